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
    ├── BlobUploadTooLarge        413 BLOB_UPLOAD_INVALID (past hosted.max_upload_size)
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
    ├── Unavailable               503 UNAVAILABLE     (upstream down, 5xx, timeout, bad bytes)
    │   └── BodyBroken                                (a body broke off: what came is resumable)
    └── StorageError              500 UNKNOWN         (a file under the storage root failed)
        └── StorageFull           507 UNKNOWN         (its disk or quota is full)

The OCI spec has no code for a full disk; UNKNOWN (as Distribution answers) with status 507
and a message that names the disk lets `docker push` print the reason instead of "denied".

The middleware also turns every OSError into one of these, except the client's own socket
failing: once the client went away (or the headers went out) no second response can follow,
so the connection is closed and the event is one log line, not a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from aiohttp import web

from . import logs

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


class BlobUploadTooLarge(RegistryError):
    code, status = "BLOB_UPLOAD_INVALID", 413


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


class TokenRequestInvalid(RegistryError):
    """A token request the mirror's token service cannot answer (api/tokens.py)."""
    code, status = "UNSUPPORTED", 400


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
    """Render every RegistryError, every aiohttp 404/405 and every OSError as OCI error JSON."""
    try:
        return await handler(request)
    except RegistryError as e:
        return _render(request, e)
    except web.HTTPNotFound:
        return NameUnknown(f"no registry API route for {request.path}").response()
    except web.HTTPMethodNotAllowed as e:
        return Unsupported(f"{request.method} is not supported on {request.path}",
                           headers={"Allow": ",".join(sorted(e.allowed_methods))}).response()
    except web.HTTPException:
        raise
    except OSError as e:
        if _client_gone(request):
            log.info("%s %s: the client went away mid-request (%s)", request.method,
                     request.path, e.strerror or e)
            return _unsent(499)
        return _render(request, storage_error(e, _storage_root(request)))
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return _render(request, RegistryError(
            "internal error; the mirror's log has the details"), logged=e)


def _render(request: web.Request, error: RegistryError,
            logged: Exception | None = None) -> web.StreamResponse:
    """The error's response, or a closed connection when a response was already begun."""
    if logs.response_started(request):
        # The headers (and maybe some body) went out: closing the connection is the only
        # way left to say the body is incomplete; the client sees a short body.
        if logged is None:
            log.error("%s %s: %s; closing the connection mid-response", request.method,
                      request.path, error.message)
        if request.transport is not None:
            request.transport.close()
        return _unsent(error.status)
    if logged is None and error.status >= 500:
        level = logging.ERROR if isinstance(error, StorageError) else logging.WARNING
        log.log(level, "%s %s: %s", request.method, request.path, error.message)
    return error.response()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _unsent(status: int) -> web.Response:
    """A response for aiohttp's access line only: the connection is closing, so writing it
    fails quietly (aiohttp ignores a ConnectionError there) and nothing reaches the wire.
    499 is the status nginx logs for a client that closed the connection."""
    return web.Response(status=status, reason="Client Closed Request" if status == 499 else None)


# Where the storage root is, for messages about a full disk; app.py sets it. (errors is
# imported by everything, so it cannot import the config's key from keys.py.)
STORAGE_ROOT = web.AppKey("storage_root", str)


def _storage_root(request: web.Request) -> str | None:
    return request.app.get(STORAGE_ROOT)


class StorageError(RegistryError):
    """A file under the storage root could not be read or written (not the client's socket)."""

    code, status = "UNKNOWN", 500


class StorageFull(StorageError):
    """The disk (or quota) holding the storage root is full; nothing partial was kept."""

    status = 507


def storage_error(error: OSError, root: str | os.PathLike | None = None) -> StorageError:
    """The typed error for a failed file operation; its message names the file, and for a
    full disk the disk (its mount point) and the storage root."""
    name = error.filename if error.filename is not None else "a file"
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        disk = mount_point(error.filename or root or ".")
        what = "quota on the disk" if error.errno == errno.EDQUOT else "disk"
        under = f" (storage root {root})" if root is not None else ""
        return StorageFull(
            f"the {what} mounted at {disk} is full: cannot write {name}{under}; free space "
            "there or lower storage.max_size", detail={"file": str(name), "disk": disk})
    return StorageError(f"storage error on {name}: {reason}", detail={"file": str(name)})


def mount_point(path: str | os.PathLike) -> str:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return str(current)


class BodyBroken(Unavailable):
    """An upstream body broke off (cut, stall): the bytes before are good and resumable."""


class RequestInvalid(RegistryError):
    """A request the HTTP parser refused (not HTTP, malformed); UNSUPPORTED is the spec's code
    for "an invalid set of parameters"."""
    code, status = "UNSUPPORTED", 400


class HeadersTooLarge(RequestInvalid):
    status = 431  # a request line or header field past limits.max_line_size / max_field_size


class RequestTimeout(RequestInvalid):
    status = 408  # the headers did not arrive within limits.header_timeout
