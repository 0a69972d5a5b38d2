"""Boot for real (issue 5): the packaged bootkey in a systemd guest opens LUKS2 volumes that
`bootkey enroll` enrolled on the host, with the keys in a host OpenBao that the guest
reaches only through one forwarded port.

Volumes are enrolled on the host with the host's bootkey (same code as the package), the
/etc/crypttab and /etc/fstab lines come from `bootkey crypttab`, and are baked into the
image (systemd reads them before any per-boot data could arrive). Everything per boot
(config, AppRole secret id, the guest-side test script) goes in on the bkcfg disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootkey import keystore
from bootkey.vault import VaultSession
from tests.support.bao import DevBao, free_port
from tests.support.proxy import LateProxy
from tests.support.scan import files_under, find_key
from tests.support.vaultenv import VaultEnv, provision
from tests.vm import harness

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(harness.QEMU is None, reason="qemu-system-x86_64 is not installed "
                       "(scripts/setup.sh installs qemu-system-x86)"),
]

ROOT_FSTAB = "LABEL=root / ext4 rw,errors=remount-ro 0 1\n"
_UUID_NS = uuid.UUID("6f1c7a52-3c1e-4d5e-9b0a-b007c0deb007")
AGENT_NAMES = ("data1", "data2", "data3")  # one agent-mode image serves every scenario

# Guest-side helpers, sourced by each scenario's script. Waits are bounded by uptime.
GUEST_LIB = r"""
out=$1
up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "VMTEST: $*" > /dev/console; }
wait_mounted() {  # wait_mounted SECONDS MOUNTPOINT...
  limit=$(( $(up | cut -d. -f1) + $1 )); shift
  for m in "$@"; do
    while ! mountpoint -q "$m"; do
      if [ "$(up | cut -d. -f1)" -ge "$limit" ]; then echo "timed out waiting for $m"; return 1; fi
      sleep 0.5
    done
  done
}
mono() {  # mono UNIT: when UNIT became active, in µs since the kernel started
  systemctl show -p ActiveEnterTimestampMonotonic --value "$1"
}
record() { for u in "$@"; do echo "$u=$(mono "$u")"; done >> "$out/times.txt"; }
"""


def _script(body: str) -> tuple[bytes, int]:
    return (("#!/bin/sh\nset -u\n" + GUEST_LIB + body).encode(), 0o755)


@dataclass
class Fleet:
    env: VaultEnv
    disks: dict[str, Path]
    uuids: dict[str, str]
    host_toml: Path

    def volume_keys(self, root_token: str) -> list[bytes]:
        """The volume keys `bootkey enroll` put in Vault, unsealed with a root token: what
        a leak would look like."""
        cfg = self.env.config()
        session = VaultSession.from_config(cfg, token=root_token)
        out = []
        for luks_uuid in self.uuids.values():
            loc = keystore.location_for(cfg, harness.MACHINE_ID, luks_uuid)
            entry = keystore.read_entry(session, loc)
            assert entry is not None, loc.display
            for sealed in entry.keys:
                with keystore.unseal(session, loc, sealed) as buf:
                    out.append(bytes(buf.view))
        return out

    def crypttab(self, mode: str) -> tuple[str, str]:
        """`bootkey crypttab --mode MODE` on the host: (crypttab lines, fstab lines)."""
        proc = host_bootkey(self.host_toml, "crypttab", "--mode", mode)
        assert proc.returncode == 0, proc.stderr
        crypttab, _, fstab = proc.stdout.partition("\n\n")
        return crypttab + "\n", fstab

    def guest_data(self, test_body: str, *, mode: str = "agent", deadline: str = "3m",
                   ready_timeout: str = "30s",
                   credential: bool = False) -> dict[str, tuple[bytes, int]]:
        approle = (f'role_id = "{self.env.role_id}"\n'
                   + ('secret_id_credential = "secret-id"\n' if credential else
                      'secret_id_file = "/etc/bootkey/secret-id"\n'))
        toml = (
            # host_id is left out: the guest's /etc/machine-id (harness.MACHINE_ID) is used
            f'[vault]\naddress = ["{harness.VAULT_GUEST_URL}"]\ntimeout = "5s"\n'
            f"[vault.approle]\n{approle}"
            f'[vault.kv]\nmount = "{self.env.kv_mount}"\nversion = {self.env.kv_version}\n'
            f'[unlock]\nmode = "{mode}"\ndeadline = "{deadline}"\n'
            f'ready_timeout = "{ready_timeout}"\n'
            'retry_initial = "500ms"\nretry_max = "3s"\n'
        )
        data = {"/etc/bootkey/bootkey.toml": (toml.encode(), 0o600),
                "/vmtest/test.sh": _script(test_body)}
        if not credential:
            data["/etc/bootkey/secret-id"] = (self.env.secret_id_file.read_bytes(), 0o600)
        return data


def host_bootkey(config: Path, *args: str, stdin: str | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bootkey.cli", "--config", str(config), *args],
        input=stdin,
        env={"PATH": os.environ["PATH"], "LC_ALL": "C", **(env or {})},
        capture_output=True, text=True, timeout=120, check=False,
    )
    return proc


def enroll_fleet(bao: DevBao, workdir: Path, scenario: str, names: tuple[str, ...]) -> Fleet:
    """LUKS2 disks (random passphrase, then `bootkey enroll` adds the Vault key), for the
    guest's host id. UUIDs are fixed per scenario so crypttab lines, and so images, cache."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = provision(bao.client(), workdir / "vault", host_id=harness.MACHINE_ID)
    disks: dict[str, Path] = {}
    uuids: dict[str, str] = {}
    passphrases: dict[str, str] = {}
    for name in names:
        img = workdir / f"{name}.img"
        passphrases[name] = os.urandom(32).hex()  # the volume's pre-existing key
        uuids[name] = str(uuid.uuid5(_UUID_NS, f"{scenario}/{name}"))
        harness.luks_disk(img, passphrases[name].encode(),
                          {"hello.txt": f"{name} says hello\n".encode()}, uuid=uuids[name])
        disks[name] = img
    host_toml = workdir / "host.toml"
    host_toml.write_text(env.toml(f'search = ["{workdir}/*.img"]\n'))
    for name, img in disks.items():
        proc = host_bootkey(host_toml, "enroll", str(img), "--name", name,
                            "--unlock-key-file", "-", stdin=passphrases[name],
                            env={"VAULT_TOKEN": env.enroll_token})
        assert proc.returncode == 0, f"enroll {name}: {proc.stdout}{proc.stderr}"
    return Fleet(env, disks, uuids, host_toml)


