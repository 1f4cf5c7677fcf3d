"""The `mirror` command line as an operator meets it: a real process, its exact messages and
exit codes — `--config` on either side of every command, `--help`, `user add` into a
directory that is not there, and `tls init` run again to add a name to the CA clients trust."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parent.parent

# Every leaf command, with arguments that get it as far as reading its config.
COMMANDS = [["serve"], ["user", "add", "bob", "--password-stdin"],
            ["tls", "init", "--host", "mirror.test"], ["prefetch", "alpine"],
            ["export", "alpine", "-o", "b.tar"], ["import", "b.tar"], ["ls"], ["du"], ["gc"],
            ["verify"]]


def mirror(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env["PYTHONPATH"] = str(REPO)  # run in `cwd`, as an operator does, yet this checkout's code
    return subprocess.run([sys.executable, "-m", "mirror", *args], cwd=cwd, env=env,
                          input=stdin if stdin is not None else "", capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_takes_config_before_and_after_its_name(tmp_path, command, where):
    config = tmp_path / "mirror.toml"
    config.write_text("[server]\nnope = 1\n")  # read means refused, naming the key
    args = ["--config", str(config), *command] if where == "before" else \
        [*command, "--config", str(config)]
    result = mirror(*args, cwd=tmp_path, stdin="secret\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "mirror: config error: unknown config key: server.nope\n")


def test_help_lists_every_command_and_describes_serve(tmp_path):
    listing = mirror("--help", cwd=tmp_path)
    assert listing.returncode == 0
    for name in ("serve", "user", "tls", "prefetch", "export", "import", "ls", "du", "gc",
                 "verify"):
        line = next((x for x in listing.stdout.splitlines() if x.split()[:1] == [name]), "")
        assert len(line.split()) > 2, f"{name} has no help line:\n{listing.stdout}"
    serve = mirror("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0
    assert "usage: mirror serve [-h] [--config PATH] [--listen HOST:PORT]" in serve.stdout
    assert "Run the registry mirror. Serves the registry API on server.listen" in serve.stdout
    assert "overriding server.listen and" in serve.stdout
    for command in ("gc", "verify"):
        text = mirror(command, "--help", cwd=tmp_path).stdout
        description = text.split("\n\n")[1]  # after the usage line
        assert len(description.split()) > 12, text


def test_user_add_into_a_missing_directory_names_it_and_writes_nothing(tmp_path):
    htpasswd = tmp_path / "etc" / "mirror" / "htpasswd"
    result = mirror("user", "add", "bob", "--htpasswd", str(htpasswd), "--password-stdin",
                    cwd=tmp_path, stdin="builder\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"mirror: cannot write {htpasswd}: the directory {htpasswd.parent} does not "
               f"exist (create it first: mkdir -p {htpasswd.parent})\n")
    assert not (tmp_path / "etc").exists()
    htpasswd.parent.mkdir(parents=True)
    result = mirror("user", "add", "bob", "--htpasswd", str(htpasswd), "--password-stdin",
                    cwd=tmp_path, stdin="builder\n")
    assert (result.returncode, result.stdout) == (0, f"added bob in {htpasswd}\n")
    assert [p.name for p in htpasswd.parent.iterdir()] == ["htpasswd"]  # no .tmp left


def test_user_add_onto_a_directory_names_the_file_not_a_temporary(tmp_path):
    (tmp_path / "htpasswd").mkdir()  # a volume mounted where the file should be
    result = mirror("user", "add", "bob", "--htpasswd", str(tmp_path / "htpasswd"),
                    "--password-stdin", cwd=tmp_path, stdin="builder\n")
    assert (result.returncode, result.stderr) == (
        1, f"mirror: cannot read {tmp_path / 'htpasswd'}: Is a directory\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["htpasswd"]


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names_of(cert: x509.Certificate) -> list[str]:
    return [str(n.value) for n in
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def test_tls_init_names_the_ca_after_the_host_and_adds_hosts_to_the_same_ca(tmp_path):
    tls = tmp_path / "tls"
    first = mirror("tls", "init", "--host", "mirror.test", "--host", "127.0.0.1",
                   "--dir", str(tls), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ca_name = f"mirror CA {socket.gethostname()}"
    assert first.stdout.startswith(f"Created the CA {ca_name!r} ({tls / 'ca.crt'}) and ")
    ca, ca_key = (tls / "ca.crt").read_bytes(), (tls / "ca.key").read_bytes()
    assert certificate(tls / "ca.crt").subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)[0].value == ca_name
    old_server = certificate(tls / "server.crt")
    assert names_of(old_server) == ["mirror.test", "127.0.0.1"]

    again = mirror("tls", "init", "--host", "registry.example", "--host", "mirror.test",
                   "--dir", str(tls), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        f"Kept the CA {ca_name!r} ({tls / 'ca.crt'}), which clients already trust; issued a new "
        f"{tls / 'server.crt'} for: mirror.test, 127.0.0.1, registry.example (added: "
        "registry.example). Restart the mirror to serve it.")
    assert (tls / "ca.crt").read_bytes() == ca and (tls / "ca.key").read_bytes() == ca_key
    server = certificate(tls / "server.crt")
    assert names_of(server) == ["mirror.test", "127.0.0.1", "registry.example"]
    assert server.serial_number != old_server.serial_number
    server.verify_directly_issued_by(certificate(tls / "ca.crt"))  # the CA clients hold
    key = serialization.load_pem_private_key((tls / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert (tls / "server.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "ca.key", "server.crt",
                                                     "server.key"]


def test_tls_init_never_renames_an_existing_ca(tmp_path):
    tls = tmp_path / "tls"
    assert mirror("tls", "init", "--host", "a.test", "--ca-name", "Example Corp registry CA",
                  "--dir", str(tls), cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    result = mirror("tls", "init", "--host", "b.test", "--ca-name", "Another CA", "--dir",
                    str(tls), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        1, f"mirror: {tls} already holds the CA 'Example Corp registry CA', which clients "
           "trust; --ca-name names a new CA only (use another --dir for a second CA)\n")
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before


def test_tls_init_refuses_a_ca_key_that_does_not_match_its_certificate(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for directory in (first, second):
        assert mirror("tls", "init", "--host", "a.test", "--dir", str(directory),
                      cwd=tmp_path).returncode == 0
    (first / "ca.key").write_bytes((second / "ca.key").read_bytes())
    result = mirror("tls", "init", "--host", "b.test", "--dir", str(first), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        1, f"mirror: {first}: ca.key is not the key of ca.crt\n")
