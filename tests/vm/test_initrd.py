"""The root volume opened in the initrd (issue 15): a guest whose root file system is on
LUKS2, its initrd built by the guest's dracut with bootkey's module, OpenBao on the host
reached through the one forwarded port. Nobody types.

The guest, its initrds and the enrolled root are built once for this module
(tests/vm/rootluks.py); each test boots its own throw-away overlay of the root.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from bootkey import keystore
from bootkey.initrd import root_setup
from bootkey.vault import VaultSession
from tests.support.bao import DevBao, free_port
from tests.support.proxy import LateProxy
from tests.support.scan import find_key
from tests.support.vaultenv import VaultEnv, provision
from tests.vm import harness, rootluks

pytestmark = [
    pytest.mark.vm,
    # the first test also builds the guest (two dracut runs, the encrypted root)
    pytest.mark.timeout(1800),
    pytest.mark.skipif(harness.QEMU is None, reason="qemu-system-x86_64 is not installed "
                       "(scripts/setup.sh installs qemu-system-x86)"),
]

# After multi-user.target: what the host checks. /run's regular files come back whole,
# so the host can look for the key in them.
ROOT_BODY = r"""#!/bin/sh
out=$1
findmnt -n -o SOURCE / > "$out/root-source.txt"
cryptsetup status root > "$out/cryptsetup-status.txt" 2>&1
systemctl is-active bootkey.service > "$out/agent-state.txt"
systemctl is-active bootkey-initrd.service bootkey-initrd.socket > "$out/initrd-units.txt"
ls -la /run/bootkey > "$out/run-bootkey.txt" 2>&1
mkdir -p "$out/run"
find /run -xdev -type f -size -2M -print0 | xargs -0 cp --parents -t "$out/run" 2>/dev/null
keyctl show @u > "$out/keyring.txt" 2>&1 || true
bootkey status --json > "$out/status.json" 2> "$out/status.err"
exit 0
"""


@pytest.fixture(scope="module")
def vault_env(bao: DevBao, tmp_path_factory: pytest.TempPathFactory) -> VaultEnv:
    workdir = tmp_path_factory.mktemp("initrd-vault")
    env = provision(bao.client(), workdir, host_id=harness.MACHINE_ID)
    return rootluks.fixed_ids(bao.client(), env, workdir)


@pytest.fixture(scope="module")
def root_guest(vm_deb: Path, vault_env: VaultEnv, bao: DevBao,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[rootluks.RootGuest]:
    guest = rootluks.build(vm_deb, vault_env, tmp_path_factory.mktemp("rootluks"), bao.port)
    print(f"INITRD-SIZE bootkey {guest.sizes['bootkey']} keyfile {guest.sizes['keyfile']} "
          f"tpm {guest.sizes['tpm']}")
    yield guest


def root_key(env: VaultEnv, bao: DevBao) -> bytes:
    """The root volume's Vault key, read with the root token: what a leak would be."""
    cfg = env.config()
    session = VaultSession.from_config(cfg, token=bao.root_token)
    loc = keystore.location_for(cfg, harness.MACHINE_ID, rootluks.LUKS_UUID)
    entry = keystore.read_entry(session, loc)
    assert entry is not None, loc.display
    with keystore.unseal(session, loc, entry.keys[0]) as buf:
        return bytes(buf.view)


# systemd-cryptsetup's own prompt, after bootkey declined ("… for disk root:"; bootkey's
# says "… for disk root (bootkey is asking Vault):")
SYSTEMD_PROMPT = r"nter passphrase for disk root:"
# bootkey's kernel command line; the journal on the console shows the initrd's progress
# even when the guest never gets as far as writing its results.
CMDLINE = (f"{root_setup(rootluks.NAME, rootluks.LUKS_UUID).kernel_cmdline} "
           "rd.udev.log_level=3 systemd.journald.forward_to_console=1")
KEYFILE_CMDLINE = f"root=/dev/mapper/{rootluks.NAME} systemd.journald.forward_to_console=1"
# Python and the Vault login run under emulation in the initrd: more than the harness's
# default boot budget on a loaded machine.
BOOT_TIMEOUT = 600.0


