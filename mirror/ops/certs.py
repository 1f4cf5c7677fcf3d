"""`mirror tls init`: a private CA and a server certificate it signs, and where clients want
the CA, so nobody has to turn TLS checks off ("server gave HTTP response to HTTPS client").

    <dir>/ca.crt ca.key         the private CA (keep ca.key safe: it can sign any name)
    <dir>/server.crt server.key the mirror's certificate, valid for every --host given
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 825  # the longest server-certificate lifetime Apple's clients accept


def make_ca_and_server_cert(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) in `directory`; the server is valid for `hosts`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(paths[2], key)
    _write_secret(directory / "ca.key", ca_key)
    return paths


def _write_secret(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def client_instructions(directory: Path, hosts: list[str], port: int) -> str:
    """Where each client wants the CA, for every name the certificate covers."""
    ca = (directory / "ca.crt").resolve()
    lines = [f"Created {ca} and {(directory / 'server.crt').resolve()} for: {', '.join(hosts)}",
             "", "Serve HTTPS with, in the mirror's config:", "  [server]",
             f'  tls_certificate = "{(directory / "server.crt").resolve()}"',
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
