"""What the HTTP/1.1 and the HTTP/2 connection of the KES server share: the TLS session's
reads and closes (`TLSConnection`), and running a handler eagerly (`run_eagerly`).

Handlers run eagerly: the handler coroutine's first step runs inside `data_received`,
and one that finishes without suspending (the usual cached-key generate/decrypt) is
answered there, with no Task and no extra loop iteration; one that suspends is carried
on by a Task from where it stopped. That first step runs outside any Task, so a handler
must not call `asyncio.timeout()`, `asyncio.TaskGroup()` or `asyncio.current_task()`
before its first `await` that really suspends (`asyncio.wait_for` is fine); doing so
fails loudly (500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Generator
from email.utils import formatdate
from typing import Any, cast

from OpenSSL import SSL

from kes import tls_session
from kes.messages import Handler, Request, Response

log = logging.getLogger("kes.server")

BATCH_BYTES = 256 * 1024  # output per serving round before yielding to the loop
INTERNAL_ERROR = b'{"message":"internal server error"}\n'


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


http_date = _Date()


class Resume:
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


def handler_failed(request: Request) -> Response:
    """Call from an `except` block: log the handler's exception, answer 500."""
    log.exception("kes: handler failed on %s %s", request.method, request.path)
    return Response(500, INTERNAL_ERROR)


def run_eagerly(handler: Handler, request: Request) -> Response | Resume:
    """Run the handler up to its first real suspension: its `Response` if it finished
    (the usual cached-key generate/decrypt, answered without a Task), else the `Resume`
    a Task awaits to carry it on from where it stopped."""
    coro = handler(request)
    try:
        first = coro.send(None)
    except StopIteration as done:
        response: Response = done.value
        return response
    except Exception:
        return handler_failed(request)
    return Resume(coro, first)


async def outcome(pending: Resume, request: Request) -> Response:
    """The response of a handler that suspended: its own, or 500 if it raised."""
    try:
        return await pending
    except asyncio.CancelledError:
        raise
    except Exception:
        return handler_failed(request)


class TLSConnection(asyncio.Protocol):
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
