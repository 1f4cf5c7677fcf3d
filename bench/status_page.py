"""Benchmark: the status page and the cache view at 500 and at 50,000 repositories (issue 16).

For each size a storage root is filled by bench/synthetic.py (S's filler: real manifests,
ledger rows, references, tag records across docker.io, ghcr.io and quay.io, the catalog,
and two hosted repositories; here with two manifests per repository and a file for every
blob, so the server's start-up reconciliation keeps every ledger row, as on a real cache),
then one `python -m mirror serve` (offline, so no upstream is ever asked) answers, one
request at a time over a kept-alive connection, `--requests` GETs of each of:

- `/`                       the status page
- `/cache`                  the cache view's first page (50 repositories)
- `/cache?last=…`           its last page (the cursor found by walking every page first)
- `/cache?q=<rare>`         a search that one repository matches
- `/cache.json`             the first page's JSON twin

and prints the median and p99 wall time of each, and the ratio of the large root's median
to the small one's. The target is under 200 ms at 50,000 repositories; a page reads only
what it shows, so the ratio should stay near 1 (a search reads every name: it grows).
Everything runs on 127.0.0.1; the roots go in a temporary directory (`--keep` keeps them).

Run: .venv/bin/python bench/status_page.py [--requests 50] [--sizes 500 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import aiohttp  # noqa: E402
import synthetic  # noqa: E402  bench/synthetic.py
from run import machine  # noqa: E402  bench/run.py

from tests.support import stop_process  # noqa: E402
from tests.support.process import toml  # noqa: E402
from tests.support.registry import free_port  # noqa: E402

PER_PAGE = 50
MANIFESTS_PER_REPOSITORY = 2
TAGS_IN_ONE = 1000  # the one big cached and hosted repository each: alike at both sizes


def fill(root: Path, repositories: int) -> synthetic.Filled:
    manifests = max(MANIFESTS_PER_REPOSITORY * repositories, 2 * synthetic.INDEX_EVERY)
    images = manifests - manifests // synthetic.INDEX_EVERY
    bases = max(images // synthetic.SHARED_BASE, 1)
    blobs = images + bases + images * (synthetic.LAYERS - 1)  # nothing unreferenced
    return synthetic.fill(root, items=manifests + blobs, manifests=manifests,
                          repositories=repositories, tags_in_one=TAGS_IN_ONE,
                          blob_files=blobs)


class Server:
    """One `mirror serve` on `root`, offline, with synthetic.py's three upstreams."""

    def __init__(self, root: Path, directory: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "mirror.toml"
        config.write_text(toml({
            "server": {"listen": f"127.0.0.1:{self.port}", "offline": True,
                       "access_log": False},
            "storage": {"root": str(root)},
            # Never dialled (offline); port 9 is discard, on loopback.
            "upstreams": [{"name": name, "url": "http://127.0.0.1:9",
                           "default": name == "docker.io"} for name in synthetic.UPSTREAMS]}))
        self.log = directory / "mirror.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", "serve", "--config", str(config)], cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT)
        self.started = self._wait()

    def _wait(self, timeout: float = 600) -> float:
        """Seconds until /healthz answers (the start reconciles the ledger with the disk)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirror exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return time.monotonic() - began
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"mirror gave no /healthz in {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc, 15)


async def last_page(http: aiohttp.ClientSession, url: str) -> tuple[str, int]:
    """The path of the listing's last page (by walking every page), and how many
    repositories there are."""
    listed: list[tuple[str, str]] = []
    path: str | None = "/cache.json?n=500"
    while path:
        async with http.get(url + path) as resp:
            assert resp.status == 200, await resp.text()
            document = await resp.json()
        listed += [(r["name"], r["kind"]) for r in document["repositories"]]
        path = document["next"]
    tail = len(listed) % PER_PAGE or PER_PAGE
    name, kind = listed[-tail - 1]
    return "/cache?" + urlencode({"last": name, "kind": kind}), len(listed)


async def measure(url: str, paths: dict[str, str], requests: int) -> dict[str, list[float]]:
    """Wall times in ms per path; the paths take turns, so drift hits each alike."""
    times: dict[str, list[float]] = {label: [] for label in paths}
    async with aiohttp.ClientSession() as http:
        for label, path in paths.items():  # one warm-up each, and a check of what it says
            async with http.get(url + path) as resp:
                body = await resp.read()
                assert resp.status == 200, (path, resp.status, body[:300])
        for _ in range(requests):
            for label, path in paths.items():
                began = time.perf_counter()
                async with http.get(url + path) as resp:
                    await resp.read()
                times[label].append((time.perf_counter() - began) * 1000)
    return times


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def run_size(work: Path, repositories: int, requests: int) -> tuple[dict, dict]:
    root = work / f"root-{repositories}"
    began = time.monotonic()
    made = fill(root, repositories)
    filled = time.monotonic() - began
    server = Server(root, work / f"run-{repositories}")
    try:
        async with aiohttp.ClientSession() as http:
            last, listed = await last_page(http, server.url)
        # synthetic.py's names: repository number n is org<n % 997>/app<n> (or library/r<n>);
        # the last one, on ghcr.io, is the only name holding app<n>.
        rare = f"app{repositories - 1}"
        paths = {"/": "/", "/cache": "/cache", "/cache (last page)": last,
                 "/cache?q=<rare>": "/cache?" + urlencode({"q": rare}),
                 "/cache.json": "/cache.json"}
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + paths["/cache?q=<rare>"]) as resp:
                assert (await resp.text()).count(f"{rare}</a>") == 1, "the rare name"
        times = await measure(server.url, paths, requests)
    finally:
        server.stop()
    facts = {"repositories": listed, "items": made.items, "manifests": made.manifests,
             "tags": made.tags, "fill_s": filled, "start_s": server.started}
    return times, facts


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 50_000],
                        metavar=("SMALL", "LARGE"))
    parser.add_argument("--keep", action="store_true", help="keep the filled roots")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    try:
        results = {size: await run_size(work, size, args.requests) for size in args.sizes}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"roots kept in {work}")
    small, large = args.sizes
    print(f"\nmachine: {machine()}; {args.requests} sequential GETs per path, one connection")
    for size, (_, facts) in results.items():
        print(f"- {size:,}: {facts['repositories']:,} repositories listed, "
              f"{facts['items']:,} ledger items, {facts['manifests']:,} manifests, "
              f"{facts['tags']:,} tags; filled in {facts['fill_s']:.0f} s, "
              f"server up in {facts['start_s']:.1f} s")
    print(f"\n| path | median @ {small:,} (ms) | p99 @ {small:,} | median @ {large:,} (ms) | "
          f"p99 @ {large:,} | ratio (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    small_times, large_times = results[small][0], results[large][0]
    for (label, a), b in zip(small_times.items(), large_times.values(), strict=True):
        print(f"| `{label}` | {statistics.median(a):.1f} | {p99(a):.1f} | "
              f"{statistics.median(b):.1f} | {p99(b):.1f} | "
              f"{statistics.median(b) / statistics.median(a):.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
