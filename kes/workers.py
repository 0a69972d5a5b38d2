"""The SO_REUSEPORT process supervisor behind `kes.server.run(workers=N)`.

The parent binds N listening sockets on one port, forks one worker per socket and then
only supervises: it forwards SIGTERM/SIGINT as SIGTERM (and SIGHUP, if the caller handles
it, for config reload), and if a worker dies it stops the others and raises. Workers die
with the parent (PR_SET_PDEATHSIG), so a parent killed without forwarding cannot leave
orphans accepting on the port next to a restarted server (KES-TLS-STACKS.md pitfall 5).

Knows nothing about TLS or HTTP: what a worker does with its socket is the `serve`
callable the caller passes (kes/server.py serves a `Server` on it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def listener(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def run(
    serve: Callable[[socket.socket], None],
    host: str,
    port: int,
    workers: int,
    *,
    ready: Callable[[int], None] | None = None,
    grace: float = 1.0,
) -> None:
    """Fork `workers` processes that each run `serve(sock)` on their own SO_REUSEPORT
    socket; return after SIGTERM/SIGINT once they have exited (waiting `grace` + 5 s
    before killing them). Call from the main thread: PR_SET_PDEATHSIG fires when the
    forking *thread* ends."""
    socks = [listener(host, port, reuse_port=True)]
    bound = socks[0].getsockname()[1]
    socks += [listener(host, bound, reuse_port=True) for _ in range(workers - 1)]
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    if callable(signal.getsignal(signal.SIGHUP)):
        watched.add(signal.SIGHUP)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    parent = os.getpid()
    children: dict[int, int] = {}
    try:
        for i, sock in enumerate(socks):
            pid = os.fork()
            if pid == 0:  # worker
                code = 0
                try:
                    die_with_parent(parent)
                    for other in socks:
                        if other is not sock:
                            other.close()
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                    serve(sock)
                except BaseException:  # a worker must not return into run()'s caller
                    log.exception("kes: worker %d failed", i)
                    code = 1
                finally:
                    logging.shutdown()
                    os._exit(code)
            children[pid] = i
        for sock in socks:
            sock.close()
        if ready is not None:
            ready(bound)
        _supervise(children, watched, grace)
    finally:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _supervise(children: dict[int, int], watched: set[signal.Signals], grace: float) -> None:
    """Wait for a stop signal or a dead worker, passing SIGHUP on; then stop all workers
    and reap them. Entries are removed from `children` as they are reaped."""
    failed = False
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo == signal.SIGHUP:
            for pid in children:
                os.kill(pid, signal.SIGHUP)
            continue
        if info.si_signo != signal.SIGCHLD:
            break
        if _reap(children):
            failed = True
            break
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    give_up = time.monotonic() + grace + 5.0
    while children and time.monotonic() < give_up:
        signal.sigtimedwait({signal.SIGCHLD}, 0.1)
        _reap(children)
    if failed:
        raise RuntimeError("kes: a worker process exited unexpectedly; all workers stopped")


def _reap(children: dict[int, int]) -> bool:
    """Collect exited workers; True if any did."""
    any_exited = False
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return True
        if pid == 0:
            break
        if children.pop(pid, None) is not None:
            any_exited = True
            log.info("kes: worker %d exited with status %d", pid, os.waitstatus_to_exitcode(status))
    return any_exited
