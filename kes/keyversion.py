"""A KES master key as stored in a keystore (shared/kes-api.md §7.1, §8.1). Pure parsing.

Invariant: the secret and HMAC keys live only in `SecretBuffer`s; `parse` accepts every
format a KES ever wrote — base64 protobuf (2024-), JSON with or without `version`,
`algorithm`, `created_*` (2022-2024), and the oldest `{"bytes":…}` — and `encode` writes
only the current protobuf format, byte-identical to Go's proto.Marshal for the same value.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hmac

from bootkey_core.secret import SecretBuffer
from kes import crypto
from kes.crypto import ALGORITHMS, KEY_SIZE, KeyType

_HASH_SHA256 = 1


class InvalidKeyVersion(ValueError):
    """The stored value is not a KES key in any known format (message has no key bytes)."""


@dataclass(frozen=True, order=True)
class Timestamp:
    """Seconds + nanoseconds since the epoch, UTC: Go's time.Time keeps nanoseconds and
    KES prints them, Python's datetime would drop three digits."""

    seconds: int = 0
    nanos: int = 0

    ZERO_TEXT = "0001-01-01T00:00:00Z"  # Go's zero time.Time, what KES shows for "unknown"

    @classmethod
    def now(cls) -> Timestamp:
        ns = time.time_ns()
        return cls(ns // 1_000_000_000, ns % 1_000_000_000)

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        """RFC 3339 with optional fraction up to 9 digits and Z or ±hh:mm."""
        m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)",
                         text.strip())
        if not m:
            raise InvalidKeyVersion("created_at is not an RFC 3339 time")
        base, frac, zone = m.groups()
        tz = dt.UTC if zone == "Z" else dt.datetime.strptime(zone.replace(":", ""), "%z").tzinfo
        when = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=tz)
        return cls(int(when.timestamp()), int((frac or "0").ljust(9, "0")))

    def is_zero(self) -> bool:
        return self.seconds == 0 and self.nanos == 0

    def rfc3339(self) -> str:
        """Go's RFC3339Nano in UTC: trailing zeros of the fraction dropped."""
        if self.is_zero():
            return self.ZERO_TEXT
        when = dt.datetime.fromtimestamp(self.seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        frac = f"{self.nanos:09d}".rstrip("0")
        return f"{when}.{frac}Z" if frac else f"{when}Z"


@dataclass
class KeyVersion:
    key: SecretBuffer
    type: KeyType
    hmac_key: SecretBuffer | None = None
    created_at: Timestamp = Timestamp()
    created_by: str = ""
    # False for keys stored without an algorithm (KES <= v0.19.1): then a legacy
    # ciphertext's own algorithm field may decide (kes.crypto.decrypt type_known).
    type_known: bool = True
    _keyed: hmac.HMAC | None = field(default=None, init=False, repr=False, compare=False)

    def keyed_hmac(self) -> hmac.HMAC:
        """`crypto.keyed_hmac(key)`, made once per cached key. Its state is derived from
        the key and lives in OpenSSL's memory (locked with the rest of the process,
        cleansed by OpenSSL when freed with this KeyVersion)."""
        keyed = self._keyed
        if keyed is None:
            keyed = self._keyed = crypto.keyed_hmac(self.key.view)
        return keyed

    @classmethod
    def generate(cls, key_type: KeyType, created_by: str) -> KeyVersion:
        return cls(SecretBuffer.random(KEY_SIZE), key_type, SecretBuffer.random(KEY_SIZE),
                   Timestamp.now(), created_by)

    def close(self) -> None:
        self._keyed = None
        self.key.close()
        if self.hmac_key is not None:
            self.hmac_key.close()

    def __repr__(self) -> str:
        return (f"<KeyVersion {self.type.wire_name} created_at={self.created_at.rfc3339()} "
                f"hmac={self.hmac_key is not None}>")


# ---- protobuf (miniohq.kms.KeyVersion), hand-coded: four fields are not worth a codegen


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes | int) -> bytes:
    """One field: an int is a varint (wire type 0), bytes are length-delimited (2)."""
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    return _varint(num << 3 | 2) + _varint(len(payload)) + bytes(payload)


