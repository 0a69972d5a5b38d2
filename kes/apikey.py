"""KES API keys `kes:v1:…` (shared/kes-api.md §5.3): the Ed25519 key inside, its identity,
and the self-signed client certificate MinIO derives from it at start.

An API key is `kes:v1:` + base64(0x00 ‖ 32-byte Ed25519 seed). The identity is the
SHA-256 of the key's SubjectPublicKeyInfo — the same value a KES server computes from the
certificate, which is why an operator can put the identity into a policy before MinIO runs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PREFIX = "kes:v1:"
_ED25519 = 0x00
CERT_VALIDITY = dt.timedelta(days=90)  # what MinIO uses; KES never checks it


class InvalidAPIKey(ValueError):
    """The string is not a KES API key; the message is kms-go's."""


@dataclass(frozen=True)
class APIKey:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> APIKey:
        return cls(Ed25519PrivateKey.from_private_bytes(os.urandom(32)))

    @classmethod
    def parse(cls, text: str) -> APIKey:
        s = text.strip()
        s = s.removeprefix(PREFIX)
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidAPIKey("kes: invalid API key: invalid length") from None
        if len(raw) != 33:
            raise InvalidAPIKey("kes: invalid API key: invalid length")
        if raw[0] != _ED25519:
            raise InvalidAPIKey("kes: invalid API key: unsupported type")
        return cls(Ed25519PrivateKey.from_private_bytes(raw[1:]))

    def __str__(self) -> str:
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        return PREFIX + base64.b64encode(bytes([_ED25519]) + seed).decode()

    def __repr__(self) -> str:
        return f"<APIKey identity={self.identity}>"

    @property
    def identity(self) -> str:
        spki = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()

    def certificate(self, now: dt.datetime | None = None) -> x509.Certificate:
        """The certificate MinIO builds (kms-go GenerateCertificate): self-signed, CN =
        identity, 90 days from `now`, digitalSignature + clientAuth, CA=false, no SANs."""
        now = now or dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.identity)])
        return (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.private_key.public_key())
            .serial_number(secrets.randbits(127) | 1)
            .not_valid_before(now).not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.private_key, None)
        )

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
