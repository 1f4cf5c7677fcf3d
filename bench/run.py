"""Benchmark: this mirror against CNCF Distribution in proxy mode, with nginx as the ceiling.

Everything runs on 127.0.0.1, started and stopped by this script:

- the upstream: tests.support's Distribution with bearer-token auth (like Docker Hub),
  seeded with a big image (one random, incompressible layer) and a small multi-layer one;
- Distribution 2.8 in proxy mode (the reference), and this mirror, both pointed at it;
- nginx serving the same blob file (the machine's practical limit for warm blobs).

Phases, each repeated for several rounds with the servers' order alternated (the machine
is noisy; the table shows medians of timings and the worst of counts and peaks):

- cold pull: both caches empty (each mirror restarted on a fresh storage directory), N curl
  clients fetch the manifest by tag and then the big layer, concurrently;
- warm blob GET: 1 and 16 connections fetching the cached layer;
- manifests: 16 connections (wrk for GET, ab for HEAD), by tag and by digest.

Upstream GETs and bytes are taken from the upstream registry's own log (one "response
completed" line per request with the bytes written), not from the counting fault proxy of
tests.support: that proxy is Python and measured slower than the registry it fronts (the
check is printed at start), which would slow the upstream and tax the mirror that fetches
most (Distribution fetches once per client).

Run: bench/run.sh [--quick]   (or: python bench/run.py --help)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mirror.ops.certs import make_ca_and_server_cert  # noqa: E402
from tests.support import images  # noqa: E402  (needs the repo root on sys.path)
from tests.support.registry import free_port  # noqa: E402
from tests.support.stack import Upstream  # noqa: E402

MiB = 1 << 20
ACCEPT = f"Accept: {images.DOCKER_MANIFEST}"
BIG, SMALL = "bench/big", "bench/small"
MIRROR, DIST, NGINX = "mirror", "Distribution", "nginx"
CURL_STATS = "%{http_code} %{size_download} %{time_starttransfer}\\n"


# -- processes -------------------------------------------------------------------------


class Child:
    """One server process we started: waited for until it answers HTTP, stopped by its PID."""

    def __init__(self, argv: list[str], log: Path, ping: str, env: dict | None = None) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.pid = self.proc.pid
        self._wait_ready(ping, log)

    def _wait_ready(self, url: str, log: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(url, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is listening
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{url} did not come up; log {log}:\n" + log.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        # Fields after the parenthesised command name; utime and stime are 14th and 15th.
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A named server kind that can be (re)started on a fresh storage directory."""
    name: str
    work: Path
    upstream_url: str
    child: Child | None = None
    url: str = ""

    def restart(self) -> "Server":
        self.stop()
        storage = self.work / "storage"
        shutil.rmtree(storage, ignore_errors=True)
        storage.mkdir(parents=True)
        for _attempt in range(3):  # free_port is racy: another process may take the port
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            try:
                self.child = self._launch(port, storage)
                return self
            except RuntimeError:
                continue
        raise RuntimeError(f"{self.name} would not start; see {self.log}")

    @property
    def log(self) -> Path:
        return self.work / "server.log"

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def _launch(self, port: int, storage: Path) -> Child:
        if self.name == MIRROR:
            return self._launch_mirror(port, storage)
        return self._launch_distribution(port, storage)

    def _launch_mirror(self, port: int, storage: Path) -> Child:
        config = self.work / "mirror.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n\n[storage]\nroot = "{storage}"\n\n'
            f'[[upstreams]]\nname = "docker.io"\nurl = "{self.upstream_url}"\ndefault = true\n')
        # The mirror's defaults otherwise (access log on, tag_ttl 5m): what users run.
        # MIRROR_* from the caller's environment would override the file: drop them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        return Child([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                     self.log, f"{self.url}/v2/", env)

    def _launch_distribution(self, port: int, storage: Path) -> Child:
        config = self.work / "config.yml"
        # Debian's default config (inmemory blob descriptor cache, info logging), proxy mode.
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n  fields:\n    service: proxy\n"
            f"storage:\n  cache:\n    blobdescriptor: inmemory\n"
            f"  filesystem:\n    rootdirectory: {storage}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
            f"proxy:\n  remoteurl: {self.upstream_url}\n")
        return Child(["docker-registry", "serve", str(config)], self.log, f"{self.url}/v2/")


