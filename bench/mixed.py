"""Benchmark: manifest GET by tag, unloaded and while many cold layers stream (issue 13).

Issue 13's mixed-load row: while 32 cold layer streams run, manifest GET by tag keeps
p99 < 10 ms and at least 0.8x its unloaded req/s, because the event loop must never be the
bottleneck for small requests. Everything runs on 127.0.0.1, started and stopped by PID:

- the upstream: tests.support's Distribution with bearer-token auth, seeded with bench/run.py's
  small image (the manifest asked for) and `--streams` distinct random layers of
  `--layer-mib` under `bench/cold`; the mirror fetches from the registry directly, not
  through the tests' Python fault proxy, which is slower than the registry it fronts;
- the mirror as a process (bench/starvation.py's `Mirror`, from this tree or `--source DIR`;
  given twice or more, the trees take turns each round, on the same seeded upstream, and
  get a table each), on an empty storage root each round, with `limits.upstream_bodies`
  >= `--streams`. Every URL goes through its `cached` prefix (the default `tag_ttl`), so a
  GET by tag is answered from the tag record: what is timed is the mirror's own
  responsiveness.

Each round: warm the tag with one GET (its digest checked); wrk -t2 -c16 for `--seconds`
(bench/run.py's `wrk_get`: --latency, schema2 Accept) unloaded; then `--streams` curl
clients, one per cold layer, to /dev/null; once every one has body bytes, the same wrk run
again. Each stream's progress is its curl's `wchar` in /proc/PID/io (the bytes it wrote to
/dev/null), read as wrk starts and as it ends: the loaded figure counts only if every
stream was mid-body at both points, and the streams' MiB/s is taken over that window.
Afterwards every stream must have received its whole layer (status 200, exact size).

`--profile` adds one more round with `py-spy record --threads --idle` attached to the
mirror for the loaded window only (`--native` too with `--profile-native`, which stops the
process far longer per sample); its figures are shown apart, since py-spy pauses the
process for each sample, and the report says where the event loop's thread spent it.

Run: .venv/bin/python bench/mixed.py [--rounds 3] [--layer-mib 192] [--streams 32]
     [--seconds 5] [--source DIR [--source DIR2]] [--profile [--profile-native]]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from profile_cold import (  # noqa: E402  bench/profile_cold.py: py-spy and its classifier
    PySpy,
    classify,
    cpu_by_thread,
    frame_name,
    own_frame,
    process_cpu,
    thread_cpu,
    trunk,
)
from run import SMALL, Transfer, UpstreamLog, alternate, curl, machine, wrk_get  # noqa: E402
from run import seed as seed_small  # noqa: E402
from starvation import Mirror, manifest_digest  # noqa: E402

from tests.support import images, stop_process  # noqa: E402
from tests.support.stack import Upstream  # noqa: E402

MiB = 1 << 20
COLD, PREFIX = "bench/cold", "cached"
TARGET_P99_MS, TARGET_RATIO = 10.0, 0.8


def seed_cold(upstream: Upstream, streams: int, layer_mib: int) -> list[tuple[str, int]]:
    """(digest, size) of `streams` one-layer images under COLD, tags l0, l1, ...

    Built and pushed one at a time (two at once), so only two layers are ever in memory.
    """
    def one(i: int) -> tuple[str, int]:
        payload = images.random_bytes(layer_mib * MiB, f"mixed/{i}")
        image = images.build_image(COLD, [f"l{i}"], [{"data.bin": payload}])
        images.push(upstream.registry, upstream.tokens, image)
        digest = image.layer_digests[0]
        return digest, len(image.blobs[digest])

    with ThreadPoolExecutor(2) as pool:  # gzip and the upload release the GIL
        return list(pool.map(one, range(streams)))


class ColdStreams:
    """One curl per cold layer, to /dev/null; progress is what each wrote there so far."""

    def __init__(self, base: str, layers: list[tuple[str, int]]) -> None:
        self.urls = [f"{base}/v2/{PREFIX}/{COLD}/blobs/{digest}" for digest, _ in layers]
        self.sizes = [size for _, size in layers]
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        self.started = time.monotonic()
        self.procs = [subprocess.Popen(curl(3600, url), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True) for url in self.urls]

    def received(self) -> list[int | None]:
        """Body bytes each stream has so far; None once its curl has exited."""
        got: list[int | None] = []
        for proc in self.procs:
            try:
                io = Path(f"/proc/{proc.pid}/io").read_text() if proc.poll() is None else ""
            except OSError:
                io = ""
            m = re.search(r"^wchar: (\d+)$", io, re.M)
            got.append(int(m.group(1)) if m else None)
        return got

    def wait_flowing(self, timeout: float = 120) -> float:
        """Seconds until every stream had body bytes, or one had already ended (the window
        check then fails: the layers are too small for the streams to overlap)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if None in got or all(got):
                return time.monotonic() - self.started
            time.sleep(0.02)
        raise RuntimeError(f"not every stream began within {timeout}s: {self.received()}")

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds of each curl still running, by PID."""
        used = {}
        for proc in self.procs:
            try:
                used[proc.pid] = process_cpu(proc.pid)
            except OSError:
                pass
        return used

    def finish(self, timeout: float = 900) -> list[Transfer | None]:
        """Each stream's transfer once it ended (None if curl said nothing usable)."""
        deadline, done = time.monotonic() + timeout, []
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(proc, grace=2)
                out = ""
            fields = out.split()
            done.append(Transfer(int(fields[0]), int(float(fields[1])), float(fields[2]))
                        if len(fields) == 3 else None)
        self.ended = time.monotonic()
        return done

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, grace=2)


