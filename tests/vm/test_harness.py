"""The harness's own plumbing, without booting: per-boot tar disks round-trip, the
initramfs module closure, journal timestamps. (Booting is tests/vm/test_smoke.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.vm import harness


def test_tar_disk_round_trips_files_modes_and_nested_paths(tmp_path: Path) -> None:
    files = {"/etc/bootkey/bootkey.toml": (b"x = 1\n", 0o600),
             "/vmtest/test.sh": (b"#!/bin/sh\n", 0o755),
             "/vmtest/key": (bytes(range(256)), 0o600)}
    disk = harness.tar_disk(tmp_path / "cfg.img", files, size=1 << 20)
    assert disk.stat().st_size == 1 << 20
    assert harness.read_tar_disk(disk) == {k.lstrip("/"): v for k, (v, _m) in files.items()}
    # What the guest runs: GNU tar extracting from the raw device, modes kept.
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-xf", str(disk), "-C", str(root)], check=True, timeout=30)
    assert (root / "vmtest/test.sh").stat().st_mode & 0o777 == 0o755
    assert (root / "etc/bootkey/bootkey.toml").stat().st_mode & 0o777 == 0o600


def test_tar_disk_refuses_data_larger_than_the_disk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        harness.tar_disk(tmp_path / "d.img", {"/big": (b"\0" * 4096, 0o644)}, size=2048)


def test_an_untouched_result_disk_reads_as_no_results(tmp_path: Path) -> None:
    disk = tmp_path / "out.img"
    with disk.open("wb") as f:
        f.truncate(1 << 20)
    assert harness.read_tar_disk(disk) == {}


def testmodule_closure_follows_modules_dep(tmp_path: Path) -> None:
    mods = tmp_path / "lib/modules/6.1.0-test"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n"
        "kernel/drivers/md/dm-mod.ko:\n")
    k = harness.Kernel("6.1.0-test", tmp_path)
    assert sorted(harness.module_closure(k, ["virtio_blk", "dm_crypt", "absent"])) == [
        "kernel/drivers/block/virtio_blk.ko", "kernel/drivers/md/dm-crypt.ko",
        "kernel/drivers/md/dm-mod.ko", "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko"]


def test_journal_monotonic_finds_the_first_matching_line() -> None:
    journal = ("[    1.500000] vm systemd[1]: Starting bootkey.service...\n"
               "[   31.848388] vm bootkey[204]: volume data1 opened\n"
               "[   32.000000] vm bootkey[204]: volume data1 opened\n")
    assert harness.journal_monotonic(journal, r"volume data1 opened") == 31.848388
    assert harness.journal_monotonic(journal, r"never") is None