def start_nginx(work: Path, blob: bytes) -> tuple[Child, str]:
    """nginx serving `blob` at /blob, as fast as this machine serves a file."""
    root = work / "root"
    root.mkdir(parents=True)
    (root / "blob").write_bytes(blob)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return _nginx(work, f"sendfile on;\n  server {{ listen 127.0.0.1:{port}; root {root}; }}",
                  f"{url}/blob"), f"{url}/blob"


def start_tls_front(work: Path, backend: str) -> tuple[Child, str, Path]:
    """nginx terminating TLS in front of `backend`, so that the caches fetch over HTTPS as
    they do from every public registry: (its process, its https URL, the CA to trust). The
    caller sets SSL_CERT_FILE to the CA before starting the caches (Python's and Go's TLS
    both read it)."""
    work.mkdir(parents=True)
    ca, cert, key = make_ca_and_server_cert(work, ["127.0.0.1"])
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    os.environ["SSL_CERT_FILE"] = str(ca)  # for the readiness check below
    # Buffered in memory only, in large pieces: nginx's default 4-8 KiB pieces made it the
    # bottleneck (~80 MiB/s), and it must cost both caches as little as it can.
    child = _nginx(work, f"""server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass {backend};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering on;
      proxy_buffer_size 64k;
      proxy_buffers 16 1m;
      proxy_busy_buffers_size 2m;
      proxy_max_temp_file_size 0;
    }}
  }}""", f"{url}/v2/")
    return child, url, ca


