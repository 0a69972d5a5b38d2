"""Notice LUKS devices that appear after boot (hot-plug, iSCSI login, a new partition).

`is_luks_event` is the pure filter: a udev event (action + properties) → the device node
to hand to the agent, or None. `HotplugWatcher` runs a pyudev netlink monitor on the
block subsystem in a thread and calls `on_luks_device(devnode)` for each match; the agent
decides whether the device carries this host's bootkey token or is configured, and
opening is idempotent, so duplicate events (udev sends `change` on every close after a
write) cost a header read, nothing more.

Where udevd runs, events come from it, after it has probed the device (ID_FS_TYPE) and
created the node. Where it does not (containers, an early-boot shell), kernel uevents are
used instead; they carry no ID_FS_TYPE, so the filter reads the LUKS magic itself.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bootkey import luks
from bootkey._wakeup import stop_thread

log = logging.getLogger(__name__)

ACTIONS = frozenset({"add", "change"})
# udevd's control socket: present while udevd runs (systemd-udevd.service, udev(7)).
UDEV_CONTROL = Path("/run/udev/control")


def is_luks_event(action: str | None, props: Mapping[str, str],
                  probe: Callable[[str], int | None] = luks.probe_magic) -> str | None:
    """The device node to unlock for this event, or None.

    >>> is_luks_event("add", {"SUBSYSTEM": "block", "DEVNAME": "/dev/vdb",
    ...                       "ID_FS_TYPE": "crypto_LUKS"})
    '/dev/vdb'
    """
    if action not in ACTIONS or props.get("SUBSYSTEM", "block") != "block":
        return None
    devname = props.get("DEVNAME")
    if not devname:
        return None
    if not devname.startswith("/"):
        devname = f"/dev/{devname}"  # kernel uevents name the node relative to /dev
    # An opened dm-crypt mapping is the *plaintext* side: never LUKS, never ours.
    if props.get("DM_UUID", "").startswith("CRYPT-"):
        return None
    # udev's own signal that a device is not ready to be used (e.g. an unconfigured
    # dm device or a multipath member): SYSTEMD_READY=0.
    if props.get("SYSTEMD_READY") == "0":
        return None
    fs_type = props.get("ID_FS_TYPE")
    if fs_type is not None:
        return devname if fs_type == "crypto_LUKS" else None
    # No probe result (no udevd, or the event came before blkid ran): read the magic.
    return devname if probe(devname) is not None else None


def udevd_running() -> bool:
    return UDEV_CONTROL.exists()


class HotplugWatcher:
    """Calls `on_luks_device(devnode)` from its own thread for each LUKS device event.

        watcher = HotplugWatcher(agent.on_luks_device)
        watcher.start()
        ...
        watcher.stop()

    `on_luks_device` runs in the watcher thread: hand slow work to a queue. An exception
    from it is logged and the watcher goes on.
    """

    def __init__(self, on_luks_device: Callable[[str], None], *, source: str | None = None,
                 probe: Callable[[str], int | None] = luks.probe_magic,
                 heartbeat: Callable[[], None] | None = None, tick: float = 10.0) -> None:
        self._on_luks_device = on_luks_device
        # called at least every `tick` seconds while the watcher runs (the watchdog)
        self._heartbeat = heartbeat
        self._tick = tick
        self._source = source
        self._probe = probe
        self._monitor: Any = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self.source: str | None = None

    def start(self) -> None:
        import pyudev  # imported here: only the agent needs libudev

        self.source = self._source or ("udev" if udevd_running() else "kernel")
        ctx = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(ctx, source=self.source)
        if self.source == "udev":
            # Filtering in the kernel (BPF) only works on udev-sourced messages.
            monitor.filter_by("block")
        monitor.start()
        self._monitor = monitor
        # A pipe to wake select() on stop: no polling interval, no lost events.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="hotplug", daemon=True)
        self._thread.start()
        log.info("hotplug: watching block devices (%s events)", self.source)

    def stop(self) -> None:
        if self._thread is None:
            return
        stop_thread(self._thread, self._wake_r, self._wake_w)
        self._thread = None
        self._monitor = None

    def __enter__(self) -> HotplugWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        monitor = self._monitor
        while True:
            if self._heartbeat is not None:
                self._heartbeat()
            try:
                ready, _, _ = select.select([monitor.fileno(), self._wake_r], [], [],
                                            self._tick if self._heartbeat else None)
            except OSError as e:
                log.warning("hotplug: monitor failed: %s; no longer watching", e)
                return
            if self._wake_r in ready:
                return
            # Drain everything that is queued; poll(0) never blocks.
            while (device := monitor.poll(timeout=0)) is not None:
                self._handle(device)

    def _handle(self, device: Any) -> None:
        try:
            props = {k: device.properties.get(k) for k in device.properties}
            action = device.action
        except Exception as e:  # a device that vanished while we read it
            log.debug("hotplug: cannot read an event: %s", e)
            return
        devnode = is_luks_event(action, props, self._probe)
        if devnode is None:
            return
        log.info("hotplug: LUKS device %s (%s)", devnode, action, extra={"DEVICE": devnode})
        try:
            self._on_luks_device(devnode)
        except Exception:
            log.exception("hotplug: handling %s failed", devnode, extra={"DEVICE": devnode})
