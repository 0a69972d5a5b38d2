"""The seam between the KES transport and the KES API: plain values, no I/O.

The transport (kes/server.py with its framings kes/http1.py and kes/http2.py) builds a
`Request` once the whole body has arrived (HTTP/1.1 chunked or not, or an HTTP/2 stream's
DATA frames) and awaits the handler (kes/api.py: routing, auth, handlers); the handler
returns a `Response`. Neither side knows the other's protocol: a `Request` looks the same
whichever HTTP version carried it. A streaming response (the log routes) sets `stream` and
goes out as chunks (HTTP/1.1) or DATA frames (h2) until the iterator ends or the client
goes away. The header mapping and path decoding both framings share live here too.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
from cryptography import x509

# KES accepts at most 1,000,000 bytes on routes with a body (aead.dev/mem MB = 10^6).
MAX_BODY = 1_000_000


# Not frozen: frozen dataclasses set fields through object.__setattr__, several µs per
# request on the hot path. Handlers treat a Request as read-only.
@dataclass(slots=True)
class Request:
    method: str                      # as sent, e.g. "POST"
    path: str                        # percent-decoded path, query string removed
    headers: Mapping[str, str]       # lower-case names
    body: bytes
    identity: str | None             # hex SHA-256 of the client cert's SPKI, or None
    peer_cert: x509.Certificate | None = None
    remote: str = ""
    body_too_large: bool = False     # the server stopped reading after MAX_BODY bytes
    received_ns: int = 0             # time.monotonic_ns() when the headers completed


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    stream: AsyncIterator[bytes] | None = field(default=None)


# A coroutine function: the server runs its first step itself (kes/server.py).
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


# Shared by both framings (kes/http1.py, kes/http2.py) ------------------------------


class Headers(Mapping[str, str]):
    """Request headers with lower-case names, decoded on first use: the KES API reads
    none on the per-object routes, so most requests never pay for the decoding.
    A repeated name reads as its values joined by ", ", as Go's `Header.Get` sees them."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = self._decoded = {}
            # Header bytes are latin-1 per RFC 9110 §5.5.
            for n, v in self._raw:
                key, text = n.decode("latin-1").lower(), v.decode("latin-1")
                old = decoded.get(key)
                decoded[key] = text if old is None else f"{old}, {text}"
        return decoded

    def __getitem__(self, name: str) -> str:
        return self._dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __repr__(self) -> str:
        return f"Headers({self._dict()!r})"


# MinIO sends a handful of distinct request targets: decode each once.
@functools.lru_cache(maxsize=4096)
def decode_path(url: bytes) -> str | None:
    """Percent-decoded path without the query, as Go's `r.URL.Path`; None if unusable."""
    if url.startswith(b"/") and b"%" not in url and b"?" not in url and b"#" not in url:
        raw = url  # the common case, no parsing needed
    else:
        try:
            raw = httptools.parse_url(url).path or b""
        except httptools.HttpParserInvalidURLError:
            return None
        if not raw.startswith(b"/"):
            return None
        raw = unquote_to_bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
