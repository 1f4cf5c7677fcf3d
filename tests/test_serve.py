"""`mirror serve` as a user runs it: a real process, a config file, one log line per request."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(config_text: str, *args: str) -> subprocess.Popen:
        config = tmp_path / "mirror.toml"
        config.write_text(config_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config", str(config),
                                 *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def wait_for(url: str, proc: subprocess.Popen, limit: float = 15.0) -> bytes:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.read()
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {limit}s")


def test_serve_answers_ping_and_logs_each_request(serve, tmp_path):
    port = free_port()
    proc = serve(f'[server]\nlisten = "127.0.0.1:{port}"\n[storage]\nroot = "{tmp_path}/d"\n'
                 '[[upstreams]]\nname = "docker.io"\nurl = "http://127.0.0.1:9"\ndefault = true\n')
    assert wait_for(f"http://127.0.0.1:{port}/v2/", proc) == b"{}"
    urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5).read()
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert out.count('"GET /v2/ HTTP/1.1" 200') == 2, out
    assert (tmp_path / "d" / "blobs").is_dir() and (tmp_path / "d" / "metadata.sqlite").is_file()


def test_serve_refuses_a_bad_config_naming_the_key(serve):
    proc = serve('[server]\nlisten = "127.0.0.1:5000"\nlistn = "typo"\n')
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode != 0
    assert "server.listn" in out and "Traceback" not in out


def test_serve_runs_on_embedded_defaults_in_the_current_folder(tmp_path):
    """No config at all: data goes to ./data, the default upstream is Docker Hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    port = free_port()
    env["MIRROR_SERVER_LISTEN"] = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(f"http://127.0.0.1:{port}/v2/", proc) == b"{}"
        assert (tmp_path / "data" / "blobs").is_dir()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "docker.io=https://registry-1.docker.io (default)" in out


def test_serve_over_https_with_the_configured_certificate(serve, tmp_path):
    import ssl

    from mirror.ops.certs import make_ca_and_server_cert
    ca, cert, key = make_ca_and_server_cert(tmp_path, hosts=["127.0.0.1", "localhost"])
    port = free_port()
    proc = serve(f'[server]\nlisten = "127.0.0.1:{port}"\ntls_certificate = "{cert}"\n'
                 f'tls_key = "{key}"\n[storage]\nroot = "{tmp_path}/d"\n')
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=context,
                                        timeout=1) as resp:
                assert resp.read() == b"{}"
                break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)


def test_a_port_in_use_is_one_line_that_names_it_and_the_fix(serve, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(f'[server]\nlisten = "127.0.0.1:{port}"\n[storage]\nroot = "{tmp_path}/d"\n'
                     '[[upstreams]]\nname = "docker.io"\nurl = "http://127.0.0.1:9"\n'
                     'default = true\n')
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in out, out
    assert "server.listen" in out and "Traceback" not in out, out


def test_version_and_a_password_without_a_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    version = subprocess.run([sys.executable, "-m", "mirror", "--version"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("mirror 0."), version
    htpasswd = tmp_path / "htpasswd"
    added = subprocess.run([sys.executable, "-m", "mirror", "user", "add", "bob", "--htpasswd",
                            str(htpasswd)], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
    assert added.returncode == 1 and "Traceback" not in added.stderr, added.stderr
    assert "--password-stdin" in added.stderr and not htpasswd.exists()


def test_listen_overrides_server_listen_of_the_config(serve, tmp_path):
    configured, given = free_port(), free_port()
    proc = serve(f'[server]\nlisten = "127.0.0.1:{configured}"\n[storage]\n'
                 f'root = "{tmp_path}/d"\n[[upstreams]]\nname = "docker.io"\n'
                 'url = "http://127.0.0.1:9"\ndefault = true\n', "--listen", f"127.0.0.1:{given}")
    assert wait_for(f"http://127.0.0.1:{given}/v2/", proc) == b"{}"
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", configured))


def test_a_bad_listen_address_is_a_config_error_naming_the_flag(serve, tmp_path):
    proc = serve(f'[storage]\nroot = "{tmp_path}/d"\n', "--listen", "nowhere")
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (
        1, "mirror: config error: server.listen must be HOST:PORT, not 'nowhere' (given by "
           "--listen)\n")
