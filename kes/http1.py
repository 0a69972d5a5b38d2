"""HTTP/1.1 request framing and response heads for the KES server, without I/O (its
HTTP/2 counterpart is kes/http2.py; which one a connection uses is decided by ALPN).

`RequestParser.feed(bytes)` returns the events the bytes completed: whole requests
(pipelined ones in order), a `100 Continue` to send, or a terminal `BadRequest`.
`render_head` and `chunk` build the bytes of a response. kes/server.py only moves these
bytes through TLS and the socket; everything here is tested with plain values.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus

import httptools
from cryptography import x509

from kes.messages import MAX_BODY, Headers, Request, decode_path

# Go's net/http allows 1 MiB of headers; KES clients send a few hundred bytes. 64 KiB
# bounds what one idle connection can make us hold while staying far above real use.
MAX_HEADER_BYTES = 64 * 1024


class State(enum.Enum):
    """Where the parser is between requests; the server picks its timeout from it."""

    IDLE = "idle"  # no byte of the next request yet: idle timeout
    HEADERS = "headers"  # inside a request head: read-header timeout
    BODY = "body"  # head done, body incomplete: body timeout
    DEAD = "dead"  # a BadRequest was returned; feed nothing more


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made
# these two objects cost more than the rest of the request framing together.
@dataclass(slots=True)
class Parsed:
    request: Request
    keep_alive: bool  # HTTP/1.1 without `Connection: close`, or HTTP/1.0 with keep-alive
    http10: bool  # the response cannot be chunked; it must be close-delimited when streamed


@dataclass(frozen=True, slots=True)
class Continue:
    """The client sent `Expect: 100-continue` and waits for a go-ahead (curl, big bodies)."""


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Malformed input. The server answers with this status and closes (as Go's server)."""

    status: int
    detail: str  # for the log only; the client gets the bare status text like Go's


Event = Parsed | Continue | BadRequest


# Methods come as bytes; decoding the usual ones once saves a call per request.
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}


