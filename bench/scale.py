"""Scale: what the mirror costs as its cache grows — a full-size cache against 1% of it.

For each size, a storage root is filled with synthetic, valid content (bench/synthetic.py:
ledger items, manifests, tag records and tag lists, the catalog, two hosted repositories,
one repository with many tags) and measured without an upstream (`server.offline`, every
tag record fresh within a year-long `tag_ttl`):

- start: `python -m mirror serve` on the filled root until its first 200 on /v2/, and the
  server's VmRSS right after (idle);
- wrk (bench/run.py's, 16 connections): manifest GET by tag and by digest of one image
  (the warm case), by tag over 2,000 random tags (each answered from the database first),
  `tags/list?n=100` first and later pages (`&last=` near the end) of the cached repository
  with many tags and of the hosted one, and `_catalog?n=100` first and later pages;
- `mirror ls`, `mirror du` and `mirror gc` wall time (subprocesses, server stopped), with
  the time per listed item for ls/du, which list everything;
- one eviction pass of 1% of the budget: `Budget.check()` in-process on the root with
  `storage.max_size` just under what the ledger holds (high watermark 0.95, low 0.94), the
  same call the server makes every 5 s; its time per evicted item too, since a pass of 1%
  of the budget evicts a hundred times more at full size.

The table has each row at full size, at 1%, their ratio, and the target: startup < 2 s and
idle RSS < 150 MiB at full size; everything else flat or logarithmic, which this run calls
met when full/1% is within 1.5x (log 10^6 / log 10^4) for times and >= 0.67 for rates.

Run: .venv/bin/python bench/scale.py [--sizes 1%,full] [--seconds 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run  # noqa: E402  (bench/run.py: Child, wrk, machine, fmt)
import synthetic  # noqa: E402

from mirror import config as cfg  # noqa: E402
from tests.support.registry import free_port  # noqa: E402

# The synthetic images are OCI manifests; a client accepting them and indexes (class "index").
run.ACCEPT = f"Accept: {synthetic.OCI_MANIFEST}, {synthetic.OCI_INDEX}"
FULL = {"items": 1_000_000, "manifests": 200_000, "repositories": 50_000,
        "tags_in_one": 10_000}
SIZES = {"full": 1.0, "1%": 0.01}
RANDOM_TAGS = 2000
PAGE = 100
HIGH, LOW = 0.95, 0.94  # a pass from just above 0.95 of the budget down to 0.94 of it
LOG_RATIO = 1.5         # log(10^6) / log(10^4): what "logarithmic" allows, full against 1%


@dataclass
class Measured:
    size: str
    filled: synthetic.Filled
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def scaled(fraction: float) -> dict[str, int]:
    return {k: max(int(v * fraction), 1) for k, v in FULL.items()}


def write_config(work: Path, root: Path, port: int, max_size: int | None = None) -> Path:
    budget = (f"max_size = {max_size}\nhigh_watermark = {HIGH}\nlow_watermark = {LOW}\n"
              "keep_recent = 0\n") if max_size else ""
    upstreams = "".join(
        f'[[upstreams]]\nname = "{name}"\nurl = "http://127.0.0.1:9"\ntag_ttl = 31536000\n'
        + ("default = true\n" if name == "docker.io" else "") + "\n"
        for name in synthetic.UPSTREAMS)
    path = work / ("evict.toml" if max_size else "mirror.toml")
    path.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\noffline = true\n\n'
                    f'[storage]\nroot = "{root}"\n{budget}\n{upstreams}')
    return path


def get(url: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=dict([run.ACCEPT.split(": ", 1)]))
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def vm_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def wrk_paths(url: str, paths: list[str], seconds: int, work: Path) -> dict[str, float]:
    """run.wrk_get over many paths, picked at random per request (a wrk Lua script)."""
    script = work / "paths.lua"
    listed = ",\n".join(json.dumps(p) for p in paths)
    script.write_text(
        f"paths = {{\n{listed}\n}}\nwrk.headers[\"Accept\"] = {json.dumps(run.ACCEPT[8:])}\n"
        "request = function()\n  return wrk.format(nil, paths[math.random(#paths)])\nend\n")
    out = subprocess.run(["wrk", "--latency", "-c16", "-t2", f"-d{seconds}s", "-s",
                          str(script), url], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        print(f"    wrk failed: {out[-500:]}", flush=True)
        return run.FAILED
    pct = {p: float(v) * run.UNIT_MS[u] for p, v, u in
           re.findall(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    errors = re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out)
    return {"rps": float(rps.group(1)), "p50": pct["50"], "p99": pct["99"],
            "errors": float(sum(map(int, errors)))}


def timed(argv: list[str], timeout: float = 1800) -> float:
    started = time.monotonic()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr[-2000:]}")
    return time.monotonic() - started


def middle_name(root: Path, table: str, column: str, where: str = "") -> str:
    """A name near the end of a sorted list: a later page's `last`."""
    with sqlite3.connect(root / "metadata.sqlite") as db:
        count = db.execute(f"SELECT count(*) FROM {table} {where}").fetchone()[0]
        return db.execute(f"SELECT {column} FROM {table} {where} ORDER BY {column} "
                          "LIMIT 1 OFFSET ?", (count * 4 // 5,)).fetchone()[0]


def random_tag_paths(root: Path, count: int) -> list[str]:
    """Manifest paths of `count` tags of docker.io (the default upstream), spread evenly."""
    with sqlite3.connect(root / "metadata.sqlite") as db:
        rows = db.execute("SELECT repository, tag FROM tags WHERE repository LIKE "
                          "'docker.io/%' AND tag LIKE 'v%'").fetchall()
    step = max(len(rows) // count, 1)
    return [f"/v2/{r[len('docker.io/'):]}/manifests/{t}" for r, t in rows[::step][:count]]


def check_answers(url: str, made: synthetic.Filled, root: Path) -> None:
    """Every measured URL answers what the filled root holds (else the numbers mean nothing)."""
    status, headers, body = get(f"{url}/v2/{made.name}/manifests/{made.tag}")
    assert status == 200 and headers["Docker-Content-Digest"] == made.digest, headers
    assert "sha256:" + hashlib.sha256(body).hexdigest() == made.digest
    status, headers, body = get(f"{url}/v2/{made.big}/tags/list?n={PAGE}")
    assert json.loads(body)["tags"] == made.big_tags[:PAGE], body[:200]
    assert "rel=\"next\"" in headers.get("Link", ""), headers
    last = made.big_tags[len(made.big_tags) * 4 // 5]
    status, headers, body = get(f"{url}/v2/{made.big}/tags/list?n={PAGE}&last={last}")
    later = [t for t in made.big_tags if t > last][:PAGE]
    assert json.loads(body)["tags"] == later, body[:200]
    status, headers, body = get(f"{url}/v2/_catalog?n={PAGE}")
    names = json.loads(body)["repositories"]
    assert len(names) == PAGE and names == sorted(names), body[:200]
    status, headers, body = get(f"{url}/v2/{made.hosted_big}/tags/list?n={PAGE}")
    assert len(json.loads(body)["tags"]) == min(PAGE, len(made.big_tags)), body[:200]


async def evict_pass(config_path: Path) -> tuple[float, float, int, int]:
    """(seconds to open the ledger, seconds of one Budget.check pass, items, bytes)."""
    from mirror.cache.budget import Budget
    from mirror.storage.blobs import BlobStore
    from mirror.storage.index import Index
    from mirror.storage.memory import Memory
    from mirror.storage.sqlite import SqliteMetadata

    config = cfg.load(str(config_path), environ={})
    started = time.monotonic()
    metadata = SqliteMetadata(config.storage.root)
    opened = time.monotonic() - started
    try:
        store = BlobStore(config.storage.root, metadata)
        budget = Budget(config.storage, Index(metadata, Memory()), store)
        started = time.monotonic()
        items, freed = await budget.check()
        return opened, time.monotonic() - started, items, freed
    finally:
        await metadata.close()


def measure(size: str, fraction: float, work: Path, seconds: int) -> Measured:
    work.mkdir(parents=True, exist_ok=True)
    root = work / "storage"
    params = scaled(fraction)
    print(f"[{size}] filling {params} ...", flush=True)
    made = synthetic.fill(root, **params)
    m = Measured(size, made)
    m.values["fill s"] = made.seconds
    print(f"[{size}] filled in {made.seconds:.1f} s; starting the mirror", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(work, root, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    started = time.monotonic()
    child = run.Child([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                      work / "server.log", f"{url}/v2/", env)
    try:
        m.values["startup s"] = time.monotonic() - started
        m.values["idle RSS MiB"] = vm_rss_mib(child.pid)
        check_answers(url, made, root)
        loads = {
            "manifest by tag": f"{url}/v2/{made.name}/manifests/{made.tag}",
            "manifest by digest": f"{url}/v2/{made.name}/manifests/{made.digest}",
            "tags/list first page": f"{url}/v2/{made.big}/tags/list?n={PAGE}",
            "tags/list later page": f"{url}/v2/{made.big}/tags/list?n={PAGE}&last="
                                    f"{made.big_tags[len(made.big_tags) * 4 // 5]}",
            "hosted tags/list first page": f"{url}/v2/{made.hosted_big}/tags/list?n={PAGE}",
            "hosted tags/list later page": f"{url}/v2/{made.hosted_big}/tags/list?n={PAGE}"
                                           f"&last={made.big_tags[len(made.big_tags) * 4 // 5]}",
            "_catalog first page": f"{url}/v2/_catalog?n={PAGE}",
            "_catalog later page": f"{url}/v2/_catalog?n={PAGE}&last="
                                   f"{middle_name(root, 'catalog', 'name')}",
        }
        for name, target in loads.items():
            print(f"[{size}] wrk {name}", flush=True)
            m.values.update(_load(name, run.wrk_get(target, seconds)))
        print(f"[{size}] wrk manifest by random tag", flush=True)
        m.values.update(_load("manifest by random tag", wrk_paths(
            url, random_tag_paths(root, RANDOM_TAGS), seconds, work)))
        m.values["RSS after load MiB"] = vm_rss_mib(child.pid)
    finally:
        child.stop()
    mirror = [sys.executable, "-m", "mirror"]
    for command in ("ls", "du", "gc"):
        print(f"[{size}] mirror {command}", flush=True)
        m.values[f"mirror {command} s"] = timed([*mirror, command, "--config", str(config)])
    m.values["mirror ls us/tag"] = m.values["mirror ls s"] / made.tags * 1e6
    m.values["mirror du us/item"] = m.values["mirror du s"] / made.items * 1e6
    print(f"[{size}] eviction pass", flush=True)
    budget = int(made.total_bytes / (HIGH + 0.0005))
    opened, took, items, freed = asyncio.run(evict_pass(write_config(work, root, port, budget)))
    m.values.update({"ledger open s": opened, "eviction pass s": took, "evicted items": items,
                     "evicted % of budget": 100 * freed / budget,
                     "eviction us/item": took / max(items, 1) * 1e6})
    return m


def _load(name: str, result: dict[str, float]) -> dict[str, float]:
    return {f"{name} req/s": result["rps"], f"{name} p99 ms": result["p99"],
            f"{name} errors": result["errors"]}


# (row, target text, kind): kind "time"/"rate" are judged by ratio, "limit" by a bound.
ROWS = [
    ("fill s", "", None), ("startup s", "< 2 s at full size", ("limit", 2.0)),
    ("idle RSS MiB", "< 150 MiB", ("limit", 150.0)), ("RSS after load MiB", "", None),
    *[(f"{n} {unit}", "flat", ("rate" if unit == "req/s" else "time", None))
      for n in ("manifest by tag", "manifest by digest", "manifest by random tag",
                "tags/list first page", "tags/list later page", "hosted tags/list first page",
                "hosted tags/list later page", "_catalog first page", "_catalog later page")
      for unit in ("req/s", "p99 ms")],
    ("mirror ls s", "", None), ("mirror ls us/tag", "flat per item", ("time", None)),
    ("mirror du s", "", None), ("mirror du us/item", "flat per item", ("time", None)),
    ("mirror gc s", "flat or log", ("time", None)),
    ("ledger open s", "flat or log", ("time", None)),
    ("eviction pass s", "", None), ("evicted items", "", None),
    ("evicted % of budget", "~1%", None),
    ("eviction us/item", "flat per evicted item", ("time", None)),
]


def table(results: dict[str, Measured]) -> str:
    full, small = results.get("full"), results.get("1%")
    lines = ["| measure | full | 1% | full / 1% | target | met |", "|---|---|---|---|---|---|"]
    for key, target, judge in ROWS:
        a = full.values.get(key) if full else None
        b = small.values.get(key) if small else None
        ratio = a / b if a is not None and b else None
        ok = None
        if judge is not None:
            kind, bound = judge
            if kind == "limit" and a is not None:
                ok = a < bound
            elif kind == "time" and ratio is not None:
                ok = ratio <= LOG_RATIO
            elif kind == "rate" and ratio is not None:
                ok = ratio >= 1 / LOG_RATIO
        lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {target} | "
                     f"{'' if ok is None else ('yes' if ok else '**no**')} |")
    errors = [f"{s}: {k} = {v:.0f}" for s, m in results.items() for k, v in m.values.items()
              if k.endswith("errors") and v]
    if errors:
        lines.append("\nwrk errors (non-2xx, socket): " + "; ".join(errors))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1%,full", help="of: " + ", ".join(SIZES))
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--work", help="where the storage roots go (default: a temp dir)")
    parser.add_argument("--readme", action="store_true",
                        help="put the table first under bench/README.md's Results")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mirror-scale-"))
    results: dict[str, Measured] = {}
    started = time.monotonic()
    for size in args.sizes.split(","):
        results[size] = measure(size, SIZES[size], work / size.replace("%", "pct"),
                                args.seconds)
        (work / "results.json").write_text(json.dumps(
            {s: m.values for s, m in results.items()}, indent=1))
    stamp = run.run(["date", "-u"], timeout=5).strip()
    load = os.getloadavg()
    block = "\n\n".join([
        f"### Scale — {stamp} — {run.machine()}",
        f"`bench/scale.py --sizes {args.sizes} --seconds {args.seconds}`; full = "
        + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in FULL.items())
        + f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        table(results)])
    print("\n" + block)
    print(f"\ntotal {time.monotonic() - started:.0f} s; roots and logs in {work}")
    if args.readme:
        run.write_readme(block)


if __name__ == "__main__":
    main()
