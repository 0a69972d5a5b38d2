"""Test certificates made with `cryptography`: a CA, leaves with SANs, and client certs
of every key type KES clients use (RSA, ECDSA, Ed25519)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

KeyType = Literal["ec", "rsa", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class Issued:
    key: PrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_key(kind: KeyType = "ec") -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_ca(cn: str, kind: KeyType = "ec") -> Issued:
    key = new_key(kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, _hash_for(key))
    )
    return Issued(key, cert)


def make_leaf(
    ca: Issued | None,
    cn: str,
    *,
    dns: list[str] | None = None,
    ips: list[str] | None = None,
    kind: KeyType = "ec",
    client: bool = False,
    days: int = 30,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A leaf signed by `ca`, or self-signed when `ca` is None."""
    key = new_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else (
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    signer = ca.key if ca else key
    return Issued(key, builder.sign(signer, _hash_for(signer)))
