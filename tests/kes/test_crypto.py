"""KES ciphertexts: KES's own vectors byte for byte, and decrypt's single failure mode."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kes import crypto
from kes.crypto import KeyType, NotAuthentic

DATA = json.loads((Path(__file__).parent / "data" / "ciphertexts.json").read_text())
TYPES = {"AES256": KeyType.AES256, "ChaCha20": KeyType.CHACHA20}


def _ct(v: dict[str, Any]) -> bytes:
    if "ciphertext_text" in v:
        return str(v["ciphertext_text"]).encode()
    return base64.b64decode(v["ciphertext_b64"])


@pytest.mark.parametrize("v", DATA["vectors"], ids=lambda v: v["name"])
def test_kes_vectors_decrypt(v: dict[str, Any]) -> None:
    key = base64.b64decode(v["key"])
    ctx = base64.b64decode(v.get("context", ""))
    assert crypto.decrypt(key, TYPES[v["type"]], _ct(v), ctx) == base64.b64decode(v["plaintext"])


@pytest.mark.parametrize("v", [v for v in DATA["vectors"] if v["name"].startswith("raw")],
                         ids=lambda v: v["name"])
def test_raw_vectors_reproduce_byte_for_byte(v: dict[str, Any]) -> None:
    ct = _ct(v)
    out = crypto.encrypt(base64.b64decode(v["key"]), TYPES[v["type"]],
                         base64.b64decode(v["plaintext"]), base64.b64decode(v.get("context", "")),
                         iv=ct[-28:-12], nonce=ct[-12:])
    assert out == ct


@pytest.mark.parametrize("v", DATA["invalid"], ids=lambda v: v["name"])
def test_kes_invalid_vectors_are_not_authentic(v: dict[str, Any]) -> None:
    with pytest.raises(NotAuthentic):
        crypto.decrypt(base64.b64decode(v["key"]), TYPES[v["type"]], _ct(v))


@pytest.mark.parametrize("keyed", [False, True], ids=["fresh-hmac", "kept-hmac"])
@pytest.mark.parametrize("kt", list(KeyType))
def test_roundtrip_size_and_context_binding(kt: KeyType, keyed: bool) -> None:
    key = bytes(range(32))
    kept = crypto.keyed_hmac(key) if keyed else None
    dek, ct = crypto.new_data_key(key, kt, b'{"bucket":"bucket/object"}', keyed=kept)
    assert len(dek) == 32 and dek != bytes(32)
    assert len(ct) == 76  # 32 + tag 16 + iv 16 + nonce 12, as KES PR #433 says
    assert crypto.decrypt(key, kt, ct, b'{"bucket":"bucket/object"}') == dek
    assert crypto.decrypt(key, kt, ct, b'{"bucket":"bucket/object"}', keyed=kept) == dek
    # A kept HMAC is copied per ciphertext, never consumed: it still works afterwards.
    assert crypto.decrypt(key, kt, ct, b'{"bucket":"bucket/object"}', keyed=kept) == dek
    for wrong_ctx in (b"", b'{"bucket":"bucket/other"}'):
        with pytest.raises(NotAuthentic):
            crypto.decrypt(key, kt, ct, wrong_ctx)
    with pytest.raises(NotAuthentic):
        crypto.decrypt(bytes(32), kt, ct, b'{"bucket":"bucket/object"}')
    other = KeyType.CHACHA20 if kt is KeyType.AES256 else KeyType.AES256
    with pytest.raises(NotAuthentic):
        crypto.decrypt(key, other, ct, b'{"bucket":"bucket/object"}')


def test_every_single_bit_flip_is_not_authentic() -> None:
    key = bytes(32)
    ct = crypto.encrypt(key, KeyType.AES256, b"x" * 32)
    for i in range(len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x01
        with pytest.raises(NotAuthentic):
            crypto.decrypt(key, KeyType.AES256, bytes(bad))


def test_legacy_key_of_unknown_type_honours_ciphertext_algorithm() -> None:
    # A pre-2022 key (stored without algorithm) that sealed with ChaCha20: real KES treats
    # the key as AES256 and fails; with type_known=False the ciphertext's aead decides.
    v = next(v for v in DATA["vectors"] if v["name"] == "json-chacha")
    key = base64.b64decode(v["key"])
    with pytest.raises(NotAuthentic):
        crypto.decrypt(key, KeyType.AES256, _ct(v))
    assert crypto.decrypt(key, KeyType.AES256, _ct(v), type_known=False) == bytes(16)


def test_hchacha20_matches_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1 test vector.
    key = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert crypto.hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


def test_hmac_is_hmac_sha256() -> None:
    import hashlib
    import hmac as std_hmac
    assert crypto.hmac_sha256(b"k" * 32, b"root access key") == std_hmac.new(
        b"k" * 32, b"root access key", hashlib.sha256).digest()


def test_encrypt_rejects_bad_parameters_as_value_errors() -> None:
    with pytest.raises(ValueError):
        crypto.encrypt(b"short", KeyType.AES256, b"x")
    with pytest.raises(ValueError):
        crypto.encrypt(bytes(32), KeyType.AES256, b"x", iv=b"1")


@settings(max_examples=400, deadline=None)
@given(ct=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=100).map(lambda b: b"\x95" + b),
    st.binary(max_size=100).map(lambda b: b"{" + b),
    st.builds(lambda a, b, c: json.dumps(
        {"aead": a, "iv": b, "nonce": c, "bytes": "AAAA"}).encode(),
        st.sampled_from(["AES-256-GCM-HMAC-SHA-256", "ChaCha20Poly1305", 1, None]),
        st.one_of(st.text(max_size=30), st.integers(), st.none()),
        st.one_of(st.text(max_size=30), st.none())),
), kt=st.sampled_from(list(KeyType)), ctx=st.binary(max_size=16))
def test_decrypt_of_arbitrary_bytes_only_raises_not_authentic(
        ct: bytes, kt: KeyType, ctx: bytes) -> None:
    with contextlib.suppress(NotAuthentic):
        crypto.decrypt(bytes(32), kt, ct, ctx)
