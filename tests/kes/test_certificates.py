"""kes.certificates on values: the self-signed identities `kes identity new` and `--dev`
make, and which certificate of a presented chain is the identity."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from kes.certificates import leaf, self_signed
from tests.support.certs import make_ca, make_leaf


def test_self_signed_client_identity_has_sans_usages_and_lifetime() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = self_signed(Ed25519PrivateKey.generate(), "minio", ips=["127.0.0.1"],
                       dns=["localhost"], days=90, client=True, now=now)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_before_utc == now - dt.timedelta(minutes=5)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=90)
    server = self_signed(Ed25519PrivateKey.generate(), "s", days=1, client=False)
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]


def test_bad_ip_is_refused() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
        self_signed(Ed25519PrivateKey.generate(), "x", ips=["not-an-ip"], days=1, client=True)


def test_the_identity_of_a_chain_is_its_leaf() -> None:
    ca = make_ca("ca")
    child = make_leaf(ca, "client", client=True)
    assert leaf([ca.cert, child.cert]) == child.cert  # CA first, as some tools write it
    assert leaf([ca.cert]) == ca.cert                 # only a CA: it is all there is
