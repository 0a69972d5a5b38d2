"""Stopping a thread that blocks in select(): write to a pipe it also selects on (no
polling interval, no lost events), wait for it, close the pipe."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading

log = logging.getLogger(__name__)


class Woken(Exception):
    """The wake pipe was written (stop), or waiting itself failed: the loop ends."""


def accept_or_wake(sock: socket.socket, wake_r: int, timeout: float | None,
                   what: str) -> socket.socket | None:
    """The next connection on the non-blocking listening `sock` (returned blocking), or
    None after `timeout` or a lost race (another process sharing the socket took it).
    Raises Woken when `wake_r` becomes readable."""
    try:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [], timeout)
    except OSError as e:
        log.error("%s: cannot wait for connections: %s", what, e)
        raise Woken from None
    if wake_r in ready:
        raise Woken
    if not ready:
        return None
    try:
        conn, _ = sock.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        # EMFILE and friends: back off briefly (still woken by a stop) instead of spinning.
        log.warning("%s: accept failed: %s", what, e.strerror or e)
        if select.select([wake_r], [], [], 0.1)[0]:
            raise Woken from None
        return None
    conn.setblocking(True)
    return conn


def stop_thread(thread: threading.Thread, wake_r: int, wake_w: int,
                timeout: float = 5.0) -> None:
    with contextlib.suppress(OSError):
        os.write(wake_w, b"x")
    thread.join(timeout=timeout)
    for fd in (wake_r, wake_w):
        with contextlib.suppress(OSError):
            os.close(fd)
