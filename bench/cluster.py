"""Benchmark: the mirror's cluster mode (S3 + Redis) against its filesystem backend and
against Distribution 2.8 on the same object store.

Everything runs on 127.0.0.1, started and stopped (by PID) by this script: the upstream of
tests.support (real Distribution with Docker-Hub-like tokens) seeded with one random layer,
one SeaweedFS (`weed server -s3`) and one redis-server shared by the caches under test, each
cache with a bucket of its own:

  (a) mirror, filesystem backend (the default; the baseline);
  (b) mirror, S3 backend with a local tier (`local_cache_size = "1GiB"`): warm reads come
      from the replica's own disk;
  (c) mirror, S3 backend without a local tier: every read streams from SeaweedFS;
  (d) Distribution 2.8 in proxy mode on S3, `redirect: disable: true` (so it streams the
      bytes itself, as (c) does) and its blob descriptor cache in Redis.

Phases: a cold pull of the layer through each cache once (TTFB, time to last byte, upstream
GETs and bytes from the upstream registry's own log, when the blob's object appeared in the
bucket); then warm blob GETs, 1 and 8 parallel curl clients fetching the layer again and
again for a fixed window (a fetch cut at the window's end counts its bytes, not as a
request), the caches' order swapped every round, the best round shown; plus the same load
on SeaweedFS itself (a presigned GetObject of (c)'s object), the ceiling for (c) and (d).
One cache works at a time; the others sit idle. The CPU that processes outside the
benchmark used during each window is printed beside it: the machine may be shared.
The clients are curl, not wrk: Debian's wrk 4.1 reads 8 KiB per call and, measured on
this machine against an aiohttp sendfile server, got 1.1 GiB/s where curl got 1.2 (1
connection) and 1.3 where curl got 1.7 (8): it would cap the fast rows.

Run: bench/cluster.sh [--quick]   (or: python bench/cluster.py --help)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
from run import (  # bench/run.py: the same seeding, upstream log reading and formatting
    ACCEPT,
    BIG,
    Child,
    MiB,
    Seeded,
    UpstreamLog,
    alternate,
    fetch_and_hash,
    fmt,
    machine,
    quiesce,
    ratio,
    seed,
)

# run.py put the repository's root on sys.path
from tests.support.process import MirrorProcess, free_port
from tests.support.redis import RedisServer
from tests.support.seaweed import REGION, SeaweedFS
from tests.support.stack import Upstream

GiB = 1 << 30
KEYS = ("a", "b", "c", "d")
LABELS = {"a": "(a) mirror, filesystem", "b": "(b) mirror, S3 + local tier",
          "c": "(c) mirror, S3, no local tier", "d": "(d) Distribution 2.8, S3",
          "s": "SeaweedFS GetObject, direct"}
ROLES = ("cache", "store", "redis")  # whose CPU is counted: the cache, SeaweedFS, Redis
CURL_STATS = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"


def cpu_seconds(pid: int | None) -> float:
    """User + system seconds of a process, from /proc/PID/stat (fields 14 and 15)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def foreign_cpu() -> dict[int, float]:
    """CPU seconds of every process that is not this script's own (nor a kernel thread).

    The machine may be shared (a test suite running beside the benchmark); what these use
    during a window is printed with it, so that a disturbed number can be told apart.
    """
    parents, used = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # ended meanwhile
            parents[int(entry.name)] = int(fields[1])
            used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")

    def ours(pid: int) -> bool:
        while pid > 2:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return pid == 2  # 2: kthreadd, the parent of kernel threads

    return {pid: cpu for pid, cpu in used.items() if not ours(pid)}


def foreign_since(before: dict[int, float], wall: float) -> float:
    """Cores that other processes used on average since `before`."""
    after = foreign_cpu()
    return sum(after[p] - cpu for p, cpu in before.items() if p in after) / wall


