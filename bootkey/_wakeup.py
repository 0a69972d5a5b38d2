"""Stopping a thread that blocks in select(): write to a pipe it also selects on (no
polling interval, no lost events), wait for it, close the pipe."""

from __future__ import annotations

import contextlib
import os
import threading


def stop_thread(thread: threading.Thread, wake_r: int, wake_w: int,
                timeout: float = 5.0) -> None:
    with contextlib.suppress(OSError):
        os.write(wake_w, b"x")
    thread.join(timeout=timeout)
    for fd in (wake_r, wake_w):
        with contextlib.suppress(OSError):
            os.close(fd)
