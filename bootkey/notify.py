"""sd_notify for a Type=notify service. Outside systemd (no NOTIFY_SOCKET) every call is
a no-op that returns False: running by hand is a mode, not an error."""

from __future__ import annotations

import logging
import os

from systemd import daemon

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.last_status = ""

    def _send(self, msg: str) -> bool:
        if not self.enabled:
            return False
        try:
            return bool(daemon.notify(msg))
        except OSError as e:  # a broken socket must not take the agent down
            log.debug("sd_notify failed: %s", e)
            return False

    def status(self, text: str) -> None:
        self.last_status = text
        self._send(f"STATUS={text}")

    def ready(self, status: str | None = None) -> None:
        if status is not None:
            self.last_status = status
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Half the WatchdogSec= systemd asked for, if it asked us (WATCHDOG_PID matches)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2_000_000)
    except ValueError:
        return None
