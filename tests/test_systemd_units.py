"""The shipped systemd units: they verify, their sandbox scores ≤ 5.0, and the values that
must agree with the code (socket path, fd name, exit codes) do."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest

from bootkey import keysocket
from bootkey.config import KeysocketConfig
from bootkey_core import errors
from tests.support import bootgraph

pytestmark = pytest.mark.skipif(not bootgraph.available(), reason="systemd not installed")
UNITS = bootgraph.UNITS
MAX_EXPOSURE = 5.0


def unit(name: str) -> dict[str, list[str]]:
    """Unit file → {"Section.Key": [values...]} (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.setdefault(f"{section}.{k}", []).append(v)
    return out


@pytest.fixture
def root(tmp_path: Path) -> bootgraph.BootRoot:
    return bootgraph.BootRoot(tmp_path / "root")


def test_units_verify(root: bootgraph.BootRoot) -> None:
    r = root.verify("/etc/systemd/system/bootkey.service",
                    "/etc/systemd/system/bootkey-cryptsetup.socket")
    assert r.returncode == 0, r.stderr
    ours = [line for line in r.stderr.splitlines()
            if "bootkey" in line and "Failed to parse system call" not in line
            and "debug" not in line.lower()]
    # Only warnings count: debug chatter mentions the units too.
    problems = [line for line in ours if re.search(r"(?i)invalid|unknown|ignoring|error", line)]
    assert problems == []


def test_verify_fails_without_the_executable(root: bootgraph.BootRoot) -> None:
    (root.root / "usr/bin/bootkey").unlink()
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root.root}",
                        "/etc/systemd/system/bootkey.service"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0
    assert "/usr/bin/bootkey" in r.stderr


def test_sandbox_exposure_is_at_most_5(root: bootgraph.BootRoot) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root.root}",
                        "--no-pager", "/etc/systemd/system/bootkey.service"],
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for bootkey\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_service_ordering_never_waits_for_network_online() -> None:
    svc = unit("bootkey.service")
    assert svc["Service.Type"] == ["notify"]
    assert svc["Service.ExecStart"] == ["/usr/bin/bootkey agent"]
    after = " ".join(svc["Unit.After"]).split()
    assert {"network.target", "nss-lookup.target"} <= set(after)
    everything = " ".join(v for vs in svc.values() for v in vs)
    assert "network-online.target" not in everything
    assert "wait-online" not in everything
    assert "Unit.Before" not in svc
    assert "Unit.DefaultDependencies" not in svc  # after sysinit: see docs/systemd.md


def test_service_limits_and_credentials() -> None:
    svc = unit("bootkey.service")
    assert svc["Service.LimitMEMLOCK"] == ["infinity"]
    assert svc["Service.LoadCredentialEncrypted"] == ["secret-id:/etc/bootkey/secret-id.cred"]
    assert svc["Service.WatchdogSec"]
    assert svc["Service.TimeoutStartSec"] != ["infinity"]
    # `systemctl reload bootkey` is SIGHUP to the agent (tests/test_agent_ops.py)
    assert svc["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_restart_prevented_exactly_for_errors_a_restart_cannot_fix() -> None:
    codes = {int(c) for c in unit("bootkey.service")["Service.RestartPreventExitStatus"][0].split()}
    assert codes == {errors.UsageError.exit_code, errors.VaultDenied.exit_code,
                     errors.ConfigError.exit_code, errors.VaultAuthFailed.exit_code}
    # and never for what is worth retrying
    assert errors.VaultUnavailable.exit_code not in codes
    assert errors.DeadlineExceeded.exit_code not in codes


def test_socket_agrees_with_the_code() -> None:
    sock = unit("bootkey-cryptsetup.socket")
    assert sock["Socket.ListenStream"] == [str(KeysocketConfig().path)]
    assert sock["Socket.SocketMode"] == ["0600"]
    assert sock["Socket.DirectoryMode"] == ["0700"]
    assert sock["Socket.FileDescriptorName"] == [keysocket.FD_NAME]
    assert sock["Socket.Service"] == ["bootkey.service"]
    # listening before any encrypted volume is attached, and pulling that target in
    assert "cryptsetup-pre.target" in sock["Unit.Before"][0].split()
    assert sock["Unit.Wants"] == ["cryptsetup-pre.target"]
    assert sock["Unit.DefaultDependencies"] == ["no"]


def test_tmpfiles_create_what_the_sandbox_writes() -> None:
    lines = [ln.split() for ln in (UNITS / "bootkey.tmpfiles").read_text().splitlines()
             if ln and not ln.startswith("#")]
    created = {f[1]: f[2] for f in lines if f[0] == "d"}
    rw = unit("bootkey.service")["Service.ReadWritePaths"][0].split()
    for path in rw:
        assert created.get(path.lstrip("-")) == "0700", path


def test_enabled_units_boot_without_ordering_cycles(root: bootgraph.BootRoot) -> None:
    root.enable("bootkey.service", "multi-user.target")
    root.enable("bootkey-cryptsetup.socket", "sockets.target")
    assert root.cycles() == []


def test_unit_files_parse_as_ini() -> None:
    # A cheap guard against stray syntax that systemd would only warn about.
    for name in ("bootkey.service", "bootkey-cryptsetup.socket"):
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.read_string((UNITS / name).read_text())
        assert cp.sections()