def _nginx(work: Path, http_block: str, ping: str) -> Child:
    """nginx (2 workers, no access log, everything under `work`) with `http_block` inside
    its http {}, waited for until `ping` answers."""
    conf = work / "nginx.conf"
    conf.write_text(f"""\
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/error.log;
user root;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  default_type application/octet-stream;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  {http_block}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    # -e: nginx opens its compiled-in error log before reading the config; keep it here.
    return Child([nginx, "-e", str(work / "error.log"), "-c", str(conf), "-g", "daemon off;"],
                 work / "server.log", ping)


# -- the upstream ----------------------------------------------------------------------


@dataclass
class Seeded:
    big: images.Image
    small: images.Image

    @property
    def layer(self) -> str:
        return self.big.layer_digests[0]

    @property
    def layer_size(self) -> int:
        return len(self.big.blobs[self.layer])


def seed(upstream: Upstream, layer_mib: int, small_layers: int) -> Seeded:
    # randbytes is limited to < 256 MiB per call: build the layer from 64 MiB pieces.
    payload = b"".join(images.random_bytes(min(64, layer_mib - i) * MiB, f"bench/{i}")
                       for i in range(0, layer_mib, 64))
    big = images.build_image(BIG, ["latest"], [{"data.bin": payload}])
    small = images.build_image(SMALL, ["latest"], [
        {f"layer{i}.bin": images.random_bytes(256 * 1024, f"small/{i}")}
        for i in range(small_layers)])
    for image in (big, small):
        images.push(upstream.registry, upstream.tokens, image)
    return Seeded(big, small)


class UpstreamLog:
    """Blob downloads as the upstream registry logged them ("response completed" lines)."""

    LINE = re.compile(r'msg="response completed".*http\.request\.method=(\w+).*'
                      r'http\.request\.uri="([^"]*)".*http\.response\.status=(\d+)'
                      r'.*http\.response\.written=(\d+)')

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size

    def settle(self, timeout: float = 15) -> None:
        """Wait until the log stops growing: a transfer is logged when it ends."""
        deadline, size = time.monotonic() + timeout, -1
        while time.monotonic() < deadline and size != self.mark():
            size = self.mark()
            time.sleep(0.5)

    def downloads(self, since: int, digest: str) -> tuple[int, int]:
        """(GETs answered 2xx, body bytes written) for `digest` after offset `since`."""
        with open(self.path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        gets = written = 0
        for m in self.LINE.finditer(text):
            method, uri, status, sent = m.groups()
            if method == "GET" and uri.endswith(f"/blobs/{digest}") and status.startswith("2"):
                gets += 1
                written += int(sent)
        return gets, written


def quiesce(child: Child, log: UpstreamLog, timeout: float = 60) -> None:
    """Wait until a cache has finished its own work after the clients left.

    Distribution keeps fetching a blob upstream to store it after its clients are served;
    that fetch is logged only when it ends, so a quiet log alone proves nothing. Quiet
    means: for 1 s, under 20 ms of CPU used and no new upstream log line.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cpu, size = child.cpu_seconds(), log.mark()
        time.sleep(1)
        if child.cpu_seconds() - cpu < 0.02 and log.mark() == size:
            return


def curl_speed(url: str, token: str, ca: Path | None = None) -> float:
    """MiB/s of one GET of the blob at `url`, best of two (trusting `ca` for https)."""
    best = 0.0
    for _ in range(2):
        out = run(["curl", "-sS", "-o", "/dev/null", "-H", f"Authorization: Bearer {token}",
                   *(["--cacert", str(ca)] if ca else []),
                   "-w", "%{speed_download}", url], timeout=120)
        best = max(best, float(out) / MiB)
    return best


def check_counting_proxy(upstream: Upstream, seeded: Seeded) -> str:
    token = upstream.tokens.mint(None, [f"repository:{BIG}:pull"])
    path = f"/v2/{BIG}/blobs/{seeded.layer}"
    direct = curl_speed(upstream.registry_url + path, token)
    proxied = curl_speed(upstream.url + path, token)
    verdict = ("the proxy is the bottleneck" if proxied < 0.9 * direct
               else "the proxy keeps up, but an extra hop is an extra cost")
    return (f"Upstream check, one GET of the layer: registry {direct:.0f} MiB/s, through the "
            f"tests' counting proxy {proxied:.0f} MiB/s: {verdict}. Both mirrors therefore "
            f"fetch from the registry directly; upstream GETs and bytes come from its log.")


# -- clients ---------------------------------------------------------------------------


def run(argv: list[str], timeout: float) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


@dataclass
class Transfer:
    status: int
    size: int
    ttfb: float


def run_curls(commands: list[list[str]], timeout: float) -> tuple[float, list[list[Transfer]]]:
    """Run curl processes at once: (wall seconds, each one's transfers; [] if it failed)."""
    start = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for c in commands]
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, start + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results.append([Transfer(int(s), int(float(n)), float(t))
                        for s, n, t in (line.split() for line in out.splitlines())])
    return time.monotonic() - start, results


def curl(max_time: float, *urls: str) -> list[str]:
    argv = ["curl", "-s", "--max-time", str(int(max_time)), "-H", ACCEPT, "-w", CURL_STATS]
    for url in urls:
        argv += ["-o", "/dev/null", url]
    return argv


