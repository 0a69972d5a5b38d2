"""`kes.server.run` with SO_REUSEPORT workers, as a real process tree."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kes.server_util import H2Client, Pki, Reader, connect, request, wait_for
from tests.support.certs import make_leaf

SCRIPT = r"""
import os, signal, sys
from kes.messages import Response
from kes.server import run
from kes.tls_context import TLSConfig

hups = 0
def on_hup(signum, frame):
    global hups
    hups += 1
signal.signal(signal.SIGHUP, on_hup)

async def handler(request):
    return Response(200, b'{"pid":%d,"hups":%d}' % (os.getpid(), hups))

cert, key = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
run(handler, TLSConfig(cert, key), port=0, workers=int(sys.argv[3]),
    ready=lambda port: print(port, flush=True))
print("parent done", flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its reaper is missing


def _children(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: set[int] = set()
    for task in tasks.iterdir():
        text = (task / "children").read_text().split()
        found.update(int(c) for c in text)
    return found


@dataclass
class Running:
    proc: subprocess.Popen[str]
    port: int


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


def _start(pki: Pki, tmp_path: Path, workers: int) -> Running:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert_pem)
    key.write_bytes(pki.server.key_pem)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(cert), str(key), str(workers)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line
    return Running(proc, int(line))


@pytest.fixture
def workers(pki: Pki, tmp_path: Path) -> Iterator[Running]:
    running = _start(pki, tmp_path, 2)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)


def test_single_process_serves_and_stops_on_sigterm(pki: Pki, tmp_path: Path) -> None:
    running = _start(pki, tmp_path, 1)
    try:
        ctx = pki.client_context(make_leaf(None, "minio", kind="ec", client=True))
        pid, _, _ = _pid_of_answer(running.port, ctx)
        assert pid == running.proc.pid  # no fork with one worker
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(15) == 0
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)


def _pid_of_answer(port: int, ctx: ssl.SSLContext,
                   session: ssl.SSLSession | None = None) -> tuple[int, bool, ssl.SSLSession]:
    with connect(port, ctx, session=session) as s:
        s.sendall(request("GET", "/version"))
        pid = Reader(s).response().json()["pid"]
        assert isinstance(pid, int)
        assert s.session is not None
        return pid, bool(s.session_reused), s.session


def test_two_workers_serve_share_tickets_and_stop_on_sigterm(
    pki: Pki, workers: Running
) -> None:
    ctx = pki.client_context(make_leaf(None, "minio", kind="ed25519", client=True))
    worker_pids = _children(workers.proc.pid)
    assert len(worker_pids) == 2

    seen: set[int] = set()
    pid, _, session = _pid_of_answer(workers.port, ctx)
    seen.add(pid)
    resumed = 0
    for _ in range(60):  # connections spread over both workers by the 4-tuple hash
        pid, reused, _ = _pid_of_answer(workers.port, ctx, session)
        seen.add(pid)
        resumed += reused
        if len(seen) == 2 and resumed >= 10:
            break
    assert seen == worker_pids
    # The context (and its ticket keys) was built before forking: every resumption works
    # whichever worker answers.
    assert resumed >= 10

    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(15) == 0
    assert workers.proc.stdout is not None
    assert "parent done" in workers.proc.stdout.read()
    assert not any(_alive(p) for p in worker_pids)


def test_workers_die_with_a_killed_parent(workers: Running) -> None:
    worker_pids = _children(workers.proc.pid)
    assert len(worker_pids) == 2
    workers.proc.kill()
    workers.proc.wait(10)
    wait_for(lambda: not any(_alive(p) for p in worker_pids), what="orphaned workers to exit")


def test_a_dying_worker_stops_the_service(workers: Running) -> None:
    worker_pids = sorted(_children(workers.proc.pid))
    os.kill(worker_pids[0], signal.SIGKILL)
    # Half a service on a shared port is worse than none: the parent stops the rest and
    # exits non-zero so that systemd restarts the whole unit.
    assert workers.proc.wait(15) != 0
    assert not _alive(worker_pids[1])


def test_sighup_to_the_parent_reaches_every_worker_once(pki: Pki, workers: Running) -> None:
    ctx = pki.client_context(make_leaf(None, "minio", kind="ec", client=True))
    worker_pids = _children(workers.proc.pid)
    workers.proc.send_signal(signal.SIGHUP)  # as systemd's ExecReload=kill -HUP $MAINPID
    reloaded: dict[int, int] = {}

    def both_reloaded() -> bool:
        with connect(workers.port, ctx) as s:
            s.sendall(request("GET", "/version"))
            answer = Reader(s).response().json()
        reloaded[int(answer["pid"])] = int(answer["hups"])  # type: ignore[call-overload]
        return set(reloaded) == worker_pids and set(reloaded.values()) == {1}

    wait_for(both_reloaded, what="both workers to see one SIGHUP")
    assert workers.proc.poll() is None  # the parent is still serving


def test_sigterm_sends_goaway_to_h2_clients_of_every_worker(pki: Pki, workers: Running) -> None:
    ctx = pki.client_context(make_leaf(None, "minio", kind="ed25519", client=True))
    clients: dict[int, H2Client] = {}
    for _ in range(60):  # connections spread over both workers by the 4-tuple hash
        client = H2Client(workers.port, ctx)
        pid = int(client.request("GET", "/version").json()["pid"])  # type: ignore[call-overload]
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if len(clients) == 2:
            break
    assert set(clients) == _children(workers.proc.pid)
    workers.proc.send_signal(signal.SIGTERM)
    for client in clients.values():
        assert client.wait_goaway().error_code == 0  # NO_ERROR: a graceful shutdown
        client.close()
    assert workers.proc.wait(15) == 0
