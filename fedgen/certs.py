"""Consortium credentials: a CA, the coordinator's TLS certificate and one node key per site.

OUT/
  ca.crt, ca.key          the consortium CA (keep ca.key offline: nothing at run time needs it)
  server.crt, server.key  the SuperLink's TLS certificate, signed by the CA, with SANs for
                          localhost, 127.0.0.1 and every --host
  site-K.key, site-K.pub  site K's node key pair (ECDSA P-384, OpenSSH format): the private
                          key stays at the site, the public key authenticates its SuperNode
  authorized-keys         the public keys the coordinator registers, one per line

TLS proves the coordinator to the sites (they pin ca.crt); node keys prove each site to the
coordinator (SuperLink node authentication, which Flower only allows over TLS). The
coordinator's key also signs the audit's decision (``sign`` / ``verify``), so whoever can write
the run folder cannot change what the audit decided without ``fedgen release`` noticing.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgen.errors import FedgenError
from fedgen.files import atomic_dir

__all__ = [
    "ConsortiumCerts",
    "make_certs",
    "load_certs",
    "site_key_name",
    "DEFAULT_HOSTS",
    "sign",
    "verify",
]

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CURVE = ec.SECP384R1()  # P-384: what Flower's node authentication expects
SIGNATURE_HASH = hashes.SHA384()
VALID_DAYS = 365
CLOCK_SKEW = timedelta(minutes=5)  # certificates start slightly in the past
PRIVATE_MODE = 0o600
CA_NAME = "fedgen consortium CA"
SERVER_NAME = "fedgen coordinator"
AUTHORIZED_KEYS = "authorized-keys"


def site_key_name(site: int) -> str:
    return f"site-{site}"


@dataclass(frozen=True)
class ConsortiumCerts:
    """Paths of a credentials folder written by make_certs."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def authorized_keys(self) -> Path:
        return self.root / AUTHORIZED_KEYS

    def site_private_key(self, site: int) -> Path:
        return self.root / f"{site_key_name(site)}.key"

    def site_public_key(self, site: int) -> Path:
        return self.root / f"{site_key_name(site)}.pub"

    def public_keys(self) -> list[str]:
        """The authorised node keys, one OpenSSH line each."""
        lines = self.authorized_keys.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def load_certs(root: str | Path) -> ConsortiumCerts:
    """Open a folder for the coordinator: it needs the CA certificate, its own pair, the keys."""
    certs = ConsortiumCerts(Path(root))
    needed = [certs.ca_cert, certs.server_cert, certs.server_key, certs.authorized_keys]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise FedgenError(f"{root} lacks {', '.join(missing)} (make it with `fedgen certs`)")
    return certs


def make_certs(
    out: str | Path,
    *,
    sites: int,
    hosts: tuple[str, ...] | list[str] = (),
    valid_days: int = VALID_DAYS,
) -> ConsortiumCerts:
    """Write a consortium's credentials into `out` (absent or empty), all or nothing."""
    out = Path(out)
    if sites < 1:
        raise FedgenError(f"--sites must be at least 1, got {sites}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedgenError(f"{out} is not empty; choose a new folder for the credentials")
    names = _subject_alt_names([*DEFAULT_HOSTS, *hosts])
    with atomic_dir(out) as staging:  # `out` was checked absent or empty
        _write_all(ConsortiumCerts(staging), sites=sites, names=names, valid_days=valid_days)
    return ConsortiumCerts(out)


def _write_all(certs: ConsortiumCerts, *, sites: int, names: list[x509.GeneralName], valid_days: int) -> None:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(CURVE)
    ca_cert = _ca_certificate(ca_key, now=now, valid_days=valid_days)
    server_key = ec.generate_private_key(CURVE)
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names=names, now=now, valid_days=valid_days)
    _write_private(certs.ca_key, _pem_key(ca_key))
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(certs.server_key, _pem_key(server_key))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    public_lines = []
    for site in range(1, sites + 1):
        key = ec.generate_private_key(CURVE)
        _write_private(
            certs.site_private_key(site),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        line = _openssh_public(key.public_key(), comment=site_key_name(site))
        certs.site_public_key(site).write_text(line + "\n", encoding="utf-8")
        public_lines.append(line)
    certs.authorized_keys.write_text("\n".join(public_lines) + "\n", encoding="utf-8")


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):  # dedupe, keep order
        if not host:
            raise FedgenError("--host must not be empty")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise FedgenError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(key: ec.EllipticCurvePrivateKey, *, now: datetime, valid_days: int) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, SIGNATURE_HASH)
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    names: list[x509.GeneralName],
    now: datetime,
    valid_days: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(SERVER_NAME))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, SIGNATURE_HASH)
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _openssh_public(key: ec.EllipticCurvePublicKey, *, comment: str) -> str:
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode('ascii')} {comment}"


def _write_private(path: Path, data: bytes) -> None:
    """Create the file readable by its owner only, before any secret byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def sign(certs: ConsortiumCerts, payload: bytes) -> bytes:
    """An ECDSA signature of ``payload`` with the coordinator's key (server.key)."""
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    return key.sign(payload, ec.ECDSA(SIGNATURE_HASH))


def verify(certs: ConsortiumCerts, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the coordinator's (server.crt) on ``payload``."""
    public = x509.load_pem_x509_certificate(certs.server_cert.read_bytes()).public_key()
    try:
        public.verify(signature, payload, ec.ECDSA(SIGNATURE_HASH))
    except InvalidSignature:
        return False
    return True
