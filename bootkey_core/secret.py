"""Locked memory for key material, and process hardening.

Invariant: a key lives in a `SecretBuffer` — an anonymous private mmap that is mlocked
(never swapped), excluded from core dumps (MADV_DONTDUMP), not inherited by children
(MADV_WIPEONFORK) and overwritten with zeros when closed. Its repr never shows the bytes
and it cannot be pickled, str()-ed or bytes()-ed by accident.

`harden_process()` is the agent's start: mlockall(MCL_CURRENT|MCL_FUTURE) so the copies
Python makes anyway (HTTP bodies, JSON, base64) are locked too; PR_SET_DUMPABLE=0 and
RLIMIT_CORE=0 so no core dump or ptrace by other users can read them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hmac
import logging
import mmap
import os
import resource
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from bootkey_core.errors import MemoryLockError

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MCL_CURRENT, MCL_FUTURE = 1, 2
THREAD_STACK = 1 << 20
PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
_MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18)


class SecretBuffer:
    """Fixed-size, mlocked, wiped-on-close memory for one secret.

    >>> with SecretBuffer.from_bytes(bytearray(b"k" * 64)) as key:
    ...     len(key)
    64
    """

    __slots__ = ("_closed", "_len", "_mm", "_view")

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("SecretBuffer size must be positive")
        self._len = size
        # Round up to a page: mlock and madvise work on whole pages.
        pages = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        self._mm = mmap.mmap(-1, pages, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._closed = False
        for advice in (mmap.MADV_DONTDUMP, _MADV_WIPEONFORK):
            # old kernels lack these: mlockall + RLIMIT_CORE=0 still cover the buffer
            with contextlib.suppress(OSError):
                self._mm.madvise(advice)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        # Over RLIMIT_MEMLOCK without CAP_IPC_LOCK mlock fails; mlockall (if it
        # succeeded) already covers this page, else harden_process has warned.
        if _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(pages)) != 0 and \
                not memory_locked():
            log.debug("mlock of a secret buffer failed: %s", os.strerror(ctypes.get_errno()))
        self._view = memoryview(self._mm)[:size]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SecretBuffer:
        """Copy `data` in; if it is a bytearray, wipe the source."""
        buf = cls(len(data))
        buf._view[:] = data
        if isinstance(data, bytearray):
            data[:] = bytes(len(data))
        return buf

    @classmethod
    def random(cls, size: int) -> SecretBuffer:
        buf = cls(size)
        buf._view[:] = os.urandom(size)
        return buf

    def __len__(self) -> int:
        return self._len

    @property
    def view(self) -> memoryview:
        """A writable view of the secret; valid until close()."""
        if self._closed:
            raise ValueError("SecretBuffer is closed")
        return self._view

    def equals(self, other: SecretBuffer | bytes | bytearray | memoryview) -> bool:
        """Constant-time comparison."""
        o = other.view if isinstance(other, SecretBuffer) else other
        return hmac.compare_digest(self.view, o)

    def close(self) -> None:
        if self._closed:
            return
        self._view[:] = bytes(self._len)
        self._view.release()
        self._mm.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nobody to tell
            self.close()

    def __repr__(self) -> str:
        return f"<SecretBuffer {self._len} bytes{' closed' if self._closed else ''}>"

    __str__ = __repr__

    def __bytes__(self) -> bytes:
        raise TypeError("SecretBuffer refuses bytes(): use .view where a copy is unavoidable")

    def __reduce__(self) -> Any:
        raise TypeError("SecretBuffer cannot be pickled")


def memory_locked() -> bool:
    """True when VmLck covers the process (mlockall succeeded)."""
    return vm_locked_kib() > 0 and _mlockall_done


_mlockall_done = False


def vm_locked_kib(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Hardening:
    mlocked: bool
    mlock_error: str | None
    dumpable: bool


def harden_process(*, require_mlock: bool = False) -> Hardening:
    """Lock all memory, forbid core dumps and ptrace-by-uid. Call before any key exists.

    Raises MemoryLockError if mlockall is refused and `require_mlock` is set.
    """
    global _mlockall_done
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    dumpable = bool(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    err: str | None = None
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        _mlockall_done = True
        # MCL_FUTURE locks (and so faults in) every new thread's whole stack: glibc's
        # default 8 MiB made each unlock worker cost ~5 ms to start. 1 MiB is ample for
        # Python threads (3.11 keeps Python frames off the C stack).
        threading.stack_size(THREAD_STACK)
    else:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        err = (
            f"mlockall refused ({os.strerror(ctypes.get_errno())}); RLIMIT_MEMLOCK is "
            f"{'unlimited' if soft == resource.RLIM_INFINITY else f'{soft // 1024} KiB'}"
            " — run with LimitMEMLOCK=infinity or CAP_IPC_LOCK"
        )
        if require_mlock:
            raise MemoryLockError(f"memory: cannot lock: {err}")
        log.warning("memory not locked: %s; keys may be swapped out", err)
    return Hardening(mlocked=_mlockall_done, mlock_error=err, dumpable=dumpable)