@dataclass
class Target:
    """One cache under test: where it listens, its process, where it puts the blob."""
    key: str
    url: str
    pid: int | None
    log: Path
    stop: Callable[[], None]
    object_key: Callable[[str], str] | None = None  # digest -> its key in `bucket`
    bucket: str = ""

    @property
    def name(self) -> str:
        return LABELS[self.key]

    def cpu_seconds(self) -> float:  # what run.quiesce asks
        return cpu_seconds(self.pid)


@dataclass
class Shared:
    """The services every cache (but the filesystem one) works with."""
    seaweed: SeaweedFS
    redis: RedisServer

    def cpu(self, t: Target) -> dict[str, float]:
        return {"cache": t.cpu_seconds(), "store": cpu_seconds(self.seaweed.proc.pid),
                "redis": cpu_seconds(self.redis.pid)}

    def settle(self, t: Target, timeout: float = 20) -> None:
        """Wait until the cache and SeaweedFS are idle (< 10 ms of CPU in 0.5 s): what the
        last phase left (an upload to the bucket, streams being closed) must not run into
        the next measurement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = sum(self.cpu(t).values())
            time.sleep(0.5)
            if sum(self.cpu(t).values()) - before < 0.01:
                return


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: after[role] - before[role] for role in ROLES}


def start_mirror(key: str, work: Path, upstream_url: str,
                 settings: dict[str, dict]) -> Target:
    proc = MirrorProcess(work / "root", work, upstream_url, settings=settings)
    proc.start(timeout=30)
    return Target(key, proc.url, proc.pid, proc.log_path, proc.stop)


def start_mirror_s3(key: str, work: Path, upstream_url: str, shared: Shared,
                    local_cache_size: str | None) -> Target:
    seaweed = shared.seaweed
    bucket = seaweed.create_bucket(f"mirror-{key}")
    storage = {"backend": "s3"}
    if local_cache_size:
        storage["local_cache_size"] = local_cache_size
    target = start_mirror(key, work, upstream_url, {
        "storage": storage,
        "storage.s3": {"endpoint": seaweed.endpoint, "bucket": bucket,
                       "access_key": seaweed.access_key, "secret_key": seaweed.secret_key},
        # Its own key space: (b) and (c) must not see each other's ledger.
        "cluster": {"redis": shared.redis.url, "name": f"bench-{key}", "replica": key}})
    target.bucket = bucket
    target.object_key = lambda digest: f"blobs/sha256/{digest.removeprefix('sha256:')}"
    return target


def start_distribution(key: str, work: Path, upstream_url: str, shared: Shared) -> Target:
    seaweed = shared.seaweed
    bucket = seaweed.create_bucket("distribution")
    work.mkdir(parents=True)
    log = work / "registry.log"
    # Its S3 driver panics at start when AWS_CA_BUNDLE is set (a bundle for https endpoints).
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    for _attempt in range(3):  # free_port is racy: another process may take the port
        port = free_port()
        config = work / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n  fields:\n    service: proxy\n"
            "storage:\n  cache:\n    blobdescriptor: redis\n"
            "  redirect:\n    disable: true\n"
            f"  s3:\n    region: {REGION}\n    regionendpoint: {seaweed.endpoint}\n"
            f"    bucket: {bucket}\n    accesskey: {seaweed.access_key}\n"
            f"    secretkey: {seaweed.secret_key}\n    secure: false\n    v4auth: true\n"
            f"redis:\n  addr: 127.0.0.1:{shared.redis.port}\n  db: 1\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
            f"proxy:\n  remoteurl: {upstream_url}\n")
        url = f"http://127.0.0.1:{port}"
        try:
            child = Child(["docker-registry", "serve", str(config)], log, f"{url}/v2/", env)
        except RuntimeError:
            continue
        return Target(key, url, child.pid, log, child.stop, bucket=bucket,
                      object_key=lambda d: "docker/registry/v2/blobs/sha256/"
                                           f"{d[7:9]}/{d[7:]}/data")
    raise RuntimeError(f"Distribution would not start; see {log}")


def direct(shared: Shared, bucket: str, key: str) -> tuple[Target, str]:
    """SeaweedFS itself, a presigned GetObject: the most a cache streaming from it gets."""
    client = shared.seaweed.client()
    try:
        url = client.generate_presigned_url("get_object", ExpiresIn=3600,
                                            Params={"Bucket": bucket, "Key": key})
    finally:
        client.close()
    return Target("s", shared.seaweed.endpoint, None, shared.seaweed.log_path,
                  lambda: None), url


# -- measurements ----------------------------------------------------------------------


def cold_pull(t: Target, seeded: Seeded, log: UpstreamLog, shared: Shared) -> dict:
    """One client: the manifest by tag, then the layer; the layer's timings and costs."""
    subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H", ACCEPT,
                    f"{t.url}/v2/{BIG}/manifests/latest"], check=True, timeout=60)
    mark, cpu = log.mark(), shared.cpu(t)
    client = shared.seaweed.client() if t.object_key else None
    start = time.monotonic()
    proc = subprocess.Popen(["curl", "-s", "--max-time", "300", "-o", "/dev/null", "-w",
                             CURL_STATS, f"{t.url}/v2/{BIG}/blobs/{seeded.layer}"],
                            stdout=subprocess.PIPE, text=True)
    stored, finished = None, float("inf")
    # Until the object is there whole (what another replica could serve), or 60 s after
    # the client finished.
    while client is not None and stored is None and time.monotonic() < finished + 60:
        try:
            client.head_object(Bucket=t.bucket, Key=t.object_key(seeded.layer))
            stored = time.monotonic() - start
        except botocore.exceptions.ClientError:
            time.sleep(0.05)
        if proc.poll() is not None and finished == float("inf"):
            finished = time.monotonic()
    if client is not None:
        client.close()
    out, _ = proc.communicate(timeout=300)
    status, size, ttfb, total = out.split()
    quiesce(t, log)
    log.settle()
    gets, written = log.downloads(mark, seeded.layer)
    ok = status == "200" and int(float(size)) == seeded.layer_size
    got = {"ok": ok, "ttfb": float(ttfb) * 1000, "ttlb": float(total),
           "mibs": int(float(size)) / MiB / float(total), "gets": gets,
           "bytes": written / seeded.layer_size, "stored": stored,
           "cpu": spent(cpu, shared.cpu(t))}
    print(f"  cold {t.name:<32} {'ok' if ok else f'FAILED {status} {size} bytes'}  "
          f"TTFB {got['ttfb']:.0f} ms  TTLB {got['ttlb']:.2f}s  upstream GETs {gets}  "
          f"in bucket {fmt(stored, 2)}s  CPU {cpus(got['cpu'])} s", flush=True)
    return got


