"""The password-agent protocol as bootkey speaks it in the initrd: sans-I/O values, then
a real ask file and datagram socket answered the way systemd's agents answer."""

from __future__ import annotations

import configparser
import socket
import threading
import time
from pathlib import Path

import pytest

from bootkey import askpassword
from bootkey.askpassword import Answer, Cancel, Ignore, PassphrasePrompt, Request


def test_ask_file_has_the_fields_agents_read() -> None:
    text = askpassword.ask_file(Request("Passphrase for\nroot:", "cryptsetup:/dev/vda2",
                                        "/run/systemd/ask-password/sck.1", 42))
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(text)
    ask = ini["Ask"]
    assert ask["PID"] == "42"
    assert ask["Socket"] == "/run/systemd/ask-password/sck.1"
    assert ask["Id"] == "cryptsetup:/dev/vda2"
    assert ask["Echo"] == "0" and ask["AcceptCached"] == "0" and ask["NotAfter"] == "0"
    assert ask["Message"] == "Passphrase for root:"  # no newline can break the file


@pytest.mark.parametrize(("data", "uid", "want"), [
    (b"+hunter2", 0, Answer(1, 8)),
    (b"+hunter2\0second", 0, Answer(1, 8)),  # agents send one; the rest is ignored
    (b"+", 0, Answer(1, 1)),
    (b"-", 0, Cancel()),
    (b"+hunter2", 1000, Ignore("sender uid 1000 is not root")),
    (b"+hunter2", None, Ignore("no sender credentials")),
    (b"", 0, Ignore("empty datagram")),
    (b"?x", 0, Ignore("reply starts with neither + nor -")),
])
def test_parse_reply(data: bytes, uid: int | None, want: askpassword.Reply) -> None:
    assert askpassword.parse_reply(data, uid) == want


def test_truncated_reply_is_ignored() -> None:
    assert askpassword.parse_reply(b"+abc", 0, truncated=True) == \
        Ignore("reply longer than the buffer")


def agent_reply(ask_dir: Path, payload: bytes) -> None:
    """What systemd-tty-ask-password-agent does: read ask.*, answer on its Socket=."""
    (ask,) = ask_dir.glob("ask.*")
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(ask.read_text())
    target = ini["Ask"]["Socket"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(payload, target)


def test_a_root_agents_answer_is_the_passphrase(tmp_path: Path) -> None:
    with PassphrasePrompt("Passphrase:", "cryptsetup:/dev/vda2", tmp_path) as p:
        assert p.ask_path.exists() and p.socket_path.exists()
        agent_reply(tmp_path, b"+correct horse")
        got = p.wait(time.monotonic() + 10)
    assert got is not None and bytes(got.view) == b"correct horse"
    got.close()
    assert list(tmp_path.iterdir()) == []  # ask file and socket gone


def test_cancel_deadline_and_stop_end_the_wait(tmp_path: Path) -> None:
    with PassphrasePrompt("Passphrase:", "x", tmp_path) as p:
        agent_reply(tmp_path, b"-")
        assert p.wait(time.monotonic() + 10) is None
        t0 = time.monotonic()
        assert p.wait(time.monotonic() + 0.3) is None
        assert time.monotonic() - t0 < 5
        stop = threading.Event()
        stop.set()
        assert p.wait(time.monotonic() + 30, stop) is None
