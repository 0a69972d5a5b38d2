"""Serving HTTP/1.1 on one KES connection: the I/O side of kes/http1.py's framing.

`HTTP1Connection` (an `asyncio.Protocol`, one per client) owns a `kes.tls_session.Session`:
ciphertext from the socket is written into OpenSSL, plaintext read out of it is fed to
the sans-I/O `kes.http1.RequestParser`, and every time OpenSSL is called its outgoing
BIO is drained to the socket (KES-TLS-STACKS.md pitfall 1: a missed flush hangs a
handshake or swallows an alert). The identity is computed once, at the handshake. When
ALPN chose `h2`, it hands socket and session to a `kes.serve_http2.HTTP2Connection`.
Requests are answered in order (pipelining), handlers run eagerly (kes/connection.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import TYPE_CHECKING, cast

from cryptography import x509
from OpenSSL import SSL

from kes import http1, tls_session
from kes.connection import (
    BATCH_BYTES,
    Resume,
    TLSConnection,
    http_date,
    outcome,
    run_eagerly,
)
from kes.identity import of_certificate
from kes.messages import Response
from kes.serve_http2 import HTTP2Connection
from kes.tls_context import ALPN_H2

if TYPE_CHECKING:
    from kes.server import Server

log = logging.getLogger("kes.server")

# Requests parsed ahead while one is being answered; beyond this we stop reading, so a
# client pipelining without reading responses cannot make us queue without bound.
MAX_PIPELINED = 32


class HTTP1Connection(TLSConnection):
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
        """Hand the socket and the TLS session to an `HTTP2Connection`; this object is done."""
        self._closed = True
        self.deadline = None
        self._server.connections.discard(self)
        transport = self._transport
        assert transport is not None  # noqa: S101 - set in connection_made
        conn = HTTP2Connection(self._server, self._tls, transport, self.remote, cert)
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
        After `BATCH_BYTES` of output the rest waits for the next loop iteration, so the
        transport gets a chance to report backpressure (uvloop calls pause_writing only
        then) before a pipelining client that does not read makes us buffer more."""
        pending = self._pending
        self._sent = 0
        while pending and not self._closed and not self._write_paused:
            if self._sent >= BATCH_BYTES:
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
                self._send(http1.error_response(event.status, http_date.get()))
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
        response = run_eagerly(self._server.handler, event.request)
        if isinstance(response, Resume):
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

    async def _finish(self, event: http1.Parsed, pending: Resume) -> None:
        response = await outcome(pending, event.request)
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
            date=http_date.get(),
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
                    date=http_date.get(),
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
                if transport.get_write_buffer_size() > BATCH_BYTES:
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