def warm_blob(t: Target, url: str, size: int, conns: int, seconds: float,
              shared: Shared) -> dict:
    """`conns` clients, each fetching `url` again and again until `seconds` are over."""
    done = [0] * conns
    got_bytes = [0] * conns
    errors = [0] * conns
    others = foreign_cpu()
    cpu = shared.cpu(t)
    start = time.monotonic()
    deadline = start + seconds

    def client(i: int) -> None:
        while (left := deadline - time.monotonic()) > 0.05:
            res = subprocess.run(["curl", "-s", "--max-time", f"{left:.2f}", "-o", "/dev/null",
                                  "-w", "%{http_code} %{size_download}", url],
                                 capture_output=True, text=True, check=False)
            status, received = res.stdout.split()
            received = int(float(received))
            if status == "200":
                got_bytes[i] += received
            if status == "200" and received == size:
                done[i] += 1
            elif res.returncode != 28:  # 28: cut by --max-time at the window's end
                errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - start
    gib = max(sum(got_bytes) / GiB, 1e-9)
    got = {"mibs": sum(got_bytes) / MiB / wall, "rps": sum(done) / wall,
           "errors": sum(errors), "others": foreign_since(others, wall),
           "cpu_gib": {role: v / gib for role, v in spent(cpu, shared.cpu(t)).items()}}
    print(f"  warm {conns} conn {t.name:<32} {got['mibs']:7.0f} MiB/s  {got['rps']:5.2f} req/s"
          f"  CPU {cpus(got['cpu_gib'])} s/GiB  others {got['others']:.2f} cores"
          + (f"  ({sum(errors)} errors)" if any(errors) else ""), flush=True)
    return got