class RequestParser:
    """One per connection. Identity, certificate and remote address are fixed at the TLS
    handshake and copied into every request.

    Every httptools callback below runs once or more per request: they do the least they
    can (appending), and the head-size limit is checked per fed chunk, not per header."""

    def __init__(
        self,
        *,
        identity: str | None,
        peer_cert: x509.Certificate | None,
        remote: str,
        max_body: int = MAX_BODY,
        max_header_bytes: int = MAX_HEADER_BYTES,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._identity = identity
        self._peer_cert = peer_cert
        self._remote = remote
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._clock = clock
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._chunk = 0  # size of the chunk being fed
        self._head_bytes = 0  # bytes fed while the current head was incomplete
        self.state = State.IDLE
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self._too_large = False
        self._keep_alive = True
        self._http10 = False
        self._received_ns = 0

    def release(self) -> None:
        """Drop the httptools parser, which refers back to this object: the connection is
        gone, and without the cycle both are freed at once instead of by the cyclic GC."""
        self.state = State.DEAD
        self._parser = None  # type: ignore[assignment]
        self._events = []

    def feed(self, data: bytes) -> list[Event]:
        if self.state is State.DEAD:
            return []
        events = self._events = []
        self._chunk = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: the request itself completed and is answered, but KES has no
            # protocol to switch to, so the bytes after it are not HTTP/1.1 for us.
            self._die(400, "protocol upgrade requested")
        except httptools.HttpParserError as exc:
            # An exception raised in a callback comes back wrapped, with the original as context.
            if isinstance(exc.__context__, _HeadTooLarge):
                self._die(431, "request head exceeds limit")
            else:
                self._die(400, str(exc.__context__ or exc) or type(exc).__name__)
        else:
            if self.state is State.HEADERS:  # the head is still incomplete
                self._head_bytes += self._chunk
                if self._head_bytes > self._max_header_bytes:
                    self._die(431, "request head exceeds limit")
        return events

    def _die(self, status: int, detail: str) -> None:
        self.state = State.DEAD
        self._events.append(BadRequest(status, detail))

    # httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.state = State.HEADERS

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._received_ns = self._clock()
        raw = self._raw_headers
        if self._head_bytes + self._chunk > self._max_header_bytes:
            # The head may have come whole in one big chunk: measure it.
            size = len(self._url) + sum(len(n) + len(v) for n, v in raw)
            if self._head_bytes + size > self._max_header_bytes:
                raise _HeadTooLarge
        self._head_bytes = 0
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()
        self._http10 = http10 = parser.get_http_version() == "1.0"
        self.state = State.BODY
        if not http10:
            for n, v in raw:
                if len(n) == 6 and n.lower() == b"expect" and v.strip().lower() == b"100-continue":
                    self._events.append(Continue())
                    break

    def on_body(self, body: bytes) -> None:
        size = self._body_len + len(body)
        if size <= self._max_body:  # the usual case, without slicing
            self._body.append(body)
            self._body_len = size
            return
        if self._too_large:
            return  # keep parsing to stay in sync with the stream, but buffer no more
        room = self._max_body - self._body_len
        if len(body) > room:
            self._too_large = True
            body = body[:room]
        if body:
            self._body.append(body)
            self._body_len += len(body)

    def on_message_complete(self) -> None:
        raw_method = self._parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        path = decode_path(self._url)
        if path is None:
            raise httptools.HttpParserInvalidURLError("invalid request target")
        chunks = self._body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        request = Request(method, path, Headers(self._raw_headers), body, self._identity,
                          self._peer_cert, self._remote, self._too_large, self._received_ns)
        self._events.append(Parsed(request, self._keep_alive, self._http10))
        self._reset()
        self.state = State.IDLE


class _HeadTooLarge(Exception):
    pass


# Responses ------------------------------------------------------------------------------

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line


def render_head(
    status: int,
    *,
    content_type: str | None,
    length: int | None,
    headers: Iterable[tuple[str, str]] = (),
    keep_alive: bool,
    http10: bool,
    date: bytes,
) -> bytes:
    """The status line and headers. `length=None` means a streamed body: chunked for
    HTTP/1.1, close-delimited for HTTP/1.0 (which has no chunked encoding)."""
    if length is not None and not headers:
        # The usual answer: everything but the date and the length comes from a template.
        key = (status, content_type, keep_alive, http10)
        template = _TEMPLATES.get(key)
        if template is None:
            template = _TEMPLATES[key] = _template(status, content_type, keep_alive, http10)
        first, type_line, tail = template
        return b"%b%b\r\n%bContent-Length: %d\r\n%b" % (first, date, type_line, length, tail)
    parts = [_status_line(status), b"Date: ", date, b"\r\n"]
    if content_type is not None:
        parts += (b"Content-Type: ", content_type.encode("latin-1"), b"\r\n")
    if length is not None:
        parts += (b"Content-Length: ", str(length).encode("ascii"), b"\r\n")
    elif not http10:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    for name, value in headers:
        parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http10:
        parts.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told otherwise
    parts.append(b"\r\n")
    return b"".join(parts)


_TEMPLATES: dict[tuple[int, str | None, bool, bool], tuple[bytes, bytes, bytes]] = {}


def _template(status: int, content_type: str | None, keep_alive: bool,
              http10: bool) -> tuple[bytes, bytes, bytes]:
    """(status line + "Date: ", the Content-Type line, what follows Content-Length)."""
    type_line = b"" if content_type is None else b"Content-Type: %b\r\n" % (
        content_type.encode("latin-1"))
    tail = []
    if not keep_alive:
        tail.append(b"Connection: close\r\n")
    elif http10:
        tail.append(b"Connection: keep-alive\r\n")
    tail.append(b"\r\n")
    return _status_line(status) + b"Date: ", type_line, b"".join(tail)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(status: int, date: bytes) -> bytes:
    """What Go's server sends for a request it cannot parse: the bare status as text."""
    body = f"{status} {HTTPStatus(status).phrase}".encode("ascii")
    head = render_head(
        status,
        content_type="text/plain; charset=utf-8",
        length=len(body),
        keep_alive=False,
        http10=False,
        date=date,
    )
    return head + body
