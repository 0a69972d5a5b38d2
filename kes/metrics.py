"""KES server metrics under KES's exact names (shared/kes-api.md §11.1).

prometheus_client keeps the histogram and does the exposition escaping; the families are
built by a custom collector and written by `exposition()` because prometheus_client would
rename counters to `*_total`, and kms-go's `Metrics()` looks up KES's names literally.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 3, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self._codes: dict[str, dict[int, int]] = {"success": {}, "error": {}, "failure": {}}
        self.active = 0
        self.audit_events = 0
        self.error_events = 0
        self.started = time.monotonic()
        # Counted here, exported as a prometheus_client histogram family: observe() of
        # prometheus_client's Histogram costs a few µs, a share of a ~20 µs request.
        self._buckets = [0] * (len(BUCKETS) + 1)
        self._sum = 0.0

    # The request counters are written and read (families) on the server's event loop
    # thread only, so they take no lock: it was a measurable share of a request.

    def request_started(self) -> None:
        self.active += 1

    def request_aborted(self) -> None:
        self.active -= 1

    def request_done(self, status: int, seconds: float) -> None:
        kind = "success" if status < 300 else "error" if status < 500 else "failure"
        self.active -= 1
        codes = self._codes[kind]
        codes[status] = codes.get(status, 0) + 1
        self._buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sum += seconds

    def count(self, kind: str) -> int:
        return sum(self._codes[kind].values())

    def families(self) -> Iterator[Metric]:
        codes = {k: dict(v) for k, v in self._codes.items()}
        active, audit, errors = self.active, self.audit_events, self.error_events
        buckets, total = list(self._buckets), self._sum
        help_ = {"success": "Number of successful requests (2xx)",
                 "error": "Number of requests that failed with a client error (4xx)",
                 "failure": "Number of requests that failed with a server error (5xx)"}
        for kind in ("success", "error", "failure"):
            m = Metric(f"kes_http_request_{kind}", help_[kind], "counter")
            for code, n in sorted(codes[kind].items()):
                m.add_sample(m.name, {"code": str(code)}, float(n))
            yield m
        yield _single("kes_http_request_active", "Number of active requests", "gauge", active)
        cumulative, acc = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), buckets, strict=True):
            acc += n
            cumulative.append((bound, float(acc)))
        yield HistogramMetricFamily("kes_http_response_time", "Response time of KES API "
                                    "requests in seconds", buckets=cumulative, sum_value=total)
        yield _single("kes_log_error_events", "Number of error log events", "counter", errors)
        yield _single("kes_log_audit_events", "Number of audit log events", "counter", audit)
        yield _single("kes_system_up_time", "Uptime in seconds", "gauge",
                      round(time.monotonic() - self.started))
        yield _single("kes_system_num_cpu", "Logical CPUs", "gauge", os.cpu_count() or 1)
        yield _single("kes_system_num_cpu_used", "Usable CPUs", "gauge", usable_cpus())
        yield _single("kes_system_num_threads", "Threads", "gauge", threading.active_count())
        heap, stack = memory_usage()
        yield _single("kes_system_mem_heap_used", "Heap bytes in use", "gauge", heap)
        yield _single("kes_system_mem_heap_objects", "Heap objects (not tracked: 0)", "gauge", 0)
        yield _single("kes_system_mem_stack_used", "Stack bytes", "gauge", stack)

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol: the agent registers this object in its
        own registry, so `/metrics` there and `/v1/metrics` here count the same requests."""
        return self.families()

    def exposition(self) -> bytes:
        lines: list[str] = []
        for m in self.families():
            lines.append(f"# HELP {m.name} {m.documentation}")
            lines.append(f"# TYPE {m.name} {m.type}")
            for s in m.samples:
                if s.name.endswith("_created"):
                    continue  # a prometheus_client addition KES does not have
                labels = ",".join(f'{k}="{_esc(_go_label(k, v))}"' for k, v in s.labels.items())
                value = _go_float(s.value)
                lines.append(f"{s.name}{{{labels}}} {value}" if labels
                             else f"{s.name} {value}")
        return ("\n".join(lines) + "\n").encode()


def _single(name: str, doc: str, typ: str, value: float) -> Metric:
    m = Metric(name, doc, typ)
    m.add_sample(name, {}, float(value))
    return m


def _go_float(v: float) -> str:
    """Go's expfmt spelling: 1 not 1.0, +Inf."""
    if v == float("inf"):
        return "+Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _go_label(name: str, value: str) -> str:
    if name == "le" and value != "+Inf":
        return _go_float(float(value))
    return value


def _esc(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_usage() -> tuple[int, int]:
    """(data segment bytes, stack bytes) from /proc/self/status — the nearest Linux
    counterparts of Go's heap and stack numbers that KES reports."""
    heap = stack = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    heap = int(line.split()[1]) * 1024
                elif line.startswith("VmStk:"):
                    stack = int(line.split()[1]) * 1024
    except OSError:
        pass
    return heap, stack
