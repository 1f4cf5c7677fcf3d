"""Test support: a real upstream (Distribution + a token server), seeded images, a fault proxy.

Start with `stack.Upstream`, or the `upstream` fixture in `fixtures.py`.
"""

import signal
import subprocess


def stop_process(proc: subprocess.Popen | None, grace: float = 5) -> None:
    """SIGTERM to this PID only, SIGKILL if it has not exited after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
