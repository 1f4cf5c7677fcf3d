"""A token server in the style of Docker Hub's auth.docker.io, signing JWTs Distribution trusts.

It owns the signing identity (an ECDSA P-256 key and a self-signed CA certificate written
to `cert_path` for the registry's `auth.token.rootcertbundle`), the access policy
(anonymous: pull on every repository that exists but `private/`; `reader`/`readpass`: pull
on every repository that exists; `admin`/`secret`: pull, push and delete everywhere, so it
can create repositories) and a log of every token request so tests can assert how often and
for what the mirror asked.

Like Docker Hub's auth.docker.io, it grants no action at all on a repository that does not
exist, to anyone but its owner (admin): the registry then answers 401 UNAUTHORIZED, never
404, and Docker prints "pull access denied ... repository does not exist or may require
docker login". A repository exists once the registry holds a manifest directory for it
(`repositories`, which the `Registry` this server signs for points at its storage).

`GET /token?service=&scope=` answers `{"token", "access_token", "expires_in", "issued_at"}`
like the real thing; a wrong password is a 401. `mint()` signs a token in-process, for
seeding, without HTTP and without being counted.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import BasicAuth, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .serverthread import ServerThread

USERS = {"admin": "secret", "reader": "readpass"}


# The distribution-spec name grammar: anything else names no repository (and no path).
COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")


def allowed_actions(username: str | None, type_: str, name: str, exists: bool = True) -> set[str]:
    """The policy: which actions `username` (None = anonymous) may have on a resource."""
    if type_ == "repository":
        if username == "admin":
            return {"pull", "push", "delete", "*"}
        if not exists:
            return set()  # Docker Hub: a missing repository is 401 for everyone, never 404
        if username == "reader":
            return {"pull"}
        return set() if name.startswith("private/") else {"pull"}
    if type_ == "registry" and name == "catalog" and username == "admin":
        return {"*"}
    return set()


def parse_scope(scope: str) -> tuple[str, str, list[str]]:
    """`repository:library/alpine:pull,push` -> ("repository", "library/alpine", [...]).

    The actions come off the right and the type off the left, because a repository name
    may itself hold a colon (`localhost:5000/x` as some clients send it).
    """
    rest, _, actions = scope.rpartition(":")
    type_, _, name = rest.partition(":")
    return type_, name, [a for a in actions.split(",") if a]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(self, directory: Path, *, service: str = "test-registry",
                 issuer: str = "test-token-issuer", expires_in: int = 300) -> None:
        self.service = service
        self.issuer = issuer
        # Tests of token refresh may lower this (it is read per request).
        self.expires_in = expires_in
        self.url = ""  # http://127.0.0.1:PORT once started
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._key, cert = self._make_identity()
        # x5c carries the DER certificate, standard (not url-safe) base64, per RFC 7515.
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.cert_path = Path(directory) / "token-ca.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        # The registry's repositories directory; until a Registry sets it, nothing exists.
        self.repositories: Path | None = None

    @staticmethod
    def _make_identity() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        # ES256: Distribution verifies the x5c chain against its rootcertbundle with Go's
        # x509, then the signature with libtrust, which takes ES256 (and RS256). One
        # self-signed CA certificate is both the root and the leaf: the shortest valid chain.
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))  # tolerate clock skew
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    # -- running -------------------------------------------------------------------------

    def start(self, thread: ServerThread) -> "TokenServer":
        app = web.Application()
        app.router.add_get("/token", self._handle)
        port = thread.serve(app)
        self.url = f"http://127.0.0.1:{port}"
        return self

    @property
    def realm(self) -> str:
        """The URL a registry's `WWW-Authenticate: Bearer realm=...` should point at."""
        return f"{self.url}/token"

    # -- what tests read -----------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every token request so far: {time, username, service, scopes, status} (a copy)."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- issuing -------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        """Whether the registry holds repository `name` (Distribution's filesystem layout)."""
        if self.repositories is None or not NAME.fullmatch(name):
            return False
        return (self.repositories / name / "_manifests").is_dir()

    def mint(self, username: str | None, scopes: list[str]) -> str:
        """A signed JWT granting `username` what the policy allows of `scopes`."""
        access = []
        for scope in scopes:
            type_, name, wanted = parse_scope(scope)
            allowed = allowed_actions(username, type_, name,
                                      exists=type_ != "repository" or self.exists(name))
            # Like Docker Hub, a denied scope still appears, with no actions: the registry
            # then answers 401/403 itself, which is the behaviour clients must handle.
            access.append({"type": type_, "name": name,
                           "actions": [a for a in wanted if a in allowed]})
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": username or "", "aud": self.service,
            "exp": now + self.expires_in, "nbf": now, "iat": now,
            "jti": secrets.token_hex(16), "access": access,
        }
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        # JWS wants the raw 64-byte r||s, not the DER structure cryptography returns.
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    async def _handle(self, request: web.Request) -> web.Response:
        # A scope param may repeat, and one param may hold several space-separated scopes.
        scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
        username, status = None, 200
        if "Authorization" in request.headers:
            try:
                auth = BasicAuth.decode(request.headers["Authorization"])
                username = auth.login
                if USERS.get(auth.login) != auth.password:
                    status = 401
            except ValueError:
                status = 401
        with self._lock:
            self._requests.append({"time": time.time(), "username": username,
                                   "service": request.query.get("service"),
                                   "scopes": scopes, "status": status})
        if status == 401:
            return web.json_response(
                {"details": "incorrect username or password"}, status=401,
                headers={"WWW-Authenticate": f'Basic realm="{self.realm}"'})
        token = self.mint(username, scopes)
        issued = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return web.json_response({
            "token": token, "access_token": token, "expires_in": self.expires_in,
            "issued_at": issued.replace("+00:00", "Z"),
        })
