"""The operator commands (`mirror prefetch`, `export`, `import`, `ls`, `du`) run as an
operator runs them: in a subprocess, with a TOML config naming a test mirror's storage."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from dataclasses import dataclass
from pathlib import Path

from mirror import config as cfg

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str


def write_config(path: Path, config: cfg.Config, max_size: str | None = None) -> Path:
    """A TOML file equal to `config` in what the commands read: storage and upstreams."""
    lines = ["[server]", f'listen = "{config.server.listen}"',
             "[storage]", f"root = {json.dumps(config.storage.root)}"]
    if max_size is not None:
        lines.append(f'max_size = "{max_size}"')
    for upstream in config.upstreams:
        lines += ["[[upstreams]]", f'name = "{upstream.name}"', f'url = "{upstream.url}"',
                  f"default = {str(upstream.default).lower()}",
                  f"aliases = {json.dumps(list(upstream.aliases))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


async def run(config: Path, *args: str, tty: bool = False) -> Result:
    """`mirror --config CONFIG ARGS...`; with `tty`, its standard error is a terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    master = slave = -1
    if tty:
        master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "--config", str(config), *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=slave if tty else asyncio.subprocess.PIPE)
    if tty:
        os.close(slave)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if tty:
        err = _drain(master)
    return Result(proc.returncode, out.decode(), err.decode())


def _drain(master: int) -> bytes:
    data = b""
    try:
        while chunk := os.read(master, 65536):
            data += chunk
    except OSError:  # EIO: the terminal's other side is closed and everything was read
        pass
    os.close(master)
    return data
