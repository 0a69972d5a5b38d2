"""The KES transport: mTLS + HTTP/1.1 or HTTP/2 on asyncio, TLS through OpenSSL memory BIOs.

The modules, by job: kes/tls_context.py builds the server's TLS context (settings, ALPN);
kes/tls_session.py is one connection's TLS session; kes/http1.py and kes/http2.py turn
plaintext into `kes.messages.Request`s and `Response`s back into bytes, without I/O;
this module moves bytes between socket, TLS and framing, runs the handlers and keeps the
timeouts; kes/workers.py forks and supervises SO_REUSEPORT worker processes.

One `_Connection` (an `asyncio.Protocol`) per client owns a `kes.tls_session.Session`:
ciphertext from the socket is written into OpenSSL, plaintext read out of it is fed to
the sans-I/O `kes.http1.RequestParser`, and every time OpenSSL is called its outgoing
BIO is drained to the socket (KES-TLS-STACKS.md pitfall 1: a missed flush hangs a
handshake or swallows an alert). The identity is computed once, at the handshake. When
ALPN chose `h2`, the `_Connection` hands socket and session to an `_H2Connection`, which
serves the multiplexed streams through kes/http2.py.

Handlers run eagerly: the handler coroutine's first step runs inside `data_received`,
and one that finishes without suspending (the usual cached-key generate/decrypt) is
answered there, with no Task and no extra loop iteration; one that suspends is carried
on by a Task from where it stopped. That first step runs outside any Task, so a handler
must not call `asyncio.timeout()`, `asyncio.TaskGroup()` or `asyncio.current_task()`
before its first `await` that really suspends (`asyncio.wait_for` is fine); doing so
fails loudly (500).

Timeouts follow KES (read-header 5 s, idle 90 s) plus a handshake and a body timeout; they
are checked by one sweep per server instead of a timer per request.

Entry points: `Server` (async, for a running loop), `ServerThread` (its own loop in a
thread: tests and the agent) and `run` (blocking, signals; with `workers > 1` the
SO_REUSEPORT process supervisor in kes/workers.py forks and watches the workers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from email.utils import formatdate
from types import TracebackType
from typing import Any, TypedDict, Unpack, cast

from cryptography import x509
from OpenSSL import SSL

from bootkey_core.errors import BootkeyError
from kes import http1, http2, tls_session
from kes import workers as workers_
from kes.identity import of_certificate
from kes.messages import MAX_BODY, Handler, Request, Response
from kes.tls_context import ALPN_H2, CertSource, TLSConfig, build_context, renewal_delay

log = logging.getLogger(__name__)

# KES server.go: ReadHeaderTimeout 5 s, IdleTimeout 90 s. Go bounds the TLS handshake by
# the read-header timeout too. KES has no body timeout; ours keeps a client that stalls
# mid-body from holding a connection and up to MAX_BODY bytes forever.
HANDSHAKE_TIMEOUT = 5.0
HEADER_TIMEOUT = 5.0
IDLE_TIMEOUT = 90.0
BODY_TIMEOUT = 30.0
SHUTDOWN_GRACE = 1.0  # KES: graceful shutdown gets 1 s, then connections are closed
RENEW_RETRY = 30.0  # after a failed certificate renewal; the old one stays in use meanwhile
RENEW_MIN_INTERVAL = 1.0  # never renew in a tight loop, whatever lifetime the issuer grants
# Requests parsed ahead while one is being answered; beyond this we stop reading, so a
# client pipelining without reading responses cannot make us queue without bound.
MAX_PIPELINED = 32
_BATCH_BYTES = 256 * 1024  # output per _serve_pending round before yielding to the loop
_INTERNAL_ERROR = b'{"message":"internal server error"}\n'


class Timeouts(TypedDict, total=False):
    """Keyword arguments of `Server` that `ServerThread` and `run` pass through."""

    handshake_timeout: float
    header_timeout: float
    idle_timeout: float
    body_timeout: float
    shutdown_grace: float
    max_body: int


class _Date:
    """The HTTP Date header value, formatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_date = _Date()


