"""Keys that a real KES wrote to Vault, in every format it ever used (plain and
transit-wrapped, KV v1 and v2), are described, listed and used through the API — with
ciphertexts from KES's own test vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from bootkey_core.secret import SecretBuffer
from kes import keyversion
from kes.api import Api
from kes.crypto import KeyType
from kes.keyring import Keyring
from kes.keyversion import KeyVersion, Timestamp
from kes.policy import PolicySet
from kes.vaultstore import VaultKeyStore
from tests.kes.apitools import ADMIN, b64, call, js
from tests.kes.conftest import TRANSIT_KEY, vault_store
from tests.support.bao import DevBao

VECTORS = {v["name"]: v for v in json.loads(
    (Path(__file__).parent / "data" / "ciphertexts.json").read_text())["vectors"]}
ZERO = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
CTX_KEY = "dDHbTWgo+Yh3u804SYB5OyVMy6RiLeJYBQth1f6KlEU="


def _protobuf(key_b64: str, kt: KeyType) -> str:
    kv = KeyVersion(SecretBuffer.from_bytes(bytearray(base64.b64decode(key_b64))), kt,
                    SecretBuffer.random(32), Timestamp.parse("2024-01-12T10:39:20.886816Z"),
                    "3ecfcdf38fcbe141ae26a1030f81e96b753365a46760ae6b578698a97c59fd22")
    return keyversion.encode(kv).decode()


# (stored value, expected algorithm, created_at, vectors that must decrypt with it)
STORED: dict[str, tuple[str, str, str, list[str]]] = {
    "oldest-json": (json.dumps({"bytes": ZERO}), "AES256", "0001-01-01T00:00:00Z",
                    ["json-aes", "msgpack-aes", "raw-aes-zero-key"]),
    "json-xchacha": (json.dumps({"bytes": ZERO, "algorithm": "XCHACHA20-POLY1305",
                                 "created_at": "2009-11-10T23:00:00Z", "created_by": ADMIN}),
                     "ChaCha20", "2009-11-10T23:00:00Z",
                     ["json-chacha", "json-chacha-with-id", "msgpack-chacha"]),
    "json-v1": (json.dumps({"version": "v1", "bytes": CTX_KEY, "algorithm": "ChaCha20",
                            "created_at": "2023-03-14T23:42:00.729167884Z"}),
                "ChaCha20", "2023-03-14T23:42:00.729167884Z", ["raw-chacha-context"]),
    "protobuf": (_protobuf(CTX_KEY, KeyType.AES256), "AES256", "2024-01-12T10:39:20.886816Z",
                 ["raw-aes-context"]),
}


def _write(bao: DevBao, store: VaultKeyStore, name: str, value: str, wrap: bool) -> None:
    root = bao.client()
    if wrap:
        value = root.secrets.transit.encrypt_data(
            TRANSIT_KEY, base64.b64encode(value.encode()).decode())["data"]["ciphertext"]
    path = f"{store.cfg.prefix}/{name}"
    if store.cfg.version == 2:
        root.secrets.kv.v2.create_or_update_secret(path=path, secret={name: value},
                                                   mount_point=store.cfg.engine)
    else:
        root.secrets.kv.v1.create_or_update_secret(path=path, secret={name: value},
                                                   mount_point=store.cfg.engine)


@pytest.mark.parametrize("version", [1, 2], ids=["kv1", "kv2"])
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "transit"])
def test_kes_written_keys_are_described_listed_used(bao: DevBao, version: int,
                                                    wrap: bool) -> None:
    store = vault_store(bao, version, transit=True)
    for name, (value, *_rest) in STORED.items():
        _write(bao, store, name, value, wrap)
    api = Api(Keyring(store), PolicySet.build(ADMIN, []), key_type=KeyType.AES256)
    assert js(call(api, "GET", "/v1/key/list/")) == {"names": sorted(STORED)}
    for name, (_, algo, created, vectors) in STORED.items():
        d: dict[str, Any] = js(call(api, "GET", f"/v1/key/describe/{name}"))
        assert (d["algorithm"], d["created_at"]) == (algo, created), name
        for vname in vectors:
            v = VECTORS[vname]
            ct = v["ciphertext_text"].encode() if "ciphertext_text" in v else (
                base64.b64decode(v["ciphertext_b64"]))
            r = js(call(api, "PUT", f"/v1/key/decrypt/{name}",
                        {"ciphertext": b64(ct), "context": v.get("context", "")}))
            assert r == {"plaintext": v["plaintext"]}, (name, vname)
        # ...and new data keys from old keys round-trip
        g = js(call(api, "PUT", f"/v1/key/generate/{name}", {"context": "e30="}))
        back = js(call(api, "PUT", f"/v1/key/decrypt/{name}",
                       {"ciphertext": g["ciphertext"], "context": "e30="}))
        assert back["plaintext"] == g["plaintext"]
