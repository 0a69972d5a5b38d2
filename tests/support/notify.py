"""A datagram socket standing in for systemd's NOTIFY_SOCKET, collecting messages."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.arrivals: list[tuple[float, str]] = []  # (time.monotonic(), message)
        self._cond = threading.Condition()
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._cond:
                lines = data.decode().split("\n")
                self.messages.extend(lines)
                self.arrivals.extend((now, m) for m in lines)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching sd_notify message; got {self.messages}")
                self._cond.wait(left)

    def times_of(self, message: str) -> list[float]:
        with self._cond:
            return [t for t, m in self.arrivals if m == message]

    def close(self) -> None:
        self._stop = True
        self.sock.close()
