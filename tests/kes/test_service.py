"""kes.service.build: TLS from config (encrypted key, tls.auth on), api overrides, the
`keys:` section — served over real TLS with an in-memory store."""

from __future__ import annotations

import http.client
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from bootkey_core.errors import ConfigError
from kes import service
from kes.identity import of_certificate
from kes.keyring import MemKeyStore
from kes.server import ServerThread
from tests.kes.server_util import Pki
from tests.support.certs import Issued, make_leaf
from tests.support.pki import enable_pki


def _section(pki: Pki, tmp: Path, **extra: Any) -> dict[str, Any]:
    (tmp / "s.crt").write_bytes(pki.server.cert_pem)
    (tmp / "s.key").write_bytes(pki.server.key_pem)
    base: dict[str, Any] = {"admin": {"identity": "disabled"},
                            "tls": {"cert": str(tmp / "s.crt"), "key": str(tmp / "s.key")}}
    for k, v in extra.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def _get(port: int, ctx: ssl.SSLContext, path: str, method: str = "GET") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_encrypted_server_key_and_api_override(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    enc = pki.server.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    sec = _section(pki, tmp_path, api={"/v1/status": {"skip_auth": True}})
    (tmp_path / "s.key").write_bytes(enc)
    sec["tls"]["password"] = "pw"
    sec["address"] = "127.0.0.1:0"
    svc = service.build(sec, store=MemKeyStore())
    stranger = pki.client_context(make_leaf(None, "stranger", client=True), "stranger")
    with svc.thread() as st:
        assert _get(st.port, stranger, "/v1/status") == 200      # skip_auth
        assert _get(st.port, stranger, "/v1/key/list/") == 403
    svc.close()
    sec["tls"]["password"] = "wrong"
    with pytest.raises(ConfigError, match=r"tls\.password"):
        service.build(sec, store=MemKeyStore())


def test_tls_auth_on_verifies_client_certs(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    (tmp_path / "ca.pem").write_bytes(pki.ca.cert_pem)
    signed = make_leaf(pki.ca, "minio", client=True)
    sec = _section(pki, tmp_path, tls={"auth": "on", "ca": str(tmp_path / "ca.pem")},
                   admin={"identity": of_certificate(signed.cert)})
    svc = service.build(sec, store=MemKeyStore())
    assert svc.tls.verify_client
    with ServerThread(svc.handler, svc.tls) as st:
        assert _get(st.port, pki.client_context(signed, "signed"), "/v1/status") == 200
        selfsigned: Issued = make_leaf(None, "self", client=True)
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _get(st.port, pki.client_context(selfsigned, "self"), "/v1/status")
    svc.close()
    del sec["tls"]["ca"]
    with pytest.raises(ConfigError, match=r"tls\.ca"):
        service.build(sec, store=MemKeyStore())


def test_configured_keys_are_created_once(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    store = MemKeyStore()
    svc = service.build(_section(pki, tmp_path, keys=[{"name": "k1"}, {"name": "k2"}]),
                        store=store)
    svc.create_configured_keys()
    first = store.get("k1")
    svc.create_configured_keys()          # existing keys are left alone
    assert store.get("k1") == first and store.list("") == ["k1", "k2"]
    svc.close()


def test_missing_keystore_and_files_are_config_errors(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    with pytest.raises(ConfigError, match=r"keystore\.vault"):
        service.build(_section(pki, tmp_path))
    sec = _section(pki, tmp_path)
    sec["tls"]["cert"] = str(tmp_path / "missing.crt")
    with pytest.raises(ConfigError, match=r"tls\.cert: cannot read"):
        service.build(sec, store=MemKeyStore())


@pytest.mark.skipif(os.geteuid() != 0, reason="mlockall needs CAP_IPC_LOCK")
def test_forked_worker_hardens_itself_before_its_first_request(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    svc = service.build(_section(pki, tmp_path), store=MemKeyStore())
    svc.harden_workers = True
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            os.close(r)
            from bootkey_core.secret import vm_locked_kib
            svc.start()
            os.write(w, str(vm_locked_kib()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        locked = int(f.read() or "0")
    _, status = os.waitpid(pid, 0)
    assert status == 0 and locked > 0
    svc.close()


def test_standalone_vault_login_errors_are_classified(tmp_path: Path) -> None:
    from bootkey_core.errors import VaultAuthFailed, VaultUnavailable
    from tests.support.bao import DevBao, free_port
    pki = Pki.create(tmp_path)
    sec = _section(pki, tmp_path, keystore={"vault": {
        "endpoint": f"http://127.0.0.1:{free_port()}", "approle": {"id": "r", "secret": "s"}}})
    with pytest.raises(VaultUnavailable):       # retryable: exit 69, systemd restarts
        service.build(sec)
    bao = DevBao(tmp_path / "bao").start()
    try:
        root = bao.client()
        if "approle/" not in root.sys.list_auth_methods()["data"]:
            root.sys.enable_auth_method("approle")
        sec["keystore"]["vault"]["endpoint"] = bao.address
        with pytest.raises(VaultAuthFailed):    # wrong credentials: exit 80, no restart loop
            service.build(sec)
        root.auth.approle.create_or_update_approle("kes", token_policies=["default"])
        role = root.auth.approle.read_role_id("kes")["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id("kes")["data"]["secret_id"]
        sec["keystore"]["vault"]["approle"] = {"id": role, "secret": secret_id}
        svc = service.build(sec)
        assert svc.keyring.status() >= 0
        svc.close()
    finally:
        bao.stop()


def test_server_certificate_from_vault_pki_config(bao_pki: tuple[Any, str, Path],
                                                  tmp_path: Path) -> None:
    bao, mount, ca_file = bao_pki
    client = make_leaf(None, "minio", client=True)
    sec: dict[str, Any] = {
        "admin": {"identity": of_certificate(client.cert)}, "address": "127.0.0.1:0",
        "tls": {"vault_pki": {"mount": mount, "role": "kes", "ttl": "30m"}},
        "keystore": {"vault": {"endpoint": bao.address, "token": "root", "engine": "secret",
                               "version": "v2", "prefix": f"pki-{mount}"}}}
    svc = service.build(sec)
    assert svc.cert_source is not None
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_bytes(client.cert_pem)
    key.write_bytes(client.key_pem)
    ctx = ssl.create_default_context(cafile=str(ca_file))  # trusts only the Vault PKI root
    ctx.load_cert_chain(str(cert), str(key))
    with svc.thread() as st:
        assert _get(st.port, ctx, "/v1/key/create/pki-key", "POST") == 200
        assert _get(st.port, ctx, "/v1/status") == 200
    svc.close()
    with pytest.raises(ConfigError, match="not both"):
        service.build({**sec, "tls": {"cert": "/x", "key": "/y", "vault_pki": {"role": "kes"}}})


@pytest.fixture
def bao_pki(bao: Any, tmp_path: Path) -> tuple[Any, str, Path]:
    pki = enable_pki(bao.client(), tmp_path)
    return bao, pki.mount, pki.ca_file
