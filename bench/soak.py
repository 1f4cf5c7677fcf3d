"""Soak: pulls, pushes, deletes, `mirror gc` and eviction under a tiny budget, for a while,
then a check of every stored blob and manifest.

Everything runs on 127.0.0.1, started and stopped by this script (by PID):

- the upstream: tests.support's Distribution with bearer-token auth, behind its counting
  proxy, seeded with `--images` small and medium images (`soak/cached-N:v1`);
- the mirror: `python -m mirror serve` as a real process (tests/support/process.py) with
  `storage.max_size` = `--max-size`, far below what the clients pull, so eviction runs on
  every pass, and `storage.keep_recent` 0, so only what is being read is safe from it;
  `tag_ttl` 5 s, so tags are revalidated all the time.

Traffic, for `--seconds` (default 180):
- `--pullers` clients pull random cached images through the mirror, checking the digest
  of the manifest and of every blob;
- `--pushers` clients push new hosted images (alternately monolithic and chunked) and pull
  back random live hosted ones: a hosted image is never evicted, so every failure to pull
  one whole is a lost image;
- a deleter deletes an old hosted image now and then (after taking it out of the live
  set, so only pulls already under way may see it go);
- `mirror gc --grace 30` every `--gc-every` seconds and `mirror verify` every
  `--verify-every` seconds, each as a separate process while the server runs.

Then the traffic stops and everything is checked: `mirror verify`; every live hosted image
pulled whole; every repository in `/v2/_catalog` and `mirror ls --json`, with every tag,
re-read and each blob's digest checked; and the server restarted with `server.offline`
so that every manifest it still answers is checked against the disk alone (a manifest
whose blob eviction took is broken content, not a miss).

Prints operations by kind, errors by kind (status, code, message), the final checks, the
server log's lines by level, and the server's RSS and open fds (/proc/PID) before and
after the traffic. Exit status 0 only when no request failed (the upstream is healthy
throughout, so every failure is the mirror's) and nothing stored was lost or wrong.

Run: .venv/bin/python bench/soak.py [--seconds 180] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support below is imported from the checkout

from tests.support import images as imagelib
from tests.support.images import Image, MiB
from tests.support.process import (
    MirrorProcess,
    PullError,
    misnamed_blobs,
    pull,
    push,
    tree,
)
from tests.support.stack import Upstream


@dataclass
class Tally:
    ops: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)

    def ok(self, kind: str) -> None:
        self.ops[kind] += 1

    def error(self, kind: str, exc: BaseException) -> None:
        self.ops[kind] += 1
        if isinstance(exc, PullError):
            key = f"{kind}: {exc.status} {exc.code or '-'}"
            message = str(exc)
        elif isinstance(exc, asyncio.TimeoutError):
            key, message = f"{kind}: timeout", "no answer within 60 s"
        else:
            key, message = f"{kind}: {type(exc).__name__}", str(exc)
        self.errors[key] += 1
        self.samples.setdefault(key, message[:300])


class Soak:
    def __init__(self, args: argparse.Namespace, directory: Path):
        self.args = args
        self.directory = directory
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.cached: list[Image] = []
        self.live: list[Image] = []     # pushed, not deleted: must always pull whole
        self.gone: set[str] = set()     # digests of deleted hosted images
        self.deleted_bytes = 0          # their blobs' bytes, once the DELETE was answered
        self.stop = asyncio.Event()
        self.upstream = Upstream(directory / "upstream")
        self.server: MirrorProcess

    # -- traffic ---------------------------------------------------------------------------

    async def puller(self, session: aiohttp.ClientSession, worker: int) -> None:
        rng = random.Random(f"{self.args.seed}-pull-{worker}")
        while not self.stop.is_set():
            image = rng.choice(self.cached)
            await self.attempt("pull cached", self.check(session, image))

    async def pusher(self, session: aiohttp.ClientSession, worker: int) -> None:
        rng = random.Random(f"{self.args.seed}-push-{worker}")
        n = 0
        while not self.stop.is_set():
            n += 1
            size = rng.choice([512, 16 * 1024, 128 * 1024])
            image = imagelib.small_image(f"soak/hosted-{worker}", [f"v{n}"],
                                         f"soak-{self.args.seed}-{worker}-{n}", size=size)
            if await self.attempt("push", push(session, self.server.url, image,
                                                chunk=64 * 1024 if n % 2 else None)):
                self.live.append(image)
            for _ in range(3):
                if self.live and not self.stop.is_set():
                    image = rng.choice(self.live)
                    await self.attempt("pull hosted", self.check(session, image),
                                       expected_gone=image)

    async def deleter(self, session: aiohttp.ClientSession) -> None:
        """Deletes an older hosted image every `--delete-every` seconds, and more often
        while more than `--keep-hosted` are live, so hosted content stays bounded."""
        pending: set[asyncio.Task] = set()
        while not self.stop.is_set():
            crowded = len(self.live) > self.args.keep_hosted
            await asyncio.sleep(0.1 if crowded else self.args.delete_every)
            if len(self.live) < 10:
                continue
            image = self.live.pop(self.rng.randrange(len(self.live) // 2))  # an older one
            self.gone.add(image.digest)
            task = asyncio.ensure_future(self.delete_later(session, image))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    async def delete_later(self, session: aiohttp.ClientSession, image: Image) -> None:
        await asyncio.sleep(1.0)  # pulls of it that already started may finish
        await self.attempt("delete", self.delete(session, image))

    async def housekeeping(self, command: str, every: float, *extra: str) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), every)
                return
            except TimeoutError:
                pass
            result = await asyncio.to_thread(self.server.cli, command, *extra, timeout=120)
            if result.returncode == 0:
                self.tally.ok(command)
            else:
                # The last lines say what went wrong (a traceback's last line is the error).
                tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
                self.tally.error(command, RuntimeError(f"exit {result.returncode}: {tail}"))

    async def attempt(self, kind: str, work, expected_gone: Image | None = None) -> bool:
        try:
            await asyncio.wait_for(work, 60)
        except (TimeoutError, PullError, aiohttp.ClientError, AssertionError) as e:
            if expected_gone is not None and expected_gone.digest in self.gone:
                self.tally.ok(f"{kind} (deleted meanwhile)")
                return False
            self.tally.error(kind, e)
            return False
        self.tally.ok(kind)
        return True

    async def check(self, session: aiohttp.ClientSession, image: Image,
                    reference: str | None = None, base: str | None = None) -> None:
        pulled = await pull(session, base or self.server.url, image.name,
                            reference or image.tags[0])
        if pulled.digest != image.digest or pulled.blobs != image.blobs:
            raise AssertionError(f"{image.name}: got {pulled.digest}, expected {image.digest}"
                                 " or other blobs")

    async def delete(self, session: aiohttp.ClientSession, image: Image) -> None:
        url = f"{self.server.url}/v2/{image.name}/manifests/{image.digest}"
        async with session.delete(url) as resp:
            if resp.status != 202:
                raise PullError(resp.status, f"delete {image.name}@{image.digest}",
                                await resp.read())
        self.deleted_bytes += sum(len(b) for b in image.blobs.values())
        async with session.get(url) as resp:
            if resp.status != 404:
                raise PullError(resp.status, f"{image.name}@{image.digest} after its delete",
                                await resp.read())

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        self.upstream.start()
        started = time.monotonic()
        for i in range(args.images):
            size = [4 * 1024, 64 * 1024, 512 * 1024, 2 * MiB][i % 4]
            self.cached.append(self.upstream.push_image(f"soak/cached-{i}", "v1",
                                                        f"soak-cached-{i}", size=size))
        total = sum(len(b) for image in self.cached for b in image.blobs.values())
        print(f"upstream: {len(self.cached)} images, {total / MiB:.1f} MiB, seeded in "
              f"{time.monotonic() - started:.1f}s; budget {args.max_size / MiB:.1f} MiB")
        self.server = MirrorProcess(
            self.directory / "data", self.directory / "mirror", self.upstream.url, tag_ttl=5.0,
            # upload_ttl 30 s: the blobs of a deleted image are free to go after it, as gc's.
            settings={"storage": {"max_size": args.max_size, "keep_recent": args.keep_recent},
                      "hosted": {"upload_ttl": 30}})
        self.server.start()
        try:
            return await self.traffic_then_checks()
        finally:
            self.server.kill()
            self.upstream.stop()

    async def traffic_then_checks(self) -> int:
        args = self.args
        before = (self.server.rss(), self.server.fds())
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            tasks = [asyncio.ensure_future(self.puller(session, w)) for w in range(args.pullers)]
            tasks += [asyncio.ensure_future(self.pusher(session, w))
                      for w in range(args.pushers)]
            tasks += [asyncio.ensure_future(self.deleter(session)),
                      asyncio.ensure_future(self.housekeeping("gc", args.gc_every,
                                                              "--grace", "30")),
                      asyncio.ensure_future(self.housekeeping("verify", args.verify_every))]
            peak_rss, peak_used = before[0], 0.0
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                peak_rss = max(peak_rss, self.server.rss())
                peak_used = max(peak_used, scrape(self.server.url).get("disk_used_bytes", 0))
                crashed = [t for t in tasks if t.done() and t.exception()]
                if crashed:
                    raise crashed[0].exception()
            self.stop.set()
            await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)  # the server notices the closed client connections
        after = (self.server.rss(), self.server.fds())
        metrics = scrape(self.server.url)
        metrics["peak_disk_used_bytes"] = peak_used
        # Idle, the next eviction passes should bring the cache back under the budget.
        await asyncio.sleep(args.settle)
        settled = scrape(self.server.url)
        metrics["settled_disk_used_bytes"] = settled.get("disk_used_bytes", 0)
        metrics["settled_blobs_on_disk_bytes"] = tree(self.server.root, "blobs")[1]
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            results = await self.final_checks(session)
        self.report(before, after, peak_rss, metrics, results)
        return 0 if results["failed"] == 0 and not self.tally.errors else 1

    async def final_checks(self, session: aiohttp.ClientSession) -> dict:
        results: dict = {"failed": 0}
        server = self.server
        verify = await asyncio.to_thread(server.cli, "verify", timeout=300)
        results["verify"] = (verify.returncode, verify.stdout.strip().splitlines()[-1:]
                             or verify.stderr.strip().splitlines()[-1:])
        results["failed"] += verify.returncode != 0
        results["misnamed"] = len(misnamed_blobs(server.root))
        results["failed"] += results["misnamed"]

        lost = []
        for image in self.live:
            try:
                await self.check(session, image)
            except (PullError, aiohttp.ClientError, AssertionError) as e:
                lost.append(f"{image.name}:{image.tags[0]}: {e}")
        results["hosted"] = (len(self.live), lost)
        results["failed"] += len(lost)

        listed = await self.listed(session)
        broken = []
        for name, tag in listed:
            try:
                await pull(session, server.url, name, tag)
            except (PullError, aiohttp.ClientError) as e:
                broken.append(f"{name}:{tag}: {e}")
        results["listed"] = (len(listed), broken)
        results["failed"] += len(broken)

        # Offline: every manifest the cache still answers must have every blob on disk.
        server.stop()
        results["disk"] = {path.name: tree(server.root, path.name)
                           if path.is_dir() else (1, path.stat().st_size)
                           for path in sorted(server.root.iterdir())}
        results["log"] = log_levels(server.log_text())
        server.start(server={"offline": True})
        whole = missing = 0
        offline_broken = []
        for image in self.cached:
            try:
                await self.check(session, image)
                whole += 1
            except PullError as e:
                if e.what.startswith("manifest") and e.status in (404, 503):
                    missing += 1
                else:
                    offline_broken.append(f"{image.name}: {e}")
        results["offline"] = (whole, missing, offline_broken)
        results["failed"] += len(offline_broken)
        return results

    async def listed(self, session: aiohttp.ClientSession) -> list[tuple[str, str]]:
        """(name, tag) of everything the mirror lists: its catalog and `mirror ls --json`."""
        found: set[tuple[str, str]] = set()
        async with session.get(f"{self.server.url}/v2/_catalog?n=10000") as resp:
            names = (await resp.json()).get("repositories", []) if resp.status == 200 else []
        for name in names:
            async with session.get(f"{self.server.url}/v2/{name}/tags/list") as resp:
                if resp.status == 200:
                    found.update((name, t) for t in (await resp.json()).get("tags") or [])
        result = await asyncio.to_thread(self.server.cli, "ls", "--json")
        if result.returncode == 0:
            found.update(_ls_tags(json.loads(result.stdout)))
        return sorted(found)

    def report(self, before, after, peak_rss, metrics, results) -> None:
        tally = self.tally
        print(f"\nran {self.args.seconds:.0f}s: {sum(tally.ops.values())} operations")
        for kind, count in sorted(tally.ops.items()):
            errors = sum(n for key, n in tally.errors.items() if key.startswith(kind + ":"))
            print(f"  {kind:28} {count:7d}   errors {errors}")
        print("errors by kind:" if tally.errors else "errors by kind: none")
        for key, count in tally.errors.most_common():
            print(f"  {count:6d}  {key}\n          e.g. {tally.samples[key]}")
        print("server metrics at the end of the traffic: " + ", ".join(
            f"{k}={v:.0f}" for k, v in metrics.items() if not k.startswith("settled_")))
        print(f"disk use: budget {metrics.get('disk_budget_bytes', 0) / MiB:.1f} MiB, peak "
              f"{metrics['peak_disk_used_bytes'] / MiB:.1f} MiB during the traffic; "
              f"{self.args.settle:.0f}s after it the ledger counts "
              f"{metrics['settled_disk_used_bytes'] / MiB:.1f} MiB and blobs/ holds "
              f"{metrics['settled_blobs_on_disk_bytes'] / MiB:.1f} MiB")
        print(f"final mirror verify: exit {results['verify'][0]}: {results['verify'][1]}")
        print(f"blob files whose bytes do not match their name: {results['misnamed']}")
        live_bytes = sum(len(b) for image in self.live for b in image.blobs.values())
        print(f"hosted: {len(self.live)} images live ({live_bytes / MiB:.1f} MiB of blobs), "
              f"{self.tally.ops['delete']} deleted ({self.deleted_bytes / MiB:.1f} MiB of "
              "blobs that nothing refers to any more)")
        live, lost = results["hosted"]
        print(f"live hosted images pulled whole: {live - len(lost)}/{live}")
        for line in lost[:10]:
            print(f"  LOST {line}")
        listed, broken = results["listed"]
        print(f"listed tags re-read with every blob: {listed - len(broken)}/{listed}")
        for line in broken[:10]:
            print(f"  BROKEN {line}")
        whole, missing, offline_broken = results["offline"]
        print(f"offline restart, cached images: {whole} whole, {missing} evicted, "
              f"{len(offline_broken)} broken")
        for line in offline_broken[:10]:
            print(f"  BROKEN {line}")
        print("disk after: " + ", ".join(f"{k} {n} files {b / MiB:.1f} MiB"
                                         for k, (n, b) in results["disk"].items()))
        levels, samples = results["log"]
        print("server log: " + ", ".join(f"{n} {level}" for level, n in levels.most_common()))
        for line in samples:
            print(f"  {line[:300]}")
        print(f"server RSS before {before[0] / MiB:.1f} MiB, after {after[0] / MiB:.1f} MiB "
              f"(peak seen {peak_rss / MiB:.1f}); open fds before {before[1]}, after {after[1]}")
        traffic = sum(tally.errors.values())
        print(f"RESULT: {'PASS' if results['failed'] == 0 and traffic == 0 else 'FAIL'}: "
              f"{results['failed']} problems in the final checks, {traffic} errors during "
              "the traffic")


def _ls_tags(data) -> set[tuple[str, str]]:
    """(name, tag) and (name, digest) pairs from `mirror ls --json`: every tag it lists
    and every manifest digest a tag record names."""
    found = set()
    for repo in data.get("repositories", []):
        for tag, by_class in (repo.get("tags") or {}).items():
            found.add((repo["name"], tag))
            if isinstance(by_class, dict):
                found.update((repo["name"], d) for d in by_class.values() if isinstance(d, str))
    return found


def log_levels(text: str) -> tuple[Counter, list[str]]:
    """Lines of the server's log by level, and its tracebacks grouped by where they were
    raised (the innermost frame) and what (the exception line), most frequent first."""
    levels: Counter = Counter()
    tracebacks: Counter = Counter()
    frame = None
    in_traceback = False
    for line in text.splitlines():
        m = re.match(r"\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)
        if m:
            levels[m.group(1)] += 1
            in_traceback = False
        elif line.startswith("Traceback"):
            levels["Traceback"] += 1
            in_traceback, frame = True, None
        elif in_traceback and line.startswith("  File "):
            frame = line.strip()
        elif in_traceback and line and not line.startswith(" ") \
                and not line.startswith("During handling"):
            tracebacks[f"{line[:160]}  <- {frame}"] += 1
            in_traceback = False
    return levels, [f"{n:6d}  {what}" for what, n in tracebacks.most_common(8)]


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = ("mirror_disk_used_bytes", "mirror_disk_budget_bytes", "mirror_evictions_total",
              "mirror_evicted_bytes_total", "mirror_fills_failed_total")
    found = {}
    for name in wanted:
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
        if m:
            found[name.removeprefix("mirror_")] = float(m.group(1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--pullers", type=int, default=4)
    parser.add_argument("--pushers", type=int, default=2)
    parser.add_argument("--images", type=int, default=60, help="cached images upstream")
    parser.add_argument("--keep-recent", type=float, default=0.0,
                        help="storage.keep_recent: 0 leaves only open readers protected")
    parser.add_argument("--max-size", type=int, default=8 * MiB, help="storage.max_size, bytes")
    parser.add_argument("--gc-every", type=float, default=20.0)
    parser.add_argument("--verify-every", type=float, default=45.0)
    parser.add_argument("--delete-every", type=float, default=2.0)
    parser.add_argument("--keep-hosted", type=int, default=40,
                        help="live hosted images above which deletes speed up")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="idle seconds after the traffic before disk use is measured")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="mirror-soak-"))
    print(f"work directory: {directory}")
    try:
        return asyncio.run(Soak(args, directory).run())
    finally:
        if args.keep:
            print(f"kept {directory} (mirror log: {directory}/mirror/mirror.log)")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
