"""The VM harness itself: a systemd guest boots, runs the packaged bootkey, and opens a LUKS2
disk made on the host with real dm-crypt (which the host kernel lacks)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bootkey import __version__
from tests.vm import harness

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(harness.QEMU is None, reason="qemu-system-x86_64 is not installed "
                       "(scripts/setup.sh installs qemu-system-x86)"),
]

SMOKE = """#!/bin/sh
out=$1
set -x
bootkey --version > "$out/version.txt"
dpkg-query -W -f '${Status}' bootkey > "$out/dpkg-status.txt"
# The shipped units, checked where they are installed (real paths, real systemd).
rc=0; systemd-analyze verify bootkey.service bootkey-cryptsetup.socket \
  > "$out/verify.txt" 2>&1 || rc=$?; echo $rc > "$out/verify.rc"
systemd-analyze security --no-pager bootkey.service > "$out/security.txt" 2>&1 || true
cryptsetup open --key-file /vmtest/disk.key /dev/disk/by-id/virtio-data1 data1
mkdir -p /mnt/data1 && mount /dev/mapper/data1 /mnt/data1
cp /mnt/data1/hello.txt "$out/hello.txt"
echo "written by the guest" > /mnt/data1/guest.txt
umount /mnt/data1 && cryptsetup close data1
"""


def test_guest_boots_runs_packaged_bootkey_and_opens_a_host_made_luks2_disk(
    plain_image: Path, tmp_path: Path
) -> None:
    key = os.urandom(64)
    disk = harness.luks_disk(tmp_path / "data1.img", key, {"hello.txt": b"hello from the host\n"})
    data = {"/vmtest/test.sh": (SMOKE.encode(), 0o755), "/vmtest/disk.key": (key, 0o600)}
    with harness.VM(plain_image, tmp_path / "vm", data=data,
                    disks=[harness.Disk(disk, "data1")]) as vm:
        vm.wait_console(r"VMTEST: ready")
        res = vm.wait()
    assert res.rc == 0, res.describe()
    assert res.text("version.txt").strip() == f"bootkey {__version__}"
    assert res.text("hello.txt") == "hello from the host\n"
    assert "VMTEST: done rc=0" in res.console
    assert res.text("dpkg-status.txt") == "install ok installed"
    assert res.text("verify.rc").strip() == "0", res.text("verify.txt")
    exposure = re.search(r"Overall exposure level for bootkey\.service: (\d+\.\d+)",
                         res.text("security.txt"))
    assert exposure, res.text("security.txt")
    print(f"VM-SECURITY bootkey.service exposure {exposure.group(1)} (in the guest)")
