"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser that sees client or upstream
input — the same ones tests/test_fuzz.py checks with hypothesis, for longer and guided by
the branches each input reaches.

    .venv/bin/pip install atheris          # not a test dependency
    .venv/bin/python bench/fuzz.py --seconds 120                  # the pure parsers
    .venv/bin/python bench/fuzz.py --seconds 60 --targets api     # through a live mirror

Each input picks a target from its first byte; the rest feeds that parser. A parse must end
in a value that passes the target's checks, or in a typed error (RegistryError,
ConfigError); anything else — another exception, a failed check — is a crash. Crashes are
counted (unique by target, exception type and the innermost mirror frame), the first input
of each is saved under --crashes, and fuzzing goes on, so one run reports every kind it
found. The run ends after --seconds or --runs and prints a JSON summary: executions per
target and the crashes.

The `api` targets run a mirror (make_app, a real 127.0.0.1 socket, a dummy upstream it
never needs) and send each input as a chunked upload's Content-Range or as a pushed
manifest: a 5xx is a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import sys
import tempfile
import time
import traceback
from itertools import pairwise
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Only the fuzzing child instruments (the supervising parent just reports).
with (atheris.instrument_imports(include=["mirror"]) if "--summary" in sys.argv
      else contextlib.nullcontext()):
    from mirror import config as cfg
    from mirror.api.responses import parse_ranges
    from mirror.cache.proxy import _next_link
    from mirror.errors import RegistryError
    from mirror.media import LIST_TYPES, OCI_MANIFEST, references
    from mirror.reference import Router, parse_digest, parse_name, parse_reference, parse_tag
    from mirror.upstream.auth import parse_challenges
    from mirror.upstream.client import _content_range

TYPED = (RegistryError, cfg.ConfigError)
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
ROUTER = Router(cfg.load(environ={}).upstreams)
ENV_KEYS = [f"MIRROR_{section.upper()}_{field.upper()}" for section, cls in cfg.SECTIONS.items()
            for field in cls.__dataclass_fields__] + [
    "MIRROR_UPSTREAM_DOCKER_IO_URL", "MIRROR_UPSTREAM_DOCKER_IO_TAG_TTL", "MIRROR_BOGUS"]


class Header:
    """A header-like string: mostly printable latin-1, as aiohttp hands headers over."""

    @staticmethod
    def take(fdp: atheris.FuzzedDataProvider, n: int) -> str:
        return fdp.ConsumeBytes(n).decode("latin-1")


# Regex matching runs in C, where libFuzzer sees no comparisons to learn from: so most
# targets build half their inputs from the grammar's pieces (structure-aware), and the
# dictionary (-dict) gives the mutator the tokens the parsers look for.
DICTIONARY = ["bytes=", "bytes ", "-", ",", "/", "*", "<", ">", ";", 'rel="next"', "://",
              "/v2/library/alpine/tags/list", "?n=", "Bearer", "Basic", "realm=", '"', "\\",
              "service=", "scope=", "sha256:", "sha512:", "{", "}", "[", "]", '"digest"',
              '"manifests"', '"layers"', '"config"', '"fsLayers"', '"blobSum"', "9" * 30,
              "GiB", "ms", "%", "true", "library/", "_", "__", "."]


def number(fdp: atheris.FuzzedDataProvider, size: int) -> str:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return str(fdp.ConsumeIntInRange(0, max(2 * size, 1)))
    if kind == 1:
        return "9" * fdp.ConsumeIntInRange(1, 6000)  # past int()'s 4300-digit limit
    if kind == 2:
        return "0" * fdp.ConsumeIntInRange(0, 30) + str(fdp.ConsumeIntInRange(0, size + 1))
    return Header.take(fdp, 4)


# -- the targets: each takes the data provider, parses, checks --------------------------

def t_name(fdp):
    text = fdp.ConsumeUnicodeNoSurrogates(300)
    for parse in (parse_name, parse_tag, parse_digest, parse_reference):
        try:
            assert parse(text) == text
        except TYPED:
            pass
    try:
        route = ROUTER.route(fdp.ConsumeUnicodeNoSurrogates(100),
                             ns=Header.take(fdp, 20) if fdp.ConsumeBool() else None,
                             prefix=Header.take(fdp, 20) if fdp.ConsumeBool() else None)
        parse_name(route.name)
    except TYPED:
        pass


