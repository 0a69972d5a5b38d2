"""Logging: structured journald fields under systemd (over a real journald socket),
readable stderr otherwise; never a key."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

SCRIPT = textwrap.dedent("""
    import logging, os, sys
    st = os.fstat(sys.stderr.fileno())
    if sys.argv[1] == "journal":
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    from bootkey import journal
    journal.setup()
    log = logging.getLogger("bootkey.unlock")
    log.info("volume %s opened", "data",
             extra=journal.fields(volume="data", luks_uuid="5c1e-uuid", keyslot=1))
""")


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                          text=True, timeout=30, check=False)


def test_stderr_mode_is_readable_with_fields() -> None:
    res = run("stderr")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == \
        "bootkey: volume data opened [VOLUME=data LUKS_UUID=5c1e-uuid KEYSLOT=1]"


@pytest.fixture
def journald() -> Iterator[socket.socket]:
    if JOURNAL_SOCKET.exists():
        pytest.skip("a real journald owns /run/systemd/journal/socket on this machine")
    JOURNAL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(JOURNAL_SOCKET))
    s.settimeout(10)
    yield s
    s.close()
    JOURNAL_SOCKET.unlink()


def test_journal_mode_sends_structured_fields(journald: socket.socket) -> None:
    res = run("journal")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # it went to the journal, not to stderr
    raw = journald.recv(65536)
    fields = dict(line.split("=", 1) for line in raw.decode().splitlines() if "=" in line)
    assert fields["MESSAGE"] == "volume data opened"
    assert fields["VOLUME"] == "data"
    assert fields["LUKS_UUID"] == "5c1e-uuid"
    assert fields["KEYSLOT"] == "1"
    assert fields["SYSLOG_IDENTIFIER"] == "bootkey"
    assert fields["PRIORITY"] == "6"