def boot(guest: rootluks.RootGuest, workdir: Path, vault_port: int | None, *,
         initrd: Path | None = None, cmdline: str = CMDLINE,
         console_input: bool = False, tpm_state: Path | None = None,
         data: Mapping[str, tuple[bytes, int]] | None = None) -> harness.VM:
    return harness.VM(guest.image, workdir, initrd=initrd or guest.initrd,
                      vault_port=vault_port, cmdline=cmdline, timeout=BOOT_TIMEOUT,
                      console_input=console_input, tpm_state=tpm_state,
                      data={"/vmtest/test.sh": (ROOT_BODY.encode(), 0o755), **(data or {})})


def unlock_seconds(journal: str) -> tuple[float | None, float | None]:
    """(network up, root unlocked) in guest uptime seconds, from the journal."""
    net = harness.journal_monotonic(journal, r"DHCPv4 address")
    opened = harness.journal_monotonic(journal, r"Finished .*(systemd-cryptsetup@root|"
                                                r"Cryptography Setup for root)")
    return net, opened


def test_root_volume_unlocks_in_the_initrd_with_nobody_typing(
    root_guest: rootluks.RootGuest, vault_env: VaultEnv, bao: DevBao, tmp_path: Path
) -> None:
    with boot(root_guest, tmp_path / "vm", bao.port) as vm:
        res = vm.wait()
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()
    assert "is active" in res.text("cryptsetup-status.txt"), res.describe()
    # The key came from bootkey's initrd socket: nobody typed, and systemd-cryptsetup
    # never had to ask (bootkey's own prompt may show if Vault is slower than 3 s).
    assert "key socket: sent the key to pid" in res.journal, res.describe()
    assert "sending the passphrase typed" not in res.journal, res.describe()
    assert not re.search(SYSTEMD_PROMPT, res.console), res.describe()
    assert re.search(r"bootkey.*initrd: serving keys", res.journal), res.describe()
    # After switch-root: the agent runs, the initrd's units and socket are gone, and no
    # file under /run holds the key in any encoding.
    assert res.text("agent-state.txt").strip() == "active", res.describe()
    assert res.text("initrd-units.txt").split() == ["inactive", "inactive"], res.describe()
    assert "initrd.sock" not in res.text("run-bootkey.txt"), res.describe()
    # ... and `bootkey status` (asking that agent) shows the root volume, open.
    status = json.loads(res.text("status.json") or "{}")
    assert status.get("agent", {}).get("running") is True, res.text("status.err")
    (root,) = [v for v in status["volumes"] if v["name"] == rootluks.NAME]
    assert root["luks_uuid"] == rootluks.LUKS_UUID, status
    assert root["state"] == "already open", status  # the initrd opened it
    key = root_key(vault_env, bao)
    run_files = [(n, b) for n, b in res.files.items() if n.startswith("run/")]
    assert run_files, "the guest sent no /run files back"
    assert find_key(key, run_files) == []
    assert find_key(key, [("console", res.console.encode()),
                          ("journal", res.journal.encode())]) == []
    net, opened = unlock_seconds(res.journal)
    print(f"VM-TIMING initrd-bootkey: qemu wall {res.seconds:.1f} s; network up {net} s; "
          f"root unlocked {opened} s")



def test_keyfile_in_initrd_baseline_for_the_timings(
    root_guest: rootluks.RootGuest, bao: DevBao, tmp_path: Path
) -> None:
    """The same root opened by a keyfile built into the initrd (no network, no bootkey):
    the reference for docs/benchmarks.md's initrd timings. (Vault is reachable only so
    the booted system's agent does not hold multi-user.target.)"""
    with boot(root_guest, tmp_path / "vm", bao.port, initrd=root_guest.keyfile_initrd,
              cmdline=KEYFILE_CMDLINE) as vm:
        res = vm.wait()
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()
    net, opened = unlock_seconds(res.journal)
    print(f"VM-TIMING initrd-keyfile: qemu wall {res.seconds:.1f} s; network up {net} s; "
          f"root unlocked {opened} s")

# --- the operator is never locked out ----------------------------------------------------

PROMPT = r"enter passphrase for disk root"


