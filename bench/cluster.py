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

Then the herd (alone with --herd, left out with --no-herd): 3 mirror replicas (S3 backend on
one bucket, one Redis key space, a local tier each, `cluster.secret` set: fill leases) side
by side with 3 Distribution 2.8 proxies (one bucket of their own, the blob descriptor cache
in the same Redis), every replica a process on its own port. For N = 32 and 64 a fresh
random layer under a new repository, its manifest fetched once through every replica; then
N curl clients, client i on replica i mod 3, released at once (each waits on a FIFO for its
URL), each body piped into `openssl dgst -sha256` and checked. Measured: upstream GETs and
bytes of the layer (the upstream registry's log), wall time until the last client ended,
TTFB and time to last byte (median, max), failed clients and wrong bodies, CPU, and the
mirror's fill counters (holder / follower / alone, from /metrics).

Run: bench/cluster.sh [--quick] [--herd | --no-herd]   (or: python bench/cluster.py --help)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request
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
from tests.support import images
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


def start_distribution(key: str, work: Path, upstream_url: str, shared: Shared,
                       bucket: str | None = None, redis_db: int = 1) -> Target:
    """Distribution 2.8 in proxy mode on S3; `bucket` (made if not given) may be shared."""
    seaweed = shared.seaweed
    bucket = bucket or seaweed.create_bucket("distribution")
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
            f"redis:\n  addr: 127.0.0.1:{shared.redis.port}\n  db: {redis_db}\n"
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


# -- the herd: N clients over 3 replicas, one uncached layer ---------------------------

REPLICAS = 3
HERD = {"m": "mirror, 3 replicas", "d": "Distribution 2.8, 3 replicas"}
for _i in range(1, REPLICAS + 1):
    LABELS[f"m{_i}"] = f"herd: mirror r{_i}"
    LABELS[f"d{_i}"] = f"herd: Distribution r{_i}"
FILL_METRICS = ("holder", "follower", "alone", "peer_streams", "takeovers")
HERD_STATS = "%{stderr}%{http_code} %{size_download} %{time_starttransfer} %{time_total}\\n"


def herd_image(name: str, layer_mib: int):
    """A one-layer image with a fresh random layer (os.urandom: never seen by any cache).

    The layer is a real tar in a gzip of level 0 (stored blocks): random bytes do not
    compress anyway, and level 9 would take ~14 s per 256 MiB to build.
    """
    payload = b"".join(os.urandom(min(64, layer_mib - i) * MiB) for i in range(0, layer_mib, 64))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("data.bin")
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        tar.addfile(info, io.BytesIO(payload))
    del payload
    layer = gzip.compress(raw.getvalue(), compresslevel=0, mtime=0)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    del raw

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def canonical(doc: dict) -> bytes:
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    config = canonical({"architecture": "amd64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    layer_digest = digest(layer)
    manifest = canonical({
        "schemaVersion": 2, "mediaType": images.DOCKER_MANIFEST,
        "config": {"mediaType": images.DOCKER_CONFIG, "size": len(config),
                   "digest": digest(config)},
        "layers": [{"mediaType": images.DOCKER_LAYER, "size": len(layer),
                    "digest": layer_digest}]})
    return images.Image(name=name, tags=["latest"], digest=digest(manifest), manifest=manifest,
                        media_type=images.DOCKER_MANIFEST,
                        blobs={digest(config): config, layer_digest: layer})


@dataclass
class Herd:
    """Three replicas of one kind on one bucket and one Redis; clients pick one round-robin."""
    kind: str  # "m" or "d"
    replicas: list[Target]

    @property
    def name(self) -> str:
        return HERD[self.kind]

    def stop(self) -> None:
        for t in self.replicas:
            t.stop()


def start_herd_mirror(work: Path, upstream_url: str, shared: Shared) -> Herd:
    """The mirror's cluster: one bucket, one key space in Redis, a local tier each, and
    `cluster.secret` set, so that followers stream a fill from its holder."""
    seaweed = shared.seaweed
    bucket = seaweed.create_bucket("mirror-herd")
    secret = secrets.token_hex(24)
    herd = Herd("m", [])
    try:
        for i in range(1, REPLICAS + 1):
            herd.replicas.append(start_mirror(f"m{i}", work / f"m{i}", upstream_url, {
                "storage": {"backend": "s3", "local_cache_size": "2GiB"},
                "storage.s3": {"endpoint": seaweed.endpoint, "bucket": bucket,
                               "access_key": seaweed.access_key,
                               "secret_key": seaweed.secret_key},
                # advertise: its default, the listening address (http://127.0.0.1:P).
                "cluster": {"redis": shared.redis.url, "name": "bench-herd",
                            "replica": f"r{i}", "secret": secret}}))
    except BaseException:
        herd.stop()
        raise
    return herd


def start_herd_distribution(work: Path, upstream_url: str, shared: Shared) -> Herd:
    """Three Distribution processes on one bucket of their own and one Redis database."""
    bucket = shared.seaweed.create_bucket("distribution-herd")
    herd = Herd("d", [])
    try:
        for i in range(1, REPLICAS + 1):
            herd.replicas.append(start_distribution(f"d{i}", work / f"d{i}", upstream_url,
                                                    shared, bucket=bucket, redis_db=2))
    except BaseException:
        herd.stop()
        raise
    return herd


def fill_metrics(herd: Herd) -> dict[str, float]:
    """The mirror's cluster counters, summed over its replicas (zeros for Distribution)."""
    got = dict.fromkeys(FILL_METRICS, 0.0)
    if herd.kind != "m":
        return got
    for t in herd.replicas:
        with urllib.request.urlopen(f"{t.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            for role in ("holder", "follower", "alone"):
                if line.startswith(f'mirror_cluster_fills_total{{role="{role}"}}'):
                    got[role] += float(line.split()[-1])
            for name in ("peer_streams", "takeovers"):
                if line.startswith(f"mirror_cluster_{name}_total "):
                    got[name] += float(line.split()[-1])
    return got


def herd_cpu(herd: Herd, shared: Shared) -> dict[str, float]:
    return {"cache": sum(t.cpu_seconds() for t in herd.replicas),
            "store": cpu_seconds(shared.seaweed.proc.pid), "redis": cpu_seconds(shared.redis.pid)}


def herd_settle(herd: Herd, shared: Shared, log: UpstreamLog, timeout: float = 90) -> None:
    """Until the replicas, SeaweedFS and the upstream log are quiet for 1 s: Distribution
    goes on fetching to store the blob after its clients are served, and the mirror
    uploads to the bucket after the digest check; neither may run into the next run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cpu, size = sum(herd_cpu(herd, shared).values()), log.mark()
        time.sleep(1)
        if sum(herd_cpu(herd, shared).values()) - cpu < 0.05 and log.mark() == size:
            return


@dataclass(eq=False)  # `in` below means: this very client
class HerdClient:
    replica: int
    rc: int
    status: int
    size: int
    ttfb: float  # s
    ttlb: float  # s
    digest: str


def herd_clients(urls: list[str], path: str, n: int, timeout: float
                 ) -> tuple[float, float, list[HerdClient]]:
    """`n` curls at once, client i on urls[i % len(urls)], each body piped into its own
    `openssl dgst -sha256` (sha256sum has no SHA-NI here: 5x slower).

    At once: every curl is started first, reading its URL from a FIFO of its own (`-K`),
    which blocks it before it connects; once all of them wait there, the URLs are written
    and the FIFOs closed in one loop, and the clock starts. Returns (wall seconds from
    that release to the last curl's end, seconds the release took, the clients)."""
    hashers: list[subprocess.Popen] = []
    curls: list[subprocess.Popen] = []
    gates: list[int] = []
    with tempfile.TemporaryDirectory(prefix="herd-gates-") as fifos:
        try:
            for i in range(n):
                read, write = os.pipe()  # curl's body -> openssl
                hashers.append(subprocess.Popen(["openssl", "dgst", "-sha256", "-r"],
                                                stdin=read, stdout=subprocess.PIPE, text=True))
                os.close(read)
                gate = Path(fifos, str(i))
                os.mkfifo(gate)
                try:
                    # -q first: no ~/.curlrc; the URL comes from the gate.
                    curls.append(subprocess.Popen(
                        ["curl", "-q", "-K", str(gate), "-s", "--max-time", str(int(timeout)),
                         "-o", "-", "-w", HERD_STATS], stdin=subprocess.DEVNULL, stdout=write,
                        stderr=subprocess.PIPE, text=True))
                finally:
                    os.close(write)
            deadline = time.monotonic() + 60
            for i in range(n):  # a non-blocking open of a FIFO fails until its reader is there
                while True:
                    try:
                        gates.append(os.open(Path(fifos, str(i)), os.O_WRONLY | os.O_NONBLOCK))
                        break
                    except OSError:
                        if time.monotonic() > deadline or curls[i].poll() is not None:
                            raise RuntimeError(f"curl {i} never opened its gate") from None
                        time.sleep(0.005)
            lines = [f'url = "{urls[i % len(urls)]}{path}"\n'.encode() for i in range(n)]
            start = time.monotonic()
            for fd, line in zip(gates, lines):
                os.write(fd, line)
                os.close(fd)
            released = time.monotonic() - start
            gates.clear()
            stats = [c.communicate(timeout=timeout + 30)[1] for c in curls]
            wall = time.monotonic() - start
            digests = [h.communicate(timeout=60)[0] for h in hashers]
        finally:
            for fd in gates:
                os.close(fd)
            for proc in curls + hashers:  # by PID, only if still running (a timeout, an error)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
    clients = []
    for i, (curl, out, hashed) in enumerate(zip(curls, stats, digests)):
        fields = out.split()
        status, size, ttfb, total = fields if len(fields) == 4 else ("0", "0", "nan", "nan")
        clients.append(HerdClient(i % len(urls), curl.returncode, int(status),
                                  int(float(size)), float(ttfb), float(total),
                                  "sha256:" + hashed.split()[0] if hashed.strip() else ""))
    return wall, released, clients


def herd_run(herd: Herd, shared: Shared, upstream: Upstream, log: UpstreamLog, n: int,
             layer_mib: int, timeout: float) -> dict:
    """One herd: a fresh layer under a new repository, its manifest fetched once through
    every replica (tokens and tag in place, so that the herd is about the layer only),
    then `n` clients at once asking for the layer."""
    began = time.monotonic()
    name = f"bench/herd-{herd.kind}-{n}-{secrets.token_hex(3)}"
    image = herd_image(name, layer_mib)
    images.push(upstream.registry, upstream.tokens, image)
    layer = image.layer_digests[0]
    size = len(image.blobs[layer])
    del image
    for t in herd.replicas:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H", ACCEPT,
                        f"{t.url}/v2/{name}/manifests/latest"], check=True, timeout=60)
    herd_settle(herd, shared, log)
    log.settle()
    ready = time.monotonic() - began
    mark, cpu, fills = log.mark(), herd_cpu(herd, shared), fill_metrics(herd)
    upstream_cpu = cpu_seconds(upstream.registry.pid)
    others = foreign_cpu()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, released, clients = herd_clients([t.url for t in herd.replicas],
                                          f"/v2/{name}/blobs/{layer}", n, timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    foreign = foreign_since(others, wall)
    ended = time.monotonic()
    herd_settle(herd, shared, log)
    log.settle()
    settled = time.monotonic() - ended
    gets, written = log.downloads(mark, layer)
    cpu = spent(cpu, herd_cpu(herd, shared))
    fills = {k: v - fills[k] for k, v in fill_metrics(herd).items()}
    failed = [c for c in clients if c.rc != 0 or c.status != 200 or c.size != size]
    wrong = [c for c in clients if c not in failed and c.digest != layer]
    good = [c for c in clients if c not in failed and c not in wrong] or clients
    got = {"n": n, "gets": gets, "bytes": written / size, "wall": wall, "released": released,
           "ttfb": [statistics.median(c.ttfb for c in good) * 1000,
                    max(c.ttfb for c in good) * 1000],
           "ttlb": [statistics.median(c.ttlb for c in good), max(c.ttlb for c in good)],
           "failed": len(failed), "wrong": len(wrong), "cpu": cpu,
           "clients_cpu": (after.ru_utime + after.ru_stime
                           - children.ru_utime - children.ru_stime),
           "upstream_cpu": cpu_seconds(upstream.registry.pid) - upstream_cpu,
           "others": foreign, "fills": fills, "layer": layer, "repository": name,
           "problems": [f"client {i}: GET {herd.replicas[c.replica].url}/v2/{name}/blobs/"
                        f"{layer} ({herd.replicas[c.replica].name}): curl exit {c.rc}, HTTP "
                        f"{c.status}, {c.size} of {size} bytes, sha256 {c.digest or '-'}"
                        for i, c in enumerate(clients) if c in failed or c in wrong]}
    fill_note = (f"  fills holder {fills['holder']:.0f} follower {fills['follower']:.0f} "
                 f"alone {fills['alone']:.0f} peer streams {fills['peer_streams']:.0f} "
                 f"takeovers {fills['takeovers']:.0f}" if herd.kind == "m" else "")
    print(f"  herd N={n:<2} {herd.name:<30} wall {wall:6.2f}s  ok "
          f"{n - len(failed) - len(wrong)}/{n}  upstream GETs {gets}  bytes "
          f"{got['bytes']:.2f}x  TTFB {got['ttfb'][0]:.0f}/{got['ttfb'][1]:.0f} ms  TTLB "
          f"{got['ttlb'][0]:.2f}/{got['ttlb'][1]:.2f} s  CPU {cpus(cpu)} s  clients "
          f"{got['clients_cpu']:.1f} s  others {foreign:.2f} cores{fill_note}  (seeded and "
          f"primed in {ready:.0f} s, quiet {settled:.0f} s after)", flush=True)
    for line in got["problems"][:10]:
        print(f"    {line}", flush=True)
    return got


def herd_table(runs: dict[tuple[str, int], dict], counts: list[int], layer_mib: int) -> str:
    rows = header(f"herd: N clients at once, one uncached {layer_mib} MiB layer", "N",
                  "upstream GETs of the layer", "upstream bytes / layer", "wall (s)",
                  "TTFB median / max (ms)", "time to last byte median / max (s)",
                  "failed / wrong bytes", "CPU s: 3 caches + SeaweedFS + Redis",
                  "upstream registry CPU s", "clients' CPU s (curl + sha256)")
    for n in counts:
        m, d = runs.get(("m", n)), runs.get(("d", n))
        for kind, r in (("m", m), ("d", d)):
            if r is None:
                continue
            rows.append(f"| {HERD[kind]} | {n} | {r['gets']} | {r['bytes']:.2f}× | "
                        f"{r['wall']:.2f} | {fmt(r['ttfb'][0])} / {fmt(r['ttfb'][1])} | "
                        f"{r['ttlb'][0]:.2f} / {r['ttlb'][1]:.2f} | "
                        f"{r['failed']} / {r['wrong']} | {cpus(r['cpu'])} | "
                        f"{r['upstream_cpu']:.1f} | {r['clients_cpu']:.1f} |")
        if m and d:
            rows.append(
                f"| *mirror / Distribution* | {n} | {ratio(m['gets'], d['gets'])} | "
                f"{ratio(m['bytes'], d['bytes'])} | {ratio(m['wall'], d['wall'])} | "
                f"{ratio(m['ttfb'][0], d['ttfb'][0])} / {ratio(m['ttfb'][1], d['ttfb'][1])} | "
                f"{ratio(m['ttlb'][0], d['ttlb'][0])} / {ratio(m['ttlb'][1], d['ttlb'][1])} | | "
                f"{ratio(sum(m['cpu'].values()), sum(d['cpu'].values()))} (sum) | "
                f"{ratio(m['upstream_cpu'], d['upstream_cpu'])} | "
                f"{ratio(m['clients_cpu'], d['clients_cpu'])} |")
    return "\n".join(rows)


def herd_phase(work: Path, origin: str, shared: Shared, upstream: Upstream, log: UpstreamLog,
               counts: list[int], layer_mib: int, herds: list[Herd]) -> tuple[str, str]:
    """Both clusters up at once (one idles while the other runs), the order swapped for
    each N; returns the table and a note."""
    print(f"herd: {counts} clients, a fresh {layer_mib} MiB layer each run, round-robin "
          f"over {REPLICAS} replicas", flush=True)
    herds.append(start_herd_mirror(work / "herd", origin, shared))
    herds.append(start_herd_distribution(work / "herd", origin, shared))
    mirror, dist = herds[-2], herds[-1]
    runs: dict[tuple[str, int], dict] = {}
    for j, n in enumerate(counts):
        for herd in alternate([mirror, dist], j):
            runs[herd.kind, n] = herd_run(herd, shared, upstream, log, n, layer_mib, 600)
    fills = "; ".join(
        f"N={n}: holder {r['fills']['holder']:.0f}, follower {r['fills']['follower']:.0f}, "
        f"alone {r['fills']['alone']:.0f}, peer streams {r['fills']['peer_streams']:.0f}, "
        f"takeovers {r['fills']['takeovers']:.0f}"
        for (k, n), r in sorted(runs.items()) if k == "m")
    spread = max(r["released"] for r in runs.values()) * 1000
    others = max(r["others"] for r in runs.values())
    note = (f"For each N a fresh random layer of {layer_mib} MiB under a new repository "
            f"(its manifest fetched once through every replica first, so the herd asks for the "
            f"layer only), N curl clients released at once (all within {spread:.1f} ms: each "
            f"waits on a FIFO for its URL), client "
            f"i on replica i mod 3, every body piped into `openssl dgst -sha256` and checked. "
            f"Mirror: 3 `mirror serve` on one SeaweedFS bucket and one Redis key space, "
            f"`local_cache_size = \"2GiB\"`, `cluster.secret` set (advertise: the default). "
            f"Distribution: 3 `docker-registry serve` on one bucket of their own, "
            f"`blobdescriptor: redis` on the same redis-server, `redirect: disable: true`. "
            f"Upstream GETs and bytes from the upstream registry's own log (direct, no counting "
            f"proxy). Both clusters run at once, the idle one waiting; order swapped per N; one "
            f"run each. Other processes used up to {others:.2f} cores during a herd. Mirror "
            f"fill counters (/metrics, summed over replicas): {fills}.")
    problems = [f"{HERD[k]} N={n}: {line}" for (k, n), r in runs.items()
                for line in r["problems"]]
    if problems:
        note += "\n\n**Failed or wrong clients:**\n" + "\n".join(f"- {p}" for p in problems[:20])
    return herd_table(runs, counts, layer_mib), note


# -- main ------------------------------------------------------------------------------


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB layer, 5 s windows, 1 round, herd of 64 MiB")
    ap.add_argument("--layer-mib", type=int, help="size of the layer (default 256)")
    ap.add_argument("--seconds", type=float, help="each warm window (default 10)")
    ap.add_argument("--rounds", type=int, help="warm rounds, order swapped (default 2)")
    ap.add_argument("--conns", default="1,8", help="warm client counts")
    ap.add_argument("--herd", action="store_true",
                    help="only the herd: 3 mirror replicas against 3 Distribution replicas")
    ap.add_argument("--no-herd", action="store_true", help="everything but the herd")
    ap.add_argument("--herd-clients", default="32,64", help="herd client counts")
    ap.add_argument("--herd-mib", type=int,
                    help="the herd's layer (default: --layer-mib, 256; 64 with --quick)")
    args = ap.parse_args()
    if args.herd and args.no_herd:
        ap.error("--herd and --no-herd exclude each other")
    layer_mib = args.layer_mib or (64 if args.quick else 256)
    herd_mib = args.herd_mib or layer_mib
    seconds = args.seconds or (5 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 2)
    conns = [int(n) for n in args.conns.split(",")]
    herd_counts = [int(n) for n in args.herd_clients.split(",")]

    # A SIGTERM to this PID ends the run as Ctrl-C does: through the `finally` below, which
    # stops every process it started (by PID).
    signal.signal(signal.SIGTERM, _terminated)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-cluster-"))
    upstream = Upstream(work / "upstream")
    seaweed = SeaweedFS(work / "seaweed")
    redis = RedisServer(work / "redis")
    targets: list[Target] = []
    herds: list[Herd] = []
    started = time.monotonic()
    try:
        upstream.start()
        log = UpstreamLog(upstream.registry.log_path)
        origin = upstream.registry_url  # direct: the counting proxy is slower than it
        stamp = subprocess.run(["date", "-u"], capture_output=True, text=True,
                               check=True).stdout.strip()
        blocks = [f"### {stamp} — {machine()}"]
        if not args.herd:
            print(f"work dir {work}; seeding a {layer_mib} MiB layer ...", flush=True)
            seeded = seed(upstream, layer_mib, 1)
        seaweed.start()
        redis.start()
        shared = Shared(seaweed, redis)
        if not args.herd:
            blocks += cold_and_warm(work, origin, shared, seeded, log, targets, layer_mib,
                                    seconds, rounds, conns, args.quick)
            for t in targets:  # idle from here on; not in the herd's way
                t.stop()
        if not args.no_herd:
            if args.herd:
                print(f"work dir {work}", flush=True)
            table, note = herd_phase(work, origin, shared, upstream, log, herd_counts,
                                     herd_mib, herds)
            blocks += [f"**Herd** (`bench/cluster.sh{' --quick' if args.quick else ''}"
                       f"{' --herd' if args.herd else ''}`). " + note, table,
                       "\n".join(log_problems(t) for h in herds for t in h.replicas)]
        print("\n" + "\n\n".join(blocks))
        print(f"\ntotal {time.monotonic() - started:.0f}s; logs in {work}")
    finally:
        for h in herds:
            h.stop()
        for t in targets:
            t.stop()
        redis.stop()
        seaweed.kill()  # SIGKILL to its PID: its data is thrown away, no need to wait ~15 s
        upstream.stop()
        # Keep the logs, drop the blob copies.
        for big in [work / "upstream" / "registry" / "storage", work / "seaweed" / "data",
                    *(work / k / "root" for k in KEYS),
                    *(work / "herd" / t.key / "root" for h in herds for t in h.replicas)]:
            shutil.rmtree(big, ignore_errors=True)


def cold_and_warm(work: Path, origin: str, shared: Shared, seeded: Seeded, log: UpstreamLog,
                  targets: list[Target], layer_mib: int, seconds: float, rounds: int,
                  conns: list[int], quick: bool) -> list[str]:
    """The four caches (a)-(d), one at a time: a cold pull each, then the warm windows."""
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

    note = (f"`bench/cluster.sh{' --quick' if quick else ''}`: layer {layer_mib} "
            f"MiB, warm windows of {seconds:g} s, best of {rounds} round(s), curl "
            "clients; SeaweedFS 4.48 (`weed server`, one process) and redis-server on "
            f"the same machine. Other processes used up to {others:.2f} of the "
            f"{os.cpu_count()} cores during a warm window (column: in the one shown). "
            "The last row is the object of (c) read from SeaweedFS itself (a presigned "
            "URL): the ceiling of (c) and (d).")
    if refetched:
        note += f" **Upstream GETs of the layer while warm: {refetched}** (expected 0)."
    return [note, tables(cold, warm, conns, layer_mib),
            "\n".join(log_problems(t) for t in targets)]


if __name__ == "__main__":
    main()
