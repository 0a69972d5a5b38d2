"""The crypttab key socket, against real AF_UNIX sockets.

The client emulates systemd-cryptsetup exactly (fileio.c): bind the abstract name
\\0<random hex>/cryptsetup/<volume>, connect, shutdown(SHUT_WR), read to EOF. Where the
real /lib/systemd/systemd-cryptsetup exists, it is used as the client too.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bootkey.config import KeysocketConfig
from bootkey.keysocket import KeySocketServer, place_key_links, remove_key_links
from bootkey.keysocket_protocol import (
    Decline,
    KeyRequest,
    PeerCred,
    SendKey,
    decide,
    parse_peer_address,
)
from bootkey_core.errors import ConfigError
from bootkey_core.secret import SecretBuffer
from tests.support.luksimg import make_image
from tests.support.wait import wait_for

ROOT = PeerCred(pid=1234, uid=0, gid=0)
# Binary on purpose: a newline, a NUL and high bytes must arrive verbatim.
KEYS = {"data": b"k\n\x00ey-" + bytes(range(200, 256)), "logs": os.urandom(64)}
SYSTEMD_CRYPTSETUP = Path("/lib/systemd/systemd-cryptsetup")


def systemd_client(path: Path | str, volume: str, *, phase: str = "cryptsetup",
                   timeout: float = 10.0) -> bytes:
    """What systemd-cryptsetup does with a socket keyfile, step by step."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(f"\0{secrets.token_hex(8)}/{phase}/{volume}".encode())
        s.connect(str(path))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(timeout)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out
    finally:
        s.close()


