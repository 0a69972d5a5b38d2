"""The seam between the KES transport (kes/server.py: TLS, HTTP/1.1 framing, timeouts)
and the KES API (kes/api.py: routing, auth, handlers). Plain values, no I/O.

The server builds a `Request` once the whole body has arrived (chunked or not) and awaits
the handler; the handler returns a `Response`. A streaming response (the log routes)
sets `stream` and is sent with chunked transfer encoding until the iterator ends or the
client goes away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

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
