"""Benchmark: manifest GET by tag, unloaded and while slow layers saturate the upstream blob limit.

Issue 9's target: manifest p99 stays under 20 ms while the upstream blob limit is saturated
by slow layers, reported as a ratio to the unloaded figure. Everything runs on 127.0.0.1:

- the upstream: tests.support's Distribution with bearer-token auth, behind its fault proxy
  (so layer bodies can be throttled), seeded with `bench/small` (the manifest asked for) and
  `bench/slow` (`--layers` + `--queued` layers of `--layer-mib` each);
- the mirror as a process (`python -m mirror serve`), from this tree or from `--source DIR`
  (e.g. an older commit unpacked with `git archive`), with `limits.upstream_bodies` set to
  `--layers` so that many slow layers exactly fill the blob limit, and two upstreams on the
  same registry: `docker.io` with `tag_ttl = 0` (every GET by tag is revalidated upstream
  with a HEAD: it needs an upstream request slot) and `quay.io` under the prefix `cached`
  with the default `tag_ttl` (GETs by tag answered from the tag record: the event loop's
  own responsiveness);
- wrk with `--connections` (16 by default, bench/run.py's `wrk_get`) for `--seconds` per
  run; 16 keep two cores busy, so their latency is mostly queueing; 1 measures what one
  request waits while the layers stream.

"Loaded" means: `--layers` curl clients each pulling one slow layer (the fault proxy sends
each body at `--rate-kib` KiB/s, so they last the whole run) plus `--queued` more that
wait for a body permit, retried as they fail. The run checks that every slow body is still
streaming at the end of the loaded phase, and counts the upstream HEADs the revalidated
GETs caused, so the figures are what they claim to be.

Run: .venv/bin/python bench/starvation.py [--seconds 5] [--rounds 3] [--source DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import machine, wrk_get  # bench/run.py: the same wrk settings

from tests.support import images, stop_process
from tests.support.registry import free_port
from tests.support.stack import Upstream

MiB, KiB = 1 << 20, 1 << 10
SMALL, SLOW = "bench/small", "bench/slow"
TARGET_P99_MS = 20.0


def seed(upstream: Upstream, layers: int, layer_mib: int) -> tuple[images.Image, images.Image]:
    small = images.build_image(SMALL, ["latest"], [
        {f"layer{i}.bin": images.random_bytes(64 * KiB, f"small/{i}")} for i in range(3)])
    slow = images.build_image(SLOW, ["latest"], [
        {"data.bin": images.random_bytes(layer_mib * MiB, f"slow/{i}")} for i in range(layers)])
    for image in (small, slow):
        images.push(upstream.registry, upstream.tokens, image)
    return small, slow


class Mirror:
    """The mirror as its own process, run from `source` (this tree by default)."""

    def __init__(self, work: Path, source: Path, upstream_url: str, bodies: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "mirror.log"
        config = work / "mirror.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n\n'
            f'[storage]\nroot = "{work / "storage"}"\n\n'
            f"[limits]\nupstream_bodies = {bodies}\n\n"
            f'[[upstreams]]\nname = "docker.io"\nurl = "{upstream_url}"\ndefault = true\n'
            f'tag_ttl = "0s"\n\n'
            f'[[upstreams]]\nname = "quay.io"\nurl = "{upstream_url}"\naliases = ["cached"]\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        env["PYTHONPATH"] = str(source)
        with open(self.log, "ab") as out:
            # cwd=source: `python -m` puts the working directory first on sys.path.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=source)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"{self.url}/v2/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the mirror did not start; {self.log}:\n"
                           + self.log.read_text()[-2000:])

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


def manifest_digest(url: str, timeout: float = 30) -> str:
    req = urllib.request.Request(url, headers={"Accept": images.DOCKER_MANIFEST})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return "sha256:" + hashlib.sha256(resp.read()).hexdigest()


def check(url: str, digest: str) -> str:
    """One GET by a plain client: "right digest", or what went wrong."""
    try:
        got = manifest_digest(url, timeout=15)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except OSError as e:  # a timeout: the request is stuck behind the layers
        return f"no answer ({e.__class__.__name__})"
    return "right digest" if got == digest else f"wrong digest {got}"


class SlowPulls:
    """curl clients pulling the slow layers; the queued ones retry as they fail (503)."""

    def __init__(self, mirror: Mirror, slow: images.Image) -> None:
        self.urls = [f"{mirror.url}/v2/{SLOW}/blobs/{d}" for d in slow.layer_digests]
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for url in self.urls:
            # --retry-all-errors: a queued request answered 503 (slot_timeout) asks again.
            self.procs.append(subprocess.Popen(
                ["curl", "-sS", "-o", "/dev/null", "--retry", "1000", "--retry-delay", "0",
                 "--retry-all-errors", "--max-time", "3600", url],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, grace=2)


def bodies_streaming(upstream: Upstream, slow: images.Image) -> list[tuple[str, int]]:
    """(digest, bytes sent so far) of each slow body the upstream is sending right now."""
    sizes = {d: len(slow.blobs[d]) for d in slow.layer_digests}
    found = []
    for r in upstream.proxy.records:
        digest = r.path.rpartition("/")[2]
        if r.method == "GET" and r.status == 200 and digest in sizes and r.sent < sizes[digest]:
            found.append((digest, r.sent))
    return found


def upstream_heads(upstream: Upstream) -> int:
    return sum(1 for r in upstream.proxy.records
               if r.method == "HEAD" and f"/v2/{SMALL}/manifests/latest" in r.path)


def measure(url: str, seconds: int, rounds: int, connections: int) -> dict[str, float]:
    runs = [wrk_get(url, seconds, connections) for _ in range(rounds)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {
        "p99_worst": max(r["p99"] for r in runs), "errors": sum(r["errors"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="wrk runs per figure (median)")
    ap.add_argument("--connections", type=int, default=16,
                    help="wrk connections: 16 saturates two cores (latency is then queueing); "
                         "1 measures one request's latency under the background load")
    ap.add_argument("--layers", type=int, default=16,
                    help="slow layers streaming = limits.upstream_bodies (default 16, also "
                         "the default per-upstream request slots)")
    ap.add_argument("--queued", type=int, default=4, help="more slow layers, waiting")
    ap.add_argument("--layer-mib", type=int, default=8)
    ap.add_argument("--rate-kib", type=int, default=32, help="each slow body's KiB/s")
    ap.add_argument("--source", type=Path, default=REPO,
                    help="the tree to run the mirror from (default: this one)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk (bench/run.sh installs it)")

    work = Path(tempfile.mkdtemp(prefix="mirror-starvation-"))
    upstream = Upstream(work / "upstream")
    mirror: Mirror | None = None
    pulls: SlowPulls | None = None
    try:
        print(f"work dir {work}; mirror from {args.source}", flush=True)
        upstream.start()
        small, slow = seed(upstream, args.layers + args.queued, args.layer_mib)
        mirror = Mirror(work, args.source.resolve(), upstream.url, args.layers)
        revalidated = f"{mirror.url}/v2/{SMALL}/manifests/latest"
        cached = f"{mirror.url}/v2/cached/{SMALL}/manifests/latest"
        for url in (revalidated, cached):
            got = manifest_digest(url)
            assert got == small.digest, f"{url} answered {got}, not {small.digest}"

        results: dict[tuple[str, str], dict[str, float]] = {}
        heads: dict[str, int] = {}
        print("unloaded", flush=True)
        for name, url in (("revalidated", revalidated), ("cached", cached)):
            before = upstream_heads(upstream)
            results[name, "unloaded"] = measure(url, args.seconds, args.rounds, args.connections)
            heads[f"{name} unloaded"] = upstream_heads(upstream) - before

        upstream.proxy.throttle(args.rate_kib * KiB, match=f"/v2/{SLOW}/blobs/")
        pulls = SlowPulls(mirror, slow)
        pulls.start()
        deadline = time.monotonic() + 60
        while len(bodies_streaming(upstream, slow)) < args.layers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(bodies_streaming(upstream, slow))} of "
                                   f"{args.layers} slow bodies started")
            time.sleep(0.1)
        time.sleep(1)
        start_streams = len(bodies_streaming(upstream, slow))
        print(f"loaded: {start_streams} slow bodies streaming, {args.queued} more waiting",
              flush=True)
        for name, url in (("revalidated", revalidated), ("cached", cached)):
            before = upstream_heads(upstream)
            results[name, "loaded"] = measure(url, args.seconds, args.rounds, args.connections)
            heads[f"{name} loaded"] = upstream_heads(upstream) - before
        end_streams = bodies_streaming(upstream, slow)
        after = {name: check(url, small.digest)
                 for name, url in (("revalidated", revalidated), ("cached", cached))}

        print(f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {machine()}\n")
        print(f"`bench/starvation.py`: mirror from `{args.source}`; {args.layers} slow layers "
              f"of {args.layer_mib} MiB at {args.rate_kib} KiB/s each "
              f"(limits.upstream_bodies = {args.layers}) plus {args.queued} waiting; wrk "
              f"-c{args.connections} -t{min(2, args.connections)}, {args.rounds} x "
              f"{args.seconds}s per figure (median; p99 also worst).\n")
        print("| manifest GET by tag | unloaded req/s | unloaded p50 / p99 (ms) | loaded req/s "
              "| loaded p50 / p99 (ms), worst p99 | loaded / unloaded p99 | errors (loaded) "
              "| upstream HEADs (loaded) | p99 < 20 ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in ("revalidated", "cached"):
            u, l = results[name, "unloaded"], results[name, "loaded"]
            ratio = l["p99"] / u["p99"] if u["p99"] else float("nan")
            ok = l["rps"] > 0 and l["p99"] < TARGET_P99_MS and l["errors"] == 0
            label = ("tag_ttl 0: revalidated upstream" if name == "revalidated"
                     else "within tag_ttl: from the tag record")
            loaded = (f"{l['p50']:.2f} / {l['p99']:.2f}, {l['p99_worst']:.2f}" if l["rps"]
                      else "no answers")
            print(f"| {label} | {u['rps']:,.0f} | {u['p50']:.2f} / {u['p99']:.2f} "
                  f"| {l['rps']:,.0f} | {loaded} "
                  f"| {f'{ratio:.2f}x' if l['rps'] else '—'} | {l['errors']:.0f} "
                  f"| {heads[f'{name} loaded']} | {'PASS' if ok else 'FAIL'} |")
        print(f"\nSlow bodies streaming: {start_streams} when the loaded runs began, "
              f"{len(end_streams)} when they ended (the limit stayed saturated: "
              f"{'yes' if len(end_streams) >= args.layers else 'NO'}). One more GET each, "
              f"still loaded: {after}. Upstream HEADs unloaded: "
              f"{heads['revalidated unloaded']} (revalidated), {heads['cached unloaded']} (cached).")
    finally:
        if pulls is not None:
            pulls.stop()
        if mirror is not None:
            mirror.stop()
        upstream.stop()
        for big in (work / "upstream" / "registry" / "storage", work / "storage"):
            shutil.rmtree(big, ignore_errors=True)
        print(f"logs in {work}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
