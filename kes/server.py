"""The KES transport: mTLS + HTTP/1.1 or HTTP/2 on asyncio, TLS through OpenSSL memory BIOs.

The modules, by job: kes/tls_context.py builds the server's TLS context (settings, ALPN);
kes/tls_session.py is one connection's TLS session; kes/http1.py and kes/http2.py turn
plaintext into `kes.messages.Request`s and `Response`s back into bytes, without I/O;
kes/serve_http1.py and kes/serve_http2.py serve one connection of each protocol (bytes
between socket, TLS and framing; handlers; backpressure), on what kes/connection.py gives
both; this module is the listener, the timeouts' sweep and the entry points; kes/workers.py
forks and supervises SO_REUSEPORT worker processes.

Every connection starts as an `HTTP1Connection`; one whose handshake chose ALPN `h2` hands
itself over to an `HTTP2Connection`.

Timeouts follow KES (read-header 5 s, idle 90 s) plus a handshake and a body timeout; they
are checked by one sweep per server instead of a timer per request.

Entry points: `Server` (async, for a running loop), `ServerThread` (its own loop in a
thread: tests and the agent) and `run` (blocking, signals; with `workers > 1` the
SO_REUSEPORT process supervisor in kes/workers.py forks and watches the workers).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypedDict, Unpack

from OpenSSL import SSL

from bootkey_core.errors import BootkeyError
from kes import tls_session
from kes import workers as workers_
from kes.messages import MAX_BODY, Handler
from kes.serve_http1 import HTTP1Connection
from kes.serve_http2 import HTTP2Connection
from kes.tls_context import CertSource, TLSConfig, build_context, renewal_delay

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


class Timeouts(TypedDict, total=False):
    """Keyword arguments of `Server` that `ServerThread` and `run` pass through."""

    handshake_timeout: float
    header_timeout: float
    idle_timeout: float
    body_timeout: float
    shutdown_grace: float
    max_body: int


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
        self.connections: set[HTTP1Connection | HTTP2Connection] = set()
        self._flush_queue: list[HTTP1Connection | HTTP2Connection] = []
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
                lambda: HTTP1Connection(self), sock=sock, backlog=1024
            )
        else:
            self._server = await self._loop.create_server(
                lambda: HTTP1Connection(self), host, port, reuse_port=reuse_port or None,
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

    def flush_soon(self, conn: HTTP1Connection | HTTP2Connection) -> None:
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
