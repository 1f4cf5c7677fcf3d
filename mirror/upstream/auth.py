"""Upstream authentication: WWW-Authenticate parsing and the bearer-token flow.

An upstream answers 401 with one or more challenges (Quay may send Basic and Bearer in one
header). For Bearer we ask the challenge's realm for a token for the repository's scope —
anonymously, or with the configured credentials only when the realm is the upstream's own
origin (scheme, host and port of its url) or on a host its config lists in `realm_hosts`
(`auth.docker.io` for Docker Hub): Distribution's proxyauth rule, without its loophole of
"any host that shares the last two DNS labels" (evil.co.uk vs registry.example.co.uk).

Challenges are learned only from the upstream's own answers (client.py never passes on a
401 from a redirect target such as a CDN), and kept per repository scope: a repository's
token comes from the realm of that repository's own challenge, so one repository's answer
cannot change where another's token is fetched. A scope not challenged yet borrows the
upstream's first Bearer challenge (its realm and service; the first, not the latest).
Tokens are cached per upstream and scope until `issued_at + expires_in` (60 s when the
token server does not say), and concurrent requests for one scope share one token fetch.
Once an upstream has challenged, later requests fetch their token up front instead of
paying a 401 round trip each.
"""

from __future__ import annotations

import base64
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
from .destinations import Destinations, same_origin

# auth-param = token "=" ( token / quoted-string ), RFC 7235 section 2.1
PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
SCHEME = re.compile(r"\s*,?\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?=\s|,|$)")
DEFAULT_TOKEN_LIFETIME = 60.0
# Renew a little before the token server's deadline, so a request never carries a token
# that expires on its way.
EXPIRY_MARGIN = 5.0
# Repository scopes whose own challenge is remembered (the oldest are forgotten first).
MAX_CHALLENGES = 10_000


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


def credentials_allowed(realm: URL, upstream: cfg.Upstream) -> bool:
    """Whether the upstream's credentials may be sent to the token realm `realm`."""
    base = URL(upstream.url)
    if realm.scheme not in ("http", "https") or not realm.raw_host:
        return False
    if same_origin(realm, base):
        return True
    if base.scheme == "https" and realm.scheme != "https":
        return False  # never in clear text when the upstream itself is reached over TLS
    host = realm.raw_host.lower()
    for entry in upstream.realm_hosts:
        entry_host, port = _split_host_port(entry)
        if entry_host == host and (port or _default_port(realm.scheme)) == realm.port:
            return True
    return False


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """"auth.docker.io" -> (host, None); "127.0.0.1:5001" and "[::1]:5001" -> (host, port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = entry.partition(":")
    return host.lower(), (int(port) if port.isdigit() else None)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class Authenticator:
    """The credentials, challenges and tokens of one upstream."""

    def __init__(self, upstream: cfg.Upstream, session: aiohttp.ClientSession, memory: Memory,
                 timeout: aiohttp.ClientTimeout, destinations: Destinations):
        self.upstream = upstream
        self.session = session
        self.memory = memory
        self.timeout = timeout
        self.destinations = destinations
        self.bearer: Challenge | None = None  # the upstream's first Bearer challenge
        self.challenges: dict[str, Challenge] = {}  # scope -> its own Bearer challenge, by age
        self.basic = False
        self._flights = Flights()

    def _credentials(self) -> str | None:
        """The Basic Authorization value of the configured credentials, if any."""
        if self.upstream.username is None:
            return None
        pair = f"{self.upstream.username}:{self.upstream.secret() or ''}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def basic_header(self) -> str | None:
        """The credentials as Basic, for the upstream's own origin after a Basic challenge."""
        return self._credentials() if self.basic else None

    def challenge(self, scope: str) -> Challenge | None:
        return self.challenges.get(scope) or self.bearer

    async def header(self, scope: str) -> str | None:
        """The Authorization header to send up front, when the upstream has challenged before."""
        if self.challenge(scope) is not None:
            return f"Bearer {await self.token(scope)}"
        return self.basic_header()

    async def answer(self, challenges: list[Challenge], scope: str,
                     sent: str | None) -> str | None:
        """The Authorization header that answers the upstream's own 401, or None if none can.

        `sent` is what the refused request carried: a token is fetched anew only if the
        refused one is still the cached one, so a burst of first requests (all refused for
        carrying nothing) shares one token fetch.
        """
        for challenge in challenges:
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self.challenges.pop(scope, None)
                self.challenges[scope] = challenge
                while len(self.challenges) > MAX_CHALLENGES:  # a scope forgotten borrows again
                    del self.challenges[next(iter(self.challenges))]
                if self.bearer is None:
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
        challenge = self.challenge(scope)
        assert challenge is not None
        try:
            realm = URL(challenge.params["realm"])
        except ValueError:
            raise Unavailable(f"upstream {self.upstream.name} named an unreadable token "
                              "realm") from None
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        creds = self._credentials() if credentials_allowed(realm, self.upstream) else None
        headers = {"Authorization": creds} if creds else {}
        targets = await self.destinations.targets(realm, "named as its token realm")
        for i, target in enumerate(targets):
            if target.host:
                headers["Host"] = target.host
            try:
                # No redirects: a token service that sends us elsewhere gets no credentials
                # carried along, and nothing is followed that the policy did not check.
                async with self.session.get(target.url, params=query, headers=headers,
                                            timeout=self.timeout, allow_redirects=False,
                                            **target.request_options()) as resp:
                    if resp.status in (401, 403):
                        raise Denied(f"the token service of upstream {self.upstream.name} "
                                     f"refused {scope}: check its username and password")
                    if resp.status != 200:
                        raise Unavailable(f"the token service of upstream "
                                          f"{self.upstream.name} answered {resp.status}")
                    answer = json.loads(await resp.read())
                break
            except aiohttp.ClientConnectorError as e:
                if i + 1 < len(targets):
                    continue  # the next address of the realm's host
                raise Unavailable(f"the token service of upstream {self.upstream.name} "
                                  f"failed: {e.__class__.__name__} {e}") from e
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError,
                    RecursionError) as e:  # RecursionError: JSON nested past any sense
                raise Unavailable(f"the token service of upstream {self.upstream.name} "
                                  f"failed: {e.__class__.__name__} {e}") from e
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) \
            else None
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
