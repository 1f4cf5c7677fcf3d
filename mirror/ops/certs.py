"""`mirror tls init`: a private CA and a server certificate it signs, and where clients want
the CA, so nobody has to turn TLS checks off ("server gave HTTP response to HTTPS client").

    <dir>/ca.crt ca.key         the private CA (keep ca.key safe: it can sign any name)
    <dir>/server.crt server.key the mirror's certificate, valid for every --host given

The CA is made once. Clients trust it (it is copied into each one's certs.d), so running
`tls init` again never replaces it: the existing CA signs a new server certificate for the
names the old one covered plus the new `--host`s, and only server.crt and server.key change
(each written beside and renamed over, so a server restarting meanwhile reads a whole one).
The CA is named after this host ("mirror CA build-01"), which is what a client's error
message and a trust-store listing show; `--ca-name` picks another name.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 825  # the longest server-certificate lifetime Apple's clients accept
CA_VALID_DAYS = 3650  # clients trust the CA for years; only the server certificate rotates


class CertificateError(Exception):
    """The CA in the directory cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Issued:
    directory: Path
    hosts: list[str]         # every name the new server certificate covers
    added: list[str]         # of those, the ones the previous certificate did not
    ca_created: bool
    ca_name: str


def default_ca_name() -> str:
    return f"mirror CA {socket.gethostname()}"


def init(directory: Path, hosts: list[str], ca_name: str | None = None) -> Issued:
    """Make the CA unless `directory` holds one, then a server certificate for `hosts` and
    every name of the server certificate already there."""
    if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
        ca_key, ca = _load_ca(directory)
        name = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if ca_name is not None and ca_name != name:
            raise CertificateError(
                f"{directory} already holds the CA {name!r}, which clients trust; --ca-name "
                "names a new CA only (use another --dir for a second CA)")
        previous = _server_hosts(directory / "server.crt")
        created = False
    else:
        name = ca_name or default_ca_name()
        ca_key, ca = _make_ca(directory, name)
        previous, created = [], True
    union = list(dict.fromkeys([*previous, *hosts]))
    _issue(directory, ca_key, ca, union)
    return Issued(directory, union, [h for h in union if h not in previous], created, str(name))


def make_ca_and_server_cert(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) of a new CA in an empty `directory` (tests use it)."""
    ca_key, ca = _make_ca(directory, default_ca_name())
    return _issue(directory, ca_key, ca, hosts)


def _make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(directory / "ca.key", _key_bytes(ca_key), 0o600)
    _write(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    return ca_key, ca


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except OSError as e:
        raise CertificateError(f"{directory} holds part of a CA: cannot read {e.filename}: "
                               f"{e.strerror}; restore it, or use another --dir") from None
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{directory}: ca.key or ca.crt is not PEM this tool wrote "
                               f"({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            key.public_key().public_numbers() != ca.public_key().public_numbers():
        raise CertificateError(f"{directory}: ca.key is not the key of ca.crt")
    return key, ca


def _server_hosts(path: Path) -> list[str]:
    """The names of the server certificate there (none if there is none)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(n.value) for n in names if isinstance(n, (x509.DNSName, x509.IPAddress))]


def _issue(directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
           hosts: list[str]) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    # The key first: a server.crt whose key is not there yet would not load.
    _write(paths[2], _key_bytes(key), 0o600)
    _write(paths[1], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Written beside and renamed over; a key is never readable by others, not even briefly."""
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, path)


def client_instructions(issued: Issued, port: int) -> str:
    """What changed, and where each client wants the CA, for every name now covered."""
    directory, hosts = issued.directory, issued.hosts
    ca = (directory / "ca.crt").resolve()
    server = (directory / "server.crt").resolve()
    if issued.ca_created:
        lines = [f"Created the CA {issued.ca_name!r} ({ca}) and {server} for: "
                 f"{', '.join(hosts)}"]
    else:
        lines = [f"Kept the CA {issued.ca_name!r} ({ca}), which clients already trust; issued "
                 f"a new {server} for: {', '.join(hosts)} (added: "
                 f"{', '.join(issued.added) or 'none'}). Restart the mirror to serve it."]
    lines += ["", "Serve HTTPS with, in the mirror's config:", "  [server]",
              f'  tls_certificate = "{server}"',
              f'  tls_key = "{(directory / "server.key").resolve()}"', "",
              "Then give each client the CA (not the key):"]
    for host in hosts:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines += [f"  {address}",
                  f"    Docker:      /etc/docker/certs.d/{address}/ca.crt",
                  f"    containerd:  ca = \"{ca}\" in /etc/containerd/certs.d/<registry>/hosts.toml"
                  f" under [host.\"https://{address}\"]",
                  f"    podman/CRI-O/skopeo: /etc/containers/certs.d/{address}/ca.crt"]
    return "\n".join(lines)