class Provider:
    """A key provider that records calls and hands out fresh SecretBuffers."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.given: list[SecretBuffer] = []
        self.gate = gate

    def __call__(self, volume: str, deadline: float) -> SecretBuffer | None:
        self.calls.append(volume)
        if self.gate is not None:
            self.gate.wait(30)
        if volume not in KEYS:
            return None
        buf = SecretBuffer.from_bytes(KEYS[volume])
        self.given.append(buf)
        return buf


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run-bootkey" / "cryptsetup.sock"


@pytest.fixture
def serve(sock_path: Path) -> Iterator[Callable[..., KeySocketServer]]:
    servers: list[KeySocketServer] = []

    def make(provider: Provider, managed: set[str] | None = None, timeout: float = 5.0,
             **kw: object) -> KeySocketServer:
        cfg = KeysocketConfig(path=sock_path, timeout=timeout)
        managed = set(KEYS) if managed is None else managed
        srv = KeySocketServer(cfg, provider, managed.__contains__,
                              activated_fds=kw.pop("activated_fds", {}), **kw)  # type: ignore[arg-type]
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


# -- the sans-I/O core ----------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    (b"\0d7067f78d9827418/cryptsetup/data", KeyRequest("cryptsetup", "data")),
    (b"\0ab/cryptsetup-tpm2/data", KeyRequest("cryptsetup-tpm2", "data")),
    (b"\0ab/cryptsetup/with space+dots.1", KeyRequest("cryptsetup", "with space+dots.1")),
    ("", None),                                  # unbound client
    ("/run/some/path", None),                    # path-bound: not systemd
    (b"\0ab/cryptsetup/", None),                 # no volume
    (b"\0/cryptsetup/data", None),               # no random part
    (b"\0ab/cryptsetup/a/b", None),              # a slash cannot be in a volume name
    (b"\0ab/cryptsetup/\xff", None),             # not UTF-8
    (b"\0abcryptsetupdata", None),
])
def test_parse_peer_address(address: str | bytes, expected: KeyRequest | None) -> None:
    assert parse_peer_address(address) == expected


def test_decide() -> None:
    managed = {"data"}.__contains__
    assert decide(ROOT, b"\0ab/cryptsetup/data", managed) == SendKey("data")
    assert decide(PeerCred(9, 65534, 65534), b"\0ab/cryptsetup/data", managed) == Decline(
        "peer uid 65534 is not root", "data")
    other = decide(ROOT, b"\0ab/cryptsetup/other", managed)
    assert other == Decline("volume is not managed by bootkey", "other")
    tpm = decide(ROOT, b"\0ab/cryptsetup-tpm2/data", managed)
    assert isinstance(tpm, Decline) and "token blob" in tpm.reason
    assert isinstance(decide(ROOT, "", managed), Decline)


def test_decide_asks_is_managed_only_for_root_key_requests() -> None:
    asked: list[str] = []

    def managed(v: str) -> bool:
        asked.append(v)
        return True

    decide(PeerCred(1, 1000, 1000), b"\0ab/cryptsetup/data", managed)
    decide(ROOT, b"\0ab/cryptsetup-pkcs11/data", managed)
    assert asked == []


# -- the server over real sockets ----------------------------------------------------


def test_root_client_gets_the_key_verbatim_and_the_buffer_is_wiped(
        serve: Callable[..., KeySocketServer], sock_path: Path) -> None:
    p = Provider()
    serve(p)
    assert systemd_client(sock_path, "data") == KEYS["data"]
    assert systemd_client(sock_path, "logs") == KEYS["logs"]
    assert p.calls == ["data", "logs"]
    wait_for(lambda: all(b.closed for b in p.given))


def test_key_bytes_never_reach_the_log(serve: Callable[..., KeySocketServer], sock_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    key = b"UNIQUE-KEY-MARKER-" + os.urandom(8).hex().encode()
    KEYS["marked"] = key
    # Attached directly: bootkey.journal.setup() (run by any cli test) turns off
    # propagation to the root logger, where caplog listens by default.
    bootkey_log = logging.getLogger("bootkey")
    bootkey_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="bootkey"):
            serve(Provider(), managed={"marked", "data"})
            assert systemd_client(sock_path, "marked") == key
            assert systemd_client(sock_path, "other") == b""
    finally:
        bootkey_log.removeHandler(caplog.handler)
        del KEYS["marked"]
    assert any("sent the key" in r.getMessage() for r in caplog.records)
    for r in caplog.records:
        text = r.getMessage() + repr(r.args) + repr(r.__dict__)
        assert "UNIQUE-KEY-MARKER" not in text


def test_socket_file_and_directory_are_private(serve: Callable[..., KeySocketServer],
                                               sock_path: Path) -> None:
    serve(Provider())
    assert sock_path.stat().st_mode & 0o777 == 0o600
    assert sock_path.parent.stat().st_mode & 0o777 == 0o700


def test_unknown_volume_is_declined_with_zero_bytes(serve: Callable[..., KeySocketServer],
                                                    sock_path: Path) -> None:
    p = Provider()
    serve(p)
    assert systemd_client(sock_path, "not-ours") == b""
    assert p.calls == []


def test_token_phase_requests_are_declined(serve: Callable[..., KeySocketServer],
                                           sock_path: Path) -> None:
    p = Provider()
    serve(p)
    assert systemd_client(sock_path, "data", phase="cryptsetup-tpm2") == b""
    assert p.calls == []


def test_provider_without_a_key_declines(serve: Callable[..., KeySocketServer],
                                         sock_path: Path) -> None:
    p = Provider()
    serve(p, managed={"data", "nokey"})
    assert systemd_client(sock_path, "nokey") == b""
    assert p.calls == ["nokey"]


_CLIENT = """
import os, secrets, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(f"\\0{secrets.token_hex(8)}/cryptsetup/data".encode())
s.connect(sys.argv[1]); s.shutdown(socket.SHUT_WR); s.settimeout(10)
out = b""
while chunk := s.recv(4096):
    out += chunk
