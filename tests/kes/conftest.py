"""KES test fixtures: Vault key stores on the session's real OpenBao."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable

import hvac
import pytest

from bootkey_core.vault import VaultSession
from bootkey_core.vault_config import VaultConnection
from kes.keyring import KeyStore, MemKeyStore
from kes.vaultstore import VaultKeyStore, VaultStoreConfig
from tests.support.bao import DevBao

TRANSIT_KEY = "kes-test"


def prepare_vault(root: hvac.Client) -> None:
    """KV v1 at kv1/, KV v2 at secret/ (dev default), a plain transit key for wrapping."""
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    if "secret/" not in mounts:
        root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    if "kv1/" not in mounts:
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    if "transit/" not in mounts:
        root.sys.enable_secrets_engine("transit", path="transit")
    keys: list[str] = []
    with contextlib.suppress(hvac.exceptions.InvalidPath):
        keys = root.secrets.transit.list_keys()["data"]["keys"]
    if TRANSIT_KEY not in keys:
        root.secrets.transit.create_key(TRANSIT_KEY)


def token_session(address: str, token: str = "root", timeout: float = 5.0) -> VaultSession:
    """A Vault session holding a token (the dev server's root token by default)."""
    return VaultSession(VaultConnection(address=[address], timeout=timeout), token=token)


def vault_store(bao: DevBao, version: int, *, transit: bool = False,
                prefix: str | None = None) -> VaultKeyStore:
    root = bao.client()
    prepare_vault(root)
    cfg = VaultStoreConfig(engine="secret" if version == 2 else "kv1", version=version,
                           prefix=prefix if prefix is not None else f"kes-{secrets.token_hex(4)}",
                           transit_key=TRANSIT_KEY if transit else "")
    return VaultKeyStore(token_session(bao.address), cfg)


StoreFactory = Callable[[], KeyStore]


@pytest.fixture(params=["mem", "kv1", "kv2", "kv2-transit"])
def any_store(request: pytest.FixtureRequest) -> KeyStore:
    """Every KeyStore implementation; the conformance suite runs on each."""
    if request.param == "mem":
        return MemKeyStore()
    bao: DevBao = request.getfixturevalue("bao")
    version = 1 if request.param == "kv1" else 2
    return vault_store(bao, version, transit=request.param.endswith("transit"))