def agent_image(deb: Path, fleet: Fleet) -> Path:
    _crypttab, fstab = fleet.crypttab("agent")
    assert "x-systemd.wanted-by=dev-mapper-data1.device" in fstab, fstab
    return harness.image(harness.ImageSpec(
        deb=deb, files={"/etc/fstab": ((ROOT_FSTAB + fstab).encode(), 0o644)},
        enable=["bootkey.service"]))


def times(res: harness.Result) -> dict[str, float]:
    """times.txt (UNIT=µs since kernel start) → seconds."""
    out = {}
    for line in res.text("times.txt").splitlines():
        unit, _, us = line.partition("=")
        if us.strip().isdigit() and int(us) > 0:
            out[unit] = int(us) / 1e6
    return out


def report(name: str, res: harness.Result) -> None:
    """Boot timings for docs/benchmarks.md, printed with -s and kept in the results dir."""
    t = times(res)
    line = f"VM-TIMING {name}: qemu wall {res.seconds:.1f} s; " + "; ".join(
        f"{u} {s:.1f} s" for u, s in sorted(t.items(), key=lambda kv: kv[1]))
    print(line)


# --- scenario 1 + 5: agent mode at boot, then a hot-plugged disk -------------------------

AGENT_BODY = r"""
wait_mounted 150 /mnt/data1 /mnt/data2 || exit 1
record dev-mapper-data1.device dev-mapper-data2.device mnt-data1.mount mnt-data2.mount \
       bootkey.service multi-user.target
cat /mnt/data1/hello.txt > "$out/data1.txt"
cat /mnt/data2/hello.txt > "$out/data2.txt"
systemctl is-active bootkey.service > "$out/agent-state.txt"
mark hotplug-now
wait_mounted 90 /mnt/data3 || exit 1
record mnt-data3.mount
cat /mnt/data3/hello.txt > "$out/data3.txt"
"""


