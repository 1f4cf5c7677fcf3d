"""Upstream authentication: WWW-Authenticate parsing and the bearer-token flow.

An upstream answers 401 with one or more challenges (Quay may send Basic and Bearer in one
header). For Bearer we ask the challenge's realm for a token for the repository's scope —
anonymously, or with the configured credentials when the realm lives on the upstream's own
host or domain (Distribution's proxyauth rule: credentials never go to a third party).
Tokens are cached per upstream and scope until `issued_at + expires_in` (60 s when the
token server does not say), and concurrent requests for one scope share one token fetch.
Once an upstream has challenged, later requests fetch their token up front instead of
paying a 401 round trip each.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime

import aiohttp
from yarl import URL

from .. import config as cfg
from ..cache.flights import Flights
from ..errors import Denied, Unavailable
from ..storage.memory import Memory

# auth-param = token "=" ( token / quoted-string ), RFC 7235 section 2.1
PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
SCHEME = re.compile(r"\s*,?\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?=\s|$)")
DEFAULT_TOKEN_LIFETIME = 60.0
# Renew a little before the token server's deadline, so a request never carries a token
# that expires on its way.
EXPIRY_MARGIN = 5.0


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Every challenge in every WWW-Authenticate header, in order."""
    challenges = []
    for header in headers:
        pos = 0
        while pos < len(header):
            m = SCHEME.match(header, pos)
            if not m:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while p := PARAM.match(header, pos):
                value = p.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[p.group(1).lower()] = value
                pos = p.end()
            challenges.append(Challenge(scheme, params))
    return challenges


def same_site(realm: str, upstream: str) -> bool:
    """Whether a token realm is on the upstream's host or its domain (auth.docker.io for
    registry-1.docker.io), so the upstream's credentials may be sent there."""
    a, b = URL(realm).host or "", URL(upstream).host or ""
    if a == b:
        return True
    try:
        ipaddress.ip_address(a)
        return False  # an IP address has no domain to share
    except ValueError:
        pass
    return a.split(".")[-2:] == b.split(".")[-2:] and len(b.split(".")) >= 2


class Authenticator:
    """The credentials and tokens of one upstream."""

    def __init__(self, upstream: cfg.Upstream, session: aiohttp.ClientSession, memory: Memory,
                 timeout: aiohttp.ClientTimeout):
        self.upstream = upstream
        self.session = session
        self.memory = memory
        self.timeout = timeout
        self.bearer: Challenge | None = None  # the last Bearer challenge seen
        self.basic = False
        self._flights = Flights()

    def _credentials(self) -> str | None:
        """The Basic Authorization value of the configured credentials, if any."""
        if self.upstream.username is None:
            return None
        pair = f"{self.upstream.username}:{self.upstream.secret() or ''}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    async def header(self, scope: str) -> str | None:
        """The Authorization header to send up front, when the upstream has challenged before."""
        if self.bearer is not None:
            return f"Bearer {await self.token(scope)}"
        if self.basic and (creds := self._credentials()):
            return creds
        return None

    async def answer(self, challenges: list[Challenge], scope: str,
                     sent: str | None) -> str | None:
        """The Authorization header that answers a 401's challenges, or None if none can.

        `sent` is what the refused request carried: a token is fetched anew only if the
        refused one is still the cached one, so a burst of first requests (all refused for
        carrying nothing) shares one token fetch.
        """
        for challenge in challenges:
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self.bearer = challenge
                if sent is not None and sent == f"Bearer {await self.memory.get(self._key(scope))}":
                    await self.memory.delete(self._key(scope))
                return f"Bearer {await self.token(scope)}"
        for challenge in challenges:
            if challenge.scheme == "basic" and (creds := self._credentials()):
                self.basic = True
                return creds
        return None

    def _key(self, scope: str) -> str:
        return f"token:{self.upstream.name}:{scope}"

    async def token(self, scope: str) -> str:
        token = await self.memory.get(self._key(scope))
        if token is None:
            token = await self._flights.run(scope, lambda: self._fetch(scope))
        return token

    async def _fetch(self, scope: str) -> str:
        assert self.bearer is not None
        realm = self.bearer.params["realm"]
        query = {"scope": scope}
        if "service" in self.bearer.params:
            query["service"] = self.bearer.params["service"]
        creds = self._credentials() if same_site(realm, self.upstream.url) else None
        headers = {"Authorization": creds} if creds else {}
        try:
            async with self.session.get(realm, params=query, headers=headers,
                                        timeout=self.timeout) as resp:
                if resp.status in (401, 403):
                    raise Denied(f"the token service of upstream {self.upstream.name} refused "
                                 f"{scope}: check its username and password")
                if resp.status != 200:
                    raise Unavailable(f"the token service of upstream {self.upstream.name} "
                                      f"answered {resp.status}")
                answer = json.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
            raise Unavailable(f"the token service of upstream {self.upstream.name} failed: "
                              f"{e.__class__.__name__} {e}") from e
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str):
            raise Unavailable(f"the token service of upstream {self.upstream.name} sent no token")
        if (lifetime := _lifetime(answer)) > 0:
            await self.memory.set(self._key(scope), token, ttl=lifetime)
        return token


def _lifetime(answer: dict) -> float:
    """Seconds the token stays usable: issued_at + expires_in, less a safety margin."""
    expires_in = answer.get("expires_in")
    if not isinstance(expires_in, (int, float)) or expires_in <= 0:
        expires_in = DEFAULT_TOKEN_LIFETIME
    issued = time.time()
    if isinstance(answer.get("issued_at"), str):
        try:
            issued = datetime.fromisoformat(answer["issued_at"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return issued + expires_in - time.time() - EXPIRY_MARGIN
