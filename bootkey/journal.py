"""Logging: to journald with structured fields under systemd, readable stderr otherwise.

Structured fields travel in `extra=` (VOLUME, LUKS_UUID, VAULT_PATH, …): never key
material, and never a secret as a logging argument, because JournalHandler forwards
`record.args` as CODE_ARGS even when the format string does not print it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

FIELDS = ("VOLUME", "LUKS_UUID", "VAULT_PATH", "KEYSLOT", "DEVICE", "IDENTITY")


class _StderrFormatter(logging.Formatter):
    """`bootkey: message [VOLUME=data LUKS_UUID=…]` for humans at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = [f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k)]
        return f"{base} [{' '.join(extras)}]" if extras else base


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(debug: bool = False, *, force_stderr: bool = False) -> None:
    root = logging.getLogger("bootkey")
    kes_root = logging.getLogger("kes")
    for lg in (root, kes_root):
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.setLevel(logging.DEBUG if debug else logging.INFO)
        lg.propagate = False
    handler: logging.Handler
    if under_journald() and not force_stderr:
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="bootkey")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter("bootkey: %(message)s"))
    root.addHandler(handler)
    kes_root.addHandler(handler)


def fields(**kw: Any) -> dict[str, Any]:
    """`log.info(..., extra=fields(volume=..., luks_uuid=...))` → upper-case journal fields."""
    return {k.upper(): v for k, v in kw.items() if v is not None}
