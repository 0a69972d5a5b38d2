"""The crypttab key socket: hand volume keys to systemd-cryptsetup over AF_UNIX.

Protocol (systemd src/basic/fileio.c, crypttab(5)): when the keyfile named in /etc/crypttab,
or found at /run/cryptsetup-keys.d/<volume>.key, is an AF_UNIX stream socket,
systemd-cryptsetup binds its client socket to the abstract name
`\\0<64-bit random hex>/cryptsetup/<volume>`, connects, shuts down writing and reads to
EOF. The bytes are the passphrase, used verbatim. Zero bytes read as a wrong key, so
systemd falls back to its next key source: that is how we decline.

Invariants:
- Only a root peer (SO_PEERCRED uid 0) ever receives key bytes.
- Only volumes the agent manages are answered; everything else gets zero bytes.
- Every accepted connection is closed within `[keysocket] timeout`, whatever the key
  provider does: systemd-cryptsetup reads without a timeout (TimeoutSec=0), so a
  connection we hold is a boot we hold.
- Key bytes are never logged and are wiped (SecretBuffer.close) right after sending.

The decision is sans-I/O (bootkey/keysocket_protocol.py); `KeySocketServer` only moves
bytes. `place_key_links` puts /run/cryptsetup-keys.d/<volume>.key symlinks to the socket,
so crypttab can keep `none` as keyfile and TPM2/FIDO2 tokens are still tried first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from bootkey._wakeup import Woken, accept_or_wake, stop_thread
from bootkey.config import KeysocketConfig
from bootkey.keysocket_protocol import Decision, Decline, PeerCred, decide, parse_peer_address
from bootkey_core.errors import ConfigError
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

# The systemd-socket unit names its fd so the agent can tell it from others it inherits.
FD_NAME = "cryptsetup"
# Where systemd-cryptsetup looks for a key when crypttab's keyfile field is `none`
# (after tokens and /etc/cryptsetup-keys.d), per crypttab(5).
KEYS_DIR = Path("/run/cryptsetup-keys.d")
# A single systemd-cryptsetup client per volume is normal; this bounds a flood. Over it
# we answer at once with zero bytes rather than queue (a queued client is a stuck boot).
MAX_CONNECTIONS = 32
_PEERCRED = struct.Struct("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


class KeyProvider(Protocol):
    def __call__(self, volume: str, deadline: float) -> SecretBuffer | None:
        """The key for `volume`, waiting at most until `deadline` (time.monotonic()).

        None declines. The returned buffer belongs to the server, which wipes it after
        sending: return a copy of a key you keep.
        """
        ...


def peer_cred(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def _is_listening_unix_stream(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    s = socket.socket(fileno=os.dup(fd))
    try:
        return (s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    finally:
        s.close()


def pick_activated_fd(fds: Mapping[int, str]) -> int | None:
    """Choose our socket among those systemd passed: the one named FD_NAME, else the only
    AF_UNIX stream listener. Pure apart from fstat/getsockopt on the given fds."""
    named = [fd for fd, name in fds.items() if name == FD_NAME]
    if named:
        return named[0]
    unix = [fd for fd in fds if _is_listening_unix_stream(fd)]
    return unix[0] if len(unix) == 1 else None


def systemd_fds() -> dict[int, str]:
    """{fd: name} passed by socket activation (LISTEN_FDS/LISTEN_PID), {} outside systemd."""
    try:
        from systemd.daemon import listen_fds_with_names
    except ImportError:  # pragma: no cover - a hard dependency, but not needed to serve
        return {}
    # Keep the environment: other parts of the agent may look for their own fds.
    fds: dict[int, str] = listen_fds_with_names(unset_environment=False)
    return fds


def bind_private_socket(path: Path, setting: str = "keysocket.path") -> socket.socket:
    """Listen on `path`: directory 0700 root, socket 0600, a stale socket replaced.
    `setting` names the config field in errors (the control socket uses this too)."""
    parent = path.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = parent.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{setting}: {parent} is not private (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}) — make it 0700 and owned by the agent's user"
        )
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(
                f"{setting}: {path} exists and is not a socket — remove it or choose"
                " another path"
            )
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the node is created 0600: no window where others can connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    return sock


class KeySocketServer:
    """Serves keys to systemd-cryptsetup. `start()` returns once it is listening.

        server = KeySocketServer(config.keysocket, agent.key_for, agent.is_managed)
        server.start()      # takes the socket-activated fd if systemd passed one
        server.link_volumes(["data", "logs"])   # /run/cryptsetup-keys.d/<vol>.key
        ...
        server.stop()       # removes the links; the socket file only if it bound it
    """

    def __init__(
        self,
        config: KeysocketConfig,
        key_for: KeyProvider,
        is_managed: Callable[[str], bool],
        *,
        activated_fds: Mapping[int, str] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        heartbeat: Callable[[], None] | None = None,
        tick: float = 10.0,
    ) -> None:
        self.path = config.path
        # called at least every `tick` seconds while the accept loop runs (the watchdog)
        self._heartbeat = heartbeat
        self._tick = tick
        self.timeout = config.timeout
        self._key_for = key_for
        self._is_managed = is_managed
        self._activated = activated_fds
        self._max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._wake_r, self._wake_w = -1, -1
        self._links_dir: Path | None = None
        self._sock: socket.socket | None = None
        self._owns_path = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.activated = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        fds = self._activated if self._activated is not None else systemd_fds()
        fd = pick_activated_fd(fds) if fds else None
        if fd is not None and _is_listening_unix_stream(fd):
            # Serve a duplicate: the inherited fd stays open, so a stop() and start()
            # in the same process finds it again, and closing ours leaves systemd's
            # listening socket (and activation on the next connection) intact.
            self._sock = socket.socket(fileno=os.dup(fd))
            self.activated = True
            log.info("key socket: serving the socket systemd passed (fd %d)", fd)
        else:
            self._sock = bind_private_socket(self.path)
            self._owns_path = True
            log.info("key socket: listening on %s", self.path)
        self._stopping.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._accept_loop,
                                        args=(self._sock, self._wake_r),
                                        name="keysocket", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting. Never shutdown() the listening socket: when systemd passed it,
        that would break it for systemd too. Connections already accepted finish on
        their own, within their deadline."""
        self._stopping.set()
        if self._thread is not None:
            stop_thread(self._thread, self._wake_r, self._wake_w)
            self._thread = None
        if self._links_dir is not None:
            remove_key_links(self.listening_path, self._links_dir)
            self._links_dir = None
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._owns_path:
                # A socket file nobody listens on gives ECONNREFUSED, which
                # systemd-cryptsetup treats as fatal; a missing one makes it fall through.
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self._owns_path = False
            sock.close()

    @property
    def listening_path(self) -> Path:
        """The path clients connect to: the inherited socket's own, else ours."""
        if self._sock is not None:
            name = self._sock.getsockname()
            if isinstance(name, str) and name:
                return Path(name)
        return self.path

    def link_volumes(self, volumes: Iterable[str], keys_dir: Path = KEYS_DIR) -> list[Path]:
        """Point keys_dir/<volume>.key at this socket for exactly these volumes (call
        again when the set changes); stop() removes the links again."""
        self._links_dir = keys_dir
        return place_key_links(volumes, self.listening_path, keys_dir)

    def __enter__(self) -> KeySocketServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- I/O -------------------------------------------------------------------

    def _accept_loop(self, sock: socket.socket, wake: int) -> None:
        # Non-blocking accept after select: another process sharing the socket (an
        # agent being replaced) may take the connection between the two calls.
        sock.setblocking(False)
        while not self._stopping.is_set():
            if self._heartbeat is not None:
                self._heartbeat()
            try:
                conn = accept_or_wake(sock, wake, self._tick if self._heartbeat else None,
                                      "key socket")
            except Woken:
                return
            if conn is None:
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("key socket: %d connections in progress, declining a new one",
                            self._max_connections)
                _close(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="keysocket-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.timeout
        worker_started = False
        try:
            try:
                peer = peer_cred(conn)
                address = conn.getpeername()
            except OSError as e:
                log.warning("key socket: cannot read the peer: %s", e.strerror)
                return
            worker_started = True
            self._answer(conn, peer, address, deadline)
        finally:
            _close(conn)
            if not worker_started:
                self._slots.release()

    def _decide_and_fetch(self, peer: PeerCred, address: str | bytes,
                          deadline: float) -> tuple[Decision, SecretBuffer | None]:
        decision = decide(peer, address, self._is_managed)
        if isinstance(decision, Decline):
            return decision, None
        return decision, self._key_for(decision.volume, deadline)

    def _answer(self, conn: socket.socket, peer: PeerCred, address: str | bytes,
                deadline: float) -> None:
        """Decide and fetch in a worker thread: `is_managed` may scan devices and the
        provider may wait for Vault, and neither may hold the connection past the
        deadline. A key that arrives late is wiped, never sent."""
        lock = threading.Lock()
        done = threading.Event()
        result: list[tuple[Decision, SecretBuffer | None]] = []
        abandoned = False

        def work() -> None:
            try:
                outcome = self._decide_and_fetch(peer, address, deadline)
            except Exception:
                log.exception("key socket: deciding or fetching the key failed")
                outcome = (Decline("internal error"), None)
            with lock:
                if abandoned:
                    if outcome[1] is not None:
                        outcome[1].close()
                else:
                    result.append(outcome)
            done.set()
            self._slots.release()  # the slot covers the worker too

        threading.Thread(target=work, name="keysocket-key", daemon=True).start()
        done.wait(max(0.0, deadline - time.monotonic()))
        with lock:
            if not result:
                abandoned = True
                req = parse_peer_address(address)
                log.warning("key socket: no answer for pid %d within %g s, declining",
                            peer.pid, self.timeout,
                            extra=_volume_extra(req.volume if req else None))
                return
            decision, key = result[0]
        if isinstance(decision, Decline):
            log.info("key socket: declined pid %d: %s", peer.pid, decision.reason,
                     extra=_volume_extra(decision.volume))
            return
        volume = decision.volume
        if key is None:
            log.info("key socket: declined pid %d: no key available", peer.pid,
                     extra={"VOLUME": volume})
            return
        with key:
            try:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                conn.sendall(key.view)
            except OSError as e:
                log.warning("key socket: cannot send the key to pid %d: %s", peer.pid,
                            e.strerror or e, extra={"VOLUME": volume})
                return
        log.info("key socket: sent the key to pid %d", peer.pid, extra={"VOLUME": volume})


def _volume_extra(volume: str | None) -> dict[str, str]:
    return {"VOLUME": volume} if volume else {}


def _close(conn: socket.socket) -> None:
    """Close so the client sees a clean EOF. Closing an AF_UNIX socket with unread data
    makes the peer's read fail with ECONNRESET, which systemd-cryptsetup treats as fatal
    rather than as a decline; so drain what a client may have sent first."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not conn.recv(4096, socket.MSG_DONTWAIT):
                break
    conn.close()


def place_key_links(volumes: Iterable[str], socket_path: Path,
                    keys_dir: Path = KEYS_DIR) -> list[Path]:
    """Make keys_dir/<volume>.key a symlink to the key socket for each managed volume,
    and remove links to the socket for volumes no longer managed. Returns the links.

    Only links pointing at `socket_path` are ever replaced or removed: other tools' key
    files in the shared directory are left alone (and win, since we skip them).
    """
    wanted = {f"{v}.key" for v in volumes}
    for name in wanted:
        if "/" in name or name.startswith(".") or "\0" in name:
            raise ValueError(f"volume {name[:-4]!r}: not a usable key file name")
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = str(socket_path)
    placed: list[Path] = []
    for entry in keys_dir.iterdir():
        if entry.name not in wanted and entry.is_symlink() and os.readlink(entry) == target:
            entry.unlink()
    for name in sorted(wanted):
        link = keys_dir / name
        if link.is_symlink() and os.readlink(link) == target:
            placed.append(link)
            continue
        if link.exists() or link.is_symlink():
            log.warning("%s exists and is not bootkey's: left alone", link,
                        extra={"VOLUME": name[:-4]})
            continue
        tmp = keys_dir / f".{name}.bootkey-tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: systemd never sees a half-made link
        placed.append(link)
    return placed


def remove_key_links(socket_path: Path, keys_dir: Path = KEYS_DIR) -> None:
    """Remove every keys_dir symlink pointing at the socket (the agent stops serving)."""
    target = str(socket_path)
    try:
        entries = list(keys_dir.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_symlink() and os.readlink(entry) == target:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
