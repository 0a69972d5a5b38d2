"""Secrets scan: look for a key, in every encoding a careless program might print it,
in text and files."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path


def encodings(key: bytes) -> dict[str, bytes]:
    return {
        "raw": key,
        "hex": key.hex().encode(),
        "HEX": key.hex().upper().encode(),
        "base64": base64.b64encode(key).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(key).rstrip(b"="),
        "repr": repr(key)[2:-1].encode(),
    }


def find_key(key: bytes, blobs: Iterable[tuple[str, bytes]]) -> list[str]:
    """Names of the blobs that contain the key in some encoding ("name: encoding")."""
    hits = []
    enc = encodings(key)
    for name, blob in blobs:
        for kind, needle in enc.items():
            # a 64-byte key: even a 32-byte run of it is a leak
            probe = needle[: max(16, len(needle) // 2)]
            if probe in blob:
                hits.append(f"{name}: {kind}")
    return hits


def files_under(root: Path, skip_suffixes: tuple[str, ...] = ()) -> Iterable[tuple[str, bytes]]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(skip_suffixes):
            yield str(p), p.read_bytes()
