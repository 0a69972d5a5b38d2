"""Hot-plug: the pure event filter with plain dicts, then the real netlink monitor.

This host has no udevd, so the live test uses kernel uevents (what the watcher falls
back to without udevd): a loop device over a LUKS image, and `change` written to its
sysfs uevent file. The VM test proves the udev path end to end.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bootkey.hotplug import HotplugWatcher, is_luks_event
from tests.support.luksimg import make_image

LUKS = {"SUBSYSTEM": "block", "DEVNAME": "/dev/vdb", "DEVTYPE": "disk",
        "ID_FS_TYPE": "crypto_LUKS"}


def never(_: str) -> int | None:
    raise AssertionError("probe must not run when udev already probed the device")


@pytest.mark.parametrize(("action", "props", "expected"), [
    ("add", LUKS, "/dev/vdb"),
    ("change", LUKS, "/dev/vdb"),
    ("remove", LUKS, None),
    ("bind", LUKS, None),
    (None, LUKS, None),
    ("add", {**LUKS, "ID_FS_TYPE": "ext4"}, None),
    ("add", {**LUKS, "SUBSYSTEM": "net"}, None),
    ("add", {k: v for k, v in LUKS.items() if k != "DEVNAME"}, None),
    # the plaintext side of an opened mapping
    ("add", {**LUKS, "DEVNAME": "/dev/dm-3", "DM_UUID": "CRYPT-LUKS2-abc-data"}, None),
    ("add", {**LUKS, "SYSTEMD_READY": "0"}, None),
])
def test_filter_with_udev_properties(action: str | None, props: dict[str, str],
                                     expected: str | None) -> None:
    assert is_luks_event(action, props, never) == expected


def test_filter_probes_when_udev_did_not() -> None:
    seen: list[str] = []

    def probe(dev: str) -> int | None:
        seen.append(dev)
        return 2 if dev == "/dev/loop3" else None

    kernel = {"SUBSYSTEM": "block", "DEVTYPE": "disk"}
    assert is_luks_event("change", {**kernel, "DEVNAME": "loop3"}, probe) == "/dev/loop3"
    assert is_luks_event("add", {**kernel, "DEVNAME": "loop4"}, probe) is None
    assert seen == ["/dev/loop3", "/dev/loop4"]


def test_filter_probe_reads_the_real_magic(tmp_path: Path) -> None:
    luks_img, plain = tmp_path / "luks.img", tmp_path / "plain.img"
    make_image(luks_img)
    plain.write_bytes(bytes(4096))
    ev = {"SUBSYSTEM": "block"}
    assert is_luks_event("add", {**ev, "DEVNAME": str(luks_img)}) == str(luks_img)
    assert is_luks_event("add", {**ev, "DEVNAME": str(plain)}) is None
    assert is_luks_event("add", {**ev, "DEVNAME": str(tmp_path / "gone")}) is None


@pytest.fixture
def loop() -> Iterator[Callable[[Path], str]]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup not installed")
    attached: list[str] = []

    def attach(img: Path) -> str:
        r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                           text=True, timeout=30, check=False)
        if r.returncode != 0:
            pytest.skip(f"no loop devices here: {r.stderr.strip()}")
        attached.append(r.stdout.strip())
        return attached[-1]

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


def uevent(devnode: str, action: str = "change") -> None:
    """Ask the kernel to re-announce the device, as `udevadm trigger` does."""
    try:
        Path(f"/sys/class/block/{Path(devnode).name}/uevent").write_text(action)
    except OSError as e:
        pytest.skip(f"cannot trigger uevents here: {e}")


def test_watcher_reports_a_luks_device_from_real_uevents(
        tmp_path: Path, loop: Callable[[Path], str]) -> None:
    luks_img, plain = tmp_path / "luks.img", tmp_path / "plain.img"
    make_image(luks_img)
    with open(plain, "wb") as f:
        f.truncate(32 << 20)
    luks_dev, plain_dev = loop(luks_img), loop(plain)
    got: list[str] = []
    arrived = threading.Event()

    def on_luks_device(dev: str) -> None:
        got.append(dev)
        if dev == luks_dev:
            arrived.set()

    with HotplugWatcher(on_luks_device) as w:
        assert w.source in ("udev", "kernel")
        uevent(plain_dev)   # first: events are delivered in order, so once the LUKS
        uevent(luks_dev)    # one arrives, the plain one has been filtered out
        assert arrived.wait(10), got
    assert plain_dev not in got


def test_a_failing_callback_does_not_stop_the_watcher(
        tmp_path: Path, loop: Callable[[Path], str]) -> None:
    img = tmp_path / "luks.img"
    make_image(img)
    dev = loop(img)
    calls: list[str] = []
    second = threading.Event()

    def on_luks_device(d: str) -> None:
        if d != dev:
            return
        calls.append(d)
        if len(calls) == 1:
            raise RuntimeError("agent bug")
        second.set()

    with HotplugWatcher(on_luks_device):
        uevent(dev)
        uevent(dev)
        assert second.wait(10), calls


def test_stop_returns_promptly_without_events() -> None:
    w = HotplugWatcher(lambda d: None)
    w.start()
    t = threading.Thread(target=w.stop)
    t.start()
    t.join(5)
    assert not t.is_alive()
