"""A large layer pushed to a real `mirror serve` process: the bytes go to disk as they
arrive, so the process's peak memory does not grow with the layer."""

import asyncio
import hashlib
import os
import subprocess
import sys

import aiohttp

from tests.test_serve import free_port, wait_for

LAYER = 256 << 20


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


async def test_large_layer_push_keeps_memory_flat(tmp_path):
    port = free_port()
    config = tmp_path / "mirror.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\naccess_log = false\n'
                      f'[storage]\nroot = "{tmp_path}/data"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_for, f"{url}/v2/", proc)
        before = peak_rss_kib(proc.pid)
        block = os.urandom(1 << 20)
        hasher = hashlib.sha256()

        async def body():
            for i in range(LAYER >> 20):
                chunk = block[i:] + block[:i]  # every MiB different, nothing to compress
                hasher.update(chunk)
                yield chunk
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v2/big/blobs/uploads/") as resp:
                location = url + resp.headers["Location"]
            async with http.patch(location, data=body()) as resp:
                assert resp.status == 202 and resp.headers["Range"] == f"0-{LAYER - 1}"
            digest = "sha256:" + hasher.hexdigest()
            async with http.put(f"{location}?digest={digest}") as resp:
                assert resp.status == 201
            async with http.head(f"{url}/v2/big/blobs/{digest}") as resp:
                assert resp.headers["Content-Length"] == str(LAYER)
        growth_mib = (peak_rss_kib(proc.pid) - before) / 1024
        assert growth_mib < 32, f"peak memory grew by {growth_mib:.0f} MiB for a 256 MiB layer"
    finally:
        proc.terminate()
        proc.wait(10)
