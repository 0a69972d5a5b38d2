"""Durations as bootkey.toml and KES YAML write them: Go's syntax or plain seconds.

One parser for both files, so "5m0s" means the same wherever an operator writes it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

# Go's duration syntax (KES YAML uses it too): "250ms", "30s", "5m", "1h30m", "5m0s".
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
          "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_EXAMPLE = 'use e.g. "30s", "5m", "1h30m" or a number of seconds'


def parse_duration(value: Any) -> float:
    """A duration string ("250ms", "30s", "5m", "1h30m") or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration: {_EXAMPLE}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    s = value.strip()
    if s == "0":
        return 0.0
    if s.startswith("-"):
        raise ValueError(f"{value!r}: a duration cannot be negative")
    s = s.removeprefix("+")
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"{value!r} is not a duration: {_EXAMPLE}")
    return total


Duration = Annotated[float, BeforeValidator(parse_duration)]


def format_duration(seconds: float) -> str:
    """Whole seconds in the same syntax `parse_duration` reads: 5400 → "1h30m",
    125 → "2m5s", 0 → "0s"; infinity → "never" (a token without expiry)."""
    if seconds == float("inf"):
        return "never"
    s = max(0, int(seconds))
    parts = ((s // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s"))
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"