print(os.getuid(), len(out))
"""


# The unprivileged client runs the system interpreter: the test's own may live under
# /root, which uid 65534 cannot enter. It needs only the standard library.
_PLAIN_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach (pytest's tmp_path is under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="bootkey-ks-"))
    os.chmod(d, 0o755)  # noqa: S103 - uid 65534 must reach it, on purpose
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_non_root_peer_is_refused(open_dir: Path,
                                  serve: Callable[..., KeySocketServer]) -> None:
    """Defence in depth: even when a socket is reachable by others (here a
    world-writable one passed in as if by socket activation), uid != 0 gets nothing."""
    path = open_dir / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o666)  # noqa: S103 - reachable by others, on purpose
    listener.listen(8)
    p = Provider()
    serve(p, activated_fds={listener.detach(): "cryptsetup"})
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         _PLAIN_PYTHON, "-c", _CLIENT, str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()
    assert out == ["65534", "0"]
    assert p.calls == []
    # and root through the same socket still gets it
    assert systemd_client(path, "data") == KEYS["data"]


def test_non_root_cannot_even_reach_the_default_layout(open_dir: Path) -> None:
    sock_path = open_dir / "run-bootkey" / "cryptsetup.sock"
    srv = KeySocketServer(KeysocketConfig(path=sock_path), Provider(),
                          set(KEYS).__contains__, activated_fds={})
    srv.start()
    try:
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             _PLAIN_PYTHON, "-c", _CLIENT, str(sock_path)],
            check=False, capture_output=True, text=True, timeout=30,
        )
    finally:
        srv.stop()
    assert r.returncode != 0 and "PermissionError" in r.stderr


def test_slow_provider_is_bounded_by_the_deadline_and_its_late_key_wiped(
        serve: Callable[..., KeySocketServer], sock_path: Path) -> None:
    gate = threading.Event()
    p = Provider(gate)
    serve(p, timeout=0.4)
    t0 = time.monotonic()
    assert systemd_client(sock_path, "data") == b""
    elapsed = time.monotonic() - t0
    assert 0.35 <= elapsed < 2.0, elapsed
    gate.set()  # the provider answers late: the key must be wiped, never sent
    wait_for(lambda: len(p.given) == 1 and p.given[0].closed)


def test_slow_is_managed_is_bounded_by_the_deadline_too(sock_path: Path) -> None:
    """Deciding whether a volume is managed may scan devices; that too must not hold
    systemd-cryptsetup past the deadline."""
    gate = threading.Event()

    def slow_managed(volume: str) -> bool:
        gate.wait(30)
        return True

    cfg = KeysocketConfig(path=sock_path, timeout=0.3)
    p = Provider()
    with KeySocketServer(cfg, p, slow_managed, activated_fds={}):
        t0 = time.monotonic()
        assert systemd_client(sock_path, "data") == b""
        assert time.monotonic() - t0 < 2.0
        gate.set()
        wait_for(lambda: len(p.given) == 1 and p.given[0].closed)


def test_concurrent_clients_are_served_in_parallel(
        serve: Callable[..., KeySocketServer], sock_path: Path) -> None:
    n = 8
    barrier = threading.Barrier(n, timeout=10)
    volumes = [f"v{i}" for i in range(n)]
    keys = {v: os.urandom(64) for v in volumes}

    def provider(volume: str, deadline: float) -> SecretBuffer | None:
        barrier.wait()  # only returns once all n are inside the provider at once
        return SecretBuffer.from_bytes(keys[volume])

    cfg = KeysocketConfig(path=sock_path, timeout=15)
    with KeySocketServer(cfg, provider, set(volumes).__contains__, activated_fds={}):
        results: dict[str, bytes] = {}
        threads = [threading.Thread(target=lambda v=v: results.__setitem__(
            v, systemd_client(sock_path, v))) for v in volumes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert results == keys


def test_connections_over_the_limit_are_declined_at_once(
        serve: Callable[..., KeySocketServer], sock_path: Path) -> None:
    gate = threading.Event()
    p = Provider(gate)
    serve(p, timeout=20, max_connections=1)
    first: list[bytes] = []
    t = threading.Thread(target=lambda: first.append(systemd_client(sock_path, "data")))
    t.start()
    wait_for(lambda: p.calls == ["data"])
    t0 = time.monotonic()
    assert systemd_client(sock_path, "logs") == b""
    assert time.monotonic() - t0 < 2.0
    gate.set()
    t.join(10)
    assert first == [KEYS["data"]]


def test_stop_removes_the_socket_it_bound_and_start_replaces_a_stale_one(
        sock_path: Path) -> None:
    cfg = KeysocketConfig(path=sock_path, timeout=5)
    srv = KeySocketServer(cfg, Provider(), set(KEYS).__contains__, activated_fds={})
    srv.start()
    srv.stop()
    assert not sock_path.exists()
    # a stale socket node from a crash: connect gives ECONNREFUSED, which
    # systemd-cryptsetup treats as fatal, so start() must replace it
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()
    with KeySocketServer(cfg, Provider(), set(KEYS).__contains__, activated_fds={}):
        assert systemd_client(sock_path, "data") == KEYS["data"]


def test_stopping_leaves_an_inherited_socket_listening(tmp_path: Path) -> None:
    """With socket activation the listening socket is systemd's too: stopping the agent
    must not shut it down, or the next boot-time connection could not re-activate it.
    A second server in the same process (a restart) serves the queued client."""
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    fds = {listener.fileno(): "cryptsetup"}
    cfg = KeysocketConfig(path=tmp_path / "unused" / "x.sock", timeout=5)
    first = KeySocketServer(cfg, Provider(), set(KEYS).__contains__, activated_fds=fds)
    first.start()
    assert first.activated
    assert systemd_client(path, "data") == KEYS["data"]
    first.stop()
    assert path.exists()
    # the socket still accepts into its backlog while no agent runs ...
    got: list[bytes] = []
    client = threading.Thread(target=lambda: got.append(systemd_client(path, "logs")))
    client.start()
    # ... and the next agent answers that waiting client
    with KeySocketServer(cfg, Provider(), set(KEYS).__contains__, activated_fds=fds):
        client.join(10)
    assert got == [KEYS["logs"]]
    assert not (tmp_path / "unused").exists()
    listener.close()


def test_refuses_a_shared_directory_or_a_non_socket(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)  # noqa: S103 - the shared directory under test
    srv = KeySocketServer(KeysocketConfig(path=shared / "s.sock"), Provider(),
                          set(KEYS).__contains__, activated_fds={})
    with pytest.raises(ConfigError, match=r"not private .*mode 0755"):
        srv.start()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "s.sock").write_text("not a socket")
    srv = KeySocketServer(KeysocketConfig(path=private / "s.sock"), Provider(),
                          set(KEYS).__contains__, activated_fds={})
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        srv.start()
    assert (private / "s.sock").read_text() == "not a socket"


_ACTIVATED_CHILD = """
import sys, logging
from pathlib import Path
from bootkey.config import KeysocketConfig
from bootkey.keysocket import KeySocketServer
from bootkey_core.secret import SecretBuffer
cfg = KeysocketConfig(path=Path(sys.argv[1]), timeout=5)
srv = KeySocketServer(cfg, lambda v, d: SecretBuffer.from_bytes(b"activated-" + v.encode()),
                      lambda v: v == "data")
