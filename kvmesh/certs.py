"""`kvmesh certs --out DIR`: a local certificate authority and one certificate per service.

For the local stack and tests, not a PKI: the CA key is written next to the certificates.
Each service's certificate names it in its common name (``kvmesh-worker``, ...), which is
how mesh-only endpoints tell a peer of the mesh from a client holding ``kvmesh-client``.
Every certificate is valid for both server and client use (a worker serves and also calls),
for the hosts given (default: 127.0.0.1 and localhost).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.pem"
# One certificate per service kind, plus one for clients (SDK, `kvmesh status`).
SERVICES = ("router", "worker", "kvstore", "planner", "client")
VALID_DAYS = 365


def common_name(service: str) -> str:
    return f"kvmesh-{service}"


def cert_paths(directory: Path, service: str) -> tuple[Path, Path]:
    """(certificate, private key) of ``service`` in a directory made by ``write_certs``."""
    return directory / f"{service}.pem", directory / f"{service}-key.pem"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))  # fmt: skip


def write_certs(out: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> list[Path]:
    """Create ``ca.pem`` (+ ``ca-key.pem``) and ``<service>.pem`` / ``<service>-key.pem`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmesh local CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))  # fmt: skip
    written = [out / CA_FILE, out / "ca-key.pem"]
    written[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    written[1].write_bytes(_pem_key(ca_key))
    usages = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for service in SERVICES:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name(service))])
        cert = (_builder(subject, ca_name, key)
                .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                .add_extension(usages, critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))  # fmt: skip
        cert_path, key_path = cert_paths(out, service)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        written += [cert_path, key_path]
    for path in written:
        if path.name.endswith("-key.pem"):
            path.chmod(0o600)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh certs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the CA and certificates")
    parser.add_argument("--host", action="append", dest="hosts", default=[],
                        help="host name or IP the services are reached at (repeatable; default 127.0.0.1, localhost)")
    args = parser.parse_args(argv)
    for path in write_certs(args.out, args.hosts or ("127.0.0.1", "localhost")):
        print(path)
    return 0
