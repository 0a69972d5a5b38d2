"""HTTP/2 request framing and responses for the KES server, without I/O.

The counterpart of kes/http1.py for connections whose TLS handshake chose ALPN `h2`
(kes/tls_context.py): the `h2` library (python-hyper) holds the HTTP/2 state machine,
HPACK and flow control; this module turns its events into the `kes.messages.Request`s
the API answers, one per stream, and `Response`s back into frames. kes/server.py only
moves the bytes through TLS and the socket and runs the handlers; everything here is
tested with plain values.

What KES (a Go net/http server) does and this module keeps:
- `SETTINGS_MAX_CONCURRENT_STREAMS` 128 (Go: 250; MinIO never has more than a few dozen
  calls in flight per connection), headers up to `MAX_HEADER_BYTES`.
- Flow control sized for KES bodies: a stream's receive window holds a whole `MAX_BODY`
  body, so a client never waits for a WINDOW_UPDATE on a KES call; the connection window
  (`CONNECTION_WINDOW`) bounds how many bytes of unfinished bodies one connection can make
  us hold, and is handed back as requests are dispatched.
- The body limit per stream, as over HTTP/1.1: bytes past `max_body` are dropped and the
  request is flagged `body_too_large` and dispatched at once (the API answers 413 with
  KES's text); the rest of that stream is then refused with RST_STREAM(NO_ERROR) after the
  answer (RFC 9113 §8.1).
- CVE-2023-44487 ("rapid reset"): a client that resets more than `RESET_LIMIT` streams
  within a second gets GOAWAY(ENHANCE_YOUR_CALM) and the connection ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509

from kes.messages import MAX_BODY, Headers, Request, decode_path

MAX_CONCURRENT_STREAMS = 128
MAX_HEADER_BYTES = 64 * 1024  # as kes/http1.py
STREAM_WINDOW = 1 << 20  # >= MAX_BODY: a whole KES body in flight without a WINDOW_UPDATE
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 14  # the protocol default; KES bodies fit in one frame or a few
RESET_LIMIT = 100  # stream resets by the client per second before GOAWAY
ALPN_H2 = b"h2"

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
_REQUIRED = (b":method", b":path")

_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,  # bytes: decoded on first use, like HTTP/1.1's Headers
    validate_outbound_headers=False,  # we build them: lower-case names, no pseudo-headers
    normalize_outbound_headers=False,
)


@dataclass(slots=True)
class Dispatch:
    """A whole request (or one cut at `max_body`) on `stream_id`: answer it."""

    stream_id: int
    request: Request


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client reset `stream_id`: stop its handler, send nothing more on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Writable:
    """The client opened flow-control windows: blocked response bytes may go out."""


Event = Dispatch | Cancel | Writable


class _Incoming:
    __slots__ = ("body", "body_len", "headers", "method", "path", "received_ns", "too_large",
                 "unacked")

    def __init__(self, method: str, path: str, headers: Headers, received_ns: int) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.received_ns = received_ns
        self.body: list[bytes] = []
        self.body_len = 0
        self.unacked = 0  # flow-controlled bytes received but not yet handed back
        self.too_large = False


class ConnectionError_(Exception):
    """The connection must end: the GOAWAY is already queued in `data_to_send()`."""


class Connection:
    """One HTTP/2 connection, server side. `feed(bytes)` returns the events the bytes
    completed; `respond`, `start_stream`, `send_piece` and `end_stream` queue frames;
    `data_to_send()` takes the bytes for the peer. Identity, certificate and remote
    address are fixed at the TLS handshake and copied into every request.

    Raises `ConnectionError_` from `feed` when the client broke the protocol or reset
    streams too fast; the GOAWAY telling it why is then queued."""

    def __init__(
        self,
        *,
        identity: str | None,
        peer_cert: x509.Certificate | None,
        remote: str,
        max_body: int = MAX_BODY,
        clock: Callable[[], int] = time.monotonic_ns,
        reset_limit: int = RESET_LIMIT,
    ) -> None:
        self._identity = identity
        self._peer_cert = peer_cert
        self._remote = remote
        self._max_body = max_body
        self._clock = clock
        self._reset_limit = reset_limit
        self._resets: list[int] = []  # times (ns) of the client's resets in the last second
        self._incoming: dict[int, _Incoming] = {}  # streams whose request is incomplete
        self._outgoing: dict[int, tuple[memoryview, bool]] = {}  # blocked by flow control
        self._refuse_rest: set[int] = set()  # answered early (body too large)
        self.goaway_sent = False
        self._last_stream = 0  # the last stream our GOAWAY lets through
        self.peer_gone = False  # the client sent GOAWAY
        conn = self._h2 = h2.connection.H2Connection(_CONFIG)
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    @property
    def receiving_since(self) -> int | None:
        """When (the clock's ns) the oldest request whose body is still incomplete began;
        None if there is none. The body timeout counts from there, as over HTTP/1.1:
        a body dripped in byte by byte does not keep its stream alive."""
        incoming = self._incoming
        if not incoming:
            return None
        return min(i.received_ns for i in incoming.values())

    @property
    def blocked(self) -> bool:
        """Response bytes wait for the client to open its flow-control windows."""
        return bool(self._outgoing)

    def stream_blocked(self, stream_id: int) -> bool:
        return stream_id in self._outgoing

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    # Input -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        conn = self._h2
        before = conn.state_machine.state
        try:
            h2_events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued GOAWAY with the matching error code already.
            self.goaway_sent = True
            raise ConnectionError_(f"HTTP/2 protocol error: {exc}") from None
        out: list[Event] = []
        writable = False
        for ev in h2_events:
            kind = type(ev)
            if kind is h2.events.DataReceived:
                self._data(ev, out)  # type: ignore[arg-type]
            elif kind is h2.events.RequestReceived:
                self._headers(ev, out)  # type: ignore[arg-type]
            elif kind is h2.events.StreamEnded:
                self._ended(ev.stream_id, out)  # type: ignore[attr-defined]
            elif kind is h2.events.StreamReset:
                self._reset_by_peer(ev.stream_id, out)  # type: ignore[attr-defined]
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                writable = True
            elif kind is h2.events.ConnectionTerminated:
                self.peer_gone = True
                if ev.error_code == h2.errors.ErrorCodes.NO_ERROR:  # type: ignore[attr-defined]
                    _keep_open(conn, before)  # it still waits for the answers in flight
            elif kind is h2.events.TrailersReceived:
                pass  # KES reads no trailers; StreamEnded follows
        if writable and self._outgoing:
            self._pump_blocked()
            out.append(Writable())
        return out

    def _headers(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        if self._refused(sid):
            return
        method = path = None
        raw: list[tuple[bytes, bytes]] = []
        for name, value in ev.headers or ():
            n, v = bytes(name), bytes(value)
            if n[:1] == b":":
                if n == b":method":
                    method = _METHODS.get(v) or v.decode("ascii", "replace")
                elif n == b":path":
                    path = decode_path(v)
            else:
                raw.append((n, v))
        if method is None or path is None:
            # h2 checked the pseudo-headers are there; a path Go cannot parse is a 400
            # from Go's server, a stream error here.
            self._h2.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        incoming = _Incoming(method, path, Headers(raw), self._clock())
        if ev.stream_ended is not None:
            out.append(Dispatch(sid, self._request(incoming)))
        else:
            self._incoming[sid] = incoming

    def _data(self, ev: h2.events.DataReceived, out: list[Event]) -> None:
        sid, data = ev.stream_id, ev.data or b""
        size = ev.flow_controlled_length or 0
        incoming = self._incoming.get(sid)
        if incoming is None or incoming.too_large:
            # Body of a stream already answered (too large) or gone: drop, hand back.
            if size:
                self._h2.acknowledge_received_data(size, sid)
            return
        incoming.unacked += size
        total = incoming.body_len + len(data)
        if total <= self._max_body:
            incoming.body.append(data)
            incoming.body_len = total
            return
        room = self._max_body - incoming.body_len
        if room:
            incoming.body.append(data[:room])
            incoming.body_len += room
        incoming.too_large = True
        self._h2.acknowledge_received_data(incoming.unacked, sid)
        incoming.unacked = 0
        del self._incoming[sid]
        if ev.stream_ended is None:
            self._refuse_rest.add(sid)
        out.append(Dispatch(sid, self._request(incoming)))

    def _ended(self, sid: int, out: list[Event]) -> None:
        incoming = self._incoming.pop(sid, None)
        if incoming is None:
            return
        if incoming.unacked:
            # Handed back now: the bytes leave our buffers with the Request.
            self._h2.acknowledge_received_data(incoming.unacked, sid)
        out.append(Dispatch(sid, self._request(incoming)))

    def _request(self, incoming: _Incoming) -> Request:
        chunks = incoming.body
        body = b"" if not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Request(incoming.method, incoming.path, incoming.headers, body,
                       self._identity, self._peer_cert, self._remote, incoming.too_large,
                       incoming.received_ns)

    def _reset_by_peer(self, sid: int, out: list[Event]) -> None:
        incoming = self._incoming.pop(sid, None)
        if incoming is not None and incoming.unacked:
            self._h2.acknowledge_received_data(incoming.unacked, sid)
        self._outgoing.pop(sid, None)
        self._refuse_rest.discard(sid)
        out.append(Cancel(sid))
        now = self._clock()
        resets = self._resets
        resets.append(now)
        if len(resets) > self._reset_limit:
            cutoff = now - 1_000_000_000
            resets[:] = [t for t in resets if t > cutoff]
            if len(resets) > self._reset_limit:
                self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                raise ConnectionError_(
                    f"more than {self._reset_limit} stream resets in a second (rapid reset)")

    # Output ----------------------------------------------------------------------------

    def respond(self, stream_id: int, status: int, content_type: str | None, body: bytes,
                headers: Iterable[tuple[str, str]] = (), *, date: bytes,
                head_only: bool = False) -> None:
        """Queue a whole response; what flow control holds back goes out on `Writable`."""
        fields = self._fields(status, content_type, headers, date)
        fields.append((b"content-length", b"%d" % len(body)))
        if head_only or not body:
            self._send_headers(stream_id, fields, end=True)
            return
        if not self._send_headers(stream_id, fields, end=False):
            return
        self._send(stream_id, memoryview(body), end=True)

    def start_stream(self, stream_id: int, status: int, content_type: str | None,
                     headers: Iterable[tuple[str, str]] = (), *, date: bytes) -> bool:
        """The head of a streamed response (no length: DATA frames until `end_stream`).
        False if the stream is gone."""
        return self._send_headers(stream_id, self._fields(status, content_type, headers, date),
                                  end=False)

    def send_piece(self, stream_id: int, data: bytes) -> None:
        if data:
            self._send(stream_id, memoryview(data), end=False)

    def end_stream(self, stream_id: int) -> None:
        self._send(stream_id, memoryview(b""), end=True)

    def cancel(self, stream_id: int) -> None:
        """Stop a stream from our side (a streamed response that ends with the server)."""
        self._outgoing.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    def goaway(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Tell the client no stream after the last one it opened will be served. With
        NO_ERROR (shutdown, timeouts) the streams in flight still get their answers."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._last_stream = self._h2.highest_inbound_stream_id
        before = self._h2.state_machine.state
        self._h2.close_connection(error_code=code, last_stream_id=self._last_stream)
        if code == h2.errors.ErrorCodes.NO_ERROR:
            _keep_open(self._h2, before)

    def _refused(self, sid: int) -> bool:
        """After our GOAWAY, streams the client opened later are refused (it may retry
        them on a new connection: RFC 9113 §6.8)."""
        if self.goaway_sent and sid > self._last_stream:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return True
        return False

    def _fields(self, status: int, content_type: str | None,
                headers: Iterable[tuple[str, str]], date: bytes) -> list[tuple[bytes, bytes]]:
        fields = [(b":status", _STATUS.get(status) or str(status).encode()), (b"date", date)]
        if content_type is not None:
            fields.append((b"content-type", content_type.encode("latin-1")))
        for name, value in headers:
            fields.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        return fields

    def _send_headers(self, sid: int, fields: list[tuple[bytes, bytes]], *, end: bool) -> bool:
        try:
            self._h2.send_headers(sid, fields, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False  # reset by the client meanwhile
        if end:
            self._answered(sid)
        return True

    def _send(self, sid: int, data: memoryview, *, end: bool) -> None:
        if sid in self._outgoing:
            queued, _ = self._outgoing[sid]
            self._outgoing[sid] = (memoryview(bytes(queued) + bytes(data)), end)
            return
        self._push(sid, data, end)

    def _push(self, sid: int, data: memoryview, end: bool) -> None:
        conn = self._h2
        try:
            while True:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if len(data) <= window:
                    conn.send_data(sid, data.tobytes(), end_stream=end)
                    break
                if window <= 0:
                    self._outgoing[sid] = (data, end)
                    return
                conn.send_data(sid, data[:window].tobytes())
                data = data[window:]
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._outgoing.pop(sid, None)
            return
        self._outgoing.pop(sid, None)
        if end:
            self._answered(sid)

    def _pump_blocked(self) -> None:
        for sid, (data, end) in list(self._outgoing.items()):
            del self._outgoing[sid]
            self._push(sid, data, end)

    def _answered(self, sid: int) -> None:
        if sid in self._refuse_rest:
            self._refuse_rest.discard(sid)
            self._incoming.pop(sid, None)
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)


_STATUS = {s: str(s).encode() for s in (200, 400, 401, 403, 404, 405, 413, 500, 501, 502, 503)}


def _keep_open(conn: h2.connection.H2Connection, state: h2.connection.ConnectionState) -> None:
    """h2 treats any GOAWAY, sent or received, as the end of the connection: its state
    machine then refuses every frame. RFC 9113 §6.8 lets the streams up to the GOAWAY's
    last stream finish (Go's client and server do), so the state goes back to open; new
    streams are refused by `_refused` (ours) or not opened (the client's).
    `state` is the one before the GOAWAY."""
    if state is not h2.connection.ConnectionState.CLOSED:
        conn.state_machine.state = state