def test_vault_down_at_boot_a_passphrase_typed_on_the_console_opens_root(
    root_guest: rootluks.RootGuest, tmp_path: Path
) -> None:
    dead = free_port()  # nothing listens: the guest's connections to Vault are refused
    with boot(root_guest, tmp_path / "vm", dead, console_input=True) as vm:
        vm.wait_console(PROMPT)
        vm.type_console(rootluks.PASSPHRASE + b"\n")
        res = vm.wait()
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()
    assert "sending the passphrase typed at the console" in res.journal, res.describe()
    assert rootluks.PASSPHRASE.decode() not in res.console + res.journal


def test_vault_back_within_the_timeout_opens_root_without_typing(
    root_guest: rootluks.RootGuest, bao: DevBao, tmp_path: Path
) -> None:
    port = free_port()
    proxy = LateProxy(port, ("127.0.0.1", bao.port))
    try:
        with boot(root_guest, tmp_path / "vm", port) as vm:
            # bootkey is waiting (its prompt is up and nobody answers); now Vault appears
            vm.wait_console(PROMPT)
            proxy.start()
            res = vm.wait()
    finally:
        proxy.stop()
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()
    assert "sending the passphrase typed" not in res.journal, res.describe()


def test_destroyed_secret_id_falls_back_to_the_prompt_with_the_reason(
    root_guest: rootluks.RootGuest, vault_env: VaultEnv, bao: DevBao, tmp_path: Path
) -> None:
    client = bao.client()
    role = rootluks.role_name(client, vault_env)
    secret_id = vault_env.secret_id_file.read_text()
    client.auth.approle.destroy_secret_id(role, secret_id)
    try:
        with boot(root_guest, tmp_path / "vm", bao.port, console_input=True) as vm:
            vm.wait_console(r"bootkey: volume root: no key from Vault: .*cannot log in")
            # then systemd-cryptsetup's own prompt (bootkey's has been withdrawn)
            vm.wait_console(r"(?s)no key from Vault.*" + SYSTEMD_PROMPT)
            vm.type_console(rootluks.PASSPHRASE + b"\n")
            res = vm.wait()
    finally:
        client.auth.approle.create_custom_secret_id(role, secret_id)
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()


# --- the secret_id sealed to the TPM2 -----------------------------------------------------


def test_secret_id_sealed_to_the_tpm2_opens_root_and_another_tpm_cannot(
    root_guest: rootluks.RootGuest, vault_env: VaultEnv, bao: DevBao, tmp_path: Path
) -> None:
    # The sealed initrd carries the credential, not the secret_id (the plain one does:
    # the same search finds it there).
    secret_id = vault_env.secret_id_file.read_bytes().strip()
    assert secret_id in gzip.decompress(root_guest.initrd.read_bytes())
    assert secret_id not in gzip.decompress(root_guest.tpm_initrd.read_bytes())
    # This machine's TPM (the state it was sealed with): root opens, nobody types. The
    # booted system has the sealed machine's /etc/bootkey too (config naming only the
    # credential): the agent logs in with the same file, through LoadCredentialEncrypted=.
    state = tmp_path / "tpm"
    shutil.copytree(root_guest.tpm_state, state)
    with boot(root_guest, tmp_path / "vm", bao.port, initrd=root_guest.tpm_initrd,
              tpm_state=state, data=root_guest.sealed_files) as vm:
        res = vm.wait()
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()
    assert "key socket: sent the key to pid" in res.journal, res.describe()
    assert not re.search(SYSTEMD_PROMPT, res.console), res.describe()
    vault = json.loads(res.text("status.json") or "{}").get("vault", {})
    assert vault.get("logged_in") is True, (vault, res.text("status.err"))
    assert str(vault.get("secret_id_source")).startswith("systemd credential"), vault
    # The same initrd with another TPM: the credential does not open, the console says
    # why, and the passphrase still does.
    with boot(root_guest, tmp_path / "vm-other", bao.port, initrd=root_guest.tpm_initrd,
              tpm_state=tmp_path / "other-tpm", console_input=True) as vm:
        vm.wait_console(r"bootkey: volume root: no key from Vault: .*secret-id\.cred: this "
                        r"machine's TPM2 cannot decrypt")
        vm.wait_console(r"(?s)TPM2 cannot decrypt.*" + SYSTEMD_PROMPT)
        vm.type_console(rootluks.PASSPHRASE + b"\n")
        res = vm.wait()
    assert res.rc == 0, res.describe()
    assert res.text("root-source.txt").strip() == "/dev/mapper/root", res.describe()
