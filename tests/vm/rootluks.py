"""A guest whose root file system is on LUKS2, with initrds built by the guest's own dracut.

Built on the host without device-mapper: the guest's rootfs (the installed layer plus
dracut) is copied, configured, `dracut` runs in a chroot of it (twice: with bootkey's
module, and without it but with a keyfile inside, for comparison), then `mkfs.ext4 -d`
and cryptsetup's offline `reencrypt --encrypt` make the encrypted root, and the host's
`bootkey enroll` adds the Vault key (its token names the volume "root").

The config baked into the initrd holds this run's AppRole ids, so the rootfs and the
initrds are built once per run (a module fixture), on top of the cached layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import hvac

from bootkey.initrd import root_setup
from tests.support.vaultenv import VaultEnv
from tests.vm import harness

# procps: pgrep, which dracut's network module installs; libtss2-*: what systemd-creds
# loads (dlopen) to seal and unseal with the TPM2
PACKAGES = (*harness.BASE_PACKAGES, "dracut-core", "dracut-network", "dbus", "procps",
            "libtss2-esys-3.0.2-0", "libtss2-rc0", "libtss2-mu0", "libtss2-tcti-device0")
NAME = "root"
LUKS_UUID = "b007c0de-0000-4000-8000-000000000001"
# The volume's pre-existing passphrase: what an operator types at the fallback prompt.
PASSPHRASE = b"vm-root-passphrase"
KEYFILE = "/etc/bootkey-test-root.key"
ROOT_SIZE_MB = 1536
# dracut modules for both initrds (the bootkey one adds bootkey and, through it,
# network + systemd-networkd): a systemd initrd that opens LUKS, nothing else.
DRACUT_MODULES = ("systemd", "systemd-initrd", "dracut-systemd", "systemd-udevd",
                  "systemd-journald", "systemd-ask-password", "udev-rules", "base",
                  "fs-lib", "rootfs-block", "kernel-modules", "crypt")
DRACUT_DRIVERS = ("virtio_pci", "virtio_blk", "virtio_net", "dm_crypt", "xts", "ecb",
                  "aesni_intel")


@dataclass(frozen=True)
class RootGuest:
    image: Path          # raw LUKS2 root, Vault key enrolled (boot it through an overlay)
    initrd: Path         # dracut + bootkey's module
    keyfile_initrd: Path  # dracut, no bootkey, the passphrase as a keyfile inside
    tpm_initrd: Path     # dracut + bootkey's module, the secret_id sealed to tpm_state
    tpm_state: Path      # the swtpm state the secret_id was sealed with (boot a copy)
    # the sealed machine's /etc/bootkey (config naming the credential, the credential),
    # for a boot's data= (the root image itself keeps the plain secret_id's config)
    sealed_files: dict[str, tuple[bytes, int]]
    sizes: dict[str, int]  # compressed initrd sizes, bytes


# The sealed secret_id, where `bootkey setup-vault` puts it (bootkey.initrd.credential_path)
CREDENTIAL = "/etc/bootkey/secret-id.cred"
CONFIG = "/etc/bootkey/bootkey.toml"
# The operator's step on the running machine, then a new initrd: seal the secret_id to
# this machine's TPM2 (default PCR 7: the firmware's secure-boot state).
SEAL_BODY = r"""#!/bin/sh
out=$1
systemd-creds encrypt --with-key=tpm2 --name=secret-id /etc/bootkey/secret-id \
    "$out/secret-id.cred" > "$out/seal.txt" 2>&1