def t_range(fdp):
    size = fdp.ConsumeIntInRange(0, 1 << 40) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 500)
    max_ranges = fdp.ConsumeIntInRange(1, 64)
    if fdp.ConsumeBool():
        specs = []
        for _ in range(fdp.ConsumeIntInRange(0, 70)):
            form = fdp.ConsumeIntInRange(0, 3)
            specs.append(f"{number(fdp, size)}-{number(fdp, size)}" if form == 0 else
                         f"{number(fdp, size)}-" if form == 1 else
                         f"-{number(fdp, size)}" if form == 2 else Header.take(fdp, 3))
        header = "bytes=" + ",".join(specs)
    else:
        header = Header.take(fdp, 4096)
    try:
        ranges = parse_ranges(header, size, max_ranges)
    except TYPED as e:
        assert e.status == 416 and e.headers == {"Content-Range": f"bytes */{size}"}
        return
    if ranges is not None:
        assert 1 <= len(ranges) <= max_ranges, "more ranges than limits.max_ranges"
        assert all(0 <= s < e <= size for s, e in ranges), "a range outside the blob"
        assert all(a[1] <= b[0] for a, b in pairwise(ranges)), "ranges overlap or unsorted"


def t_content_range(fdp):
    if fdp.ConsumeBool():
        value = f"bytes {number(fdp, 1000)}-{number(fdp, 1000)}/{number(fdp, 1000)}"
    else:
        value = Header.take(fdp, 200)
    try:
        first, total = _content_range(value)
    except TYPED:
        return
    assert isinstance(first, int) and (total is None or isinstance(total, int))


