"""bootkey's root-only run directory: header backups and per-device locks.

Invariant: a header backup holds every keyslot, so it lives only in a directory that is
ours and mode 0700 (default /run/bootkey, a tmpfs: it never persists; $BOOTKEY_RUN_DIR
overrides it), never in a shared /tmp. One enroll/rotate/unenroll works on a device at a
time (`flock`).

Crash windows: a backup file may be left behind (the next run on that volume replaces or
removes it; resuming never needs it); a lock is freed by the kernel when its holder dies,
even on SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootkey_core.errors import DeviceBusy, DeviceNotFound, UsageError

RUN_DIR = Path("/run/bootkey")  # tmpfs: a header backup (every keyslot) never persists


def _private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700; refuse a directory others can read or that is not ours:
    a header backup holds every keyslot."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as e:
        raise UsageError(f"{path}: cannot create bootkey's run directory: {e.strerror} — run "
                         "as root, or set BOOTKEY_RUN_DIR to a root-only directory") from None
    if st.st_uid != os.geteuid():
        raise UsageError(f"{path}: cannot keep header backups there: owned by uid "
                         f"{st.st_uid}, not us — remove it or set BOOTKEY_RUN_DIR")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class RunDir:
    root: Path = RUN_DIR

    @classmethod
    def from_env(cls) -> RunDir:
        return cls(Path(os.environ.get("BOOTKEY_RUN_DIR") or RUN_DIR))

    @property
    def backups(self) -> Path:
        return self.root / "backup"

    def backup_path(self, luks_uuid: str) -> Path:
        return _private_dir(self.backups) / f"{luks_uuid}.luksheader"

    @contextlib.contextmanager
    def lock(self, device: str) -> Iterator[None]:
        """One enroll/rotate/unenroll per device at a time (flock; freed by the kernel
        if we die). `enroll --format` also opens a block device O_EXCL, as mkfs does
        (check_block_device_free), to refuse one that is mounted or mapped."""
        try:
            st = os.stat(device)
        except OSError as e:
            raise DeviceNotFound(f"{device}: cannot lock: {e.strerror} — check the device")\
                from None
        ident = f"{st.st_rdev:x}" if stat.S_ISBLK(st.st_mode) else f"{st.st_dev:x}-{st.st_ino:x}"
        path = _private_dir(self.root / "lock") / f"{ident}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeviceBusy(f"{device}: busy: another bootkey enroll/rotate/unenroll is "
                                 "working on it — wait for it to finish") from None
            yield
        finally:
            os.close(fd)


