"""KES log streams (shared/kes-api.md §2.18, §11.2): audit events and the error log,
delivered to `/v1/log/audit` and `/v1/log/error` subscribers as NDJSON, and to Python
logging (journald/stderr via bootkey.journal).

Unlike current KES — whose metrics wrapper swallows these streams (issue #480) and which
audits only create/import/delete — every subscriber really receives every event, and
generate/decrypt and the other key, policy and identity calls are audited too.

Invariant: an event never contains key material: audit records carry path, identity,
IP, status and time only; error lines are the messages bootkey logs, which never
include keys (bootkey STYLE rule 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

audit_log = logging.getLogger("kes.audit")
error_log = logging.getLogger("kes.error")

QUEUE_LIMIT = 1000  # a subscriber that falls this far behind loses events, not memory


@dataclass
class _Subscriber:
    queue: asyncio.Queue[bytes | None]
    loop: asyncio.AbstractEventLoop


class LogHub:
    """Fan-out of NDJSON lines to stream subscribers. `publish` is thread-safe: events
    come from the event loop (handlers) and from worker threads (keyring probe)."""

    def __init__(self, on_publish: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._subs: list[_Subscriber] = []
        self._on_publish = on_publish

    def publish(self, event: dict[str, object]) -> None:
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            # RuntimeError: that subscriber's loop is closed; it unsubscribes on its own.
            with contextlib.suppress(RuntimeError):
                s.loop.call_soon_threadsafe(_offer, s.queue, line)
            if self._on_publish is not None:
                self._on_publish()

    @property
    def subscribers(self) -> int:
        return len(self._subs)  # a racy read is fine: a new subscriber sees later events

    async def stream(self) -> AsyncIterator[bytes]:
        """Yield lines until the consumer stops iterating (client went away)."""
        sub = _Subscriber(asyncio.Queue(QUEUE_LIMIT), asyncio.get_running_loop())
        with self._lock:
            self._subs.append(sub)
        try:
            while True:
                line = await sub.queue.get()
                if line is None:
                    return
                yield line
        finally:
            with self._lock:
                self._subs.remove(sub)

    def close(self) -> None:
        """End every stream (server shutdown)."""
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            with contextlib.suppress(RuntimeError):
                s.loop.call_soon_threadsafe(_offer, s.queue, None)


def _offer(q: asyncio.Queue[bytes | None], line: bytes | None) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        q.put_nowait(line)


def _rfc3339_ms(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_event(*, when: dt.datetime, ip: str, path: str, identity: str, status: int,
                millis: int) -> dict[str, object]:
    """The JSON of a KES audit record (§2.18): response.time in milliseconds."""
    return {"time": _rfc3339_ms(when),
            "request": {"ip": ip, "path": path, "identity": identity},
            "response": {"code": status, "time": millis}}


class Audit:
    """Writes audit records to subscribers and to the `kes.audit` logger (slog-like text)."""

    def __init__(self, hub: LogHub) -> None:
        self.hub = hub

    def wanted(self, kes_audited: bool) -> bool:
        """Whether a record would reach anyone: lets the caller skip building it."""
        level = logging.INFO if kes_audited else logging.DEBUG
        return bool(self.hub.subscribers) or audit_log.isEnabledFor(level)

    def record(self, *, method: str, path: str, ip: str, identity: str, status: int,
               millis: int, message: str = "", kes_audited: bool = False) -> None:
        """Every record goes to stream subscribers. The log gets at INFO what KES itself
        audits (key create/import/delete) and the rest at DEBUG: a log line per data key
        would flood journald and cost more than the request."""
        if self.hub.subscribers:
            self.hub.publish(audit_event(when=dt.datetime.now(dt.UTC), ip=ip, path=path,
                                         identity=identity, status=status, millis=millis))
        level = logging.INFO if kes_audited else logging.DEBUG
        if audit_log.isEnabledFor(level):
            audit_log.log(
                level, 'msg="%s" req.method=%s req.path=%s req.ip=%s req.identity=%s '
                "res.code=%d res.time=%dms", message or "request", method, path, ip,
                identity, status, millis)


class HubHandler(logging.Handler):
    """Copies error-log records to `/v1/log/error` subscribers as `{"message": line}`."""

    def __init__(self, hub: LogHub, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.hub = hub
        self.setFormatter(logging.Formatter("time=%(asctime)s level=%(levelname)s msg=%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == audit_log.name:
            return  # audit records have their own stream
        try:
            self.hub.publish({"message": self.format(record)})
        except Exception:
            self.handleError(record)