def _fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    out: list[tuple[int, int, bytes | int]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = n = 0
        while True:
            if i >= len(buf) or shift > 63:
                raise InvalidKeyVersion("truncated protobuf")
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(buf):
        tag = varint()
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            out.append((num, wire, varint()))
        elif wire == 2:
            ln = varint()
            if i + ln > len(buf):
                raise InvalidKeyVersion("truncated protobuf")
            out.append((num, wire, buf[i:i + ln]))
            i += ln
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise InvalidKeyVersion("bad protobuf wire type")
        if i > len(buf):
            raise InvalidKeyVersion("truncated protobuf")
    return out


def encode(kv: KeyVersion) -> bytes:
    """The value KES >= 2024-02-29 stores: base64(proto.Marshal(KeyVersion))."""
    if kv.hmac_key is None:
        raise ValueError("a key version without HMAC key cannot be written in the current format")
    secret = _field(1, bytes(kv.key.view)) + _field(2, int(kv.type))
    hmac_key = _field(1, bytes(kv.hmac_key.view)) + _field(2, _HASH_SHA256)
    msg = _field(1, secret) + _field(2, hmac_key)
    ts = b""
    if kv.created_at.seconds:
        ts += _field(1, kv.created_at.seconds)
    if kv.created_at.nanos:
        ts += _field(2, kv.created_at.nanos)
    msg += _field(3, ts)
    if kv.created_by:
        msg += _field(4, kv.created_by.encode())
    return base64.b64encode(msg)


def parse(raw: bytes | str) -> KeyVersion:
    """Any stored format → KeyVersion. Raises InvalidKeyVersion."""
    if isinstance(raw, str):
        raw = raw.encode()
    raw = raw.strip()
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return _parse_json(obj)
    if obj is not None:
        raise InvalidKeyVersion("stored key is JSON but not an object")
    try:
        pb = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyVersion("stored key is neither JSON nor base64 protobuf") from None
    return _parse_proto(pb)


def _parse_json(obj: dict[str, object]) -> KeyVersion:
    version = obj.get("version", "")
    if version not in ("", "v1", None):
        raise InvalidKeyVersion("unknown stored key version")
    b = obj.get("bytes")
    if not isinstance(b, str):
        raise InvalidKeyVersion("stored key has no 'bytes'")
    try:
        key = bytearray(base64.b64decode(b, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidKeyVersion("stored key 'bytes' is not base64") from None
    if len(key) != KEY_SIZE:
        raise InvalidKeyVersion("stored key is not 32 bytes")
    algo = obj.get("algorithm") or ""
    if not isinstance(algo, str) or (algo and algo not in ALGORITHMS):
        raise InvalidKeyVersion("stored key has an unknown algorithm")
    created_at = obj.get("created_at")
    created_by = obj.get("created_by") or ""
    return KeyVersion(
        key=SecretBuffer.from_bytes(key),
        type=ALGORITHMS[algo] if algo else KeyType.AES256,
        created_at=Timestamp.parse(created_at) if isinstance(created_at, str) else Timestamp(),
        created_by=created_by if isinstance(created_by, str) else "",
        type_known=bool(algo),
    )


def _parse_proto(pb: bytes) -> KeyVersion:
    secret: bytearray | None = None
    key_type = 0
    hmac_key: bytearray | None = None
    hash_ = 0
    ts = Timestamp()
    created_by = ""
    for num, wire, val in _fields(pb):
        if num == 1 and isinstance(val, bytes):
            for n2, _, v2 in _fields(val):
                if n2 == 1 and isinstance(v2, bytes):
                    secret = bytearray(v2)
                elif n2 == 2 and isinstance(v2, int):
                    key_type = v2
        elif num == 2 and isinstance(val, bytes):
            for n2, _, v2 in _fields(val):
                if n2 == 1 and isinstance(v2, bytes):
                    hmac_key = bytearray(v2)
                elif n2 == 2 and isinstance(v2, int):
                    hash_ = v2
        elif num == 3 and isinstance(val, bytes):
            secs = nanos = 0
            for n2, _, v2 in _fields(val):
                if n2 == 1 and isinstance(v2, int):
                    secs = v2 - (1 << 64) if v2 >= 1 << 63 else v2
                elif n2 == 2 and isinstance(v2, int):
                    nanos = v2
            ts = Timestamp(secs, nanos)
        elif num == 4 and isinstance(val, bytes):
            created_by = val.decode("utf-8", "replace")
        del wire
    # KES's ParseKeyVersion requires all three to be valid.
    if secret is None or len(secret) != KEY_SIZE or key_type not in (1, 2):
        raise InvalidKeyVersion("stored key has no valid secret key")
    if hmac_key is None or len(hmac_key) != KEY_SIZE or hash_ != _HASH_SHA256:
        raise InvalidKeyVersion("stored key has no valid HMAC key")
    return KeyVersion(SecretBuffer.from_bytes(secret), KeyType(key_type),
                      SecretBuffer.from_bytes(hmac_key), ts, created_by)
