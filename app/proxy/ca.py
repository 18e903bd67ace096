"""A task's forward-mode CA, and the leaf certificates it issues (PRODUCT.md "Forward mode").

The CA carries a critical Name Constraints extension that permits only the task's
upstream hosts: DNS names as themselves, IP addresses as /32 or /128. An IP family
without a permitted address is excluded whole, and so are DNS names when no upstream
is named by one (a permitted `leasehold.invalid`, a reserved name nobody holds), so a
standard TLS client rejects whatever else this CA signs. It is valid from a minute
before its creation (clock skew) until the task can no longer live. Keys are EC P-256:
made in about a millisecond, on the request path if need be.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SKEW = timedelta(minutes=1)
NO_DNS = "leasehold.invalid"  # RFC 6761: never resolves, never issued


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: str
    key_pem: str


def upstream_host(upstream: str) -> str:
    """The host a profile's upstream names (lower-case; an IPv6 address without [])."""
    host = urlsplit(upstream).hostname
    if not host:
        raise ValueError("the upstream names no host")
    return host.lower()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def name_constraints(hosts: Iterable[str]) -> x509.NameConstraints:
    permitted: list[x509.GeneralName] = []
    families: set[int] = set()
    dns = False
    for host in sorted(set(hosts)):
        ip = _ip(host)
        if ip is None:
            permitted.append(x509.DNSName(host))
            dns = True
        else:
            families.add(ip.version)
            permitted.append(x509.IPAddress(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")))
    if not dns:
        permitted.append(x509.DNSName(NO_DNS))
    excluded: list[x509.GeneralName] = []
    if 4 not in families:
        excluded.append(x509.IPAddress(ipaddress.IPv4Network("0.0.0.0/0")))
    if 6 not in families:
        excluded.append(x509.IPAddress(ipaddress.IPv6Network("::/0")))
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # sealed by the caller (app/core/sealing.py) at rest
    ).decode()


def make_ca(hosts: Iterable[str], *, label: str, not_after: datetime) -> Issued:
    """A CA for these hosts only, valid until `not_after` (aware)."""
    hosts = list(hosts)
    if not hosts:
        raise ValueError("a task CA needs at least one host")
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Leasehold"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Leasehold task CA {label}"[:64]),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(max(not_after, now))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(name_constraints(hosts), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def issue_leaf(ca: Issued, host: str, *, not_after: datetime | None = None) -> Issued:
    """A server certificate for `host`, signed by `ca`, never outliving it. Nothing
    here checks `host` against the constraints: the verifying client does."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca.key_pem.encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    end = ca_cert.not_valid_after_utc
    if not_after is not None:
        end = min(end, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    ip = _ip(host)
    san: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - SKEW, ca_cert.not_valid_before_utc))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))