class _Resume:
    """Awaitable that continues a handler coroutine which already ran up to its first
    suspension (`first`, the future it is waiting on) outside any Task. Sending and
    throwing are passed through, so a Task awaiting this behaves as if it had run the
    coroutine from the start (cancellation included)."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Response], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Response]:
        coro, pending = self._coro, self._first
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # forwarded into the coroutine
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return cast(Response, done.value)
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as done:
                    return cast(Response, done.value)


def _handler_failed(request: Request) -> Response:
    """Call from an `except` block: log the handler's exception, answer 500."""
    log.exception("kes: handler failed on %s %s", request.method, request.path)
    return Response(500, _INTERNAL_ERROR)


def _run_eagerly(handler: Handler, request: Request) -> Response | _Resume:
    """Run the handler up to its first real suspension: its `Response` if it finished
    (the usual cached-key generate/decrypt, answered without a Task), else the `_Resume`
    a Task awaits to carry it on from where it stopped."""
    coro = handler(request)
    try:
        first = coro.send(None)
    except StopIteration as done:
        response: Response = done.value
        return response
    except Exception:
        return _handler_failed(request)
    return _Resume(coro, first)


async def _outcome(pending: _Resume, request: Request) -> Response:
    """The response of a handler that suspended: its own, or 500 if it raised."""
    try:
        return await pending
    except asyncio.CancelledError:
        raise
    except Exception:
        return _handler_failed(request)


class _TLSConnection(asyncio.Protocol):
    """What the HTTP/1.1 and the HTTP/2 connection do alike with their TLS session:
    read plaintext, close with close_notify, abort."""

    _tls: tls_session.Session
    _transport: asyncio.Transport | None
    _closed: bool
    deadline: float | None
    remote: str

    def _flush(self) -> None:
        raise NotImplementedError

    def _on_peer_closed(self) -> None:
        raise NotImplementedError

    def _read_plain(self) -> bytes:
        """Up to one record of plaintext; b"" when none is buffered, or when the peer sent
        close_notify or a TLS error ended the connection (then handled here)."""
        try:
            plain = self._tls.read()
        except SSL.Error as exc:
            log.debug("kes: TLS error from %s: %s", self.remote, exc)
            self._flush()
            self._abort_after_flush()
            return b""
        if plain is None:  # close_notify
            self._on_peer_closed()
            return b""
        return plain

    def _close(self) -> None:
        """Orderly close: close_notify, flush, FIN after the buffered data is written."""
        if self._closed:
            return
        self._closed = True
        self.deadline = None
        with contextlib.suppress(SSL.Error):
            self._tls.conn.shutdown()
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _abort_after_flush(self) -> None:
        self._closed = True
        self.deadline = None
        if self._transport is not None:
            self._transport.close()  # close() still writes the alert already queued

    def _abort(self) -> None:
        self._closed = True
        self.deadline = None
        if self._transport is not None:
            self._transport.abort()


