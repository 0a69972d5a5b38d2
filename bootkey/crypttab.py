"""/etc/crypttab and /etc/fstab lines for bootkey volumes, with the boot pitfalls designed out.

Pure: `render(volumes, mode, ...)` turns values into text; the command does the I/O.

Invariant: no line this module prints can make boot wait on bootkey for ever.
- Every crypttab and fstab line is `nofail`: an unreachable Vault never fails or stalls
  boot; the volume simply is not there yet.
- Every line is `_netdev`: the key comes over the network, so the unit belongs after
  remote-fs-pre.target, not in sysinit. (crypttab(5): the mount must be `_netdev` too.)
  bootkey.service is ordered after sysinit.target, so a volume ordered before
  cryptsetup.target/local-fs.target that waits on bootkey would be a dependency loop.
- `headless=true`: no password prompt nobody will answer at an unattended boot.
- Agent mode mounts are `x-systemd.wanted-by=` the mapped device: a volume the agent
  opens late (Vault came back, or a disk was hot-plugged) is mounted when it appears.
  Not `x-systemd.requires=bootkey.service`: Requires= propagates stop and restart, so
  `systemctl restart bootkey` (or a package upgrade) would unmount the file systems.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath
from typing import Protocol


class Mode(Enum):
    AGENT = "agent"    # bootkey.service opens the volumes itself
    SOCKET = "socket"  # systemd-cryptsetup opens them, reading keys from the key socket


class VolumeLike(Protocol):
    """What render needs of bootkey.unlock.Volume."""

    @property
    def name(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def luks_uuid(self) -> str: ...


@dataclass(frozen=True)
class Options:
    socket_path: str = "/run/bootkey/cryptsetup.sock"
    mount_root: str = "/mnt"
    fstype: str = "auto"
    # How long systemd waits for a device before giving up on that unit. Both are
    # bounded: with `nofail` nothing else waits on them.
    device_timeout: str = "2min"


def systemd_escape(s: str) -> str:
    """systemd-escape(1) of a unit-name component: '/' → '-', other specials → \\xNN."""
    out = []
    for i, ch in enumerate(s):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_")) or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def device_unit(path: str) -> str:
    """`/dev/mapper/data-1` → `dev-mapper-data\\x2d1.device` (systemd-escape --path)."""
    return systemd_escape(path.strip("/")) + ".device"


_FIELD_OK = re.compile(r"^[^\s#]+$")
_TIMESPAN = re.compile(r"^(infinity|\d+(\.\d+)?(us|ms|s|sec|m|min|h|hr)?)$")


def _field(value: str, what: str) -> str:
    # crypttab and fstab split on whitespace and treat '#' as a comment: such values
    # cannot be written without octal escapes; refuse rather than print a broken line.
    if not _FIELD_OK.match(value):
        raise ValueError(f"{what} {value!r}: contains whitespace or '#', cannot go in a"
                         " crypttab/fstab field — rename it")
    return value


def crypttab_line(vol: VolumeLike, opts: Options, *, readonly: bool = False,
                  discard: bool = False) -> str:
    source = f"UUID={vol.luks_uuid}" if vol.luks_uuid else vol.device
    flags = ["luks", "_netdev", "nofail", "headless=true",
             f"x-systemd.device-timeout={opts.device_timeout}"]
    if readonly:
        flags.append("readonly")
    if discard:
        flags.append("discard")
    return "  ".join([_field(vol.name, "volume name"), _field(source, "device"),
                      _field(opts.socket_path, "socket path"), ",".join(flags)])


def fstab_line(vol: VolumeLike, mode: Mode, opts: Options) -> str:
    mapped = f"/dev/mapper/{vol.name}"
    mountpoint = str(PurePosixPath(opts.mount_root) / vol.name)
    flags = ["defaults", "_netdev", "nofail", f"x-systemd.device-timeout={opts.device_timeout}"]
    if mode is Mode.AGENT:
        flags.append(f"x-systemd.wanted-by={device_unit(mapped)}")
    return "  ".join([_field(mapped, "device"), _field(mountpoint, "mount point"),
                      _field(opts.fstype, "file system type"), ",".join(flags), "0", "2"])


def render(volumes: Sequence[VolumeLike], mode: Mode, opts: Options = Options()) -> str:
    """The text `bootkey crypttab` prints: commented sections ready to paste."""
    if not _TIMESPAN.match(opts.device_timeout):
        raise ValueError(f"device timeout {opts.device_timeout!r}: not a systemd time span"
                         " — use e.g. 90s, 2min or infinity")
    out: list[str] = []
    if not volumes:
        return ("# no volumes: enroll one with `bootkey enroll`, or list it as [[volume]]"
                " in the config\n")
    if mode is Mode.SOCKET:
        out += [
            "# /etc/crypttab — systemd-cryptsetup reads each key from bootkey's socket",
            "# (enable it: systemctl enable --now bootkey-cryptsetup.socket)",
        ]
        out += [crypttab_line(v, opts, readonly=_attr(v, "readonly"),
                              discard=_attr(v, "discard")) for v in volumes]
    else:
        out += [
            "# /etc/crypttab — nothing: bootkey.service opens these volumes itself",
            "# (enable it: systemctl enable --now bootkey.service)",
        ]
    out += ["", f"# /etc/fstab — mount points under {opts.mount_root}; adjust to taste"]
    out += [fstab_line(v, mode, opts) for v in volumes]
    return "\n".join(out) + "\n"


def _attr(v: object, name: str) -> bool:
    return bool(getattr(v, name, False))
