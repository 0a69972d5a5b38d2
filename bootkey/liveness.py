"""Which of the agent's loops have shown progress lately: the watchdog's evidence.

Invariant: the agent sends `WATCHDOG=1` only while `stale(now)` is empty, i.e. every loop
that ever beat has beaten within `limit` seconds, or declared a bounded piece of work
(`busy_until`) that has not run out. A loop that wedges stops beating, so within `limit`
plus one ping interval systemd stops hearing from the agent and restarts it.

Sans-I/O: time is a parameter, nothing here sleeps, sends or starts a thread.

    >>> lv = Liveness(limit=10.0)
    >>> lv.beat("main", now=100.0); lv.beat("renewal", now=100.0)
    >>> lv.stale(now=105.0)
    []
    >>> lv.beat("main", now=108.0)
    >>> lv.stale(now=111.0)
    ['renewal']
    >>> lv.beat("renewal", now=111.0, busy_until=200.0)   # renewing: Vault retries are bounded
    >>> lv.stale(now=150.0)
    ['main']
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Stale:
    """A loop that has not beaten in time: for the log line and STATUS=."""

    name: str
    silent_for: float


class Liveness:
    def __init__(self, limit: float) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        # name -> (last beat, busy until): loops beat from their own threads
        self._beats: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def tick(self) -> float:
        """How often a loop should beat: well inside `limit`, so one slow pass is no hang."""
        return self.limit / 4

    def beat(self, name: str, *, now: float, busy_until: float | None = None) -> None:
        """`name` made progress at `now`. `busy_until`: it now starts work bounded by that
        instant (a Vault call with a deadline, an unlock round) and may be silent until then."""
        with self._lock:
            self._beats[name] = (now, busy_until if busy_until is not None else now)

    def forget(self, name: str) -> None:
        """The loop ended on purpose (its component stopped): its silence is no hang."""
        with self._lock:
            self._beats.pop(name, None)

    def details(self, now: float) -> list[Stale]:
        with self._lock:
            beats = dict(self._beats)
        return [Stale(name, now - last) for name, (last, busy) in sorted(beats.items())
                if now - last > self.limit and now > busy]

    def stale(self, now: float) -> list[str]:
        return [s.name for s in self.details(now)]

    def healthy(self, now: float) -> bool:
        return not self.details(now)

    def loops(self) -> list[str]:
        with self._lock:
            return sorted(self._beats)
