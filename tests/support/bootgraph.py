"""An offline systemd boot graph: the host's units, bootkey's units, and units the real
generators make from crypttab/fstab text, checked with `systemd-analyze verify --root`.

What it can prove without booting: unit files parse, ExecStart exists (a stub), and the
boot transaction (multi-user.target) has no ordering cycle. A blocking wait that is not
an ordering edge (systemd-cryptsetup reading a socket whose service has not started) is
modelled by a drop-in making the waiting unit `Requires=`+`After=` bootkey.service: a
deadlock then shows up as an ordering cycle.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
HOST_UNITS = Path("/lib/systemd/system")
GENERATORS = Path("/lib/systemd/system-generators")
STUB = "#!/bin/sh\nexit 0\n"


@functools.cache
def _host_units_copy() -> Path:
    """One copy of the host's units per test process; each BootRoot hard-links it."""
    tmp = Path(tempfile.mkdtemp(prefix="bootkey-hostunits-"))
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(HOST_UNITS, tmp / "system", symlinks=True)
    return tmp / "system"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def available() -> bool:
    return shutil.which("systemd-analyze") is not None and HOST_UNITS.is_dir()


class BootRoot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc/systemd/system"
        self.etc.mkdir(parents=True)
        shutil.copytree(_host_units_copy(), root / "usr/lib/systemd/system", symlinks=True,
                        copy_function=_link_or_copy)
        for exe in ("usr/bin/bootkey", "lib/systemd/systemd-cryptsetup", "bin/kill"):
            p = root / exe
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(STUB)
            p.chmod(0o755)
        for unit in ("bootkey.service", "bootkey-cryptsetup.socket"):
            shutil.copy(UNITS / unit, self.etc / unit)

    def enable(self, unit: str, target: str) -> None:
        wants = self.etc / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")

    def generate(self, *, crypttab: str | None = None, fstab: str | None = None) -> None:
        """Run the real generators on this text, output into /etc/systemd/system."""
        env = dict(os.environ)
        gens = []
        if crypttab is not None:
            (self.root / "crypttab").write_text(crypttab)
            env["SYSTEMD_CRYPTTAB"] = str(self.root / "crypttab")
            gens.append("systemd-cryptsetup-generator")
        if fstab is not None:
            (self.root / "fstab").write_text(fstab)
            env["SYSTEMD_FSTAB"] = str(self.root / "fstab")
            gens.append("systemd-fstab-generator")
        for g in gens:
            out = str(self.etc)
            subprocess.run([str(GENERATORS / g), out, out, out], env=env, check=True,
                           capture_output=True, timeout=30)

    def waits_on_bootkey(self, unit: str) -> None:
        d = self.etc / f"{unit}.d"
        d.mkdir(exist_ok=True)
        (d / "zz-model-waits-on-bootkey.conf").write_text(
            "[Unit]\nRequires=bootkey.service\nAfter=bootkey.service\n")

    def verify(self, *units: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug")
        return subprocess.run(
            ["systemd-analyze", "verify", "--man=no", f"--root={self.root}", *units],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )

    def cycles(self, target: str = "multi-user.target") -> list[str]:
        """The debug lines describing ordering cycles in the transaction that starts
        `target` (systemd-analyze exits 0 even then, breaking them by deleting jobs)."""
        r = self.verify(target)
        return [line for line in (r.stdout + r.stderr).splitlines()
                if "ordering cycle" in line or "Found dependency on" in line]
