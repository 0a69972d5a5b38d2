"""Certificates bootkey makes or reads for KES: self-signed Ed25519 certificates (client
identities for `kes identity new`, the `--dev` server certificate) and the leaf of a
presented chain.

Pure values in, values out: the command line only reads and writes the files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Valid from a little before now: a client whose clock is slightly behind must not
# see a certificate from the future.
BACKDATE = dt.timedelta(minutes=5)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def leaf(certs: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate whose identity counts: like KES, CA certificates in a presented
    chain are not identities (the first non-CA one, else the first)."""
    return next((c for c in certs if not is_ca(c)), certs[0])


def self_signed(key: Ed25519PrivateKey, cn: str, *, ips: Sequence[str] = (),
                dns: Sequence[str] = (), days: int, client: bool,
                now: dt.datetime | None = None) -> x509.Certificate:
    """A self-signed Ed25519 certificate with these SANs. `client` adds clientAuth (a
    KES client identity); serverAuth is always there. Raises ValueError on a bad IP."""
    addrs = [ipaddress.ip_address(i) for i in ips]
    start = (now or dt.datetime.now(dt.UTC)) - BACKDATE
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    usage = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client:
        usage.insert(0, ExtendedKeyUsageOID.CLIENT_AUTH)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start)
         .not_valid_after(start + BACKDATE + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
    sans: list[x509.GeneralName] = [x509.IPAddress(a) for a in addrs]
    sans += [x509.DNSName(d) for d in dns]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, None)