def fetch_and_hash(url: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as resp:
        while chunk := resp.read(MiB):
            digest.update(chunk)
    return resp.status, "sha256:" + digest.hexdigest()


# -- measurements ----------------------------------------------------------------------


@dataclass
class Results:
    """Per-round values: values[metric][server] = [round 0, round 1, ...]."""
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, metric: str, server: str, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(server, []).append(value)

    def median(self, metric: str, server: str) -> float | None:
        got = self.values.get(metric, {}).get(server)
        return statistics.median(got) if got else None

    def worst(self, metric: str, server: str) -> float | None:
        got = self.values.get(metric, {}).get(server)
        return max(got) if got else None

    def total(self, metric: str, server: str) -> float:
        return sum(self.values.get(metric, {}).get(server, []))


def cold_pull(server: Server, seeded: Seeded, log: UpstreamLog, n: int, res: Results) -> None:
    server.restart()
    assert server.child is not None
    mark, cpu = log.mark(), server.child.cpu_seconds()
    urls = (f"{server.url}/v2/{BIG}/manifests/latest",
            f"{server.url}/v2/{BIG}/blobs/{seeded.layer}")
    wall, clients = run_curls([curl(600, *urls) for _ in range(n)], timeout=600)
    ok = [c for c in clients if len(c) == 2 and c[0].status == 200 and c[1].status == 200
          and c[1].size == seeded.layer_size]
    quiesce(server.child, log)
    rss, cpu = server.child.peak_rss_mib(), server.child.cpu_seconds() - cpu
    # Stopped before counting, so that nothing it still does lands in the next cache's count.
    server.stop()
    log.settle()
    gets, written = log.downloads(mark, seeded.layer)
    key = f"cold{n}"
    res.add(f"{key}.wall", server.name, wall)
    ttfbs = [c[1].ttfb for c in ok] or [float("nan")]
    res.add(f"{key}.ttfb_med", server.name, statistics.median(ttfbs) * 1000)
    res.add(f"{key}.ttfb_max", server.name, max(ttfbs) * 1000)
    res.add(f"{key}.gets", server.name, gets)
    res.add(f"{key}.bytes", server.name, written / seeded.layer_size)
    res.add(f"{key}.rss", server.name, rss)
    res.add(f"{key}.cpu", server.name, cpu)
    res.add(f"{key}.ok", server.name, len(ok))
    res.add(f"{key}.clients", server.name, n)
    print(f"  cold N={n:<2} {server.name:<12} wall {wall:6.2f}s  ok {len(ok)}/{n}  "
          f"upstream GETs {gets}  bytes {written / seeded.layer_size:.2f}x  "
          f"RSS {rss:.0f} MiB  CPU {cpu:.1f}s", flush=True)


def late_joiner(server: Server, seeded: Seeded, log: UpstreamLog, res: Results,
                after: float = 0.3) -> None:
    """A second client asking for the layer `after` seconds into a lone cold pull: its
    TTFB (the mirror joins the running fill; Distribution starts a fetch of its own)."""
    server.restart()
    urls = (f"{server.url}/v2/{BIG}/manifests/latest",
            f"{server.url}/v2/{BIG}/blobs/{seeded.layer}")
    first = subprocess.Popen(curl(600, *urls), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    time.sleep(after)
    _, [late] = run_curls([curl(600, urls[1])], timeout=600)
    out, _ = first.communicate(timeout=600)
    assert server.child is not None
    quiesce(server.child, log)
    server.stop()
    log.settle()
    firsts = [Transfer(int(s), int(float(n)), float(t))
              for s, n, t in (line.split() for line in out.splitlines())]
    complete = all(t.status == 200 for t in firsts) and late and late[0].status == 200 \
        and late[0].size == seeded.layer_size
    res.add("late.ttfb", server.name, late[0].ttfb * 1000 if late else float("nan"))
    res.add("late.ok", server.name, 1 if complete else 0)
    res.add("late.clients", server.name, 1)
    print(f"  late joiner {server.name:<12} TTFB {res.values['late.ttfb'][server.name][-1]:.1f} "
          f"ms  complete {complete}", flush=True)


def prime(server: Server, seeded: Seeded, log: UpstreamLog) -> None:
    """Fill a cache with everything the warm phases read, and check the layer's bytes."""
    base = server.url
    for ref in ("latest", seeded.small.digest):
        run(curl(60, f"{base}/v2/{SMALL}/manifests/{ref}"), timeout=90)
    run(curl(60, f"{base}/v2/{BIG}/manifests/latest"), timeout=90)
    status, digest = fetch_and_hash(f"{base}/v2/{BIG}/blobs/{seeded.layer}")
    if (status, digest) != (200, seeded.layer):
        raise RuntimeError(f"{server.name} served the layer as {status} {digest}")
    assert server.child is not None
    quiesce(server.child, log)  # Distribution stores the blob after the response


def warm_blob(name: str, url: str, child: Child, conns: int, fetches: int, size: int,
              res: Results) -> None:
    if conns > 1:
        child.reset_peak_rss()
    cpu = child.cpu_seconds()
    wall, clients = run_curls([curl(600, *[url] * fetches) for _ in range(conns)], timeout=600)
    good = sum(t.size for c in clients for t in c if t.status == 200 and t.size == size)
    bad = conns * fetches - good // size
    res.add(f"warm{conns}.mibs", name, good / MiB / wall)
    res.add(f"warm{conns}.bad", name, bad)
    if conns > 1:
        res.add(f"warm{conns}.rss", name, child.peak_rss_mib())
        res.add(f"warm{conns}.cpu", name, child.cpu_seconds() - cpu)
    print(f"  warm {conns:>2} conn {name:<12} {good / MiB / wall:7.0f} MiB/s"
          + (f"  ({bad} bad)" if bad else ""), flush=True)


UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
FAILED = {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": 1.0}


def manifest_load(url: str, method: str, seconds: int, work: Path) -> dict[str, float]:
    """req/s, p50 and p99 (ms) and errors of 16 connections asking for `url`.

    GET with wrk. HEAD with ab: Debian's wrk 4.1 (and h2load) wait for the body that a HEAD
    answer's Content-Length announces but never sends, and stall at 0 req/s.
    """
    return wrk_get(url, seconds) if method == "GET" else ab_head(url, seconds, work)


def wrk_get(url: str, seconds: int, connections: int = 16) -> dict[str, float]:
    out = subprocess.run(["wrk", "--latency", f"-c{connections}", f"-t{min(2, connections)}",
                          f"-d{seconds}s", "-H", ACCEPT, url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        print(f"    wrk failed: {out[-500:]}", flush=True)
        return FAILED
    pct = {p: float(v) * UNIT_MS[u] for p, v, u in  # "     99%    2.03ms"
           re.findall(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    errors = re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out)
    return {"rps": float(rps.group(1)), "p50": pct["50"], "p99": pct["99"],
            "errors": float(sum(map(int, errors)))}


def ab_head(url: str, seconds: int, work: Path) -> dict[str, float]:
    csv = work / "ab.csv"  # ab's text report rounds percentiles to whole ms; its CSV does not
    out = subprocess.run(["ab", "-q", "-k", "-i", "-c16", f"-t{seconds}", "-n100000000",
                          "-e", str(csv), "-H", ACCEPT, url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    if rps is None:
        print(f"    ab failed: {out[-500:]}", flush=True)
        return FAILED
    pct = dict(re.findall(r"^(50|99),([\d.]+)$", csv.read_text(), re.M))
    errors = re.findall(r"(?:Failed requests|Non-2xx responses):\s+(\d+)", out)
    return {"rps": float(rps.group(1)), "p50": float(pct["50"]), "p99": float(pct["99"]),
            "errors": float(sum(map(int, errors)))}


MANIFEST_KINDS = [("HEAD", "tag"), ("GET", "tag"), ("HEAD", "digest"), ("GET", "digest")]


def manifests(server: Server, seeded: Seeded, seconds: int, work: Path, res: Results) -> None:
    for method, by in MANIFEST_KINDS:
        ref = "latest" if by == "tag" else seeded.small.digest
        got = manifest_load(f"{server.url}/v2/{SMALL}/manifests/{ref}", method, seconds, work)
        for stat, value in got.items():
            res.add(f"man.{method}.{by}.{stat}", server.name, value)
        print(f"  {method:<4} by {by:<6} {server.name:<12} {got['rps']:8.0f} req/s  "
              f"p50 {got['p50']:.2f} ms  p99 {got['p99']:.2f} ms"
              + (f"  ({got['errors']:.0f} errors)" if got["errors"] else ""), flush=True)


def alternate(items: list, round_: int) -> list:
    """Who goes first swaps every round, so neither always runs on a warmer machine."""
    return items if round_ % 2 == 0 else items[::-1]


# -- the table -------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def table(res: Results, clients: list[int]) -> str:
    m, d = MIRROR, DIST
    rows = ["| measurement | mirror | Distribution | mirror / Distribution | nginx | target | |",
            "|---|---|---|---|---|---|---|"]

    def row(label, mv, dv, rat="—", nginx="—", target="", ok=None):
        rows.append(f"| {label} | {mv} | {dv} | {rat} | {nginx} | {target} | "
                    f"{'' if ok is None else verdict(ok)} |")

    for n in clients:
        k, strict = f"cold{n}", n >= 8
        mw, dw = res.median(f"{k}.wall", m), res.median(f"{k}.wall", d)
        complete = {s: f"{res.total(f'{k}.ok', s):.0f}/{res.total(f'{k}.clients', s):.0f}"
                    for s in (m, d)}
        row(f"cold N={n}: complete bodies", complete[m], complete[d], target="all",
            ok=res.total(f"{k}.ok", m) == res.total(f"{k}.clients", m))
        if strict:
            row(f"cold N={n}: wall (s)", fmt(mw, 2), fmt(dw, 2), ratio(mw, dw),
                target="< Distribution", ok=mw < dw)
        else:
            row(f"cold N={n}: wall (s)", fmt(mw, 2), fmt(dw, 2), ratio(mw, dw),
                target="≤ 0.8× Distribution", ok=mw is not None and dw is not None
                and mw <= 0.8 * dw)
        row(f"cold N={n}: blob TTFB median / max (ms)",
            *(f"{fmt(res.median(f'{k}.ttfb_med', s))} / {fmt(res.median(f'{k}.ttfb_max', s))}"
              for s in (m, d)),
            ratio(res.median(f"{k}.ttfb_med", m), res.median(f"{k}.ttfb_med", d)))
        mg, mb = res.worst(f"{k}.gets", m), res.worst(f"{k}.bytes", m)
        row(f"cold N={n}: upstream GETs of the layer, bytes / layer",
            *(f"{fmt(res.worst(f'{k}.gets', s))}, {fmt(res.worst(f'{k}.bytes', s), 2)}×"
              for s in (m, d)), ratio(mb, res.worst(f"{k}.bytes", d)),
            target="1, ≤ 1.02×" if strict else "",
            ok=(mg == 1 and mb <= 1.02) if strict else None)
        mr = res.worst(f"{k}.rss", m)
        row(f"cold N={n}: peak RSS (MiB)", fmt(mr), fmt(res.worst(f"{k}.rss", d)),
            ratio(mr, res.worst(f"{k}.rss", d)), target="≤ 80" if n == 32 else "",
            ok=(mr <= 80) if n == 32 else None)
        mc, dc = res.median(f"{k}.cpu", m), res.median(f"{k}.cpu", d)
        row(f"cold N={n}: server CPU (s)", fmt(mc, 1), fmt(dc, 1), ratio(mc, dc),
            target="" if strict else "≤ Distribution",
            ok=None if strict else (mc is not None and dc is not None and mc <= dc))
    if "late.ttfb" in res.values:
        lt = res.median("late.ttfb", m)
        complete = {s: f"{res.total('late.ok', s):.0f}/{res.total('late.clients', s):.0f}"
                    for s in (m, d)}
        row("late joiner (0.3 s into a lone cold pull): blob TTFB (ms), complete",
            *(f"{fmt(res.median('late.ttfb', s))}, {complete[s]}" for s in (m, d)),
            ratio(lt, res.median("late.ttfb", d)), target="< 50",
            ok=lt is not None and lt < 50 and res.total("late.ok", m) == res.total(
                "late.clients", m))

    for conns in (1, 16):
        k = f"warm{conns}"
        mv, dv, nv = (res.median(f"{k}.mibs", s) for s in (m, d, NGINX))
        bad = res.total(f"{k}.bad", m)
        row(f"warm blob GET, {conns} conn (MiB/s)" + (f", {bad:.0f} bad" if bad else ""),
            fmt(mv), fmt(dv), ratio(mv, dv), fmt(nv),
            f"≥ 0.95× nginx ({ratio(mv, nv)})", mv is not None and nv is not None
            and mv >= 0.95 * nv and not bad)
    mr = res.worst("warm16.rss", m)
    row("warm, 16 streams: peak RSS (MiB)", fmt(mr), fmt(res.worst("warm16.rss", d)),
        ratio(mr, res.worst("warm16.rss", d)), target="≤ 120", ok=mr is not None and mr <= 120)
    row("warm, 16 streams: server CPU (s)", fmt(res.median("warm16.cpu", m), 1),
        fmt(res.median("warm16.cpu", d), 1),
        ratio(res.median("warm16.cpu", m), res.median("warm16.cpu", d)))

    for method, by in MANIFEST_KINDS:
        k = f"man.{method}.{by}"
        mv, dv = res.median(f"{k}.rps", m), res.median(f"{k}.rps", d)
        errs = res.total(f"{k}.errors", m)
        need = 10 if by == "tag" else 3
        label = f"manifest {method} by {by}, 16 conns (req/s)"
        row(label + (f", {errs:.0f} errors" if errs else ""),
            fmt(mv), fmt(dv), ratio(mv, dv), target=f"≥ {need}× Distribution",
            ok=mv is not None and dv is not None and mv >= need * dv and not errs)
        p99 = res.median(f"{k}.p99", m)
        row(f"manifest {method} by {by}: p50 / p99 (ms)",
            *(f"{fmt(res.median(f'{k}.p50', s), 2)} / {fmt(res.median(f'{k}.p99', s), 2)}"
              for s in (m, d)), ratio(p99, res.median(f"{k}.p99", d)),
            target="p99 < 20" if by == "tag" else "",
            ok=(p99 is not None and p99 < 20) if by == "tag" else None)
    return "\n".join(rows)


def machine() -> str:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    ram = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return (f"{os.cpu_count()} CPUs ({model.group(1).strip() if model else 'unknown'}), "
            f"{ram / 1024 / 1024:.0f} GiB RAM")


def log_problems(server: Server) -> str:
    """The server log's warnings and errors, counted, with the first few distinct ones."""
    if not server.log.exists():
        return ""
    # Distribution's level=warning lines are start-up notices (no http.secret, no repo remover).
    pattern = re.compile(r"WARNING|ERROR|Traceback|level=(error|fatal|panic)")
    lines = [l for l in server.log.read_text(errors="replace").splitlines() if pattern.search(l)]
    if not lines:
        return f"{server.name} log: no warnings or errors."
    distinct = list(dict.fromkeys(re.sub(r"^\S+ \S+ |time=\"[^\"]*\" ", "", l)[:200]
                                  for l in lines))
    return (f"{server.name} log: {len(lines)} warning/error lines, e.g.:\n"
            + "\n".join(f"    {l}" for l in distinct[:4]))


def write_readme(block: str) -> None:
    """Put this run's results first under "## Results", keeping earlier runs below it."""
    readme = REPO / "bench" / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmark\n\n## Results\n"
    head, marker, rest = text.partition("## Results\n")
    if not marker:
        head, marker, rest = text.rstrip() + "\n\n", "## Results\n", ""
    readme.write_text(f"{head}{marker}\n{block}\n{rest.lstrip()}")


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a fast check: 64 MiB layer, 1 round, 2 s of wrk")
    ap.add_argument("--layer-mib", type=int, help="size of the big layer (default 512)")
    ap.add_argument("--rounds", type=int, help="repeats of every measurement (default 3)")
    ap.add_argument("--clients", default="1,8,32", help="cold-pull client counts")
    ap.add_argument("--small-layers", type=int, default=5,
                    help="layers of the small image used for manifests")
    ap.add_argument("--warm-gib", type=float, default=4,
                    help="at least this much data per warm measurement")
    ap.add_argument("--wrk-seconds", type=int, help="duration of each wrk run (default 5)")
    ap.add_argument("--no-readme", action="store_true", help="do not write bench/README.md")
    args = ap.parse_args()
    layer_mib = args.layer_mib or (64 if args.quick else 512)
    rounds = args.rounds or (1 if args.quick else 3)
    wrk_seconds = args.wrk_seconds or (2 if args.quick else 5)
    clients = [int(n) for n in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    upstream = Upstream(work / "upstream")
    servers: list[Server] = []
    nginx: Child | None = None
    started = time.monotonic()
    try:
        print(f"work dir {work}; seeding a {layer_mib} MiB layer ...", flush=True)
        upstream.start()
        seeded = seed(upstream, layer_mib, args.small_layers)
        log = UpstreamLog(upstream.registry.log_path)
        proxy_note = check_counting_proxy(upstream, seeded)
        print(proxy_note, flush=True)
        servers = [Server(name, work / name.lower(), upstream.registry_url)
                   for name in (MIRROR, DIST)]
        for s in servers:
            s.work.mkdir()
        res = Results()

        print("cold pulls", flush=True)
        for r in range(rounds):
            for n in clients:
                for server in alternate(servers, r):
                    cold_pull(server, seeded, log, n, res)
            for server in alternate(servers, r):
                late_joiner(server, seeded, log, res)

        print("warm blobs", flush=True)
        for server in servers:
            prime(server.restart(), seeded, log)
        nginx, nginx_url = start_nginx(work / "nginx", seeded.big.blobs[seeded.layer])
        warm = [(s.name, f"{s.url}/v2/{BIG}/blobs/{seeded.layer}", s.child) for s in servers]
        warm.append((NGINX, nginx_url, nginx))
        size = seeded.layer_size
        mark = log.mark()
        for r in range(rounds):
            for conns in (1, 16):
                fetches = max(1, round(args.warm_gib * 1024 * MiB / (conns * size)))
                for name, url, child in alternate(warm, r):
                    warm_blob(name, url, child, conns, fetches, size, res)
        log.settle()
        warm_refetches = log.downloads(mark, seeded.layer)[0]

        print("manifests", flush=True)
        for r in range(rounds):
            for server in alternate(servers, r):
                manifests(server, seeded, wrk_seconds, work, res)

        stamp = run(["date", "-u"], timeout=5).strip()
        block = "\n\n".join([
            f"### {stamp} — {machine()}",
            f"`bench/run.sh{' --quick' if args.quick else ''}`: layer {size / MiB:.0f} MiB "
            f"({size} bytes), {rounds} round(s), cold-pull clients {args.clients}; "
            f"medians over rounds, worst round for counts and peaks. {proxy_note}"
            + (f" **Upstream blob GETs during the warm phase: {warm_refetches}** (expected 0)."
               if warm_refetches else ""),
            table(res, clients),
            "\n".join(p for p in (log_problems(s) for s in servers) if p)])
        print("\n" + block)
        print(f"\ntotal {time.monotonic() - started:.0f}s; logs in {work}")
        if not args.no_readme:
            write_readme(block)
    finally:
        for s in servers:
            s.stop()
        if nginx is not None:
            nginx.stop()
        upstream.stop()
        # Keep the logs, drop the blob copies (several times the layer size).
        for big in [work / "upstream" / "registry" / "storage", work / "nginx" / "root",
                    *(s.work / "storage" for s in servers)]:
            shutil.rmtree(big, ignore_errors=True)


if __name__ == "__main__":
    main()