srv.start()
print("activated" if srv.activated else "bound", flush=True)
sys.stdin.read()   # serve until the test closes our stdin
srv.stop()
"""


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed")
def test_socket_activation_with_a_real_listen_fd(tmp_path: Path) -> None:
    """systemd-socket-activate binds the socket, waits for the first connection, then
    execs the agent with LISTEN_FDS=1/LISTEN_PID/LISTEN_FDNAMES: the connection that
    arrived before the agent existed is answered, as at boot."""
    sock = tmp_path / "activated.sock"
    unused = tmp_path / "never-created" / "x.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), "--fdname=cryptsetup",
         sys.executable, "-c", _ACTIVATED_CHILD, str(unused)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(sock.exists, timeout=10)
        assert systemd_client(sock, "data") == b"activated-data"
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "activated"
        assert systemd_client(sock, "other") == b""
        assert not unused.parent.exists()
    finally:
        proc.communicate(timeout=10)
    assert proc.returncode == 0, proc.stderr


# -- /run/cryptsetup-keys.d placement --------------------------------------------------


def test_place_key_links(tmp_path: Path) -> None:
    keys_dir = tmp_path / "cryptsetup-keys.d"
    sock = Path("/run/bootkey/cryptsetup.sock")
    links = place_key_links(["data", "logs"], sock, keys_dir)
    assert sorted(p.name for p in links) == ["data.key", "logs.key"]
    assert all(os.readlink(p) == str(sock) for p in links)
    assert keys_dir.stat().st_mode & 0o777 == 0o700
    # another tool's key file is never touched
    (keys_dir / "theirs.key").write_bytes(b"x")
    os.symlink("/elsewhere", keys_dir / "other.key")
    # idempotent; a volume that is no longer managed loses its link
    links = place_key_links(["data", "theirs"], sock, keys_dir)
    assert [p.name for p in links] == ["data.key"]
    assert sorted(p.name for p in keys_dir.iterdir()) == ["data.key", "other.key", "theirs.key"]
    assert (keys_dir / "theirs.key").read_bytes() == b"x"
    remove_key_links(sock, keys_dir)
    assert sorted(p.name for p in keys_dir.iterdir()) == ["other.key", "theirs.key"]
    with pytest.raises(ValueError, match="not a usable key file name"):
        place_key_links(["../etc"], sock, keys_dir)


def test_server_links_volumes_to_the_socket_it_serves(tmp_path: Path) -> None:
    """With an inherited socket the links must name *its* path, not the config's."""
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    keys_dir = tmp_path / "keys.d"
    cfg = KeysocketConfig(path=tmp_path / "unused" / "x.sock", timeout=5)
    srv = KeySocketServer(cfg, Provider(), set(KEYS).__contains__,
                          activated_fds={listener.fileno(): "cryptsetup"})
    srv.start()
    try:
        assert srv.listening_path == path
        links = srv.link_volumes(["data"], keys_dir)
        assert [os.readlink(p) for p in links] == [str(path)]
        # systemd-cryptsetup opens the link, gets ENXIO, connects to what it names
        assert systemd_client(links[0], "data") == KEYS["data"]
    finally:
        srv.stop()
    assert list(keys_dir.iterdir()) == []
    listener.close()