class _Connection(_TLSConnection):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._tls = tls_session.Session(server.context, server.scratch)
        self._transport: asyncio.Transport | None = None
        self._parser: http1.RequestParser | None = None  # created at the handshake
        self._pending: collections.deque[http1.Event] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a request is being answered
        self._streaming = False
        self._write_paused = False
        self._read_paused = False
        self._sent = 0  # bytes handed to TLS in the current _serve_pending round
        self._dirty = False  # _send was called since the last _flush
        self._flush_queued = False  # in the server's end-of-iteration flush list
        self._drain: asyncio.Future[None] | None = None
        self._peer_closed = False
        self._closed = False
        self._close_when_idle = False
        self._state: http1.State | None = None  # None while handshaking
        self.deadline: float | None = None
        self.remote = ""

    # asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport, hence no isinstance.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = peer[0]
            self.remote = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Responses are written whole; do not let Nagle hold the last segment.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deadline = self._loop.time() + self._server.handshake_timeout
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._tls.feed(data)
        if self._parser is None and (not self._handshake() or self._closed):
            return
        self._pump_in()
        if not self._busy:
            self._serve_pending()
        elif self._dirty:
            self._flush_soon()

    def eof_received(self) -> bool:
        self._on_peer_closed()
        return True  # keep the write side open to finish what is in flight

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        if not self._busy and not self._closed:
            self._serve_pending()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self._parser is not None:
            self._parser.release()
        if self._task is not None:
            self._task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client went away"))
            self._drain.exception()  # retrieved: nobody may be waiting any more

    # TLS -----------------------------------------------------------------------------

    def _handshake(self) -> bool:
        tls = self._tls
        try:
            done = tls.handshake()
        except SSL.Error as exc:
            # Missing/unacceptable certificate, bad version, garbage: send the alert first.
            log.debug("kes: TLS handshake with %s failed: %s", self.remote, exc)
            self._flush()
            self._abort_after_flush()
            return False
        if not done:
            self._flush()
            return False
        cert = tls.conn.get_peer_certificate(as_cryptography=True)
        if tls.conn.get_alpn_proto_negotiated() == ALPN_H2:
            self._switch_to_h2(cert)
            return False
        self._parser = http1.RequestParser(
            identity=of_certificate(cert) if cert is not None else None,
            peer_cert=cert,
            remote=self.remote,
            max_body=self._server.max_body,
        )
        self._flush()  # TLS 1.2: the server's Finished; TLS 1.3: the session tickets
        self._set_state(http1.State.IDLE)
        return True

    def _switch_to_h2(self, cert: x509.Certificate | None) -> None:
        """Hand the socket and the TLS session to an `_H2Connection`; this object is done."""
        self._closed = True
        self.deadline = None
        self._server.connections.discard(self)
        transport = self._transport
        assert transport is not None  # noqa: S101 - set in connection_made
        conn = _H2Connection(self._server, self._tls, transport, self.remote, cert)
        transport.set_protocol(conn)
        conn.start()

    def _pump_in(self) -> None:
        """Feed decrypted bytes to the parser until OpenSSL has no more or the pipeline is full."""
        parser, pending = self._parser, self._pending
        assert parser is not None  # noqa: S101 - only called after the handshake
        while len(pending) < MAX_PIPELINED:
            plain = self._read_plain()
            if not plain:
                if self._closed:
                    return
                break
            events = parser.feed(plain)
            if events:
                pending.extend(events)
            if parser.state is http1.State.DEAD:
                break
        else:
            self._pause_reading()
        if not self._busy and not pending and parser.state is not self._state:
            self._set_state(parser.state)

    def _flush(self) -> None:
        """Move everything OpenSSL has queued to the socket. Called unconditionally after
        handshake steps, errors and shutdown; after request processing only when something
        was sent (`_dirty`), which saves an empty BIO read per request. Output that a
        `recv` alone produces (a TLS 1.3 KeyUpdate reply) goes out with the next write."""
        self._dirty = False
        out = self._tls.take()
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out)

    def _flush_soon(self) -> None:
        """Queue this connection's answers for the end of the loop iteration, when the
        server writes every connection's answers back to back. One epoll round usually
        brings requests on many connections; written one at a time, each answer woke the
        client again (on a VM a wake-up is an IPI and a few µs of the server's system
        time); back to back, the first write wakes it for all of them."""
        if not self._flush_queued:
            self._flush_queued = True
            self._server.flush_soon(self)

    def flush_queued(self) -> None:
        self._flush_queued = False
        if self._dirty and not self._closed:
            self._flush()

    def _send(self, data: bytes) -> None:
        self._dirty = True
        self._sent += len(data)
        self._tls.write(data)

    # Flow control and timeouts -------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self._closed:
            self._read_paused = False
            self._transport.resume_reading()

    def _set_state(self, state: http1.State | None) -> None:
        self._state = state
        server = self._server
        if state is http1.State.IDLE:
            if self._close_when_idle or self._peer_closed:
                self._close()
                return
            self.deadline = self._loop.time() + server.idle_timeout
        elif state is http1.State.HEADERS:
            self.deadline = self._loop.time() + server.header_timeout
        elif state is http1.State.BODY:
            self.deadline = self._loop.time() + server.body_timeout
        else:
            self.deadline = None

    def check_deadline(self, now: float) -> None:
        if self.deadline is None or now < self.deadline or self._closed:
            return
        if self._parser is None:
            log.debug("kes: TLS handshake timeout from %s", self.remote)
            self._abort()
        elif self._state is http1.State.IDLE:
            self._close()  # idle keep-alive connection: a clean close_notify + FIN
        else:
            log.debug("kes: %s timeout from %s", self._state, self.remote)
            self._close()

    def _on_peer_closed(self) -> None:
        self._peer_closed = True
        if self._streaming and self._task is not None:
            self._task.cancel()  # a log stream ends when its client goes away
        elif not self._busy and not self._pending:
            self._close()

    def close_soon(self) -> None:
        """Server shutdown: close now if idle, otherwise after the current response."""
        self._close_when_idle = True
        if self._parser is None or (not self._busy and self._state is http1.State.IDLE):
            self._close()
        elif self._streaming and self._task is not None:
            self._task.cancel()

    # Serving -------------------------------------------------------------------------

    def _serve_pending(self) -> None:
        """Answer queued requests in order, for as long as each handler finishes without
        suspending; then flush everything at once (pipelined responses share a write).
        After `_BATCH_BYTES` of output the rest waits for the next loop iteration, so the
        transport gets a chance to report backpressure (uvloop calls pause_writing only
        then) before a pipelining client that does not read makes us buffer more."""
        pending = self._pending
        self._sent = 0
        while pending and not self._closed and not self._write_paused:
            if self._sent >= _BATCH_BYTES:
                self._yield_to_loop()
                return
            event = pending.popleft()
            if type(event) is http1.Parsed:
                self._busy = True
                self.deadline = None
                task = self._handle(event)
                if task is None:
                    continue
                self._task = task
                task.add_done_callback(self._task_done)
                if self._dirty:
                    self._flush_soon()
                return
            if type(event) is http1.Continue:
                self._send(http1.CONTINUE)
            elif type(event) is http1.BadRequest:
                log.debug("kes: bad request from %s: %s", self.remote, event.detail)
                self._send(http1.error_response(event.status, _date.get()))
                self._close()
                return
        self._busy = False
        if self._closed:
            return
        if self._dirty:
            self._flush_soon()
        if not pending and not self._write_paused:
            if self._read_paused:
                self._resume_reading()
                self._pump_in()  # ciphertext may be waiting in the BIO from before the pause
                if pending:
                    self._yield_to_loop()
                    return
            assert self._parser is not None  # noqa: S101
            self._set_state(self._parser.state)
        elif self._write_paused:
            self._pause_reading()

    def _handle(self, event: http1.Parsed) -> asyncio.Task[None] | None:
        """Answer `event` at once if its handler finishes without suspending (the usual
        cached-key generate/decrypt); otherwise return the Task that carries it on from
        where it stopped."""
        response = _run_eagerly(self._server.handler, event.request)
        if isinstance(response, _Resume):
            return self._loop.create_task(self._finish(event, response))
        if response.stream is not None:
            return self._loop.create_task(self._stream(event, response))
        self._answer(event, response)
        return None

    def _yield_to_loop(self) -> None:
        self._busy = True  # data_received only queues until _serve_later runs
        self.deadline = None
        self._flush()
        self._loop.call_soon(self._serve_later)

    def _serve_later(self) -> None:
        if not self._closed and self._task is None:
            self._serve_pending()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            if not self._closed:
                self._close()
            return
        exc = task.exception()
        if exc is not None:
            log.error("kes: connection from %s failed", self.remote, exc_info=exc)
            self._abort()
            return
        if not self._closed:
            self._serve_pending()

    async def _finish(self, event: http1.Parsed, pending: _Resume) -> None:
        response = await _outcome(pending, event.request)
        if response.stream is not None:
            await self._stream(event, response)
        else:
            self._answer(event, response)

    def _answer(self, event: http1.Parsed, response: Response) -> None:
        keep_alive = event.keep_alive and not self._close_when_idle
        body = response.body
        head = http1.render_head(
            response.status,
            content_type=response.content_type,
            length=len(body),
            headers=response.headers,
            keep_alive=keep_alive,
            http10=event.http10,
            date=_date.get(),
        )
        if event.request.method == "HEAD" or not body:
            self._send(head)
        elif len(body) < 4096:
            self._send(head + body)  # one TLS record for the usual small JSON answer
        else:
            self._send(head)
            self._send(body)
        if not keep_alive:
            self._close()

    async def _stream(self, event: http1.Parsed, response: Response) -> None:
        stream = response.stream
        assert stream is not None  # noqa: S101
        http10 = event.http10
        # HTTP/1.0 has no chunked encoding: the body then ends with the connection.
        keep_alive = event.keep_alive and not self._close_when_idle and not http10
        self._streaming = True
        try:
            self._send(
                http1.render_head(
                    response.status,
                    content_type=response.content_type,
                    length=None,
                    headers=response.headers,
                    keep_alive=keep_alive,
                    http10=http10,
                    date=_date.get(),
                )
            )
            self._flush()
            transport = self._transport
            assert transport is not None  # noqa: S101
            async for piece in stream:
                if self._closed:
                    break
                if piece:
                    self._send(piece if http10 else http1.chunk(piece))
                    self._flush()
                if transport.get_write_buffer_size() > _BATCH_BYTES:
                    # A stream that never suspends would otherwise fill memory: give the
                    # loop a turn (uvloop reports backpressure only then) and wait for it.
                    await asyncio.sleep(0)
                if self._write_paused:
                    self._drain = self._loop.create_future()
                    await self._drain
            else:
                if not http10:
                    self._send(http1.LAST_CHUNK)
        finally:
            self._streaming = False
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if not keep_alive:
            self._close()

