"""The agent's control socket: `bootkey status` asks the running agent here.

Invariants: the socket is 0600 in a 0700 directory, and each reply is decided by
`control_protocol.answer` from the peer's SO_PEERCRED uid, so only root is answered.
Every connection is closed within `timeout`; a client that stalls holds one thread, and
at most MAX_CONNECTIONS of them.

    server = ControlServer(Path("/run/bootkey/control.sock"), {"status": agent.snapshot})
    server.start()
    ...
    server.stop()

    ask(Path("/run/bootkey/control.sock"), "status")   # the client side
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bootkey import control_protocol
from bootkey._wakeup import Woken, accept_or_wake, stop_thread
from bootkey.keysocket import bind_private_socket, peer_cred
from bootkey_core.errors import BootkeyError

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/run/bootkey/control.sock")
# `bootkey status` is one connection; a few at once is an operator and a monitor.
MAX_CONNECTIONS = 8


class AgentNotRunning(BootkeyError):
    """No agent answers on the control socket. `bootkey status` reports the config instead
    and exits with this code (LSB's "program is not running", as `systemctl status`)."""

    exit_code = 3


class ControlServer:
    def __init__(self, path: Path, commands: Mapping[str, control_protocol.Command], *,
                 timeout: float = 5.0, heartbeat: Callable[[], None] | None = None,
                 tick: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._commands = commands
        self._heartbeat = heartbeat
        self._tick = tick
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def start(self) -> None:
        self._sock = bind_private_socket(self.path, "control.path")
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._accept_loop, args=(self._sock,),
                                        name="control", daemon=True)
        self._thread.start()
        log.info("control socket: listening on %s", self.path)

    def stop(self) -> None:
        if self._thread is not None:
            stop_thread(self._thread, self._wake_r, self._wake_w)
            self._thread = None
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sock.close()

    def _accept_loop(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        while True:
            if self._heartbeat is not None:
                self._heartbeat()
            try:
                conn = accept_or_wake(sock, self._wake_r, self._tick, "control socket")
            except Woken:
                return
            if conn is None:
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.timeout)
            uid = peer_cred(conn).uid
            with conn.makefile("rb") as rf:
                while line := rf.readline(control_protocol.MAX_LINE + 1):
                    reply = control_protocol.answer(line.rstrip(b"\n"), uid, self._commands)
                    conn.sendall(reply)
                    if uid != 0 or not line.endswith(b"\n"):
                        break  # refused, or an over-long line: nothing more to read
        except OSError as e:
            log.debug("control socket: connection ended: %s", e)
        except Exception:
            log.exception("control socket: answering failed")
        finally:
            conn.close()
            self._slots.release()


def ask(path: Path, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the agent and return its reply object.

    Raises AgentNotRunning when nothing listens at `path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentNotRunning(f"agent: not running (nothing listens on {path}) — "
                                  "`systemctl start bootkey`") from None
        except PermissionError:
            raise BootkeyError(f"{path}: cannot connect: permission denied — run as root"
                               ) from None
        sock.sendall(control_protocol.request(command))
        with sock.makefile("rb") as rf:
            line = rf.readline()
    except TimeoutError:
        raise BootkeyError(f"{path}: the agent did not answer within {timeout:g} s — "
                           "it may be hung; `systemctl status bootkey`") from None
    finally:
        sock.close()
    try:
        reply = control_protocol.parse_reply(line)
    except ValueError:
        raise BootkeyError(f"{path}: not an answer from bootkey's agent") from None
    if not reply["ok"]:
        raise BootkeyError(str(reply.get("error", "control: refused")))
    return reply
