"""Serving HTTP/2 on one KES connection: the I/O side of kes/http2.py's framing.

`HTTP2Connection` takes over socket and TLS session from the `HTTP1Connection` whose
handshake chose ALPN `h2`. Streams are multiplexed; handlers run eagerly as over
HTTP/1.1 (kes/connection.py), and one that suspends gets its own Task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from cryptography import x509

from kes import http2, tls_session
from kes.connection import Resume, TLSConnection, http_date, outcome, run_eagerly
from kes.identity import of_certificate
from kes.messages import Request, Response

if TYPE_CHECKING:
    from kes.server import Server

log = logging.getLogger("kes.server")


class HTTP2Connection(TLSConnection):
    """A connection whose TLS handshake chose ALPN `h2` (`HTTP1Connection` hands it the socket
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
        elif (since := self._h2.receiving_since) is not None:
            waited = (time.monotonic_ns() - since) / 1e9
            self.deadline = self._loop.time() + server.body_timeout - waited
        else:
            self.deadline = self._loop.time() + server.idle_timeout

    def check_deadline(self, now: float) -> None:
        if self.deadline is None or now < self.deadline or self._closed:
            return
        if self._h2.receiving_since is not None:
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
        response = run_eagerly(self._server.handler, request)
        if isinstance(response, Resume):
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

    async def _finish(self, sid: int, request: Request, pending: Resume) -> None:
        response = await outcome(pending, request)
        if response.stream is not None:
            await self._stream(sid, response)
        else:
            self._answer(sid, request, response)

    def _answer(self, sid: int, request: Request, response: Response) -> None:
        self._h2.respond(sid, response.status, response.content_type, response.body,
                         response.headers, date=http_date.get(),
                         head_only=request.method == "HEAD")

    async def _stream(self, sid: int, response: Response) -> None:
        stream = response.stream
        assert stream is not None  # noqa: S101
        framing = self._h2
        self._streaming.add(sid)
        try:
            if not framing.start_stream(sid, response.status, response.content_type,
                                        response.headers, date=http_date.get()):
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
