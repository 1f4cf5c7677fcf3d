"""The scanner gate (`policy.scan_webhook`): a manifest digest is served only once a scanner
the company runs has allowed it.

Before a manifest digest is served for the first time — by GET or HEAD, from the cache or
fresh from an upstream, pulled or pushed — the mirror POSTs what it is about to serve to the
webhook and waits up to `scan_timeout` for its verdict:

    request   {"name": "library/alpine", "digest": "sha256:...", "media_type": "...",
               "upstream": "docker.io" | "hosted", "reference": "3.19" | "sha256:..."}
    response  {"allow": true | false, "reason": "..."}   (2xx, JSON; reason optional)

Verdicts are kept by digest (a bounded LRU, in memory): an allowed digest stays allowed, a
denied one stays denied, and one webhook call serves every request for a digest, however
many arrive while it runs (`cache/flights.py`). A scan that outlasts `scan_timeout` goes on
in the background while the client gets 503 UNAVAILABLE with `Retry-After`; its verdict is
kept for the client's retry. A failed scan (unreachable, non-2xx, an answer that is not
the JSON above) is kept for nothing: it is 503 under `scan_fail_closed`, served otherwise,
logged and counted either way, and the next request asks again. Every manifest digest is
judged on its own — an index and each child a client pulls through it — because scanners
judge images (the children), and an index's digest says nothing about what they hold.
docs/trust.md ("Scanner gate") is the user's version of this paragraph.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import unicodedata
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import aiohttp

from ..cache.flights import Flights
from ..config import ConfigError
from ..errors import Denied, Unavailable
from .rules import HOSTED, RECENT, Denial, Glob, _glob

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import Policy
    from ..metrics import Metrics

log = logging.getLogger("mirror")

KNOWN_VERDICTS = 100_000  # digests whose verdict is remembered (~200 bytes each)
RETRY_AFTER = 10          # seconds a client is told to wait while a scan runs or failed
# One scan's wall-clock bound, however long clients wait: a scanner that never answers must
# not keep a digest "pending" for ever (Trivy on a large image takes a few minutes).
SCAN_LIMIT = 600.0
CONNECT_LIMIT = 10.0      # an unreachable scanner fails fast, not after SCAN_LIMIT
ANSWER_LIMIT = 64 * 1024  # bytes of the webhook's answer read; a verdict is a few dozen
REASON_LIMIT = 200        # characters of the scanner's reason shown to clients
VERDICTS = ("allowed", "denied", "error", "pending")  # the metric's `verdict` label


class ScanFailed(Exception):
    """The webhook gave no verdict: unreachable, timed out, non-2xx, or not the JSON format."""


@dataclass(frozen=True)
class Verdict:
    allow: bool | None  # None: the scan failed (the reason says how)
    reason: str


@dataclass(frozen=True)
class Subject:
    """What the webhook is asked about (its request body)."""

    upstream: str  # an upstream's name, or "hosted"
    name: str
    reference: str
    digest: str
    media_type: str

    def shown(self) -> str:
        where = self.name if self.upstream == HOSTED else f"{self.upstream}/{self.name}"
        return f"{where}@{self.digest}"


def repository_globs(texts: tuple[str, ...], where: str) -> tuple[Glob, ...]:
    """`scan_repositories` compiled, in pull rules' glob syntax (trust/rules.py). Repository
    globs only: verdicts are kept by digest, which a tag glob cannot see."""
    globs = []
    for i, text in enumerate(texts):
        if ":" in text:
            raise ConfigError(f"{where}[{i}]: {text!r}: the scanner judges manifests by digest, "
                              f"so only repository globs apply; write {text.split(':')[0]!r}")
        globs.append(_glob(text, f"{where}[{i}]", set(), library=False))
    return tuple(globs)


def clean_reason(reason: object) -> str:
    """The scanner's reason as clients, logs and the status page may show it: no control or
    line-separator characters (no forged log lines), whitespace folded, at most
    REASON_LIMIT characters."""
    text = reason if isinstance(reason, str) else ""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
                   for c in text[:REASON_LIMIT * 4])
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > REASON_LIMIT:
        text = text[:REASON_LIMIT - 1].rstrip() + "…"
    return text or "no reason given"


class Scanner:
    """The gate of one running mirror: its webhook session, verdicts, counts, last denials."""

    def __init__(self, policy: Policy, metrics: Metrics | None = None):
        self.webhook = policy.scan_webhook
        self.timeout = policy.scan_timeout
        self.fail_closed = policy.scan_fail_closed
        self.repositories = repository_globs(policy.scan_repositories,
                                             "policy.scan_repositories")
        self.verdicts: OrderedDict[str, Verdict] = OrderedDict()
        self.recent: deque[Denial] = deque(maxlen=RECENT)
        self.waiting = 0  # client requests waiting for a scan now (the status page's)
        self._flights = Flights()
        self._scans: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._counts = {}
        if metrics is not None and self.active:  # bound from zero: rate() sees the first
            self._counts = {v: metrics.scan_verdicts.labels(v) for v in VERDICTS}

    @property
    def active(self) -> bool:
        return self.webhook is not None

    @property
    def running(self) -> int:
        """Scans waiting for the webhook now."""
        return len(self._flights)

    def covers(self, name: str) -> bool:
        return not self.repositories or any(g.allows(name, None) for g in self.repositories)

    async def session(self, app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup context: the webhook's own client session, closed with the app
        after every scan still running is stopped."""
        if self.active:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SCAN_LIMIT, sock_connect=CONNECT_LIMIT),
                connector=aiohttp.TCPConnector(limit=16),
                cookie_jar=aiohttp.DummyCookieJar())
        yield
        for task in list(self._scans):
            task.cancel()
        await asyncio.gather(*self._scans, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def check(self, upstream: str, name: str, reference: str, digest: str,
                    media_type: str, client: str | None) -> None:
        """Return when `digest` may be served; raise Denied (403) or Unavailable (503)."""
        if self.webhook is None or not self.covers(name):
            return
        verdict = self.verdicts.get(digest)
        if verdict is not None:
            self.verdicts.move_to_end(digest)
        else:
            subject = Subject(upstream, name, reference, digest, media_type)
            # Not wait_for: the scan must start even with scan_timeout = 0, and a client
            # that stops waiting leaves it running for the others and for its own retry.
            waiter = asyncio.ensure_future(self._flights.run(digest,
                                                             lambda: self._scan(subject)))
            self.waiting += 1
            try:
                done, _ = await asyncio.wait({waiter}, timeout=self.timeout)
            finally:
                self.waiting -= 1
            if not done:
                self._count("pending")
                raise Unavailable(
                    f"the scanner has not judged {subject.shown()} yet (it is being scanned); "
                    f"retry in {RETRY_AFTER} s", detail={"name": name, "digest": digest},
                    headers={"Retry-After": str(RETRY_AFTER)})
            verdict = waiter.result()
        if verdict.allow:
            self._count("allowed")
            return
        shown = Subject(upstream, name, reference, digest, media_type).shown()
        if verdict.allow is None:
            self._count("error")
            if not self.fail_closed:
                return  # served; _scan logged the failure
            raise Unavailable(
                f"the scanner could not judge {shown} ({verdict.reason}), and unjudged images "
                f"are not served (policy.scan_fail_closed); retry in {RETRY_AFTER} s",
                detail={"name": name, "digest": digest},
                headers={"Retry-After": str(RETRY_AFTER)})
        self._count("denied")
        self.recent.appendleft(Denial(time.time(), client or "-", shown,
                                      f"scanner: {verdict.reason}"))
        log.info("denied %s to %s: the scanner says %s", shown, client or "-", verdict.reason)
        raise Denied(f"the scanner denied {shown}: {verdict.reason}",
                     detail={"name": name, "digest": digest, "reason": verdict.reason})

    async def _scan(self, subject: Subject) -> Verdict:
        """One webhook call; its verdict is kept even when no client waits for it any more.
        Never raises (but when the app stops): a failure is a Verdict with allow None."""
        task = asyncio.current_task()
        if task is not None:
            self._scans.add(task)
        try:
            verdict = await self._ask(subject)
        except ScanFailed as e:
            log.warning("scanner webhook failed for %s: %s; %s", subject.shown(), e,
                        "not served (policy.scan_fail_closed)" if self.fail_closed
                        else "served unscanned (policy.scan_fail_closed = false)")
            return Verdict(None, str(e))
        finally:
            if task is not None:
                self._scans.discard(task)
        if len(self.verdicts) >= KNOWN_VERDICTS:
            self.verdicts.popitem(last=False)
        self.verdicts[subject.digest] = verdict
        log.info("scanner %s %s%s", "allowed" if verdict.allow else "denied", subject.shown(),
                 "" if verdict.allow else f": {verdict.reason}")
        return verdict

    async def _ask(self, subject: Subject) -> Verdict:
        if self._session is None:
            raise ScanFailed("the mirror is not running")
        body = {"name": subject.name, "digest": subject.digest,
                "media_type": subject.media_type, "upstream": subject.upstream,
                "reference": subject.reference}
        try:
            async with self._session.post(self.webhook, json=body,
                                          allow_redirects=False) as response:
                status = response.status
                answer = b""
                while len(answer) < ANSWER_LIMIT:  # read() returns what has arrived so far
                    chunk = await response.content.read(ANSWER_LIMIT - len(answer))
                    if not chunk:
                        break
                    answer += chunk
        except asyncio.TimeoutError:
            raise ScanFailed(f"no answer within {SCAN_LIMIT:.0f} s") from None
        except aiohttp.ClientError as e:
            raise ScanFailed(f"webhook unreachable: {clean_reason(str(e))}") from None
        if not 200 <= status < 300:
            raise ScanFailed(f"webhook answered HTTP {status}")
        try:
            document = json.loads(answer)
        except ValueError:
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("allow"), bool):
            raise ScanFailed('webhook answer is not JSON {"allow": true|false, "reason": ...}')
        return Verdict(document["allow"], clean_reason(document.get("reason")))

    def _count(self, verdict: str) -> None:
        series = self._counts.get(verdict)
        if series is not None:
            series.inc()
