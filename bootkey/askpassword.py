"""Ask for a passphrase the way systemd does, so one typed at the console (or in plymouth)
reaches bootkey while it is still waiting for Vault.

The password-agent protocol (systemd's docs/PASSWORD_AGENTS.md, src/shared/ask-password-api.c):
- the asker binds an AF_UNIX datagram socket with SO_PASSCRED and then writes an ini file
  `/run/systemd/ask-password/ask.<random>` ([Ask] PID, Socket, AcceptCached, Echo,
  NotAfter, Message, Icon, Id) atomically, because agents watch the directory;
- an agent answers with one datagram, `+<passphrase>` or `-` (cancelled). Only a datagram
  from uid 0, by its kernel-attached credentials, counts;
- the asker removes the file (so agents stop prompting) and its socket.

Sans-I/O: `ask_file` renders a request and `parse_reply` judges a datagram.
`PassphrasePrompt` moves the bytes. The passphrase is received straight into a
SecretBuffer and never copied into an immutable object.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bootkey_core.secret import SecretBuffer

ASK_DIR = Path("/run/systemd/ask-password")
# systemd's agents send at most LINE_MAX-ish passphrases; a bigger datagram is truncated
# (MSG_TRUNC) and ignored.
MAX_REPLY = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


@dataclass(frozen=True)
class Request:
    message: str
    id: str               # e.g. "cryptsetup:/dev/disk/by-uuid/…": how agents group asks
    socket: str
    pid: int
    not_after_us: int = 0  # CLOCK_MONOTONIC µs after which agents ignore it; 0: never
    icon: str = "drive-harddisk"


@dataclass(frozen=True)
class Answer:
    """The passphrase is reply[start:end] (up to the first NUL: systemd's agents send one)."""

    start: int
    end: int


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class Ignore:
    reason: str


Reply = Answer | Cancel | Ignore


def _one_line(s: str) -> str:
    return "".join(c if c.isprintable() else " " for c in s)


def ask_file(req: Request) -> str:
    """The ask.* file's text. Control characters are blanked: it is a line-based ini."""
    return (
        "[Ask]\n"
        f"PID={req.pid}\n"
        f"Socket={req.socket}\n"
        "AcceptCached=0\n"
        "Echo=0\n"
        f"NotAfter={req.not_after_us}\n"
        f"Message={_one_line(req.message)}\n"
        f"Icon={_one_line(req.icon)}\n"
        f"Id={_one_line(req.id)}\n"
    )


def parse_reply(data: memoryview | bytes, uid: int | None, truncated: bool = False) -> Reply:
    """Judge one datagram on the asker's socket, sent by `uid` (None: no credentials)."""
    if uid is None:
        return Ignore("no sender credentials")
    if uid != 0:
        return Ignore(f"sender uid {uid} is not root")
    if truncated:
        return Ignore("reply longer than the buffer")
    if len(data) == 0:
        return Ignore("empty datagram")
    kind = data[0]
    if kind == ord("-"):
        return Cancel()
    if kind != ord("+"):
        return Ignore("reply starts with neither + nor -")
    end = len(data)
    for i in range(1, len(data)):
        if data[i] == 0:
            end = i
            break
    return Answer(1, end)


def sender_uid(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and \
                len(blob) >= _UCRED.size:
            _pid, uid, _gid = _UCRED.unpack_from(blob)
            return int(uid)
    return None


class PassphrasePrompt:
    """One outstanding ask-password request. Use as a context manager; `wait()` returns
    the typed passphrase, or None when cancelled, stopped or past the deadline."""

    def __init__(self, message: str, ask_id: str, directory: Path = ASK_DIR) -> None:
        self.message = message
        self.ask_id = ask_id
        self.directory = directory
        token = secrets.token_hex(8)
        self.socket_path = directory / f"sck.{token}"
        self.ask_path = directory / f"ask.{token}"
        self._sock: socket.socket | None = None

    def __enter__(self) -> PassphrasePrompt:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(str(self.socket_path))
            req = Request(self.message, self.ask_id, str(self.socket_path), os.getpid())
            tmp = self.directory / f".tmp.{self.ask_path.name}"
            tmp.write_text(ask_file(req))
            tmp.rename(self.ask_path)  # agents react to the rename, never see half a file
        except BaseException:
            sock.close()
            self.socket_path.unlink(missing_ok=True)
            raise
        self._sock = sock
        return self

    def __exit__(self, *exc: object) -> None:
        # The ask file first: agents stop prompting when it goes.
        with contextlib.suppress(FileNotFoundError):
            self.ask_path.unlink()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def wait(self, deadline: float, stop: threading.Event | None = None) -> SecretBuffer | None:
        """Wait (until `deadline`, monotonic, or `stop`) for a root agent's answer."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("PassphrasePrompt.wait outside its with-block")
        cmsg = socket.CMSG_SPACE(_UCRED.size)
        with SecretBuffer(MAX_REPLY) as buf:
            while not (stop is not None and stop.is_set()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                ready, _, _ = select.select([sock], [], [], min(remaining, 0.25))
                if not ready:
                    continue
                n, anc, flags, _addr = sock.recvmsg_into([buf.view], cmsg)
                reply = parse_reply(buf.view[:n], sender_uid(anc),
                                    truncated=bool(flags & socket.MSG_TRUNC))
                if isinstance(reply, Answer):
                    return _copy(buf, reply)
                if isinstance(reply, Cancel):
                    return None
        return None


def _copy(buf: SecretBuffer, reply: Answer) -> SecretBuffer | None:
    """The passphrase out of the receive buffer (which the caller wipes)."""
    if reply.end <= reply.start:
        return None  # an empty passphrase never opens a bootkey volume
    return SecretBuffer.from_bytes(buf.view[reply.start:reply.end])