class _H2Connection(_TLSConnection):
    """A connection whose TLS handshake chose ALPN `h2` (`_Connection` hands it the socket
    and the TLS session). Streams are multiplexed: every request runs its handler the
    same eager way as over HTTP/1.1, and one that suspends gets its own Task, so a slow
    call does not hold up the others. The framing is kes/http2.py.

    Timeouts: the header timeout until the client's first bytes (the connection preface),
    the body timeout while a request body is incomplete, the idle timeout while no stream
    is open; none while a handler runs. On shutdown the client gets GOAWAY(NO_ERROR), the
    streams in flight are answered, then the connection closes."""

    def __init__(self, server: Server, tls: tls_session.Session, transport: asyncio.Transport,
                 remote: str, cert: x509.Certificate | None) -> None:
        self._server = server
        self._loop = server.loop
        self._tls = tls
        self._transport: asyncio.Transport | None = transport
        self.remote = remote
        self._h2 = http2.Connection(
            identity=of_certificate(cert) if cert is not None else None,
            peer_cert=cert, remote=remote, max_body=server.max_body,
        )
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._streaming: set[int] = set()
        self._wakeup: asyncio.Future[None] | None = None  # a stream waits for window/drain
        self._write_paused = False
        self._flush_queued = False
        self._closed = False
        self._close_when_idle = False
        self.deadline: float | None = self._loop.time() + server.header_timeout

    def start(self) -> None:
        self._server.connections.add(self)
        # Our SETTINGS, and the handshake's last flight (TLS 1.2: the server's Finished,
        # which the client waits for before it sends its preface).
        self._flush()
        self._pump_in()  # TLS 1.3: the preface often arrives with the client's Finished

    # asyncio callbacks ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._tls.feed(data)
        self._pump_in()

    def eof_received(self) -> bool:
        self._on_peer_closed()
        return True

    # A client that does not read its answers has at most MAX_CONCURRENT_STREAMS of them
    # waiting (it may open no more streams until it has seen their ends), so only the
    # streamed responses need to wait for the socket.
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = None
        self._server.connections.discard(self)
        for task in list(self._tasks.values()):
            task.cancel()
        self._wake()

    # Input ---------------------------------------------------------------------------

    def _pump_in(self) -> None:
        framing = self._h2
        got = False
        while not self._closed:
            plain = self._read_plain()
            if not plain:
                break
            got = True
            try:
                events = framing.feed(plain)
            except http2.ConnectionError_ as exc:
                log.info("kes: closing HTTP/2 connection from %s: %s", self.remote, exc)
                for task in list(self._tasks.values()):
                    task.cancel()
                self._close()
                return
            for event in events:
                if isinstance(event, http2.Dispatch):
                    self._dispatch(event.stream_id, event.request)
                elif isinstance(event, http2.Cancel):
                    cancelled = self._tasks.get(event.stream_id)
                    if cancelled is not None:
                        cancelled.cancel()
                else:
                    self._wake()
        if self._closed:
            return
        if got:
            self._flush_soon()  # SETTINGS/PING acks and WINDOW_UPDATEs, answers
            self._set_deadline()
        if framing.peer_gone and not self._tasks:
            self._close()

    def _set_deadline(self) -> None:
        server = self._server
        if self._tasks or self._h2.blocked:
            self.deadline = None
        elif self._h2.receiving:
            self.deadline = self._loop.time() + server.body_timeout
        else:
            self.deadline = self._loop.time() + server.idle_timeout

    def check_deadline(self, now: float) -> None:
        if self.deadline is None or now < self.deadline or self._closed:
            return
        if self._h2.receiving:
            log.debug("kes: HTTP/2 body timeout from %s", self.remote)
        self._h2.goaway()
        self._close()

    def _on_peer_closed(self) -> None:
        for sid in list(self._streaming):
            self._tasks[sid].cancel()  # a log stream ends when its client goes away
        if not self._tasks:
            self._close()
        else:
            self._close_when_idle = True

    def close_soon(self) -> None:
        """Server shutdown: GOAWAY now; close once the streams in flight are answered."""
        self._close_when_idle = True
        self._h2.goaway()
        for sid in list(self._streaming):
            self._tasks[sid].cancel()
        if not self._tasks:
            self._close()
        else:
            self._flush()

    # Serving -------------------------------------------------------------------------

    def _dispatch(self, sid: int, request: Request) -> None:
        response = _run_eagerly(self._server.handler, request)
        if isinstance(response, _Resume):
            self._track(sid, self._finish(sid, request, response))
            return
        if response.stream is not None:
            self._track(sid, self._stream(sid, response))
        else:
            self._answer(sid, request, response)

    def _track(self, sid: int, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks[sid] = task
        task.add_done_callback(lambda t: self._task_done(sid, t))

    def _task_done(self, sid: int, task: asyncio.Task[None]) -> None:
        self._tasks.pop(sid, None)
        self._streaming.discard(sid)
        if self._closed:
            return
        if task.cancelled():
            if self._close_when_idle:
                self._h2.cancel(sid)  # a log stream cut by shutdown
        elif (exc := task.exception()) is not None:
            log.error("kes: stream %d from %s failed", sid, self.remote, exc_info=exc)
            self._h2.cancel(sid)
        self._flush_soon()
        if not self._tasks and (self._close_when_idle or self._h2.peer_gone):
            self._close()
        else:
            self._set_deadline()

    async def _finish(self, sid: int, request: Request, pending: _Resume) -> None:
        response = await _outcome(pending, request)
        if response.stream is not None:
            await self._stream(sid, response)
        else:
            self._answer(sid, request, response)

    def _answer(self, sid: int, request: Request, response: Response) -> None:
        self._h2.respond(sid, response.status, response.content_type, response.body,
                         response.headers, date=_date.get(),
                         head_only=request.method == "HEAD")

    async def _stream(self, sid: int, response: Response) -> None:
        stream = response.stream
        assert stream is not None  # noqa: S101
        framing = self._h2
        self._streaming.add(sid)
        try:
            if not framing.start_stream(sid, response.status, response.content_type,
                                        response.headers, date=_date.get()):
                return
            self._flush()
            async for piece in stream:
                if self._closed:
                    return
                framing.send_piece(sid, piece)
                self._flush()
                while not self._closed and (self._write_paused or framing.stream_blocked(sid)):
                    # Backpressure: the socket's buffer or the client's window is full.
                    self._wakeup = self._wakeup or self._loop.create_future()
                    await self._wakeup
            framing.end_stream(sid)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # Output and closing --------------------------------------------------------------

    def _flush(self) -> None:
        out = self._h2.data_to_send()
        if out:
            self._tls.write(out)
        data = self._tls.take()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _flush_soon(self) -> None:
        if not self._flush_queued:
            self._flush_queued = True
            self._server.flush_soon(self)

    def flush_queued(self) -> None:
        self._flush_queued = False
        if not self._closed:
            self._flush()

    def _close(self) -> None:
        """GOAWAY (if not sent yet), then as any TLS connection."""
        if not self._closed:
            self._h2.goaway()
            out = self._h2.data_to_send()
            if out:
                self._tls.write(out)  # before close_notify, after which OpenSSL writes nothing
            super()._close()


class Server:
    """The KES listener on a running event loop.

    `tls` is a `TLSConfig`, or an `SSL.Context` already built with `kes.tls_context.build_context`
    (workers share one so that their session tickets are interchangeable).
    With `cert_source`, the certificate is issued again when two thirds of its lifetime
    have passed (`kes.tls_context.renewal_delay`) and new connections get the new one; a failed
    renewal is retried every `RENEW_RETRY` seconds while the old certificate serves on.
    """

    def __init__(
        self,
        handler: Handler,
        tls: TLSConfig | SSL.Context,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        shutdown_grace: float = SHUTDOWN_GRACE,
        max_body: int = MAX_BODY,
        cert_source: CertSource | None = None,
    ) -> None:
        self.handler = handler
        self.context = build_context(tls) if isinstance(tls, TLSConfig) else tls
        self.cert_pem = tls.cert_pem if isinstance(tls, TLSConfig) else None
        self.scratch = tls_session.Scratch()  # used by this server's loop thread only
        self._cert_received = dt.datetime.now(dt.UTC)
        self._cert_source = cert_source
        self._renewer: asyncio.Task[None] | None = None
        if cert_source is not None and self.cert_pem is None:
            raise ValueError("cert_source needs the initial certificate as a TLSConfig")
        self.handshake_timeout = handshake_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.shutdown_grace = shutdown_grace
        self.max_body = max_body
        self.connections: set[_Connection | _H2Connection] = set()
        self._flush_queue: list[_Connection | _H2Connection] = []
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        # The sweep period bounds how late a timeout fires: a quarter of the shortest one.
        shortest = min(handshake_timeout, header_timeout, idle_timeout, body_timeout)
        self._sweep_every = min(1.0, max(0.01, shortest / 4))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None  # noqa: S101 - set by start()
        return self._loop

    def set_tls(self, tls: TLSConfig | SSL.Context) -> None:
        """Use a new certificate for connections accepted from now on (certificate renewal)."""
        self.context = build_context(tls) if isinstance(tls, TLSConfig) else tls
        self.cert_pem = tls.cert_pem if isinstance(tls, TLSConfig) else None
        self._cert_received = dt.datetime.now(dt.UTC)

    async def _renew_forever(self, source: CertSource) -> None:
        while self.cert_pem is not None:
            delay = renewal_delay(self.cert_pem, dt.datetime.now(dt.UTC),
                                  received=self._cert_received)
            await asyncio.sleep(max(delay, RENEW_MIN_INTERVAL))
            try:
                tls = await asyncio.to_thread(source.issue)
                self.set_tls(tls)
            except BootkeyError as exc:
                log.warning("kes: certificate renewal failed, retrying in %.0f s: %s",
                            RENEW_RETRY, exc)
                await asyncio.sleep(RENEW_RETRY)
            else:
                log.info("kes: renewed the server certificate")

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=1024
            )
        else:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), host, port, reuse_port=reuse_port or None,
                backlog=1024,
            )
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        if self._cert_source is not None:
            self._renewer = self._loop.create_task(self._renew_forever(self._cert_source))

    @property
    def port(self) -> int:
        """The bound port (still readable after close, for messages and tests)."""
        return self._port

    def flush_soon(self, conn: _Connection | _H2Connection) -> None:
        """Flush `conn` once the loop has run this iteration's I/O callbacks."""
        queue = self._flush_queue
        if not queue:
            self.loop.call_soon(self._flush_all)
        queue.append(conn)

    def _flush_all(self) -> None:
        queue, self._flush_queue = self._flush_queue, []
        for conn in queue:
            conn.flush_queued()

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.deadline is not None and now >= conn.deadline:
                conn.check_deadline(now)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish for `shutdown_grace`, then cut."""
        if self._server is None:
            return
        if self._renewer is not None:
            self._renewer.cancel()
        self._server.close()
        for conn in list(self.connections):
            conn.close_soon()
        deadline = self.loop.time() + self.shutdown_grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn._abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._server.wait_closed()
        self._server = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (about 8 % faster here), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class ServerThread:
    """A `Server` on its own event loop in a daemon thread. `.port` is valid inside `with`;
    leaving the block closes the server gracefully and joins the thread."""

    def __init__(
        self,
        handler: Handler,
        tls: TLSConfig | SSL.Context,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        cert_source: CertSource | None = None,
        **timeouts: Unpack[Timeouts],
    ) -> None:
        # Building the context here makes configuration errors surface in the caller.
        self.server = Server(handler, tls, cert_source=cert_source, **timeouts)
        self._loop_factory = loop_factory or new_event_loop
        self._host = host
        self._port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kes-server", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stop, self._stop = self._stop, None  # a second exit is a no-op
        if self.loop is not None and stop is not None:
            self.loop.call_soon_threadsafe(stop.set)
            self._thread.join()

    def _main(self) -> None:
        loop = self.loop = self._loop_factory()
        try:
            loop.run_until_complete(self._amain())
        except BaseException as exc:  # handed to the thread that entered
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _amain(self) -> None:
        self._stop = asyncio.Event()
        await self.server.start(self._host, self._port)
        self._ready.set()
        await self._stop.wait()
        await self.server.close()


# Blocking entry point ---------------------------------------------------------------


async def _serve_until_signal(
    server: Server, sock: socket.socket, ready: Callable[[int], None] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(sock=sock)
    log.info("kes: serving on %s:%d (pid %d)", *sock.getsockname()[:2], os.getpid())
    if ready is not None:
        ready(server.port)
    await stop.wait()
    await server.close()


def _serve_in_process(
    server: Server, sock: socket.socket, ready: Callable[[int], None] | None = None
) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve_until_signal(server, sock, ready))
    finally:
        loop.close()


def run(
    handler: Handler,
    tls: TLSConfig | SSL.Context,
    host: str = "127.0.0.1",
    port: int = 7373,
    workers: int = 1,
    *,
    ready: Callable[[int], None] | None = None,
    cert_source: CertSource | None = None,
    **timeouts: Unpack[Timeouts],
) -> None:
    """Serve until SIGTERM or SIGINT; call it from the main thread (signal handling, and
    PR_SET_PDEATHSIG fires when the forking *thread* ends).

    With `workers > 1` the parent builds the SSL context, then `kes.workers` binds the
    SO_REUSEPORT sockets, forks one worker per socket and supervises them (signal
    forwarding, SIGHUP for reload, a dead worker stops all). Anything the handler holds
    that cannot survive fork (threads, open connections) must be created lazily, in the
    worker.

    `ready(port)`, if given, is called once everything listens. With `cert_source` each
    worker renews on its own (see `Server`); after a renewal the workers' session-ticket
    keys differ, so resumption across workers is then best effort."""
    if cert_source is not None:
        if not isinstance(tls, TLSConfig):
            raise ValueError("cert_source needs the initial certificate as a TLSConfig")
        initial = tls
    context = build_context(tls) if isinstance(tls, TLSConfig) else tls

    def make_server() -> Server:
        if cert_source is None:
            return Server(handler, context, **timeouts)
        server = Server(handler, initial, cert_source=cert_source, **timeouts)
        server.context = context  # the shared one, built before forking
        return server

    if workers <= 1:
        server = make_server()
        _serve_in_process(server, workers_.listener(host, port, reuse_port=False), ready)
        return
    workers_.run(lambda sock: _serve_in_process(make_server(), sock), host, port, workers,
                 ready=ready, grace=timeouts.get("shutdown_grace", SHUTDOWN_GRACE))