def test_agent_opens_volumes_at_boot_and_a_hot_added_disk(
    vm_deb: Path, bao: DevBao, tmp_path: Path
) -> None:
    fleet = enroll_fleet(bao, tmp_path / "fleet", "agent", AGENT_NAMES)
    img = agent_image(vm_deb, fleet)
    disks = [harness.Disk(fleet.disks[n], n) for n in ("data1", "data2")]
    with harness.VM(img, tmp_path / "vm", data=fleet.guest_data(AGENT_BODY), disks=disks,
                    vault_port=bao.port) as vm:
        vm.wait_console(r"VMTEST: hotplug-now")
        vm.hotplug(harness.Disk(fleet.disks["data3"], "data3"))
        res = vm.wait()
    report("agent", res)
    assert res.rc == 0, res.describe()
    for n in AGENT_NAMES:
        assert res.text(f"{n}.txt") == f"{n} says hello\n", res.describe()
    assert res.text("agent-state.txt").strip() == "active"
    assert re.search(r"hotplug: \S+ appeared, unlocking data3", res.journal), res.describe()
    # No volume key reached the guest's disk (every block it wrote is in the overlay), its
    # journal or its console, in any encoding.
    keys = fleet.volume_keys(bao.root_token)
    assert len(keys) == len(AGENT_NAMES)
    blobs = list(files_under(tmp_path / "vm", skip_suffixes=(".payload",)))
    assert any(name.endswith("root.qcow2") for name, _ in blobs)
    for k in keys:
        assert find_key(k, blobs) == []


# --- scenario 2: socket mode via /etc/crypttab ------------------------------------------

SOCKET_BODY = r"""
wait_mounted 150 /mnt/data1 || exit 1
record bootkey-cryptsetup.socket systemd-cryptsetup@data1.service dev-mapper-data1.device \
       mnt-data1.mount bootkey.service
cat /mnt/data1/hello.txt > "$out/data1.txt"
systemctl is-active systemd-cryptsetup@data1.service > "$out/cryptsetup-state.txt"
"""


def test_socket_mode_crypttab_gets_the_key_from_the_bootkey_socket(
    vm_deb: Path, bao: DevBao, tmp_path: Path
) -> None:
    fleet = enroll_fleet(bao, tmp_path / "fleet", "socket", ("data1",))
    crypttab, fstab = fleet.crypttab("socket")
    assert "/run/bootkey/cryptsetup.sock" in crypttab, crypttab
    img = harness.image(harness.ImageSpec(
        deb=vm_deb,
        files={"/etc/fstab": ((ROOT_FSTAB + fstab).encode(), 0o644),
               "/etc/crypttab": (crypttab.encode(), 0o644)},
        enable=["bootkey-cryptsetup.socket"]))
    with harness.VM(img, tmp_path / "vm", data=fleet.guest_data(SOCKET_BODY, mode="socket"),
                    disks=[harness.Disk(fleet.disks["data1"], "data1")],
                    vault_port=bao.port) as vm:
        res = vm.wait()
    report("socket", res)
    assert res.rc == 0, res.describe()
    assert res.text("data1.txt") == "data1 says hello\n"
    assert res.text("cryptsetup-state.txt").strip() == "active"
    # The key came from bootkey's socket, which systemd passed to the activated agent.
    assert "key socket: serving the socket systemd passed" in res.journal, res.describe()
    assert re.search(r"key socket: sent the key to pid \d+", res.journal), res.describe()


# --- scenario 3: Vault unreachable at boot, reachable later ------------------------------

