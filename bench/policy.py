"""Benchmark: what trust costs on a warm manifest GET (issue 14).

Four mirrors as processes (`python -m mirror serve`) on one storage each, all in front of the
same upstream (tests.support's Distribution with bearer-token auth), each asked for the same
cosign-signed image `myorg/app:1` by tag until its verdicts are cached, then measured with wrk
in interleaved rounds (so the machine's drift hits every configuration alike):

- `none`: no [policy];
- `rules`: ten [[policy.rules]] (allow lists and deny globs; the image is allowed by the last);
- `rules+signatures`: the same and a [[policy.signatures]] rule in `enforce` mode with the
  ECDSA key that signed it (the verdict is cached by digest after the first GET);
- `rules+signatures+scan`: the same and `policy.scan_webhook`, a local webhook that allows
  (its verdict is cached by digest too; the bench checks it was asked exactly once).

Every figure is a median over `--rounds`; the ratio is to `none`. Everything runs on 127.0.0.1.

Run: .venv/bin/python bench/policy.py [--seconds 5] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import ACCEPT, machine, wrk_get  # bench/run.py: the same wrk settings

from tests.support import cosign, stop_process
from tests.support.registry import free_port
from tests.support.stack import Upstream
from tests.test_signatures import publish

NAME, TAG = "myorg/app", "1"
RULES = "".join(
    f'[[policy.rules]]\nupstream = "docker.io"\ndeny = ["other{i}/*", "*:nightly-{i}"]\n\n'
    for i in range(9)) + '[[policy.rules]]\nupstream = "docker.io"\nallow = ["library/*", ' \
    '"myorg/*"]\n\n'


class Webhook:
    """A scanner that allows everything and counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[dict] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                webhook.asked.append(json.loads(self.rfile.read(length)))
                body = b'{"allow": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/scan"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


class Mirror:
    def __init__(self, work: Path, upstream_url: str, policy: str) -> None:
        work.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "mirror.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n\n[storage]\nroot = "{work / "data"}"'
            f'\n\n[[upstreams]]\nname = "docker.io"\nurl = "{upstream_url}"\ndefault = true\n\n'
            + policy)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        env["PYTHONPATH"] = str(REPO)
        with open(work / "mirror.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"{self.url}/v2/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        sys.exit(f"the mirror did not start: see {work / 'mirror.log'}")

    def warm(self, digest: str) -> None:
        request = urllib.request.Request(f"{self.url}/v2/{NAME}/manifests/{TAG}", headers={
            "Accept": ACCEPT.partition(": ")[2]})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.headers["Docker-Content-Digest"] == digest, resp.headers

    def stop(self) -> None:
        stop_process(self.proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved wrk runs per figure")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk (bench/run.sh installs it)")
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    upstream = Upstream(work / "upstream").start()
    webhook = Webhook()
    mirrors: dict[str, Mirror] = {}
    try:
        signer = cosign.signer("ecdsa")
        key = work / "cosign.pub"
        key.write_bytes(signer.public_pem)
        # A Docker schema 2 image: bench/run.py's wrk asks with Docker's Accept.
        image = upstream.push_image(NAME, TAG, "bench-policy")
        artifacts = cosign.Registry(referrers_api=False)
        artifacts.sign(NAME, image.digest, [signer],
                       payload=cosign.simple_signing_payload(image.digest))
        publish(upstream, artifacts)
        signatures = (f'[[policy.signatures]]\nupstream = "docker.io"\nrepositories = '
                      f'["myorg/*"]\nkey = "{key}"\nmode = "enforce"\n\n')
        scan = f'[policy]\nscan_webhook = "{webhook.url}"\nscan_timeout = "30s"\n\n'
        configs = {"none": "", "rules": RULES, "rules+signatures": RULES + signatures,
                   "rules+signatures+scan": scan + RULES + signatures}
        for label, policy in configs.items():
            mirrors[label] = Mirror(work / label.replace("+", "-"), upstream.url, policy)
            mirrors[label].warm(image.digest)
        assert [a["digest"] for a in webhook.asked] == [image.digest], webhook.asked
        upstream.proxy.reset()
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in configs}
        for round_ in range(args.rounds):
            for label, mirror in mirrors.items():
                url = f"{mirror.url}/v2/{NAME}/manifests/{TAG}"
                runs[label].append(wrk_get(url, args.seconds, args.connections))
            print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
        # Warm means warm: the measured GETs asked neither the upstream nor the scanner.
        assert upstream.proxy.records == [], upstream.proxy.records[:3]
        assert len(webhook.asked) == 1, len(webhook.asked)
        base = statistics.median(r["rps"] for r in runs["none"])
        print(f"\nwarm manifest GET by tag, {args.connections} connections, "
              f"{args.rounds} x {args.seconds}s (median):")
        print(f"{'policy':<24}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}{'errors':>8}")
        for label, figures in runs.items():
            rps = statistics.median(r["rps"] for r in figures)
            print(f"{label:<24}{rps:>10.0f}"
                  f"{statistics.median(r['p50'] for r in figures):>9.2f}"
                  f"{statistics.median(r['p99'] for r in figures):>9.2f}"
                  f"{rps / base:>8.2f}{sum(r['errors'] for r in figures):>8.0f}")
    finally:
        for mirror in mirrors.values():
            mirror.stop()
        webhook.stop()
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
