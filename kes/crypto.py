"""KES data-key cryptography (shared/kes-api.md §7): pure functions, no I/O.

Invariant: `decrypt` either returns the plaintext or raises `NotAuthentic` — one error for
a wrong key, a wrong context, a tampered, truncated or unparsable ciphertext in any of the
three formats — so a caller (and MinIO) learns nothing about *why* it failed.

Construction (identical in all formats, only the framing differs):
  AES256   : k = HMAC-SHA256(secret, iv)   → AES-256-GCM(k, nonce, pt, aad=context)
  ChaCha20 : k = HChaCha20(secret, iv)     → ChaCha20-Poly1305(k, nonce, pt, aad=context)
with a 16-byte iv and a 12-byte nonce. Output is always the current raw format
`sealed ‖ iv ‖ nonce`; decrypt also reads the MessagePack (2022-2024) and JSON (2020-2022)
formats because MinIO stores whatever a KES once returned and hands it back verbatim.

`iv` and `nonce` can be passed in so KES's own vectors reproduce byte for byte; production
callers leave them out and get fresh random ones.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct

import msgpack
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from kes.randpool import random_bytes

Buffer = bytes | bytearray | memoryview

KEY_SIZE = 32        # every KES secret and HMAC key is 32 bytes
DEK_SIZE = 32        # MinIO checks the generated plaintext is exactly 32 bytes
IV_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16


class KeyType(enum.IntEnum):
    """Protobuf `SecretKey.Type` values (§8.1)."""

    AES256 = 1
    CHACHA20 = 2

    @property
    def wire_name(self) -> str:
        return "AES256" if self is KeyType.AES256 else "ChaCha20"


# Algorithm names accepted wherever KES parses one (§7.1): current and kes-go v0.1 aliases.
ALGORITHMS: dict[str, KeyType] = {
    "AES256": KeyType.AES256,
    "AES256-GCM_SHA256": KeyType.AES256,
    "ChaCha20": KeyType.CHACHA20,
    "XCHACHA20-POLY1305": KeyType.CHACHA20,
}
# The `aead` field of the 2020-2022 JSON ciphertexts. The pre-v0.6.1 "AES-256-GCM" used a
# broken KDF and is rejected, as KES does.
_JSON_AEADS = {"AES-256-GCM-HMAC-SHA-256": KeyType.AES256, "ChaCha20Poly1305": KeyType.CHACHA20}


class NotAuthentic(Exception):
    """The ciphertext cannot be opened with this key and context. Carries no detail."""

    def __init__(self) -> None:
        super().__init__("ciphertext is not authentic")


def hchacha20(key: Buffer, nonce16: bytes) -> bytes:
    """HChaCha20(key, 16-byte input) → 32 bytes (RFC draft-irtf-cfrg-xchacha §2.2).

    Computed from one ChaCha20 block: the block is `rounds(state) + state` word-wise, and
    HChaCha20 is words 0-3 and 12-15 of `rounds(state)` — so subtract the known input
    words. This reuses the vetted ChaCha20 core instead of a hand-written one.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    out = struct.unpack("<16I", block)
    consts = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
    inp = struct.unpack("<4I", nonce16)
    words = [(out[i] - consts[i]) & 0xFFFFFFFF for i in range(4)]
    words += [(out[12 + i] - inp[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *words)


def keyed_hmac(key: Buffer) -> hmac.HMAC:
    """HMAC-SHA256 under `key`, before any data: `encrypt`/`decrypt` copy it for each
    ciphertext instead of setting the key up again (a third of the cost; it lives as
    long as the cached key, see KeyVersion.keyed_hmac)."""
    return hmac.HMAC(key, hashes.SHA256())


def _aead(key: Buffer, key_type: KeyType, iv: bytes,
          keyed: hmac.HMAC | None) -> AESGCM | ChaCha20Poly1305:
    if key_type is KeyType.AES256:
        h = keyed.copy() if keyed is not None else keyed_hmac(key)
        h.update(iv)
        return AESGCM(h.finalize())
    return ChaCha20Poly1305(hchacha20(key, iv))


def encrypt(key: Buffer, key_type: KeyType, plaintext: Buffer, context: bytes = b"",
            *, iv: bytes | None = None, nonce: bytes | None = None,
            keyed: hmac.HMAC | None = None) -> bytes:
    """Seal `plaintext` with `context` as associated data → `sealed ‖ iv ‖ nonce`.
    `keyed` is `keyed_hmac(key)`, if the caller keeps one."""
    if len(key) != KEY_SIZE:
        raise ValueError("KES secret keys are 32 bytes")
    if iv is None or nonce is None:
        fresh = random_bytes(IV_SIZE + NONCE_SIZE)  # KES draws 28 bytes: iv ‖ nonce
        iv = fresh[:IV_SIZE] if iv is None else iv
        nonce = fresh[IV_SIZE:] if nonce is None else nonce
    if len(iv) != IV_SIZE or len(nonce) != NONCE_SIZE:
        raise ValueError("iv must be 16 bytes and nonce 12 bytes")
    sealed = _aead(key, key_type, iv, keyed).encrypt(nonce, plaintext, context or None)
    return sealed + iv + nonce


def decrypt(key: Buffer, key_type: KeyType, ciphertext: bytes, context: bytes = b"",
            *, type_known: bool = True, keyed: hmac.HMAC | None = None) -> bytearray:
    """Open a ciphertext in any KES format. Raises only `NotAuthentic`.

    `type_known=False` (keys stored by KES ≤ v0.19.1 without an algorithm) makes a legacy
    ciphertext's own algorithm field decide, which real KES does not do (§7.3) — so old
    ChaCha20 ciphertexts of such keys still open.
    """
    try:
        framed = _unframe(ciphertext)
        if framed is None:
            raise NotAuthentic
        algo, iv, nonce, sealed = framed
        use = algo if (algo is not None and not type_known) else key_type
        return bytearray(_aead(key, use, iv, keyed).decrypt(nonce, sealed, context or None))
    except NotAuthentic:
        raise
    except Exception:
        # Any parse or tag failure, whatever the library raised, is the same answer.
        raise NotAuthentic from None


def _unframe(ct: bytes) -> tuple[KeyType | None, bytes, bytes, bytes] | None:
    """Split a ciphertext into (recorded algorithm, iv, nonce, sealed); None = malformed."""
    if ct[:1] == b"\x95":
        legacy = _unframe_msgpack(ct)
        if legacy is not None:
            return legacy
    elif ct[:1] == b"{":
        legacy_json = _unframe_json(ct)
        if legacy_json is not None:
            return legacy_json
    # Raw (and any legacy framing that did not parse, as KES does): sealed ‖ iv ‖ nonce.
    if len(ct) <= IV_SIZE + NONCE_SIZE:
        return None
    n = len(ct)
    return None, ct[n - 28:n - 12], ct[n - 12:], ct[:n - 28]


def _unframe_msgpack(ct: bytes) -> tuple[KeyType | None, bytes, bytes, bytes] | None:
    try:
        # unpackb rejects trailing bytes (ExtraData), as KES's decoder does.
        obj = msgpack.unpackb(ct, raw=False, strict_map_key=True)
    except Exception:
        return None
    if not (isinstance(obj, list) and len(obj) == 5):
        return None
    algo, _key_id, iv, nonce, sealed = obj
    if not (isinstance(algo, str) and isinstance(iv, bytes) and isinstance(nonce, bytes)
            and isinstance(sealed, bytes)):
        return None
    if algo not in ALGORITHMS or len(iv) != IV_SIZE or len(nonce) != NONCE_SIZE:
        raise NotAuthentic
    return ALGORITHMS[algo], iv, nonce, sealed


def _unframe_json(ct: bytes) -> tuple[KeyType | None, bytes, bytes, bytes] | None:
    try:
        obj = json.loads(ct)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    algo = _JSON_AEADS.get(obj.get("aead"))  # type: ignore[arg-type]
    try:
        iv = _b64(obj.get("iv"))
        nonce = _b64(obj.get("nonce"))
        sealed = _b64(obj.get("bytes"))
    except (binascii.Error, TypeError, ValueError):
        raise NotAuthentic from None
    if algo is None or len(iv) != IV_SIZE or len(nonce) != NONCE_SIZE:
        raise NotAuthentic
    return algo, iv, nonce, sealed


def _b64(v: object) -> bytes:
    if v is None:
        return b""
    if not isinstance(v, str):
        raise TypeError("not a string")
    return base64.b64decode(v, validate=True)


def hmac_sha256(key: Buffer, message: bytes) -> bytes:
    h = keyed_hmac(key)
    h.update(message)
    return h.finalize()


def new_data_key(key: Buffer, key_type: KeyType, context: bytes = b"", *,
                 keyed: hmac.HMAC | None = None) -> tuple[bytearray, bytes]:
    """A fresh 32-byte data key (a bytearray, for the caller to wipe) and its ciphertext.
    Key, iv and nonce come from one draw of the pool (kes.randpool: no system call)."""
    fresh = random_bytes(DEK_SIZE + IV_SIZE + NONCE_SIZE)
    dek = bytearray(fresh[:DEK_SIZE])
    ct = encrypt(key, key_type, dek, context, iv=fresh[DEK_SIZE:DEK_SIZE + IV_SIZE],
                 nonce=fresh[DEK_SIZE + IV_SIZE:], keyed=keyed)
    return dek, ct


def preferred_key_type() -> KeyType:
    """KES picks AES256 when the CPU has AES-GCM hardware, else ChaCha20 (§7.1)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return KeyType.AES256
    for line in flags.splitlines():
        if line.startswith("flags"):
            return KeyType.AES256 if "aes" in line.split() else KeyType.CHACHA20
    return KeyType.AES256