def cpus(by_role: dict[str, float]) -> str:
    """"cache + SeaweedFS + Redis" seconds."""
    return " + ".join(f"{by_role[role]:.2f}" for role in ROLES)


# -- the tables ------------------------------------------------------------------------


def header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def tables(cold: dict[str, dict], warm: dict[tuple[str, int], list[dict]],
           conns: list[int], layer_mib: int) -> str:
    rows = header(f"warm blob GET, {layer_mib} MiB layer", "clients", "MiB/s", "req/s",
                  "vs (a)", "vs (d)", "CPU s / GiB: cache + SeaweedFS + Redis",
                  "other processes (cores)", "errors")
    for n in conns:
        # The best round of each: the machine may be shared, and a round that others
        # disturbed is slower, never faster. Its CPU and the others' load are shown with it.
        best = {k: max(runs, key=lambda r: r["mibs"]) for (k, m), runs in warm.items() if m == n}
        for k, r in best.items():
            rows.append(f"| {LABELS[k]} | {n} | {fmt(r['mibs'])} | {r['rps']:.2f} | "
                        f"{ratio(r['mibs'], best['a']['mibs'])} | "
                        f"{ratio(r['mibs'], best['d']['mibs'])} | {cpus(r['cpu_gib'])} | "
                        f"{r['others']:.2f} | {sum(w['errors'] for w in warm[k, n]):.0f} |")
    rows += ["", *header(f"cold pull, {layer_mib} MiB layer, 1 client", "complete",
                         "TTFB (ms)", "time to last byte (s)", "MiB/s", "TTLB vs (a)",
                         "TTLB vs (d)", "upstream GETs, bytes / layer",
                         "object in the bucket after (s)",
                         "CPU s: cache + SeaweedFS + Redis")]
    for k in KEYS:
        c = cold[k]
        rows.append(f"| {LABELS[k]} | {'yes' if c['ok'] else '**no**'} | {fmt(c['ttfb'])} | "
                    f"{c['ttlb']:.2f} | {fmt(c['mibs'])} | "
                    f"{ratio(c['ttlb'], cold['a']['ttlb'])} | "
                    f"{ratio(c['ttlb'], cold['d']['ttlb'])} | {c['gets']}, {c['bytes']:.2f}× | "
                    f"{fmt(c['stored'], 2)} | {cpus(c['cpu'])} |")
    return "\n".join(rows)


