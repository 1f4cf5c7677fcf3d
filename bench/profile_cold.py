"""Profile of one lone cold pull (issue 13): where its time goes, the mirror against Distribution.

Everything runs on 127.0.0.1 and is started and stopped (by PID) here, the way bench/run.py
sets up its cold N=1 rows: tests.support's upstream (Distribution with bearer-token auth,
like Docker Hub) seeded with one incompressible layer of `--layer-mib`; the mirror as
`python -m mirror serve` with its defaults and that registry as its default upstream;
Distribution 2.8 in proxy mode (Debian's config plus `proxy.remoteurl`) as the reference.
Each cold pull restarts the cache on an empty storage directory, and one curl fetches the
manifest by tag and then the layer to /dev/null (bench/run.py's client, unchanged).

Three phases, each on its own pulls, so that no tool's cost lands in another's numbers:

- timing: `--rounds` alternating rounds of mirror and Distribution without any tool
  attached: wall, blob TTFB, server CPU (utime + stime from /proc/PID/stat) at the client's
  end and once the cache went quiet (Distribution stores the blob with a second upstream
  fetch after the client is served), and context switches over all threads (voluntary ones
  are the server's wake-ups: each is a sleep in epoll_wait, futex or a blocking call);
- strace: one pull each with `strace -c -f` attached to every thread: syscalls by kind;
- py-spy: one mirror pull with `py-spy record --native --threads --idle` sampling it; the
  samples are sorted into the fill (upstream read, spool write, sha256), the reader
  (`fill_response` and its sendfile), the event loop's own work, GIL waits and idle, and
  the top functions are listed by own and by cumulative samples for each.

Output: a markdown report on stdout and in `<work>/report.md` (per-MiB and per-GiB
figures), the raw py-spy stacks (`pyspy.txt`, collapsed format: speedscope and
flamegraph.pl read it) and the strace summaries, in the work directory it names.

Run: .venv/bin/python bench/profile_cold.py [--layer-mib 512] [--rounds 3] [--phases ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import (  # noqa: E402  bench/run.py: the same servers, client and upstream log
    BIG,
    DIST,
    MIRROR,
    Child,
    Server,
    UpstreamLog,
    curl,
    curl_speed,
    machine,
    quiesce,
    run_curls,
    seed,
    start_tls_front,
)

from tests.support.stack import Upstream  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
PHASES = ("timing", "strace", "pyspy")


class SourceChild(Child):
    """A Child started in `cwd`: `python -m mirror` then imports the tree there."""

    def __init__(self, argv: list[str], log: Path, ping: str, env: dict, cwd: Path) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.pid = self.proc.pid
        self._wait_ready(ping, log)


@dataclass
class SourceServer(Server):
    """bench/run.py's mirror, run from another tree (`--source`: an experiment's copy)."""

    source: Path = REPO

    def _launch(self, port: int, storage: Path) -> Child:
        return self._launch_mirror(port, storage)  # whatever its name: a variant is a mirror

    def _launch_mirror(self, port: int, storage: Path) -> Child:
        config = self.work / "mirror.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n\n[storage]\nroot = "{storage}"\n\n'
            f'[[upstreams]]\nname = "docker.io"\nurl = "{self.upstream_url}"\ndefault = true\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        env["PYTHONPATH"] = str(self.source)
        return SourceChild([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                           self.log, f"{self.url}/v2/", env, self.source)


# -- what a process used ---------------------------------------------------------------


def switches(pid: int) -> dict[int, tuple[int, int]]:
    """(voluntary, involuntary) context switches of each live thread of `pid`."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        got = dict(re.findall(r"^(\w+_ctxt_switches):\s+(\d+)$", status, re.M))
        counts[int(task.name)] = (int(got["voluntary_ctxt_switches"]),
                                  int(got["nonvoluntary_ctxt_switches"]))
    return counts


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """(name, utime + stime seconds) of each live thread of `pid`: "main" (the event loop's,
    for the mirror) or "others" (Python 3.11 gives its threads no OS names to tell apart)."""
    tick = os.sysconf("SC_CLK_TCK")
    got = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if int(task.name) == pid else "others"
        fields = stat.rpartition(")")[2].split()
        got[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return got


def cpu_by_thread(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per thread name (the others summed) between two snapshots."""
    used: dict[str, float] = collections.Counter()
    for tid, (name, seconds) in after.items():
        used[name] += seconds - before.get(tid, (name, 0.0))[1]
    return dict(used)


def switched(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
             ) -> tuple[int, int]:
    """Switches between two snapshots; threads born since count from 0 (threads that ended
    are lost: the executor's and Go's threads live for the whole pull)."""
    vol = sum(v - before.get(t, (0, 0))[0] for t, (v, _) in after.items())
    invol = sum(n - before.get(t, (0, 0))[1] for t, (_, n) in after.items())
    return vol, invol


@dataclass
class Pull:
    server: str
    wall: float
    ttfb: float
    ok: bool
    cpu_at_end: float  # server CPU seconds from the first request to the client's last byte
    cpu_quiet: float  # ... to the cache going quiet (its own work after the client left)
    voluntary: int
    involuntary: int
    upstream_gets: int
    upstream_bytes: int
    threads: int
    fill_seconds: float | None  # the mirror's log: upstream headers to the blob committed
    thread_cpu: dict  # thread name -> CPU seconds to the client's last byte
    tool: dict = field(default_factory=dict)


class Tool:
    """Something attached to the server for one pull: started before, finished after (once
    the cache went quiet, or with `early` as soon as the mirror logged the blob stored)."""

    early = False

    def start(self, pid: int) -> None: ...

    def finish(self) -> dict:
        return {}


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The upstream registry's PID, set by main: its CPU during a pull shares the two cores.
UPSTREAM_PID: list[int] = []


def cold_pull(server: Server, seeded, log: UpstreamLog, tool: Tool | None = None) -> Pull:
    server.restart()
    child = server.child
    assert child is not None
    if tool is not None:
        tool.start(child.pid)
    mark, cpu0, ctx0 = log.mark(), child.cpu_seconds(), switches(child.pid)
    threads0 = thread_cpu(child.pid)
    upstream0 = process_cpu(UPSTREAM_PID[0]) if UPSTREAM_PID else 0.0
    logged = server.log.stat().st_size
    urls = (f"{server.url}/v2/{BIG}/manifests/latest",
            f"{server.url}/v2/{BIG}/blobs/{seeded.layer}")
    wall, clients = run_curls([curl(600, *urls)], timeout=600)
    cpu_end, ctx_end = child.cpu_seconds(), switches(child.pid)
    per_thread = cpu_by_thread(threads0, thread_cpu(child.pid))
    if UPSTREAM_PID:  # not the server's: the upstream registry serving it meanwhile
        per_thread["upstream registry"] = process_cpu(UPSTREAM_PID[0]) - upstream0
    got = {}
    if tool is not None and tool.early:
        wait_stored(server.log, logged)
        got = tool.finish()
    quiesce(child, log)
    cpu_quiet = child.cpu_seconds()
    threads = len(list(Path(f"/proc/{child.pid}/task").iterdir()))
    if tool is not None and not tool.early:
        got = tool.finish()
    server.stop()
    log.settle()
    gets, written = log.downloads(mark, seeded.layer)
    transfers = clients[0]
    ok = (len(transfers) == 2 and transfers[0].status == 200 and transfers[1].status == 200
          and transfers[1].size == seeded.layer_size)
    vol, invol = switched(ctx0, ctx_end)
    # The mirror logs "stored DIGEST: N bytes in S s": the fill's own duration.
    with open(server.log, "rb") as f:
        f.seek(logged)
        stored = re.search(rb"stored \S+: \d+ bytes in ([\d.]+)s", f.read())
    pull = Pull(server.name, wall, transfers[1].ttfb if len(transfers) == 2 else float("nan"),
                ok, cpu_end - cpu0, cpu_quiet - cpu0, vol, invol, gets, written, threads,
                float(stored.group(1)) if stored else None, per_thread, got)
    print(f"  {server.name:<12} wall {wall:6.2f}s  ok {ok}  CPU {pull.cpu_at_end:.2f}s "
          f"(quiet {pull.cpu_quiet:.2f}s)  switches {vol}+{invol}  upstream GETs {gets}"
          + (f"  [{', '.join(got)}]" if got else ""), flush=True)
    return pull


def wait_stored(path: Path, since: int, timeout: float = 30) -> None:
    """Until the mirror's log says the blob was stored (the fill's last step, the commit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            f.seek(since)
            if b"stored sha256:" in f.read():
                return
        time.sleep(0.01)


# -- strace -c -------------------------------------------------------------------------


class Strace(Tool):
    """`strace -c -f` attached to every thread of the server; the summary parsed."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen | None = None

    def start(self, pid: int) -> None:
        # -f with -p: every thread of the process, and the ones it starts later.
        argv = ["strace", "-c", "-f", "-o", str(self.out), "-p", str(pid)]
        self.err = self.out.with_suffix(".err")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # "strace: Process N attached with K threads"
            said = self.err.read_text(errors="replace")
            if "attached" in said:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"strace did not attach: {self.err.read_text()[-500:]}")

    def finish(self) -> dict:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # detaches and writes the summary
        self.proc.wait(30)
        calls: dict[str, int] = {}
        errors: dict[str, int] = {}
        seconds: dict[str, float] = {}
        # "% time     seconds  usecs/call     calls    errors syscall"; errors may be blank
        row = re.compile(r"^\s*[\d.]+\s+([\d.]+)\s+\d+\s+(\d+)\s+(\d+\s+)?(\w+)\s*$")
        for line in self.out.read_text().splitlines():
            m = row.match(line)
            if m and m.group(4) != "total":
                calls[m.group(4)] = int(m.group(2))
                errors[m.group(4)] = int(m.group(3) or 0)
                seconds[m.group(4)] = float(m.group(1))
        return {"syscalls": calls, "errors": errors, "seconds": seconds}


# -- py-spy ----------------------------------------------------------------------------


class PySpy(Tool):
    """`py-spy record` of every thread, idle ones included, with native frames; from just
    before the client starts to the blob committed."""

    early = True

    def __init__(self, out: Path, rate: int, native: bool) -> None:
        self.out, self.rate, self.native = out, rate, native
        self.proc: subprocess.Popen | None = None

    def start(self, pid: int) -> None:
        argv = [pyspy(), "record", "--pid", str(pid), "--rate", str(self.rate), "--threads",
                "--idle", "--format", "raw", "-o", str(self.out)]
        if self.native:
            argv.append("--native")
        self.err = self.out.with_suffix(".err")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "Sampling process" in self.err.read_text(errors="replace"):
                return
            time.sleep(0.02)
        raise RuntimeError(f"py-spy did not start: {self.err.read_text()[-500:]}")

    def finish(self) -> dict:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # writes the file
        self.proc.wait(60)
        said = self.err.read_text(errors="replace")
        m = re.search(r"Samples: (\d+) Errors: (\d+)", said)
        return {"samples": int(m.group(1)) if m else 0, "errors": int(m.group(2)) if m else -1}


def pyspy() -> str:
    for candidate in (Path(sys.executable).parent / "py-spy", shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("py-spy is missing: .venv/bin/python -m pip install py-spy")


# Which part of the pull a stack belongs to, by the frames in it (first match wins).
# The fill: the upstream body read (aiohttp's client protocol and StreamReader), the fill
# task, and its chunk stores (pwrite + sha256) on the executor.
# asyncio's socket read callback counts here too: with one client, the only other bytes it
# reads are that client's request line and headers.
FILL = re.compile(r"^(Fill\.|Body\.chunks|ResponseHandler\.|StreamReader\.|"
                  r"_SelectorSocketTransport\._read_ready\w* |sock_recv\w* |"
                  r"_store |_advance |pwrite_all|EVP_|SHA256|BlobStore\.|os_fsync )|"
                  r"\((fill|client_proto|streams)\.py")
# The reader: fill_response, its wait for readable bytes, and asyncio's sendfile steps.
READER = re.compile(r"(^|\.)(fill_response|_send_fill|_sendfile|_respond|readable|"
                    r"\w*sendfile\w*)( |\.<locals>)|\(api/responses\.py")
# CPython's GIL is a condition variable (take_gil is inlined): a thread in pthread_cond_*wait
# is waiting for the GIL, unless it is in a lock's wait (PyThread_acquire_lock_timed).
GIL = re.compile(r"^(take_gil|drop_gil|pthread_cond_timedwait|pthread_cond_wait|"
                 r"___?pthread_cond_\w*wait\w*) ")
METADATA = re.compile(r"\(storage/(sqlite|database|ledger|metadata)\.py\)")
# A thread asleep: the loop in epoll_wait, an executor worker waiting for work, a sleep.
BLOCKING = re.compile(r"^(select_epoll_poll\w*|PyThread_acquire_lock_timed|time_sleep|"
                      r"epoll_wait|clock_nanosleep|pysleep) ")
IDLE_PY = re.compile(r"^(BaseSelector\.select|EpollSelector\.select|_worker|Queue\.get|"
                     r"SimpleQueue\.get|Condition\.wait|Event\.wait|Thread\.join) ")
# Frames every stack of a thread shares (start-up, the loop's dispatch, thread bootstrap):
# left out of the cumulative tables, where they would fill the top rows with 100%.
TRUNK = re.compile(r"<module>|_run_module_as_main|_run_code|main|_serve|run_app|"
                   r"BaseEventLoop\.(run_forever|run_until_complete|_run_once)|Handle\._run|"
                   r"thread_run|Thread\.(_bootstrap|_bootstrap_inner|run)|_worker|"
                   r"_?PyEval\w*|_?PyObject\w*|_?PyFunction\w*|method_vectorcall\w*|"
                   r"cfunction_\w*|context_run|_?PyCFunction\w*|task_step\w*|"
                   r"task_wakeup\w*|gen_send_ex\w*|_?PyGen\w*|slot_tp_call|_?PyVectorcall\w*|"
                   r"vectorcall\w*|0x[0-9a-f]+")


def trunk(name: str) -> bool:
    return name.startswith("[") or TRUNK.fullmatch(name.partition(" (")[0]) is not None


def frame_name(frame: str) -> str:
    """A frame without its line number; a bare native address as its library."""
    frame = frame.strip()
    m = re.fullmatch(r"0x[0-9a-f]+ \((.*)\)", frame)
    if m:
        return f"[{m.group(1)}]"
    return re.sub(r":\d+\)$", ")", frame)


def own_frame(names: list[str]) -> str:
    """The innermost named frame (a bare library address says nothing by itself)."""
    for i in range(len(names) - 1, -1, -1):
        if not names[i].startswith("["):
            return names[i] + (" → " + names[-1] if i != len(names) - 1 else "")
    return names[-1] if names else "?"


def classify(names: list[str]) -> str:
    """idle, gil, reader, fill, metadata (SQLite, on its own thread) or loop (everything
    else: the event loop's own work, request handling, logging)."""
    python = [n for n in names if n.endswith(".py)") or "<frozen" in n]
    if any(GIL.match(n) for n in names) and not any(
            n.startswith("PyThread_acquire_lock_timed ") for n in names):
        return "gil"
    working = any(FILL.search(n) or READER.search(n) for n in python)
    if not working and (any(BLOCKING.match(n) for n in names)
                        or python and IDLE_PY.match(python[-1])):
        return "idle"
    if any(READER.search(n) for n in names):
        return "reader"
    if any(FILL.search(n) for n in names):
        return "fill"
    if any(METADATA.search(n) for n in names):
        return "metadata"
    return "loop"


@dataclass
class Profile:
    rate: int
    by_part: collections.Counter = field(default_factory=collections.Counter)
    by_thread: dict = field(default_factory=dict)  # thread name -> Counter(part)
    own: dict = field(default_factory=dict)  # part -> Counter(frame)
    cumulative: dict = field(default_factory=dict)  # part -> Counter(frame)


def read_profile(path: Path, rate: int) -> Profile:
    prof = Profile(rate)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        head, *frames = stack.split(";")
        # "thread (TID): NAME" opens each stack (--threads); executor threads are
        # asyncio_N, Go has none here (Distribution is not profiled).
        thread = re.sub(r"^thread \(\d+\): ", "", head)
        thread = re.sub(r"_\d+$", "_N", thread)
        names = [frame_name(f) for f in frames]
        part = classify(names)
        prof.by_part[part] += n
        prof.by_thread.setdefault(thread, collections.Counter())[part] += n
        if names:
            prof.own.setdefault(part, collections.Counter())[own_frame(names)] += n
            cum = prof.cumulative.setdefault(part, collections.Counter())
            for name in set(names):
                if not trunk(name):
                    cum[name] += n
    return prof


# -- the report ------------------------------------------------------------------------


def per_mib(value: float, size: int) -> str:
    return f"{value / (size / MiB):,.2f}"


SYSCALL_KINDS = [
    ("read/recvfrom (socket in)", ("read", "recvfrom", "recvmsg", "readv")),
    ("write/sendto (socket out)", ("write", "sendto", "sendmsg", "writev")),
    ("pwrite64 (spool)", ("pwrite64", "pwritev", "pwritev2")),
    ("pread64", ("pread64", "preadv")),
    ("sendfile", ("sendfile", "sendfile64")),
    ("splice", ("splice",)),
    ("epoll_wait / epoll_pwait", ("epoll_wait", "epoll_pwait", "epoll_pwait2")),
    ("epoll_ctl", ("epoll_ctl",)),
    ("futex", ("futex",)),
    ("nanosleep", ("nanosleep", "clock_nanosleep")),
    ("getpid (loop self-pipe check)", ("getpid",)),
    ("rt_sigprocmask / rt_sigreturn", ("rt_sigprocmask", "rt_sigreturn")),
    ("tgkill / sched_yield", ("tgkill", "sched_yield")),
    ("fallocate / fsync / fdatasync", ("fallocate", "fsync", "fdatasync")),
    ("openat / close / stat", ("openat", "close", "newfstatat", "fstat", "statx", "lseek")),
    ("madvise / mmap / munmap / brk", ("madvise", "mmap", "munmap", "brk", "mprotect")),
]


def syscall_table(pulls: dict[str, Pull], size: int) -> str:
    rows = ["| syscalls per MiB | mirror | Distribution |", "|---|---|---|"]
    counts = {name: p.tool.get("syscalls", {}) for name, p in pulls.items()}
    listed = set()
    for label, kinds in SYSCALL_KINDS:
        listed.update(kinds)
        vals = {name: sum(c.get(k, 0) for k in kinds) for name, c in counts.items()}
        if any(vals.values()):
            rows.append(f"| {label} | "
                        + " | ".join(per_mib(vals.get(s, 0), size) for s in (MIRROR, DIST))
                        + " |")
    others = collections.Counter()
    for name, c in counts.items():
        for k, v in c.items():
            if k not in listed:
                others[name] += v
    rows.append("| everything else | "
                + " | ".join(per_mib(others.get(s, 0), size) for s in (MIRROR, DIST)) + " |")
    rows.append("| **total** | " + " | ".join(
        per_mib(sum(counts.get(s, {}).values()), size) for s in (MIRROR, DIST)) + " |")
    for name in (MIRROR, DIST):
        p = pulls.get(name)
        if p is not None:
            rows.append(f"| context switches (vol + invol), under strace, {name} | "
                        f"{per_mib(p.voluntary, size)} + {per_mib(p.involuntary, size)} | |")
    top = {name: ", ".join(f"{k} {per_mib(v, size)}" for k, v in
                           collections.Counter(c).most_common(12))
           for name, c in counts.items()}
    notes = "\n".join(f"- {name}, by count: {t}" for name, t in top.items())
    errors = {name: {k: v for k, v in p.tool.get("errors", {}).items() if v}
              for name, p in pulls.items()}
    notes += "\n" + "\n".join(f"- {name}, calls that failed (EAGAIN etc.): {e}"
                              for name, e in errors.items() if e)
    return "\n".join(rows) + "\n\n" + notes


def timing_table(pulls: list[Pull], size: int) -> str:
    """One column per server (the mirror, Distribution, then any --variant), and the
    mirror's (or each variant's) ratio to Distribution."""
    gib = size / GiB
    names = list(dict.fromkeys([MIRROR, DIST] + [p.server for p in pulls]))
    variants = [n for n in names if n != DIST]
    by = {s: [p for p in pulls if p.server == s] for s in names}

    def med(server: str, value) -> float | None:
        got = [v for v in (value(p) for p in by[server] if p.ok) if v is not None]
        return statistics.median(got) if got else None

    def cell(x: float | None, digits: int = 2) -> str:
        return "—" if x is None else f"{x:,.{digits}f}"

    def ratio(a, b) -> str:
        return "—" if not a or not b else f"{a / b:.2f}×"

    rows = ["| cold N=1, median of rounds | " + " | ".join(names) + " | "
            + " | ".join(f"{v} / Distribution" for v in variants) + " |",
            "|---|" + "---|" * (len(names) + len(variants))]
    metrics = [
        ("complete bodies", None, 0),
        ("wall (s)", lambda p: p.wall, 2),
        ("MiB/s (layer / wall)", lambda p: size / MiB / p.wall, 0),
        ("blob TTFB (ms)", lambda p: p.ttfb * 1000, 1),
        ("fill, start to commit, as logged (s)", lambda p: p.fill_seconds, 2),
        ("server CPU to the last byte (s)", lambda p: p.cpu_at_end, 2),
        ("server CPU to quiet (s)", lambda p: p.cpu_quiet, 2),
        ("server CPU to the last byte, s/GiB", lambda p: p.cpu_at_end / gib, 2),
        ("server CPU to quiet, s/GiB", lambda p: p.cpu_quiet / gib, 2),
        ("voluntary switches (wake-ups) / MiB", lambda p: p.voluntary / (size / MiB), 2),
        ("involuntary switches / MiB", lambda p: p.involuntary / (size / MiB), 2),
        ("upstream GETs of the layer", lambda p: p.upstream_gets, 0),
        ("threads", lambda p: p.threads, 0),
    ]
    for label, value, digits in metrics:
        if value is None:
            cells = [f"{sum(p.ok for p in by[s])}/{len(by[s])}" for s in names]
            rows.append(f"| {label} | " + " | ".join(cells) + " |" + " — |" * len(variants))
            continue
        got = {s: med(s, value) for s in names}
        rows.append(f"| {label} | " + " | ".join(cell(got[s], digits) for s in names) + " | "
                    + " | ".join(ratio(got[v], got[DIST]) for v in variants) + " |")
    for server in names:  # the busiest threads: is one of them the bound (CPU ≈ wall)?
        shares: dict[str, list[float]] = {}
        for p in by[server]:
            for thread, seconds in p.thread_cpu.items():
                shares.setdefault(thread, []).append(seconds / p.wall)
        top = sorted(shares.items(), key=lambda kv: -statistics.median(kv[1]))
        rows.append(f"| {server}: CPU / wall of its main thread, its others, and the upstream's | "
                    + ", ".join(f"{t} {statistics.median(v):.0%}" for t, v in top)
                    + " |" + " |" * (len(names) + len(variants) - 1))
    rounds = "; ".join(f"{p.server} {p.wall:.2f}s/{p.cpu_at_end:.2f}s" for p in pulls)
    return "\n".join(rows) + f"\n\nEach pull in order (wall / CPU to the last byte): {rounds}."


def profile_section(prof: Profile, pull: Pull, size: int, top: int) -> str:
    total = sum(prof.by_part.values()) or 1
    ms = 1000 / prof.rate
    lines = [f"{total} samples at {prof.rate} Hz over all threads (wall of this pull "
             f"{pull.wall:.2f}s, CPU {pull.cpu_at_end:.2f}s; py-spy stops the process for "
             f"each sample, so times are stretched: read the shares).", "",
             "| thread | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]
    for thread, parts in sorted(prof.by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"| {thread} | " + " | ".join(
            f"{parts.get(p, 0) * ms:,.0f} ms" for p in PARTS) + " |")
    lines.append("| **all** | " + " | ".join(
        f"{prof.by_part.get(p, 0) * ms:,.0f} ms ({100 * prof.by_part.get(p, 0) / total:.0f}%)"
        for p in PARTS) + " |")
    lines.append("")
    lines.append("Per MiB of the layer: " + ", ".join(
        f"{p} {prof.by_part.get(p, 0) * ms / (size / MiB):.2f} ms" for p in PARTS) + ".")
    for part in ("fill", "reader", "loop", "metadata", "gil"):
        for kind, table in (("own", prof.own), ("cumulative", prof.cumulative)):
            counter = table.get(part)
            if not counter:
                continue
            lines += ["", f"Top {top} by {kind} samples, part **{part}** "
                      f"({prof.by_part[part] * ms:,.0f} ms in all):", "",
                      "| function | ms | % of part |", "|---|---|---|"]
            for name, n in counter.most_common(top):
                lines.append(f"| `{name}` | {n * ms:,.0f} | "
                             f"{100 * n / prof.by_part[part]:.0f}% |")
    return "\n".join(lines)


PARTS = ("fill", "reader", "metadata", "loop", "gil", "idle")


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds, order alternated")
    ap.add_argument("--phases", default=",".join(PHASES), help="any of " + ",".join(PHASES))
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--no-native", action="store_true", help="py-spy without --native")
    ap.add_argument("--top", type=int, default=15, help="functions listed per table")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="also time the mirror run from DIR (a patched copy), as NAME")
    ap.add_argument("--tls", action="store_true",
                    help="the caches fetch over HTTPS, through nginx terminating TLS in front "
                    "of the upstream registry (as from every public registry)")
    ap.add_argument("--source", type=Path, default=REPO,
                    help="run the mirror from this tree (e.g. a patched copy for an experiment)")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")

    work = Path(tempfile.mkdtemp(prefix="mirror-profile-"))
    upstream = Upstream(work / "upstream")
    servers: list[Server] = []
    front: Child | None = None
    report: list[str] = []
    started = time.monotonic()
    try:
        print(f"work dir {work}; seeding a {args.layer_mib} MiB layer ...", flush=True)
        upstream.start()
        seeded = seed(upstream, args.layer_mib, 1)
        size = seeded.layer_size
        log = UpstreamLog(upstream.registry.log_path)
        UPSTREAM_PID[:] = [upstream.registry._proc.pid]
        upstream_url = upstream.registry_url
        if args.tls:
            front, upstream_url, ca = start_tls_front(work / "tls", upstream.registry_url)
        servers = [SourceServer(MIRROR, work / "mirror", upstream_url,
                                source=args.source.resolve()),
                   Server(DIST, work / "distribution", upstream_url)]
        for s in servers:
            s.work.mkdir()
        token = upstream.tokens.mint(None, [f"repository:{BIG}:pull"])
        direct = curl_speed(f"{upstream.registry_url}/v2/{BIG}/blobs/{seeded.layer}", token)
        print(f"the upstream registry alone: {direct:.0f} MiB/s", flush=True)
        if args.tls:
            direct = curl_speed(f"{upstream_url}/v2/{BIG}/blobs/{seeded.layer}", token, ca)
            print(f"through the TLS front: {direct:.0f} MiB/s", flush=True)
        stamp = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
        report.append(f"### {stamp} — {machine()}\n\n`bench/profile_cold.py`: one cold pull "
                      f"(curl: manifest by tag, then the layer) of a {size / MiB:.0f} MiB "
                      f"layer ({size} bytes), each cache restarted on empty storage; "
                      f"upstream: the tests' Distribution with token auth, fetched "
                      + ("over HTTPS through nginx terminating TLS in front of it; "
                         if args.tls else "directly; ") +
                      f"one curl GET of the layer straight from it: {direct:.0f} MiB/s "
                      f"({size / MiB / direct:.2f} s), best of two; mirror from "
                      f"`{args.source}`.")
        pulls: list[Pull] = []
        if "timing" in phases:
            print("timing", flush=True)
            timed = list(servers)
            for variant in args.variant:
                name, _, tree = variant.partition("=")
                timed.append(SourceServer(f"{MIRROR}[{name}]", work / f"variant-{name}",
                                          upstream_url, source=Path(tree).resolve()))
                timed[-1].work.mkdir()
            for r in range(args.rounds):
                for server in timed if r % 2 == 0 else timed[::-1]:
                    pulls.append(cold_pull(server, seeded, log))
            servers += timed[2:]  # stopped at the end with the others
            report += ["#### Wall and CPU, no tool attached", timing_table(pulls, size)]
        traced: dict[str, Pull] = {}
        if "strace" in phases:
            print("strace -c", flush=True)
            for server in servers:
                traced[server.name] = cold_pull(
                    server, seeded, log, Strace(work / f"strace-{server.name.lower()}.txt"))
            report += ["#### Syscalls per MiB (`strace -c -f`, one pull each; strace slows "
                       "every syscall, so its wall times are not comparable)",
                       syscall_table(traced, size)]
        if "pyspy" in phases:
            print("py-spy", flush=True)
            out = work / "pyspy.txt"
            pull = cold_pull(servers[0], seeded, log, PySpy(out, args.rate, not args.no_native))
            prof = read_profile(out, args.rate)
            report += ["#### Where the mirror's time goes (py-spy, one pull)",
                       profile_section(prof, pull, size, args.top)]
        (work / "pulls.json").write_text(json.dumps(
            [p.__dict__ for p in pulls + list(traced.values())], indent=1, default=str))
        text = "\n\n".join(report)
        (work / "report.md").write_text(text + "\n")
        print("\n" + text)
        print(f"\ntotal {time.monotonic() - started:.0f}s; report, stacks and logs in {work}")
    finally:
        for s in servers:
            s.stop()
        if front is not None:
            front.stop()
        upstream.stop()
        for big in [work / "upstream" / "registry" / "storage",
                    *(s.work / "storage" for s in servers)]:
            shutil.rmtree(big, ignore_errors=True)


if __name__ == "__main__":
    main()
