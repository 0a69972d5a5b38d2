"""Before `enroll --format`: is the device free (not mounted, mapped or held open) and
blank (no LUKS header, filesystem or partition table)?

Invariant: a device holding data is never formatted unless the operator said --force.

Crash windows: none (read-only).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from bootkey import _proc, luks
from bootkey_core.errors import DeviceBusy, NotBlank


def check_block_device_free(device: str) -> None:
    """For --format: a block device that is mounted or mapped is in use."""
    if not stat.S_ISBLK(os.stat(device).st_mode):
        return
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"{device}: busy: mounted, mapped or held open — unmount or "
                             "close it first") from None
        raise
    os.close(fd)


def blank_check(device: str) -> None:
    """Refuse to format over a LUKS header, filesystem or partition table (blkid -p)."""
    version = luks.probe_magic(device)
    if version is not None:
        raise NotBlank(f"{device}: holds a LUKS{version} header — refusing to format; "
                       "enroll it without --format, or add --force to destroy it")
    found = ""
    if shutil.which("blkid"):
        res = _proc.run(["blkid", "-p", "-o", "export", device], timeout=30.0)
        if res.returncode == 0:
            fields = dict(line.split("=", 1) for line in
                          res.stdout.decode(errors="replace").splitlines() if "=" in line)
            if "PTTYPE" in fields:
                found = f"a {fields['PTTYPE']} partition table"
            elif "TYPE" in fields:
                found = f"a {fields['TYPE']} signature"
    else:  # no blkid: anything but zeros in the first MiB counts as data
        with open(device, "rb") as f:
            if f.read(1 << 20).strip(b"\0"):
                found = "data"
    if found:
        raise NotBlank(f"{device}: holds {found} — refusing to format; add --force to "
                       "destroy it")