def log_problems(t: Target) -> str:
    """Warnings and errors in a cache's log, counted, with the first few distinct ones."""
    marks = ("WARNING", "ERROR", "CRITICAL", "Traceback", "level=error", "level=fatal",
             "level=panic", "panic:")
    lines = [line for line in t.log.read_text(errors="replace").splitlines()
             if any(m in line for m in marks)] if t.log.exists() else []
    if not lines:
        return f"{t.name}: no warnings or errors in its log."
    distinct = list(dict.fromkeys(line[:240] for line in lines))
    return (f"{t.name}: {len(lines)} warning/error lines in {t.log}, e.g.:\n"
            + "\n".join(f"    {line}" for line in distinct[:5]))


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB layer, 5 s windows, 1 round")
    ap.add_argument("--layer-mib", type=int, help="size of the layer (default 256)")
    ap.add_argument("--seconds", type=float, help="each warm window (default 10)")
    ap.add_argument("--rounds", type=int, help="warm rounds, order swapped (default 2)")
    ap.add_argument("--conns", default="1,8", help="warm client counts")
    args = ap.parse_args()
    layer_mib = args.layer_mib or (64 if args.quick else 256)
    seconds = args.seconds or (5 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 2)
    conns = [int(n) for n in args.conns.split(",")]

    work = Path(tempfile.mkdtemp(prefix="mirror-bench-cluster-"))
    upstream = Upstream(work / "upstream")
    seaweed = SeaweedFS(work / "seaweed")
    redis = RedisServer(work / "redis")
    targets: list[Target] = []
    started = time.monotonic()
    try:
        print(f"work dir {work}; seeding a {layer_mib} MiB layer ...", flush=True)
        upstream.start()
        seeded = seed(upstream, layer_mib, 1)
        log = UpstreamLog(upstream.registry.log_path)
        seaweed.start()
        redis.start()
        shared = Shared(seaweed, redis)
        origin = upstream.registry_url  # direct: the counting proxy is slower than it
        starters = {
            "a": lambda: start_mirror("a", work / "a", origin, {}),
            "b": lambda: start_mirror_s3("b", work / "b", origin, shared, "1GiB"),
            "c": lambda: start_mirror_s3("c", work / "c", origin, shared, None),
            "d": lambda: start_distribution("d", work / "d", origin, shared),
        }
        print("cold pulls (each cache started empty)", flush=True)
        cold = {}
        for k in KEYS:
            t = starters[k]()
            targets.append(t)
            shared.settle(t)
            cold[k] = cold_pull(t, seeded, log, shared)
            status, digest = fetch_and_hash(f"{t.url}/v2/{BIG}/blobs/{seeded.layer}")
            if (status, digest) != (200, seeded.layer):
                raise RuntimeError(f"{t.name} served the layer as {status} {digest}")
            quiesce(t, log)  # Distribution stores the blob after the response

        print(f"warm blobs, {seconds:g} s per window, {rounds} round(s)", flush=True)
        loads = [(t, f"{t.url}/v2/{BIG}/blobs/{seeded.layer}") for t in targets]
        loads.append(direct(shared, targets[2].bucket, targets[2].object_key(seeded.layer)))
        mark = log.mark()
        warm: dict[tuple[str, int], list[dict]] = {}
        for r in range(rounds):
            for n in conns:
                for t, url in alternate(loads, r):
                    shared.settle(t)
                    warm.setdefault((t.key, n), []).append(
                        warm_blob(t, url, seeded.layer_size, n, seconds, shared))
        log.settle()
        refetched = log.downloads(mark, seeded.layer)[0]
        others = max(r["others"] for runs in warm.values() for r in runs)

        stamp = subprocess.run(["date", "-u"], capture_output=True, text=True,
                               check=True).stdout.strip()
        note = (f"`bench/cluster.sh{' --quick' if args.quick else ''}`: layer {layer_mib} "
                f"MiB, warm windows of {seconds:g} s, best of {rounds} round(s), curl "
                "clients; SeaweedFS 4.48 (`weed server`, one process) and redis-server on "
                f"the same machine. Other processes used up to {others:.2f} of the "
                f"{os.cpu_count()} cores during a warm window (column: in the one shown). "
                "The last row is the object of (c) read from SeaweedFS itself (a presigned "
                "URL): the ceiling of (c) and (d).")
        if refetched:
            note += f" **Upstream GETs of the layer while warm: {refetched}** (expected 0)."
        block = "\n\n".join([
            f"### {stamp} — {machine()}", note,
            tables(cold, warm, conns, layer_mib),
            "\n".join(log_problems(t) for t in targets)])
        print("\n" + block)
        print(f"\ntotal {time.monotonic() - started:.0f}s; logs in {work}")
    finally:
        for t in targets:
            t.stop()
        redis.stop()
        seaweed.kill()  # SIGKILL to its PID: its data is thrown away, no need to wait ~15 s
        upstream.stop()
        # Keep the logs, drop the blob copies.
        for big in [work / "upstream" / "registry" / "storage", work / "seaweed" / "data",
                    *(work / k / "root" for k in KEYS)]:
            shutil.rmtree(big, ignore_errors=True)


if __name__ == "__main__":
    main()
