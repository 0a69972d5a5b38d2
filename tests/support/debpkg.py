"""Build the bootkey .deb once per test process, from a snapshot of the working tree.

The snapshot keeps the build stable while other work edits the checkout, and lets a test
build the very same inputs twice to prove the package is reproducible. SOURCE_DATE_EPOCH
is fixed so the .deb (and so the VM image cache keyed by its hash) changes only when its
content does, not with every commit.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_EPOCH = "1700000000"
# What build-deb.sh reads from the tree.
_INPUTS = ("pyproject.toml", "README.md", "bootkey", "bootkey_core", "kes", "systemd", "docs",
           "packaging")
BUILD_TIMEOUT = 600.0  # cold pip cache: downloads every wheel and compiles systemd-python


@dataclass(frozen=True)
class Snapshot:
    root: Path
    constraints: Path


def snapshot(dest: Path) -> Snapshot:
    """Copy the package's inputs and the tested dependency versions to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in _INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    constraints = dest / "constraints.txt"
    pip = REPO / ".venv" / "bin" / "pip"
    text = ""
    if pip.exists():
        out = subprocess.run(
            [str(pip), "freeze", "--exclude-editable"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
        text = "".join(
            line + "\n" for line in out.splitlines() if not line.startswith("bootkey")
        )
    constraints.write_text(text)
    return Snapshot(dest, constraints)


def build(snap: Snapshot, out_dir: Path) -> Path:
    """Run packaging/build-deb.sh on a snapshot; return the .deb's path."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": TEST_EPOCH,
        "BOOTKEY_CONSTRAINTS": str(snap.constraints),
    }
    for k in ("PIP_CERT", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL"):
        if k in os.environ:
            env[k] = os.environ[k]
    proc = subprocess.run(
        ["bash", str(snap.root / "packaging" / "build-deb.sh"), str(out_dir)],
        check=False, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"build-deb.sh failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@functools.cache
def built() -> tuple[Snapshot, Path]:
    """The snapshot and .deb for this test process (built on first use)."""
    work = Path(tempfile.mkdtemp(prefix="bootkey-debtest-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    snap = snapshot(work / "src")
    return snap, build(snap, work / "out")
