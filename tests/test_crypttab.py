# ruff: noqa: E501 - expected output is compared line for line, as operators will paste it
"""`bootkey crypttab`: the pure renderer, then its output fed to systemd's real generators
and checked for boot deadlocks offline (tests/support/bootgraph.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootkey import cli
from bootkey.crypttab import Mode, Options, device_unit, render, systemd_escape
from tests.support import bootgraph
from tests.support.luksimg import make_image


@dataclass(frozen=True)
class Vol:
    name: str
    device: str
    luks_uuid: str
    readonly: bool = False
    discard: bool = False


U1 = "5c1e0a52-8d1b-4f7e-9a7b-0c3f2a1d9e01"
U2 = "0f9d3c2b-1a2b-4c5d-8e9f-a0b1c2d3e4f5"
VOLS = [Vol("data-1", "/dev/vdb", U1), Vol("logs", "/dev/vdc", U2, readonly=True, discard=True)]


def test_render_socket_mode() -> None:
    assert render(VOLS, Mode.SOCKET) == f"""\
# /etc/crypttab — systemd-cryptsetup reads each key from bootkey's socket
# (enable it: systemctl enable --now bootkey-cryptsetup.socket)
data-1  UUID={U1}  /run/bootkey/cryptsetup.sock  luks,_netdev,nofail,headless=true,x-systemd.device-timeout=2min
logs  UUID={U2}  /run/bootkey/cryptsetup.sock  luks,_netdev,nofail,headless=true,x-systemd.device-timeout=2min,readonly,discard

# /etc/fstab — mount points under /mnt; adjust to taste
/dev/mapper/data-1  /mnt/data-1  auto  defaults,_netdev,nofail,x-systemd.device-timeout=2min  0  2
/dev/mapper/logs  /mnt/logs  auto  defaults,_netdev,nofail,x-systemd.device-timeout=2min  0  2
"""


def test_render_agent_mode() -> None:
    out = render(VOLS, Mode.AGENT, Options(mount_root="/srv", fstype="ext4",
                                           device_timeout="90s"))
    assert out == """\
# /etc/crypttab — nothing: bootkey.service opens these volumes itself
# (enable it: systemctl enable --now bootkey.service)