@dataclass
class Round:
    unloaded: dict[str, float]
    loaded: dict[str, float]
    window: float  # seconds of the loaded wrk run
    inside: bool  # every stream mid-body when the loaded wrk run began and when it ended
    mid_body: str  # "32/32 at start, 32/32 at end"
    window_mibs: float  # the streams' MiB/s over the loaded window
    stream_mibs: float  # all layers' bytes over first start to last end
    complete: int
    flowing_after: float  # seconds from starting the streams to every one having bytes
    ttfb: tuple[float, float]  # the streams' time to first byte (curl's), median and max
    cpu: dict[str, float]  # cores used during the window: mirror threads, upstream, curls
    loop: tuple[float, float, float]  # the loop's thread in the window: on a CPU, waiting
    # for a CPU, blocked (shares of the window)
    tag_requests: int  # upstream requests for the small image's tag during the wrk runs


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process: /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def loop_sched(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of the mirror's main thread,
    the event loop's (/proc/PID/task/PID/schedstat). The rest of a window it was blocked:
    in epoll_wait with nothing to do, or waiting for the GIL or a lock."""
    on_cpu, waiting, _slices = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def tag_requests(log: UpstreamLog, since: int) -> int:
    """Upstream requests for the small image's tag since `since` (should stay 0)."""
    with open(log.path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return sum(1 for m in log.LINE.finditer(text) if m.group(2).startswith(
        f"/v2/{SMALL}/manifests/latest"))


def one_round(args: argparse.Namespace, source: Path, work: Path, upstream: Upstream,
              small: images.Image, layers: list[tuple[str, int]],
              spy: PySpy | None = None) -> Round:
    shutil.rmtree(work / "storage", ignore_errors=True)
    mirror = Mirror(work, source, upstream.registry_url,
                    max(64, args.streams))  # 64: the default; never fewer than the streams
    streams = ColdStreams(mirror.url, layers)
    log = UpstreamLog(upstream.registry.log_path)
    try:
        url = f"{mirror.url}/v2/{PREFIX}/{SMALL}/manifests/latest"
        got = manifest_digest(url)  # the one warming GET
        if got != small.digest:
            raise RuntimeError(f"{url} answered {got}, not {small.digest}")
        mark = log.mark()
        unloaded = wrk_get(url, args.seconds)

        streams.start()
        flowing = streams.wait_flowing()
        pid = mirror.proc.pid
        if spy is not None:
            spy.start(pid)
        threads0, up0, curls0 = thread_cpu(pid), process_cpu(upstream.registry.pid), \
            streams.cpu_seconds()
        busy0, sched0 = machine_busy(), loop_sched(pid)
        before, t0 = streams.received(), time.monotonic()
        loaded = wrk_get(url, args.seconds)
        t1, after = time.monotonic(), streams.received()
        busy1, sched1 = machine_busy(), loop_sched(pid)
        threads1, up1, curls1 = thread_cpu(pid), process_cpu(upstream.registry.pid), \
            streams.cpu_seconds()
        if spy is not None:
            spy.finish()
        window = t1 - t0
        on_cpu, waiting = ((b - a) / window for a, b in zip(sched0, sched1))
        cpu = {f"mirror {k}": v / window for k, v in cpu_by_thread(threads0, threads1).items()}
        curls = sum(v - curls0[p] for p, v in curls1.items() if p in curls0)
        cpu |= {"upstream": (up1 - up0) / window, "curls": curls / window,
                "whole machine": (busy1 - busy0) / window}
        at_start = sum(1 for g in before if g)
        at_end = sum(1 for g, size in zip(after, streams.sizes) if g is not None and g < size)
        # A stream that ended inside the window moved the rest of its layer.
        moved = sum((size if b is None else b) - (a or 0)
                    for a, b, size in zip(before, after, streams.sizes))

        transfers = streams.finish()
        complete = sum(1 for t, size in zip(transfers, streams.sizes)
                       if t is not None and t.status == 200 and t.size == size)
        ttfbs = [t.ttfb for t in transfers if t is not None]
        log.settle(timeout=5)
        return Round(
            unloaded=unloaded, loaded=loaded, window=window,
            inside=at_start == at_end == len(layers),
            mid_body=f"{at_start}/{len(layers)} at start, {at_end}/{len(layers)} at end",
            window_mibs=moved / MiB / window,
            stream_mibs=sum(streams.sizes) / MiB / (streams.ended - streams.started),
            complete=complete, flowing_after=flowing, cpu=cpu,
            loop=(on_cpu, waiting, max(0.0, 1 - on_cpu - waiting)), ttfb=(
                statistics.median(ttfbs), max(ttfbs)) if ttfbs else (0.0, 0.0),
            tag_requests=tag_requests(log, mark))
    finally:
        streams.stop()
        mirror.stop()


# -- the report ------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def med(rounds: list[Round], pick) -> float:
    return statistics.median(pick(r) for r in rounds)


def table(rounds: list[Round], streams: int) -> str:
    u_rps, l_rps = med(rounds, lambda r: r.unloaded["rps"]), med(rounds, lambda r: r.loaded["rps"])
    u50, l50 = med(rounds, lambda r: r.unloaded["p50"]), med(rounds, lambda r: r.loaded["p50"])
    u99, l99 = med(rounds, lambda r: r.unloaded["p99"]), med(rounds, lambda r: r.loaded["p99"])
    worst99 = max(r.loaded["p99"] for r in rounds)
    errors = sum(r.unloaded["errors"] + r.loaded["errors"] for r in rounds)
    inside = sum(r.inside for r in rounds)
    complete = sum(r.complete for r in rounds)
    ratio = l_rps / u_rps if u_rps else 0.0
    rows = [f"| manifest GET by tag, wrk -t2 -c16 | unloaded | while {streams} cold streams "
            "| loaded / unloaded | target | |", "|---|---|---|---|---|---|",
            f"| req/s | {u_rps:,.0f} | {l_rps:,.0f} | {ratio:.2f}× | ≥ {TARGET_RATIO}× "
            f"| {verdict(ratio >= TARGET_RATIO)} |",
            f"| p50 (ms) | {u50:.2f} | {l50:.2f} | {l50 / u50:.2f}× | | |",
            f"| p99 (ms), loaded worst round {worst99:.2f} | {u99:.2f} | {l99:.2f} "
            f"| {l99 / u99:.2f}× | < {TARGET_P99_MS:.0f} | {verdict(l99 < TARGET_P99_MS)} |",
            f"| wrk errors, all runs | | | | 0 | {verdict(errors == 0)} |",
            f"| cold streams' MiB/s over the wrk window (all streams) | | "
            f"{med(rounds, lambda r: r.window_mibs):,.0f} | | | |",
            f"| cold streams' MiB/s, first start to last end | | "
            f"{med(rounds, lambda r: r.stream_mibs):,.0f} | | | |",
            f"| cold streams' TTFB median / max (s) | | "
            f"{med(rounds, lambda r: r.ttfb[0]):.2f} / {max(r.ttfb[1] for r in rounds):.2f} "
            f"| | | |",
            "| the loop's thread in the window: on a CPU / waiting for one / blocked | | "
            + " / ".join(f"{med(rounds, lambda r: r.loop[i]):.0%}" for i in range(3))
            + " | | | |",
            f"| rounds whose wrk window lay inside every stream | | {inside}/{len(rounds)} | "
            f"| all | {verdict(inside == len(rounds))} |",
            f"| layers received whole (200, exact size) | | {complete}/{streams * len(rounds)} "
            f"| | all | {verdict(complete == streams * len(rounds))} |"]
    return "\n".join(rows)


def round_lines(rounds: list[Round], label: str = "round", first: int = 1) -> str:
    lines = []
    for i, r in enumerate(rounds, first):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items())
        lines.append(
            f"- {label} {i}: unloaded {r.unloaded['rps']:,.0f} req/s, p50/p99 "
            f"{r.unloaded['p50']:.2f}/{r.unloaded['p99']:.2f} ms; loaded "
            f"{r.loaded['rps']:,.0f} req/s, p50/p99 {r.loaded['p50']:.2f}/"
            f"{r.loaded['p99']:.2f} ms ({r.loaded['rps'] / max(r.unloaded['rps'], 1):.2f}×); "
            f"streams' TTFB median {r.ttfb[0]:.2f} s, max {r.ttfb[1]:.2f} s, all flowing "
            f"{r.flowing_after:.2f} s after start, {r.mid_body} of the "
            f"{r.window:.2f} s window, {r.window_mibs:,.0f} MiB/s in it, "
            f"{r.stream_mibs:,.0f} MiB/s overall; cores used in the window: {cpu}; the "
            f"loop's thread {r.loop[0]:.0%} on a CPU, {r.loop[1]:.0%} waiting for one, "
            f"{r.loop[2]:.0%} blocked; "
            f"upstream requests for the tag during wrk: {r.tag_requests}")
    return "\n".join(lines)


def profile_report(path: Path, top: int = 15) -> str:
    """Where the event loop's thread spent the loaded window, from py-spy's raw stacks."""
    parts: dict[str, collections.Counter] = {}
    own: collections.Counter = collections.Counter()
    cumulative: collections.Counter = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        head, *frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", head)
        thread = "MainThread" if thread == "MainThread" else re.sub(r"_\d+$", "_N", thread)
        names = [frame_name(f) for f in frames]
        part = classify(names)
        parts.setdefault(thread, collections.Counter())[part] += int(count)
        if thread == "MainThread" and part != "idle" and names:
            own[own_frame(names)] += int(count)
            for name in set(names):
                if not trunk(name):
                    cumulative[name] += int(count)
    main = parts.get("MainThread", collections.Counter())
    total = sum(main.values()) or 1
    out = ["| thread | samples | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
    for thread, counts in sorted(parts.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counts.values()) or 1
        out.append(f"| {thread} | {n} | " + " | ".join(
            f"{100 * counts.get(p, 0) / n:.0f}%" for p in PARTS) + " |")
    for kind, counter in (("own", own), ("cumulative", cumulative)):
        out += ["", f"MainThread, not idle: top {top} functions by {kind} samples "
                f"(% of all MainThread samples):", "", "| function | % |", "|---|---|"]
        out += [f"| `{name}` | {100 * n / total:.1f}% |" for name, n in counter.most_common(top)]
    return "\n".join(out)


PARTS = ("idle", "loop", "reader", "fill", "metadata", "gil")


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each on an empty mirror")
    ap.add_argument("--streams", type=int, default=32, help="cold layers streaming at once")
    ap.add_argument("--layer-mib", type=int, default=192,
                    help="size of each cold layer: the streams must outlast the wrk window")
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    ap.add_argument("--source", type=Path, action="append",
                    help="a tree to run the mirror from (default: this one); repeat it to "
                         "time trees side by side, taking turns")
    ap.add_argument("--profile", action="store_true",
                    help="one more round with py-spy attached during the loaded window")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native too (GIL waits visible; it slows the mirror more)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk (bench/run.sh installs it)")

    work = Path(tempfile.mkdtemp(prefix="mirror-mixed-"))
    upstream = Upstream(work / "upstream")
    sources = [s.resolve() for s in args.source or [REPO]]
    load_before = os.getloadavg()
    try:
        print(f"work dir {work}; mirror from {', '.join(map(str, sources))}; seeding "
              f"{args.streams} x {args.layer_mib} MiB ...", flush=True)
        upstream.start()
        small = seed_small(upstream, 1, 5).small  # bench/run.py's manifest rows' image
        layers = seed_cold(upstream, args.streams, args.layer_mib)
        rounds: dict[Path, list[Round]] = {s: [] for s in sources}
        for i in range(args.rounds):
            for source in alternate(sources, i):
                rounds[source].append(one_round(args, source, work, upstream, small, layers))
                print(f"{source}: " + round_lines(rounds[source][-1:], first=i + 1)[2:],
                      flush=True)
        profiled = ""
        if args.profile:
            raw = work / "pyspy.txt"
            spy = PySpy(raw, args.profile_rate, native=args.profile_native)
            extra = one_round(args, sources[0], work, upstream, small, layers, spy)
            profiled = "\n\n".join([
                f"#### py-spy on the mirror from `{sources[0]}` during one more loaded window "
                f"({args.profile_rate} Hz, --threads --idle"
                f"{' --native' if args.profile_native else ''}; raw stacks in {raw})",
                round_lines([extra], "profiled round"), profile_report(raw)])

        print(f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {machine()}\n")
        print(f"`bench/mixed.py`: {args.streams} cold layers of "
              f"{args.layer_mib} MiB (random), one curl each, from Distribution with token "
              f"auth; manifest GET by tag from the tag record (`/v2/{PREFIX}/{SMALL}`); wrk "
              f"-t2 -c16 --latency, {args.seconds} s per run, {args.rounds} round(s), each on "
              f"an empty mirror (medians). Load average (1/5/15 min) "
              f"{'/'.join(f'{x:.2f}' for x in load_before)} at start, "
              f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at the end.\n")
        for source, done in rounds.items():
            print(f"Mirror from `{source}`:\n\n{table(done, args.streams)}\n\n"
                  f"{round_lines(done)}\n")
        if profiled:
            print("\n" + profiled)
    finally:
        upstream.stop()
        for big in (work / "upstream" / "registry" / "storage", work / "storage"):
            shutil.rmtree(big, ignore_errors=True)
        print(f"logs in {work}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
