"""The agent's control socket: the sans-I/O protocol, and the real socket with
SO_PEERCRED (root answered, anyone else refused)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootkey import control_protocol as cp
from bootkey.control import AgentNotRunning, ControlServer, ask

COMMANDS: dict[str, cp.Command] = {"status": lambda: {"status": {"volumes": []}},
                                   "ping": lambda: {}}


def reply(line: bytes, uid: int = 0) -> dict[str, Any]:
    out = cp.answer(line, uid, COMMANDS)
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    obj: dict[str, Any] = json.loads(out)
    return obj


def test_root_gets_the_answer() -> None:
    assert reply(b'{"command": "status"}') == {"ok": True, "status": {"volumes": []}}
    assert reply(b'{"command": "ping"}') == {"ok": True}


@pytest.mark.parametrize(("line", "uid", "error"), [
    (b'{"command": "status"}', 1000, "control: permission denied: peer uid 1000 is not root"),
    (b"status", 0, 'control: not a JSON object — send e.g. {"command": "status"}'),
    (b"\xff\xfe", 0, 'control: not a JSON object — send e.g. {"command": "status"}'),
    (b'["status"]', 0, 'control: no "command" — send e.g. {"command": "status"}'),
    (b'{"command": 1}', 0, 'control: no "command" — send e.g. {"command": "status"}'),
    (b'{"command": "unlock"}', 0,
     "control: unknown command 'unlock' — use one of: ping, status"),
    (b'{"command": "' + b"x" * cp.MAX_LINE + b'"}', 0,
     f"control: request longer than {cp.MAX_LINE} bytes"),
])
def test_everything_else_is_refused_with_one_line(line: bytes, uid: int, error: str) -> None:
    assert reply(line, uid) == {"ok": False, "error": error}


def test_a_non_root_peer_is_refused_before_the_command_runs() -> None:
    ran: list[str] = []

    def status() -> dict[str, str]:
        ran.append("status")
        return {}

    cp.answer(b'{"command": "status"}', 1000, {"status": status})
    assert ran == []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(tmp_path / "run" / "control.sock", COMMANDS, timeout=2.0)
    srv.start()
    yield srv
    srv.stop()


def test_real_socket_answers_root_and_is_private(server: ControlServer) -> None:
    assert ask(server.path, "status") == {"ok": True, "status": {"volumes": []}}
    assert server.path.stat().st_mode & 0o777 == 0o600
    assert server.path.parent.stat().st_mode & 0o777 == 0o700
    # several requests on one connection, one line each
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.path))
        s.sendall(cp.request("ping") + cp.request("status"))
        with s.makefile("rb") as rf:
            assert json.loads(rf.readline()) == {"ok": True}
            assert json.loads(rf.readline())["ok"] is True


def _as_nobody(path: Path) -> bytes:
    """Connect as uid 65534 from a forked child; the reply (or the errno) comes back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                s.sendall(cp.request("status"))
                out = s.makefile("rb").readline()
        except OSError as e:
            out = f"errno {e.errno}".encode()
        os.write(w, out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_non_root_is_kept_out_by_the_mode_and_by_peercred(server: ControlServer) -> None:
    import errno

    assert _as_nobody(server.path) == f"errno {errno.EACCES}".encode()
    # even with the socket reachable and opened up, SO_PEERCRED refuses (pytest's tmp_path
    # is private to root, so this one lives in a directory of its own under /tmp)
    top = Path(tempfile.mkdtemp(prefix="bootkey-control-"))
    try:
        srv = ControlServer(top / "run" / "control.sock", COMMANDS, timeout=2.0)
        srv.start()
        try:
            top.chmod(0o755)
            srv.path.parent.chmod(0o755)
            srv.path.chmod(0o666)
            assert json.loads(_as_nobody(srv.path)) == {
                "ok": False, "error": "control: permission denied: peer uid 65534 is not root"}
        finally:
            srv.stop()
    finally:
        shutil.rmtree(top)


def test_no_agent_is_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(AgentNotRunning) as e:
        ask(tmp_path / "control.sock", "status")
    assert e.value.exit_code == 3
    assert "agent: not running" in str(e.value)
