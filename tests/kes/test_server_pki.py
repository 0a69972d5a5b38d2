"""The KES server certificate issued by a real OpenBao PKI engine, and its renewal."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from bootkey_core.errors import ConfigError, VaultDenied
from bootkey_core.vault import VaultSession
from kes.server import ServerThread
from kes.tls_context import renewal_delay
from kes.vault_pki import VaultPKI
from tests.kes.conftest import token_session
from tests.kes.server_util import Reader, Recorder, connect, request, wait_for
from tests.support.bao import DevBao
from tests.support.certs import make_leaf
from tests.support.pki import VaultPki, enable_pki

Pki = VaultPki


@pytest.fixture
def vault_pki(bao: DevBao, tmp_path: Path) -> Pki:
    return enable_pki(bao.client(), tmp_path)


def _client(pki: Pki, tmp_path: Path) -> ssl.SSLContext:
    client = make_leaf(None, "minio", kind="ed25519", client=True)
    (tmp_path / "c.crt").write_bytes(client.cert_pem)
    (tmp_path / "c.key").write_bytes(client.key_pem)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))  # verifies the Vault-issued cert
    ctx.load_cert_chain(str(tmp_path / "c.crt"), str(tmp_path / "c.key"))
    return ctx


def _root(p: Pki) -> VaultSession:
    return token_session(p.root.url, p.root.token)


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with connect(port, ctx) as s:
        s.sendall(request("GET", "/version"))
        assert Reader(s).response().status == 200
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_server_certificate_from_vault_pki(vault_pki: Pki, tmp_path: Path) -> None:
    source = VaultPKI(_root(vault_pki), role=vault_pki.role, common_name="localhost",
                      mount=vault_pki.mount, ttl="10m")
    tls = source.issue()
    assert b"PRIVATE KEY" in tls.key_pem and not list(tmp_path.glob("*key*"))
    recorder = Recorder()
    ctx = _client(vault_pki, tmp_path)
    with ServerThread(recorder, tls) as st, connect(st.port, ctx) as s:
        cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True) or b"")
        assert cert.issuer.rfc4514_string() == "CN=bootkey test root"
        s.sendall(request("GET", "/version"))
        assert Reader(s).response().status == 200
    assert recorder.requests[0].identity is not None


def test_certificate_is_renewed_before_it_expires(vault_pki: Pki, tmp_path: Path) -> None:
    source = VaultPKI(_root(vault_pki), role=vault_pki.role, common_name="localhost",
                      mount=vault_pki.mount, ttl="3s")
    ctx = _client(vault_pki, tmp_path)
    with ServerThread(Recorder(), source.issue(), cert_source=source) as st:
        first = _served_serial(st.port, ctx)
        # Renewal is due after two thirds of 3 s; new connections then get a new serial,
        # and the certificate they get is always still valid.
        wait_for(lambda: _served_serial(st.port, ctx) != first, timeout=15,
                 what="a renewed certificate")


def test_pki_errors_name_the_fix(vault_pki: Pki, bao: DevBao) -> None:
    weak = token_session(bao.address, vault_pki.root.auth.token.create(
        policies=["default"])["auth"]["client_token"])
    with pytest.raises(VaultDenied, match=f"grant the token 'update' on {vault_pki.mount}/issue"):
        VaultPKI(weak, role=vault_pki.role, common_name="localhost",
                 mount=vault_pki.mount).issue()
    with pytest.raises(ConfigError, match="allow these names"):
        VaultPKI(_root(vault_pki), role=vault_pki.role, common_name="evil.example",
                 mount=vault_pki.mount).issue()


def test_renewal_delay_is_two_thirds_of_the_lifetime_from_receipt() -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = make_leaf(None, "x", days=30, not_before=start).cert_pem
    now = start + dt.timedelta(days=1)
    assert renewal_delay(cert, now) == pytest.approx(dt.timedelta(days=19).total_seconds(), abs=1)
    # Received later than notBefore (Vault backdates it): two thirds of what is left.
    received = start + dt.timedelta(days=3)
    assert renewal_delay(cert, received, received=received) == pytest.approx(
        dt.timedelta(days=18).total_seconds(), abs=1)
    assert renewal_delay(cert, start + dt.timedelta(days=29)) == 0.0