TOKEN_CHARS = set("!#$%&'*+.^_`|~-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def token(fdp: atheris.FuzzedDataProvider) -> str:
    return "".join(c for c in Header.take(fdp, 8) if c in TOKEN_CHARS) or "x"


def t_challenges(fdp):
    if fdp.ConsumeBool():  # challenges built by the grammar: each must come back, in order
        built = []
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            params = {token(fdp).lower(): "".join(c for c in Header.take(fdp, 20)
                                                  if c not in '"\\\r\n')
                      for _ in range(fdp.ConsumeIntInRange(0, 3))}
            built.append((token(fdp), params))
        header = ", ".join(" ".join([scheme] + [", ".join(f'{k}="{v}"' for k, v in params.items())]
                                    if params else [scheme]) for scheme, params in built)
        parsed = [(c.scheme, c.params) for c in parse_challenges([header])]
        assert parsed == [(s.lower(), p) for s, p in built], "a challenge was lost or mangled"
        return
    headers = [Header.take(fdp, 300) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    for challenge in parse_challenges(headers):
        assert challenge.scheme == challenge.scheme.lower()
        assert all(isinstance(v, str) for v in challenge.params.values())


def t_link(fdp):
    expected = "/v2/library/alpine/tags/list"
    if fdp.ConsumeBool():
        link = "".join(fdp.PickValueInList(["<", ">", "", expected, "http://h" + expected,
                                            "?n=1&last=x", '; rel="next"', ", ", "<x>"])
                       for _ in range(fdp.ConsumeIntInRange(0, 6)))
    else:
        link = Header.take(fdp, 300)
    target = _next_link(type("Answer", (), {"headers": {"Link": link}})(), expected)
    assert target is None or target.split("?")[0] == expected


def t_references(fdp):
    if fdp.ConsumeBool():
        depth = fdp.ConsumeIntInRange(0, 5000)
        body = b'{"manifests": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
    found = references(body)
    assert isinstance(found, list) and all(isinstance(d, str) for d in found)


def t_config(fdp):
    environ = {"MIRROR_STORAGE_ROOT": "/tmp/mirror-fuzz"}
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        key = ENV_KEYS[fdp.ConsumeIntInRange(0, len(ENV_KEYS) - 1)]
        environ[key] = (number(fdp, 100) + fdp.PickValueInList(["", "GiB", "s", "%", "ms"])
                        if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(60))
    try:
        assert isinstance(cfg.load(environ=environ), cfg.Config)
    except TYPED:
        pass


class Api:
    """A mirror on a real socket, driven synchronously from the fuzzer's thread."""

    def __init__(self) -> None:
        import aiohttp
        from aiohttp.test_utils import TestServer

        with atheris.instrument_imports(include=["mirror"]):
            from mirror.app import make_app
        self.loop = asyncio.new_event_loop()
        root = tempfile.mkdtemp(prefix="mirror-fuzz-")
        config = cfg.Config(server=cfg.Server(listen="127.0.0.1:0"),
                            storage=cfg.Storage(root=root),
                            upstreams=(cfg.Upstream("docker.io", "http://127.0.0.1:9",
                                                    default=True),))
        self.server = TestServer(make_app(config), host="127.0.0.1", port=0)
        self.loop.run_until_complete(self.server.start_server())
        self.base = f"http://127.0.0.1:{self.server.port}"
        self.session = aiohttp.ClientSession(loop=self.loop, auto_decompress=False)

    def request(self, method: str, path: str, **kwargs) -> tuple[int, dict, bytes]:
        async def go():
            async with self.session.request(method, self.base + path, **kwargs) as resp:
                return resp.status, dict(resp.headers), await resp.read()
        return self.loop.run_until_complete(go())


API: Api | None = None


def t_upload_range(fdp):
    if fdp.ConsumeBool():
        content_range = (fdp.PickValueInList(["", "bytes ", "bytes=", " "])
                         + f"{number(fdp, 64)}-{number(fdp, 64)}")
    else:
        content_range = Header.take(fdp, 100)
    # Only what a client can send in a header (aiohttp refuses control characters).
    content_range = "".join(c for c in content_range if c == "\t" or (" " <= c and c != "\x7f"))
    chunk = fdp.ConsumeBytes(64)
    status, headers, _ = API.request("POST", "/v2/fuzz/uploads/blobs/uploads/")
    assert status == 202, status
    location = headers["Location"]
    try:
        status, _, body = API.request("PATCH", location, data=chunk,
                                      headers={"Content-Range": content_range})
    finally:
        API.request("DELETE", location)
    assert status < 500, (status, body[:200])


def t_manifest(fdp):
    media_type = ["application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  ""][fdp.ConsumeIntInRange(0, 3)]
    if fdp.ConsumeBool():  # a manifest-shaped document with hostile descriptors
        def descriptor():
            digest = fdp.PickValueInList([
                "sha256:" + "0" * 64, "../" * 20 + "etc/passwd", "sha256:../../../../etc",
                "a\x00b", "", "sha512:" + "f" * 128]) if fdp.ConsumeBool() else Header.take(fdp, 30)
            return {"mediaType": "x", "size": fdp.ConsumeIntInRange(-1, 1 << 62), "digest": digest}
        document = {"schemaVersion": 2, "config": descriptor(),
                    "layers": [descriptor() for _ in range(fdp.ConsumeIntInRange(0, 3))],
                    "manifests": [descriptor() for _ in range(fdp.ConsumeIntInRange(0, 3))]}
        if media_type:
            document["mediaType"] = media_type
        depth = fdp.ConsumeIntInRange(0, 3000) if fdp.ConsumeBool() else 0
        body = json.dumps(document).encode()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
    status, _, answer = API.request("PUT", "/v2/fuzz/pushed/manifests/v1", data=body,
                                    headers={"Content-Type": media_type} if media_type else {})
    assert status < 500, (status, answer[:200])
    if status == 201:  # what it refers to (as its type reads it, and in the ledger): digests
        document = json.loads(body)
        kind = media_type or document.get("mediaType") or OCI_MANIFEST
        used = (document.get("manifests") if kind in LIST_TYPES
                else [document.get("config")] + list(document.get("layers") or []))
        for digest in [d["digest"] for d in used or [] if isinstance(d, dict) and "digest" in d] \
                + references(body):
            assert DIGEST.fullmatch(digest), digest


TARGETS = {"parsers": [t_name, t_range, t_content_range, t_challenges, t_link, t_references,
                       t_config],
           "api": [t_upload_range, t_manifest]}

# -- the run -------------------------------------------------------------------------------

executions: collections.Counter = collections.Counter()
crashes: dict[tuple[str, str, str], dict] = {}


def innermost_mirror_frame(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/mirror/" in f.filename
              or f.filename.endswith("fuzz.py")]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def make_one_input(targets, crash_dir: Path, summary: Path):
    last_flush = [0.0]

    def flush() -> None:
        summary.write_text(json.dumps({"per_target": dict(executions),
                                       "crash_kinds": list(crashes.values())}))
        last_flush[0] = time.monotonic()

    def one_input(data: bytes) -> None:
        if not data:
            return
        target = targets[data[0] % len(targets)]
        executions[target.__name__] += 1
        try:
            target(atheris.FuzzedDataProvider(data[1:]))
        except Exception as error:  # noqa: BLE001 (a crash: count it, keep the input, go on)
            key = (target.__name__, type(error).__name__, innermost_mirror_frame(error))
            if key not in crashes:
                path = crash_dir / f"crash-{len(crashes):03d}-{target.__name__}"
                path.write_bytes(data)
                crashes[key] = {"target": key[0], "error": f"{key[1]}: {str(error)[:200]}",
                                "where": key[2], "input": str(path), "count": 0}
                print(f"CRASH {key}: {str(error)[:200]}", file=sys.stderr, flush=True)
            crashes[key]["count"] += 1
            flush()
        if time.monotonic() - last_flush[0] > 1.0:
            flush()
    return one_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="parsers")
    parser.add_argument("--crashes", default=None, help="directory for crashing inputs")
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--summary", help=argparse.SUPPRESS)  # set for the fuzzing child
    args, libfuzzer_args = parser.parse_known_args()
    crash_dir = Path(args.crashes or tempfile.mkdtemp(prefix="mirror-fuzz-crashes-"))
    crash_dir.mkdir(parents=True, exist_ok=True)
    if args.summary is None:
        sys.exit(supervise(args, crash_dir))
    global API
    if args.targets == "api":
        API = Api()
    dictionary = Path(args.summary).with_name("fuzz.dict")
    dictionary.write_text("".join(json.dumps(token) + "\n" for token in DICTIONARY))
    argv = [sys.argv[0], f"-max_total_time={args.seconds}", f"-runs={args.runs}",
            f"-dict={dictionary}",
            f"-max_len={args.max_len}", "-rss_limit_mb=4096", "-timeout=20",
            "-print_final_stats=1", *libfuzzer_args]
    atheris.Setup(argv, make_one_input(TARGETS[args.targets], crash_dir, Path(args.summary)))
    atheris.Fuzz()  # libFuzzer ends the process when a limit is reached


def supervise(args: argparse.Namespace, crash_dir: Path) -> int:
    """Run the fuzzer in a child (libFuzzer exits without Python's cleanup) and print the
    summary: libFuzzer's own count of executions, ours per target, and the crashes."""
    import subprocess

    summary = crash_dir / "summary.json"
    started = time.monotonic()
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--summary", str(summary),
                            "--crashes", str(crash_dir)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, check=False)
    log = child.stdout
    (crash_dir / "libfuzzer.log").write_text(log)
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    found = json.loads(summary.read_text()) if summary.exists() else {}
    kinds = found.get("crash_kinds", [])
    print(json.dumps({
        "targets": args.targets, "seconds": round(time.monotonic() - started, 1),
        "executions": int(done.group(1)) if done else sum(found.get("per_target", {}).values()),
        "per_target": found.get("per_target", {}),
        "coverage": {"edges": int(cov[-1][0]), "features": int(cov[-1][1])} if cov else None,
        "crashes": sum(k["count"] for k in kinds), "crash_kinds": kinds,
        "crash_dir": str(crash_dir), "libfuzzer_exit": child.returncode}, indent=2))
    return 1 if kinds else 0


if __name__ == "__main__":
    main()