# -- the real systemd-cryptsetup as the client ------------------------------------------


@pytest.fixture
def luks_image(tmp_path: Path) -> Path:
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    img = tmp_path / "vol.img"
    make_image(img, passphrase=KEYS["data"])
    return img


def _attach(volume: str, img: Path, keyfile: str) -> subprocess.CompletedProcess[str]:
    # Activation itself fails on hosts without device-mapper; the key exchange before
    # it is what is under test. headless/tries=1: never prompt, one attempt.
    return subprocess.run(
        [str(SYSTEMD_CRYPTSETUP), "attach", volume, str(img), keyfile, "headless=true,tries=1"],
        check=False, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(not SYSTEMD_CRYPTSETUP.exists(), reason="systemd-cryptsetup not installed")
def test_real_systemd_cryptsetup_fetches_the_key_from_the_socket(
        serve: Callable[..., KeySocketServer], sock_path: Path, luks_image: Path) -> None:
    p = Provider()
    serve(p)
    _attach("data", luks_image, str(sock_path))
    assert p.calls == ["data"]
    wait_for(lambda: len(p.given) == 1 and p.given[0].closed)
    # a volume bootkey does not manage: declined, and systemd-cryptsetup finishes
    r = _attach("other", luks_image, str(sock_path))
    assert p.calls == ["data"]
    assert r.returncode != 0


@pytest.mark.skipif(not SYSTEMD_CRYPTSETUP.exists(), reason="systemd-cryptsetup not installed")
def test_real_systemd_cryptsetup_finds_the_keys_d_link(
        serve: Callable[..., KeySocketServer], sock_path: Path, luks_image: Path) -> None:
    """crypttab keyfile `none`: systemd-cryptsetup looks up
    /run/cryptsetup-keys.d/<volume>.key itself and follows our link to the socket."""
    volume = f"bktest-{secrets.token_hex(4)}"
    KEYS[volume] = KEYS["data"]
    p = Provider()
    serve(p, managed={volume})
    try:
        place_key_links([volume], sock_path)
        _attach(volume, luks_image, "none")
        assert p.calls == [volume]
    finally:
        remove_key_links(sock_path)
        del KEYS[volume]
    assert not Path(f"/run/cryptsetup-keys.d/{volume}.key").exists()