LATE_BODY = r"""
# Boot has completed (multi-user.target) although Vault is unreachable.
record multi-user.target
mountpoint -q /mnt/data1 && echo mounted > "$out/at-boot.txt" || echo absent > "$out/at-boot.txt"
mark vault-now
wait_mounted 150 /mnt/data1 /mnt/data2 || exit 1
record dev-mapper-data1.device mnt-data1.mount mnt-data2.mount
cat /mnt/data1/hello.txt > "$out/data1.txt"
cat /mnt/data2/hello.txt > "$out/data2.txt"
"""


def test_vault_unreachable_at_boot_then_volumes_open_without_reboot(
    vm_deb: Path, bao: DevBao, tmp_path: Path
) -> None:
    fleet = enroll_fleet(bao, tmp_path / "fleet", "late", AGENT_NAMES)
    img = agent_image(vm_deb, fleet)
    port = free_port()  # nothing listens here until the proxy starts
    proxy = LateProxy(port, ("127.0.0.1", bao.port))
    disks = [harness.Disk(fleet.disks[n], n) for n in ("data1", "data2")]
    data = fleet.guest_data(LATE_BODY, deadline="3m", ready_timeout="5s")
    try:
        with harness.VM(img, tmp_path / "vm", data=data, disks=disks, vault_port=port) as vm:
            vm.wait_console(r"VMTEST: vault-now")
            proxy.start()
            res = vm.wait()
    finally:
        proxy.stop()
    report("late-vault", res)
    assert res.rc == 0, res.describe()
    assert res.text("at-boot.txt").strip() == "absent"
    assert res.text("data1.txt") == "data1 says hello\n"
    assert res.text("data2.txt") == "data2 says hello\n"
    t = times(res)
    assert t["multi-user.target"] < t["mnt-data1.mount"], t
    # The agent told systemd it was ready without Vault (boot went on), kept retrying
    # with back-off in the same process, and opened the volumes when Vault answered: no
    # reboot, no restart.
    assert "(boot goes on; volumes open when Vault answers)" in res.journal, res.describe()
    assert "waiting for Vault: attempt 2 failed" in res.journal, res.describe()
    assert "logged in to Vault with AppRole" in res.journal, res.describe()
    assert "gave up after" not in res.journal, res.describe()


# --- scenario 4: the secret id as an encrypted credential --------------------------------

# Before sysinit (vmtest-setup.service): seal the secret id with this guest's host key, as
# an operator provisioning the machine would, and leave no plaintext behind.
SEAL_EARLY = r"""#!/bin/sh
set -e
systemd-creds encrypt --with-key=host --name=secret-id /vmtest/secret-id.plain \
  /etc/bootkey/secret-id.cred
rm -f /vmtest/secret-id.plain
"""

CRED_BODY = r"""
wait_mounted 150 /mnt/data1 || exit 1
record mnt-data1.mount bootkey.service
cat /mnt/data1/hello.txt > "$out/data1.txt"
ls /etc/bootkey /vmtest > "$out/ls.txt"
"""


def test_secret_id_from_an_encrypted_credential(
    vm_deb: Path, bao: DevBao, tmp_path: Path
) -> None:
    fleet = enroll_fleet(bao, tmp_path / "fleet", "cred", AGENT_NAMES)
    img = agent_image(vm_deb, fleet)
    data = fleet.guest_data(CRED_BODY, credential=True)
    data["/vmtest/secret-id.plain"] = (fleet.env.secret_id_file.read_bytes(), 0o600)
    data["/vmtest/early.sh"] = (SEAL_EARLY.encode(), 0o755)
    with harness.VM(img, tmp_path / "vm", data=data, vault_port=bao.port,
                    disks=[harness.Disk(fleet.disks["data1"], "data1")]) as vm:
        res = vm.wait()
    report("credential", res)
    assert res.rc == 0, res.describe()
    assert res.text("data1.txt") == "data1 says hello\n"
    listing = res.text("ls.txt").split()
    assert "secret-id.cred" in listing
    assert "secret-id" not in listing and "secret-id.plain" not in listing
    # No plain secret id anywhere: the agent's only source was the credential.
