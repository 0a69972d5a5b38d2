"""KeyStore conformance (MemKeyStore, real OpenBao KV v1/v2, transit), stored formats, and
the cache: expiry, offline mode, coalesced misses."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest

from kes import keyversion
from kes.crypto import KeyType
from kes.keyring import (
    CacheExpiry,
    KeyExists,
    KeyNotFound,
    Keyring,
    KeyStore,
    MemKeyStore,
    StoreError,
    StoreUnreachable,
)
from kes.keyversion import KeyVersion, Timestamp
from kes.vaultstore import VaultStoreConfig
from tests.kes.conftest import TRANSIT_KEY, vault_store
from tests.support.bao import DevBao
from tests.support.wait import wait_for

STORED = json.loads((Path(__file__).parent / "data" / "stored_keys.json").read_text())
PB_VECTOR = STORED["valid"][-1]


# ---- stored value formats (pure)

@pytest.mark.parametrize("v", STORED["valid"], ids=range(len(STORED["valid"])))
def test_parse_every_stored_format(v: dict[str, Any]) -> None:
    kv = keyversion.parse(v["raw"])
    assert bytes(kv.key.view) == base64.b64decode(v["key"])
    assert kv.type.wire_name == v["type"]
    if v["hmac"] is None:
        assert kv.hmac_key is None
    else:
        assert kv.hmac_key is not None
        assert bytes(kv.hmac_key.view) == base64.b64decode(v["hmac"])
    assert kv.created_at.rfc3339() == (v["created_at"] or Timestamp.ZERO_TEXT)
    assert kv.created_by == v["created_by"]


@pytest.mark.parametrize("raw", STORED["invalid"])
def test_invalid_stored_values_are_refused(raw: str) -> None:
    with pytest.raises(keyversion.InvalidKeyVersion):
        keyversion.parse(raw)


def test_encode_is_byte_identical_to_kes() -> None:
    assert keyversion.encode(keyversion.parse(PB_VECTOR["raw"])).decode() == PB_VECTOR["raw"]


def test_roundtrip_and_repr_hides_key() -> None:
    kv = KeyVersion.generate(KeyType.CHACHA20, "ab" * 32)
    back = keyversion.parse(keyversion.encode(kv))
    assert back.key.equals(kv.key) and back.type is KeyType.CHACHA20
    assert back.created_at == kv.created_at and back.created_by == "ab" * 32
    assert bytes(kv.key.view).hex() not in repr(kv)


# ---- conformance: every KeyStore behaves the same

def _value() -> bytes:
    return keyversion.encode(KeyVersion.generate(KeyType.AES256, ""))


def test_store_conformance(any_store: KeyStore) -> None:
    s = any_store
    assert isinstance(s.status(), float)
    with pytest.raises(KeyNotFound):
        s.get("k1")
    v1 = _value()
    s.create("k1", v1)
    assert s.get("k1") == v1
    with pytest.raises(KeyExists):
        s.create("k1", _value())
    assert s.get("k1") == v1  # create-only: the first value survives
    s.create("k2", _value())
    s.create("other", _value())
    assert s.list("") == ["k1", "k2", "other"]
    assert s.list("k") == ["k1", "k2"]
    assert s.list("zzz") == []
    s.delete("k1")
    with pytest.raises(KeyNotFound):
        s.get("k1")
    s.create("k1", v1)  # a deleted name can be created again
    assert s.get("k1") == v1


def test_concurrent_creates_one_wins(any_store: KeyStore) -> None:
    results: list[str] = []

    def create() -> None:
        try:
            any_store.create("race", _value())
            results.append("ok")
        except KeyExists:
            results.append("exists")
    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") >= 1
    # KV v1 has no cas: check-then-put is not atomic there (as in KES); v2 and mem are.
    if not (hasattr(any_store, "cfg") and any_store.cfg.version == 1):
        assert results.count("ok") == 1


@pytest.mark.parametrize("version", [1, 2])
def test_vault_layout_is_kes_layout(bao: DevBao, version: int) -> None:
    store = vault_store(bao, version, prefix="tenant-1/" + secrets.token_hex(3))
    value = _value()
    store.create("minio-key", value)
    root = bao.client()
    if version == 2:
        r = root.secrets.kv.v2.read_secret_version(
            path=f"{store.cfg.prefix}/minio-key", mount_point="secret", version=1,
            raise_on_deleted_version=True)
        assert r["data"]["data"] == {"minio-key": value.decode()}
    else:
        r = root.secrets.kv.v1.read_secret(path=f"{store.cfg.prefix}/minio-key",
                                           mount_point="kv1")
        assert r["data"] == {"minio-key": value.decode()}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("raw", [
    PB_VECTOR["raw"],
    STORED["valid"][4]["raw"],   # JSON with version/algorithm/created_*
    STORED["valid"][0]["raw"],   # oldest {"bytes":…}
], ids=["protobuf", "json-v1", "json-oldest"])
@pytest.mark.parametrize("wrap", ["plain", "transit"])
def test_keys_written_by_real_kes_are_read(bao: DevBao, version: int, raw: str,
                                           wrap: str) -> None:
    store = vault_store(bao, version, transit=True)
    root = bao.client()
    value = raw
    if wrap == "transit":
        value = root.secrets.transit.encrypt_data(
            TRANSIT_KEY, base64.b64encode(raw.encode()).decode())["data"]["ciphertext"]
    path = f"{store.cfg.prefix}/legacy"
    if version == 2:
        root.secrets.kv.v2.create_or_update_secret(path=path, secret={"legacy": value},
                                                   mount_point="secret")
    else:
        root.secrets.kv.v1.create_or_update_secret(path=path, secret={"legacy": value},
                                                   mount_point="kv1")
    ring = Keyring(store)
    kv = ring.get("legacy")
    assert bytes(kv.key.view) == keyversion.parse(raw).key.view.tobytes()
    assert ring.list("") == (["legacy"], "")


def test_transit_rotated_vN_prefix_is_read(bao: DevBao) -> None:
    store = vault_store(bao, 2, transit=True)
    root = bao.client()
    store.create("before", _value())
    root.secrets.transit.rotate_key(TRANSIT_KEY)
    store.create("after", _value())
    stored = root.secrets.kv.v2.read_secret_version(
        path=f"{store.cfg.prefix}/after", mount_point="secret", version=1,
        raise_on_deleted_version=True)["data"]["data"]["after"]
    assert stored.startswith("vault:v") and not stored.startswith("vault:v1:")
    ring = Keyring(store)
    ring.get("before")
    ring.get("after")


def test_transit_value_without_transit_config_is_a_store_error(bao: DevBao) -> None:
    wrapped = vault_store(bao, 2, transit=True)
    wrapped.create("w", _value())
    plain = vault_store(bao, 2, prefix=wrapped.cfg.prefix)
    with pytest.raises(StoreError, match=r"transit\.key"):
        plain.get("w")


def test_malformed_entry_is_store_error_not_not_found(bao: DevBao) -> None:
    store = vault_store(bao, 1)
    bao.client().secrets.kv.v1.create_or_update_secret(
        path=f"{store.cfg.prefix}/bad", secret={"bad": "not a key"}, mount_point="kv1")
    with pytest.raises(StoreError):
        Keyring(store).get("bad")
    bao.client().secrets.kv.v1.create_or_update_secret(
        path=f"{store.cfg.prefix}/nofield", secret={"other": "x"}, mount_point="kv1")
    with pytest.raises(StoreError):
        store.get("nofield")


def test_unreachable_vault_is_a_store_error() -> None:
    from kes.vaultstore import VaultKeyStore, VaultStoreConfig
    from tests.kes.conftest import token_session
    from tests.support.bao import free_port
    store = VaultKeyStore(token_session(f"http://127.0.0.1:{free_port()}", timeout=2),
                          VaultStoreConfig())
    with pytest.raises(StoreError):
        store.get("k")
    with pytest.raises(StoreError):
        store.status()


# ---- cache

class CountingStore(MemKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.gate: threading.Event | None = None
        self.down = False

    def get(self, name: str) -> bytes:
        self.reads += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.down:
            raise StoreUnreachable("down")
        return super().get(name)

    def status(self) -> float:
        if self.down:
            raise StoreUnreachable("down")
        return 0.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _ring(expiry: CacheExpiry) -> tuple[Keyring, CountingStore, Clock]:
    store, clock = CountingStore(), Clock()
    ring = Keyring(store, expiry, clock=clock)
    ring.create("k", KeyVersion.generate(KeyType.AES256, ""))
    return ring, store, clock


def test_default_expiry_is_the_documented_one() -> None:
    assert CacheExpiry() == CacheExpiry(any=300.0, unused=30.0, offline=0.0)


def test_cache_serves_repeated_gets_and_any_expiry_drops_all() -> None:
    ring, store, clock = _ring(CacheExpiry(any=300, unused=0, offline=0))
    for _ in range(5):
        ring.get("k")
    assert store.reads == 1
    clock.t += 299
    ring.get("k")
    assert store.reads == 1
    clock.t += 2
    ring.get("k")
    assert store.reads == 2


def test_unused_expiry_evicts_only_idle_keys() -> None:
    ring, store, clock = _ring(CacheExpiry(any=0, unused=30, offline=0))
    ring.get("k")
    for _ in range(6):           # used every 10 s: stays cached
        clock.t += 10
        ring.get("k")
    assert store.reads == 1
    clock.t += 15                # sweep: used since last sweep → keep, clear flag
    ring.maintain()
    clock.t += 15                # sweep: not used → evict
    ring.maintain()
    assert ring.cached_names() == []
    ring.get("k")
    assert store.reads == 2


def test_offline_mode_keeps_keys_while_store_is_down() -> None:
    ring, store, clock = _ring(CacheExpiry(any=60, unused=0, offline=3600))
    ring.get("k")
    store.down = True
    assert ring.probe() is False and ring.offline
    with pytest.raises(StoreUnreachable):
        ring.status()
    clock.t += 600               # `any` is suspended while offline
    ring.get("k")
    assert store.reads == 1
    clock.t += 3600              # the offline interval drops the cache
    with pytest.raises(StoreUnreachable):
        ring.get("k")
    store.down = False
    assert ring.probe() is True and not ring.offline
    ring.get("k")


def test_without_offline_mode_entries_expire_while_down() -> None:
    ring, store, clock = _ring(CacheExpiry(any=60, unused=0, offline=0))
    ring.get("k")
    store.down = True
    ring.probe()
    clock.t += 61
    with pytest.raises(StoreUnreachable):
        ring.get("k")


def test_concurrent_misses_are_coalesced() -> None:
    ring, store, _ = _ring(CacheExpiry())
    store.gate = threading.Event()
    got: list[KeyVersion] = []
    threads = [threading.Thread(target=lambda: got.append(ring.get("k"))) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: store.reads > 0, what="the leader inside the store read")
    store.gate.set()
    for t in threads:
        t.join()
    assert store.reads == 1 and len(got) == 8 and all(g is got[0] for g in got)


def test_failed_miss_is_shared_then_retried() -> None:
    ring, store, _ = _ring(CacheExpiry())
    store.down = True
    with pytest.raises(StoreUnreachable):
        ring.get("k")
    store.down = False
    ring.get("k")
    with pytest.raises(KeyNotFound):
        ring.get("missing")


def test_delete_evicts_local_entry() -> None:
    ring, _, _ = _ring(CacheExpiry())
    ring.get("k")
    ring.delete("k")
    with pytest.raises(KeyNotFound):
        ring.get("k")


def test_list_pages_at_1024() -> None:
    store = MemKeyStore()
    for i in range(1030):
        store.create(f"k{i:04d}", b"x")
    names, cont = Keyring(store).list("")
    assert len(names) == 1024 and cont == "k1024"
    assert Keyring(store).list("k102") == ([f"k102{i}" for i in range(10)], "")


@pytest.mark.parametrize("version,transit", [(1, False), (2, False), (2, True)])
def test_policy_hcl_is_enough_and_least_privilege(bao: DevBao, version: int,
                                                  transit: bool) -> None:
    from kes.vaultstore import VaultKeyStore
    from tests.kes.conftest import token_session
    full = vault_store(bao, version, transit=transit)
    root = bao.client()
    name = f"kes-test-{secrets.token_hex(4)}"
    root.sys.create_or_update_policy(name, full.policy_hcl())
    token = root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    store = VaultKeyStore(token_session(bao.address, token), full.cfg)
    test_store_conformance(store)
    # ...and nothing outside the prefix
    other = VaultKeyStore(token_session(bao.address, token),
                          VaultStoreConfig(engine=full.cfg.engine, version=version,
                                           prefix="elsewhere"))
    with pytest.raises(StoreError, match="403"):
        other.create("k", _value())


def test_cached_is_io_free_lookup() -> None:
    ring, store, _ = _ring(CacheExpiry())
    assert ring.cached("k") is None and store.reads == 0
    kv = ring.get("k")
    assert ring.cached("k") is kv and store.reads == 1


def test_revoked_token_means_one_relogin_through_the_session(bao: DevBao,
                                                              tmp_path: Path) -> None:
    """The keystore has no login of its own: a dead token is the session's to replace,
    with the secret_id it holds (the file is gone after the first login)."""
    from bootkey_core.vault import VaultSession
    from bootkey_core.vault_config import VaultConnection
    from kes.vaultstore import VaultKeyStore
    full = vault_store(bao, 2)
    full.create("k", _value())
    root = bao.client()
    name = f"kes-relogin-{secrets.token_hex(4)}"
    root.sys.create_or_update_policy(name, full.policy_hcl())
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(name, token_policies=[name], token_ttl="1h")
    role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
    sid = tmp_path / "secret-id"
    sid.write_text(root.auth.approle.generate_secret_id(name)["data"]["secret_id"])
    session = VaultSession(VaultConnection.model_validate({
        "address": bao.address,
        "approle": {"role_id": role_id, "secret_id_file": str(sid),
                    "remove_secret_id_file": True}}))
    session.login()
    assert not sid.exists()
    store = VaultKeyStore(session, full.cfg)
    root.auth.token.revoke(session.raw_client().token)
    assert store.get("k")
    assert session.logins == 2

    root.auth.token.revoke(session.raw_client().token)
    root.auth.approle.delete_role(name)  # nothing can log in any more
    with pytest.raises(StoreError, match="cannot log in"):
        store.get("k")
