"""Random bytes for data keys, ivs and nonces without a system call per request.

Every getrandom(2) is a system call, and on the VMs bootkey is measured on a system call
costs several microseconds: one per generate request was 6 % of the server's time
(py-spy, 2026-11-22). OpenSSL's DRBG (`ssl.RAND_bytes`) is no way out: its fork check
makes a getpid(2) call per draw. So the kernel's randomness is drawn 16 KiB at a time
into a `SecretBuffer` (locked, not in core dumps, wiped in a forked child) and handed
out in pieces; each piece is zeroed in the pool as it is taken, so the pool never holds
a byte that was already used.

Fork safety: a child (the SO_REUSEPORT workers are forked) must never hand out what the
parent did. `os.register_at_fork` empties the pool in the child, and MADV_WIPEONFORK
has already zeroed the child's copy of the pages.
"""

from __future__ import annotations

import io
import os
import threading

from bootkey_core.secret import SecretBuffer

POOL_SIZE = 16 * 1024  # about 270 data keys per read of /dev/urandom


class RandomPool:
    """Thread-safe; `take(n)` for small n (larger requests go to os.urandom directly)."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self._size = size
        self._buf: SecretBuffer | None = None  # made on first use, not at import
        self._pos = size  # empty
        self._zeros = memoryview(bytes(size))
        self._lock = threading.Lock()
        self._source: io.FileIO | None = None  # /dev/urandom, kept open
        self.refills = 0  # for tests

    def take(self, n: int) -> bytes:
        if n > self._size // 4:
            return os.urandom(n)
        with self._lock:
            pos = self._pos
            if pos + n > self._size:
                self._refill()
                pos = 0
            view = self._buf.view  # type: ignore[union-attr]  # set by _refill
            out = bytes(view[pos:pos + n])
            view[pos:pos + n] = self._zeros[:n]
            self._pos = pos + n
            return out

    def _refill(self) -> None:
        if self._buf is None:
            self._buf = SecretBuffer(self._size)
            os.getrandom(1)  # blocks until the kernel's generator is seeded (early boot)
        if self._source is None:
            self._source = io.FileIO("/dev/urandom", "rb")
        # Straight into the locked pages: no copy of future keys on Python's heap.
        if self._source.readinto(self._buf.view) != self._size:
            raise OSError("short read from /dev/urandom")
        self._pos = 0
        self.refills += 1

    def forget(self) -> None:
        """In a forked child: nothing the parent drew may be handed out here."""
        self._lock = threading.Lock()  # the parent may have held it while forking
        if self._buf is not None:
            self._buf.view[:] = self._zeros
        self._pos = self._size


_pool = RandomPool()
os.register_at_fork(after_in_child=_pool.forget)


def random_bytes(n: int) -> bytes:
    """`n` bytes from the kernel's generator (as os.urandom), mostly without a syscall."""
    return _pool.take(n)
