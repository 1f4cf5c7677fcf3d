"""Headless Chromium for tests: render a page the way a browser does and hand back its DOM.

    from tests.support import chromium

    html = await chromium.dump_dom(url, tmp_path)                  # the DOM after scripts ran
    html = await chromium.dump_dom(url, tmp_path, login=("alice", "s3cret"))  # Basic auth
    await chromium.screenshot(url, tmp_path / "page.png", tmp_path, size=(1200, 900))
    path = chromium.binary()    # /usr/bin/chromium, or missing(): skip, or fail under CI=true

Each call starts one Chromium with a fresh profile under `workdir` (pass the test's
`tmp_path`), waits for it and returns; nothing outlives the call (the process is killed by
its PID on timeout). The flags keep Chromium off the network: no QUIC, no background
requests, no component updates, no sync. `--virtual-time-budget` lets the page's scripts run
(and its timers fire) before the DOM is dumped.

Logins: Chromium takes `user:password@` in a top-level URL (verified with Chromium 156:
it sends the first request bare, gets the 401 challenge, and retries with `Authorization:
Basic ...`); it percent-decodes them, so both are percent-encoded here. A 401 that is not
answered dumps an empty DOM: check a 401 with an HTTP client, not with this helper.

Debian's package is `chromium`; scripts/test.sh installs it when it is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from . import missing

TIMEOUT = 90.0  # a cold Chromium start on a busy 2-core machine takes a few seconds

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio",
)


class ChromiumFailed(Exception):
    """Chromium exited non-zero or did not finish in time; carries its output."""


def binary() -> str:
    """The Chromium executable; a test without it is skipped (failed under CI=true)."""
    path = shutil.which("chromium")
    if path is None:
        missing("Debian's chromium is not installed (scripts/test.sh installs it)")
    return path


def with_login(url: str, login: tuple[str, str] | None) -> str:
    """`url` with `user:password@` in its authority, both percent-encoded."""
    if login is None:
        return url
    parts = urlsplit(url)
    user, password = (quote(part, safe="") for part in login)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


async def dump_dom(url: str, workdir: Path, *, login: tuple[str, str] | None = None,
                   budget_ms: int = 2000, timeout: float = TIMEOUT) -> str:
    """The serialised DOM of `url` after its scripts ran for `budget_ms` of virtual time."""
    out = await _run(workdir, timeout, f"--virtual-time-budget={budget_ms}", "--dump-dom",
                     with_login(url, login))
    return out.decode("utf-8", errors="replace")


async def screenshot(url: str, dest: Path, workdir: Path, *, size: tuple[int, int],
                     login: tuple[str, str] | None = None, timeout: float = TIMEOUT) -> None:
    """A PNG of `url` at `size` (width, height) written to `dest`."""
    await _run(workdir, timeout, f"--screenshot={dest}", f"--window-size={size[0]},{size[1]}",
               with_login(url, login))
    if not dest.exists():
        raise ChromiumFailed(f"chromium wrote no screenshot to {dest}")


async def _run(workdir: Path, timeout: float, *args: str) -> bytes:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir)
    proc = await asyncio.create_subprocess_exec(
        binary(), *FLAGS, f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)  # its own group: a timeout ends its renderers with it
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, by its leader
        await proc.wait()
        raise ChromiumFailed(f"chromium did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise ChromiumFailed(f"chromium exited {proc.returncode}: "
                             f"{err.decode(errors='replace')[-2000:]}")
    return out