echo $? > "$out/seal.rc"
exit 0
"""


def guest_config(env: VaultEnv, socket_timeout: str = "60s", *, sealed: bool = False) -> str:
    # host_id left out: the guest's /etc/machine-id (harness.MACHINE_ID), copied into
    # the initrd by the module, is the default.
    source = ('secret_id_credential = "secret-id"\n' if sealed
              else 'secret_id_file = "/etc/bootkey/secret-id"\n')
    return (
        f'[vault]\naddress = ["{harness.VAULT_GUEST_URL}"]\ntimeout = "5s"\n'
        f'[vault.approle]\nrole_id = "{env.role_id}"\n'
        + source +
        f'[vault.kv]\nmount = "{env.kv_mount}"\nversion = {env.kv_version}\n'
        '[unlock]\nretry_initial = "500ms"\nretry_max = "2s"\n'
        f'[keysocket]\ntimeout = "{socket_timeout}"\n'
    )


# dracut needs /proc and /dev (process substitution, udevadm): mounted in a private mount
# namespace, so they vanish with the process and never touch the host's mounts.
_IN_CHROOT = ('mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && '
              'exec chroot "$@"')


def _dracut(root: Path, kver: str, out: str, modules: tuple[str, ...],
            extra: tuple[str, ...] = ()) -> None:
    harness._run(
        ["unshare", "--mount", "sh", "-c", _IN_CHROOT, "sh", str(root),
         "dracut", "--force", "--no-hostonly", "--no-early-microcode",
         "--kver", kver, "--modules", " ".join(modules),
         "--drivers", " ".join(DRACUT_DRIVERS), "--compress", "gzip", *extra, out],
        timeout=900, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})


def role_name(root_client: hvac.Client, env: VaultEnv) -> str:
    roles = root_client.auth.approle.list_roles()["data"]["keys"]
    (role,) = [r for r in roles
               if root_client.auth.approle.read_role_id(r)["data"]["role_id"] == env.role_id]
    return str(role)


def fixed_ids(root_client: hvac.Client, env: VaultEnv, workdir: Path) -> VaultEnv:
    """Give the host's AppRole a role_id and secret_id derived from constants, so the
    config baked into the initrd (and so the cached guest) is the same in every run."""
    role = role_name(root_client, env)
    ids = hashlib.sha256(f"bootkey-vm-initrd/{harness.MACHINE_ID}".encode()).hexdigest()
    role_id = str(uuid.UUID(ids[:32]))
    secret_id = str(uuid.UUID(ids[32:]))
    root_client.auth.approle.update_role_id(role, role_id)
    root_client.auth.approle.create_custom_secret_id(role, secret_id)
    sid = workdir / "secret-id"
    sid.write_text(secret_id)
    sid.chmod(0o600)
    return dataclasses.replace(env, role_id=role_id, secret_id_file=sid)


def build(deb: Path, env: VaultEnv, workdir: Path, vault_port: int) -> RootGuest:
    """The guest for `env` (ids from `fixed_ids`): the encrypted root, the initrds and the
    TPM state are cached by their inputs; the copy in `workdir` gets this run's Vault key
    enrolled. `vault_port`: Vault for the sealing boot's agent."""
    installed = harness.installed_rootfs(deb, PACKAGES)
    config_text = guest_config(env)
    key = harness._sha(harness.RECIPE, installed.parent.name, config_text,
                       env.secret_id_file.read_bytes(), Path(__file__).read_bytes(),
                       *(f"{p}={c!r}" for p, c in sorted(harness._harness_files().items())))
    cached = harness.cache_dir() / f"rootluks-{key}"
    with harness._locked("rootluks"):
        if not (cached / "done").exists():
            shutil.rmtree(cached, ignore_errors=True)
            _build(installed, env, cached, vault_port)
            (cached / "done").touch()
            for old in harness.cache_dir().glob("rootluks-*"):
                if old != cached:
                    shutil.rmtree(old, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    img = workdir / "root.img"
    harness._run(["cp", "--sparse=always", str(cached / "root.img"), str(img)], timeout=600)
    enroll(env, img, workdir)
    initrd, keyfile_initrd = cached / "initrd-bootkey.img", cached / "initrd-keyfile.img"
    tpm_initrd = cached / "initrd-tpm.img"
    sealed = {CONFIG: (guest_config(env, sealed=True).encode(), 0o600),
              CREDENTIAL: ((cached / "secret-id.cred").read_bytes(), 0o600)}
    return RootGuest(img, initrd, keyfile_initrd, tpm_initrd, cached / "tpm-state", sealed,
                     {"bootkey": initrd.stat().st_size, "keyfile": keyfile_initrd.stat().st_size,
                      "tpm": tpm_initrd.stat().st_size})


def _build(installed: Path, env: VaultEnv, workdir: Path, vault_port: int) -> None:
    k = harness.kernel()
    workdir.mkdir(parents=True)
    root = workdir / "rootfs"
    harness._run(["cp", "-a", "--reflink=auto", str(installed), str(root)], timeout=300)
    setup = root_setup(NAME, LUKS_UUID)
    files = {
        "/etc/crypttab": (f"{setup.crypttab}\n".encode(), 0o644),
        CONFIG: (guest_config(env).encode(), 0o600),
        "/etc/bootkey/secret-id": (env.secret_id_file.read_bytes(), 0o600),
        "/etc/dracut.conf.d/bootkey.conf": (setup.dracut_conf.encode(), 0o644),
    }
    harness.populate(root, harness.ImageSpec(deb=None, files=files, enable=["bootkey.service"]))
    _dracut(root, k.version, "/boot/initrd-bootkey.img", (*DRACUT_MODULES, "bootkey"))
    # The comparison guest: the passphrase as a keyfile in the initrd, its own crypttab.
    (root / KEYFILE.lstrip("/")).write_bytes(PASSPHRASE)
    (root / "tmp/crypttab.keyfile").write_text(
        f"{NAME} UUID={LUKS_UUID} {KEYFILE} luks\n")
    _dracut(root, k.version, "/boot/initrd-keyfile.img", DRACUT_MODULES,
            ("--omit", "bootkey", "--include", "/tmp/crypttab.keyfile", "/etc/crypttab",
             "--install", KEYFILE))
    (root / KEYFILE.lstrip("/")).unlink()
    (root / "tmp/crypttab.keyfile").unlink()
    initrd = workdir / "initrd-bootkey.img"
    keyfile_initrd = workdir / "initrd-keyfile.img"
    shutil.move(root / "boot/initrd-bootkey.img", initrd)
    shutil.move(root / "boot/initrd-keyfile.img", keyfile_initrd)

    img = workdir / "root.img"
    harness._run(["truncate", "-s", f"{ROOT_SIZE_MB}M", str(img)], timeout=30)
    harness._run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(img),
                  f"{ROOT_SIZE_MB - 16}M"], timeout=600)
    proc = subprocess.run(
        ["cryptsetup", "reencrypt", "--encrypt", "--batch-mode", "--type", "luks2",
         "--reduce-device-size", "16M", "--force-offline-reencrypt", *harness.FAST_PBKDF,
         "--uuid", LUKS_UUID, "--key-file=-", str(img)],
        input=PASSPHRASE, capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    _seal_and_build_tpm_initrd(root, env, workdir, vault_port)
    shutil.rmtree(root)


def _seal_and_build_tpm_initrd(root: Path, env: VaultEnv, workdir: Path,
                               vault_port: int) -> None:
    """As an operator would: boot the machine (the keyfile initrd opens its root), seal
    the secret_id to its TPM2 there, then build the initrd that carries the credential
    instead of the secret_id."""
    state = workdir / "tpm-state"
    with harness.VM(workdir / "root.img", workdir / "seal-vm",
                    initrd=workdir / "initrd-keyfile.img", vault_port=vault_port,
                    cmdline=f"root=/dev/mapper/{NAME}", timeout=600, tpm_state=state,
                    data={"/vmtest/test.sh": (SEAL_BODY.encode(), 0o755)}) as vm:
        res = vm.wait()
    assert res.rc == 0 and res.text("seal.rc").strip() == "0", \
        f"sealing the secret_id in the guest: {res.text('seal.txt')}\n{res.describe()}"
    (workdir / "secret-id.cred").write_bytes(res.files["secret-id.cred"])  # for build()
    cred = root / CREDENTIAL.lstrip("/")
    cred.write_bytes(res.files["secret-id.cred"])
    cred.chmod(0o600)
    (root / CONFIG.lstrip("/")).write_text(guest_config(env, sealed=True))
    k = harness.kernel()
    _dracut(root, k.version, "/boot/initrd-tpm.img", (*DRACUT_MODULES, "bootkey"))
    shutil.move(root / "boot/initrd-tpm.img", workdir / "initrd-tpm.img")


def enroll(env: VaultEnv, img: Path, workdir: Path) -> None:
    """The host's `bootkey enroll` adds the Vault key and the token naming it "root"."""
    toml = workdir / "host.toml"
    toml.write_text(env.toml(f'search = ["{img}"]\n'))
    proc = subprocess.run(
        [sys.executable, "-m", "bootkey.cli", "--config", str(toml), "enroll", str(img),
         "--name", NAME, "--unlock-key-file", "-"],
        input=PASSPHRASE.decode(), capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": os.environ["PATH"], "LC_ALL": "C", "VAULT_TOKEN": env.enroll_token})
    assert proc.returncode == 0, f"enroll root: {proc.stdout}{proc.stderr}"