# /etc/fstab — mount points under /srv; adjust to taste
/dev/mapper/data-1  /srv/data-1  ext4  defaults,_netdev,nofail,x-systemd.device-timeout=90s,x-systemd.wanted-by=dev-mapper-data\\x2d1.device  0  2
/dev/mapper/logs  /srv/logs  ext4  defaults,_netdev,nofail,x-systemd.device-timeout=90s,x-systemd.wanted-by=dev-mapper-logs.device  0  2
"""


def test_render_without_volumes_says_what_to_do() -> None:
    assert "bootkey enroll" in render([], Mode.SOCKET)


def test_a_device_without_a_uuid_is_named_by_path() -> None:
    assert "  /dev/vdb  " in render([Vol("d", "/dev/vdb", "")], Mode.SOCKET)


@pytest.mark.parametrize(("vol", "opts", "msg"), [
    (Vol("my data", "/dev/vdb", U1), Options(), "volume name 'my data'"),
    (Vol("d", "/dev/vdb", U1), Options(mount_root="/mnt/#x"), "mount point"),
    (Vol("d", "/dev/vdb", U1), Options(device_timeout="soon"), "not a systemd time span"),
])
def test_refuses_what_cannot_be_written(vol: Vol, opts: Options, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        render([vol], Mode.SOCKET, opts)


@pytest.mark.parametrize("path", ["/dev/mapper/data-1", "/dev/mapper/a.b_c:d+e",
                                  "/dev/mapper/x y", "/dev/mapper/.hidden"])
def test_device_unit_matches_systemd_escape(path: str) -> None:
    want = subprocess.run(["systemd-escape", "--path", "--suffix=device", path],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert device_unit(path) == want


def test_escape_of_a_plain_name() -> None:
    assert systemd_escape("data") == "data"


def test_command_prints_lines_for_configured_volumes(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "vol.img"
    make_image(img)
    uuid = subprocess.run(["cryptsetup", "luksUUID", str(img)], capture_output=True, text=True,
                          check=True).stdout.strip()
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text(f'host_id = "h1"\n[[volume]]\nname = "data"\ndevice = "{img}"\n'
                   '[keysocket]\npath = "/run/bk/k.sock"\n')
    rc = cli.main(["--config", str(cfg), "crypttab", "--mode", "socket"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"data  UUID={uuid}  /run/bk/k.sock  luks,_netdev,nofail" in out
    rc = cli.main(["--config", str(cfg), "crypttab", "--device-timeout", "soon"])
    assert rc == 64
    assert "not a systemd time span" in capsys.readouterr().err


# -- through systemd's own generators ----------------------------------------------------

needs_systemd = pytest.mark.skipif(not bootgraph.available(), reason="systemd not installed")


@needs_systemd
def test_socket_mode_lines_generate_units_that_cannot_deadlock(tmp_path: Path) -> None:
    root = bootgraph.BootRoot(tmp_path / "root")
    root.enable("bootkey.service", "multi-user.target")
    root.enable("bootkey-cryptsetup.socket", "sockets.target")
    text = render(VOLS, Mode.SOCKET)
    crypttab = "\n".join(line for line in text.splitlines() if "UUID=" in line)
    fstab = "\n".join(line for line in text.splitlines() if line.startswith("/dev/mapper"))
    root.generate(crypttab=crypttab + "\n", fstab=fstab + "\n")
    unit = (root.etc / "systemd-cryptsetup@data\\x2d1.service").read_text()
    assert "After=remote-fs-pre.target" in unit
    assert "/run/bootkey/cryptsetup.sock" in unit
    # nofail: wanted, not required, by remote-cryptsetup.target, and nothing in sysinit
    assert (root.etc / "remote-cryptsetup.target.wants" / "systemd-cryptsetup@data\\x2d1.service"
            ).is_symlink()
    assert not (root.etc / "cryptsetup.target.requires").exists()
    # systemd-cryptsetup blocks reading the socket until bootkey answers
    for v in ("data\\x2d1", "logs"):
        root.waits_on_bootkey(f"systemd-cryptsetup@{v}.service")
    assert root.cycles() == []


@needs_systemd
def test_agent_mode_mounts_follow_their_device(tmp_path: Path) -> None:
    root = bootgraph.BootRoot(tmp_path / "root")
    root.enable("bootkey.service", "multi-user.target")
    text = render(VOLS, Mode.AGENT)
    root.generate(fstab="\n".join(line for line in text.splitlines()
                                  if line.startswith("/dev/mapper")) + "\n")
    # mounted whenever the agent opens the volume: at boot, after Vault comes back, on
    # hot-plug; not part of remote-fs.target, so boot never waits for it
    assert (root.etc / "dev-mapper-data\\x2d1.device.wants" / "mnt-data\\x2d1.mount").is_symlink()
    assert not (root.etc / "remote-fs.target.wants").exists()
    root.waits_on_bootkey("mnt-data\\x2d1.mount")
    assert root.cycles() == []


@needs_systemd
def test_the_deadlock_check_catches_a_local_volume_waiting_on_bootkey(tmp_path: Path) -> None:
    """Control: a crypttab line without nofail/_netdev is ordered before sysinit.target,
    which bootkey.service is after: the check must report the loop."""
    root = bootgraph.BootRoot(tmp_path / "root")
    root.enable("bootkey.service", "multi-user.target")
    root.enable("bootkey-cryptsetup.socket", "sockets.target")
    root.generate(crypttab=f"data UUID={U1} /run/bootkey/cryptsetup.sock luks,headless=true\n")
    root.waits_on_bootkey("systemd-cryptsetup@data.service")
    loop = "\n".join(root.cycles())
    assert "systemd-cryptsetup@data.service/start" in loop
    assert "bootkey.service/start" in loop
