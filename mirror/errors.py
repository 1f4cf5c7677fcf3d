"""The RegistryError family, and the one middleware that renders any of them as OCI error JSON.

Each error carries its OCI code and HTTP status (as Distribution's errcode package does),
so handlers and policy code *raise* and never build an error response by hand:

    RegistryError                 500 UNKNOWN
    ├── NameInvalid               400 NAME_INVALID
    ├── DigestInvalid             400 DIGEST_INVALID
    ├── SizeInvalid               400 SIZE_INVALID
    ├── ManifestInvalid           400 MANIFEST_INVALID
    │   └── ManifestTooLarge      413
    ├── ManifestBlobUnknown       400 MANIFEST_BLOB_UNKNOWN
    ├── BlobUploadInvalid         400 BLOB_UPLOAD_INVALID
    │   └── UploadOutOfOrder      416 (a chunk that does not start where the upload ends)
    ├── PaginationInvalid         400 PAGINATION_NUMBER_INVALID
    ├── RangeInvalid              416 RANGE_INVALID   (Range header that cannot be served)
    ├── NameUnknown               404 NAME_UNKNOWN
    ├── ManifestUnknown           404 MANIFEST_UNKNOWN
    ├── BlobUnknown               404 BLOB_UNKNOWN
    ├── BlobUploadUnknown         404 BLOB_UPLOAD_UNKNOWN
    ├── Unsupported               405 UNSUPPORTED
    ├── Unauthorized              401 UNAUTHORIZED    (with a Basic challenge)
    ├── Denied                    403 DENIED
    ├── TooManyRequests           429 TOOMANYREQUESTS (keeps the upstream's Retry-After)
    └── Unavailable               503 UNAVAILABLE     (upstream down, 5xx, timeout, bad bytes)
        └── BodyBroken                                (a body broke off: what came is resumable)
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

log = logging.getLogger("mirror")


class RegistryError(Exception):
    code, status = "UNKNOWN", 500

    def __init__(self, message: str, detail: object = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.headers},
        )


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(RegistryError):
    code, status = "MANIFEST_INVALID", 400


class SizeInvalid(RegistryError):
    code, status = "SIZE_INVALID", 400


class ManifestTooLarge(ManifestInvalid):
    status = 413


class ManifestBlobUnknown(RegistryError):
    code, status = "MANIFEST_BLOB_UNKNOWN", 400


class BlobUploadInvalid(RegistryError):
    code, status = "BLOB_UPLOAD_INVALID", 400


class UploadOutOfOrder(BlobUploadInvalid):
    status = 416


class BlobUploadUnknown(RegistryError):
    code, status = "BLOB_UPLOAD_UNKNOWN", 404


class Unauthorized(RegistryError):
    code, status = "UNAUTHORIZED", 401


class PaginationInvalid(RegistryError):
    code, status = "PAGINATION_NUMBER_INVALID", 400


class RangeInvalid(RegistryError):
    code, status = "RANGE_INVALID", 416


class NameUnknown(RegistryError):
    code, status = "NAME_UNKNOWN", 404


class ManifestUnknown(RegistryError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(RegistryError):
    code, status = "BLOB_UNKNOWN", 404


class Unsupported(RegistryError):
    code, status = "UNSUPPORTED", 405


class Denied(RegistryError):
    code, status = "DENIED", 403


class TooManyRequests(RegistryError):
    code, status = "TOOMANYREQUESTS", 429


class Unavailable(RegistryError):
    code, status = "UNAVAILABLE", 503


@web.middleware
async def middleware(request: web.Request, handler):
    """Render every RegistryError, and every aiohttp 404/405, as OCI error JSON."""
    try:
        return await handler(request)
    except RegistryError as e:
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, e.message)
        return e.response()
    except web.HTTPNotFound:
        return NameUnknown(f"no registry API route for {request.path}").response()
    except web.HTTPMethodNotAllowed as e:
        return Unsupported(f"{request.method} is not supported on {request.path}",
                           headers={"Allow": ",".join(sorted(e.allowed_methods))}).response()
    except web.HTTPException:
        raise
    except OSError:
        raise  # a socket or file failing mid-response: no second response can follow
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return RegistryError("internal error; the mirror's log has the details").response()


class BodyBroken(Unavailable):
    """An upstream body broke off (cut, stall): the bytes before are good and resumable."""
