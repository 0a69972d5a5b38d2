"""The root volume in the initrd: what dracut's `90bootkey` module installs and runs.

Key delivery is the crypttab key socket, served inside the initrd by this same code and
Vault session (not a shell client). Why not answer systemd's ask-password requests: the
password-agent reply is a NUL-separated list of C strings (systemd splits it with
strv_parse_nulstr and passes strlen() to libcryptsetup), while bootkey's volume keys are
64 random bytes — about one in five holds a NUL and could never be delivered. The key
socket passes bytes verbatim. A console passphrase still works: when the socket declines
(Vault unreachable within `[keysocket] timeout`, key revoked) systemd-cryptsetup asks
through the usual agents (console, plymouth); see docs/initrd.md.

Nothing here writes to /run: the key lives in a SecretBuffer for the one connection and
the socket file goes with the socket unit (RemoveOnStop) before switch-root.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bootkey import _proc, askpassword, unlock
from bootkey import config as config_mod
from bootkey.config import Config, KeysocketConfig
from bootkey.keysocket import KeySocketServer
from bootkey.unlock import Volume
from bootkey.vault import SecretIdReader, VaultSession
from bootkey_core.errors import BootkeyError, DeadlineExceeded
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

# The initrd's key socket: apart from the booted system's /run/bootkey/cryptsetup.sock,
# so the agent after switch-root never finds a stale socket of ours in its place.
SOCKET_PATH = Path("/run/bootkey/initrd.sock")
DEFAULT_CONFIG = Path("/etc/bootkey/bootkey.toml")
# The sealed secret_id: `<name>.cred` in /etc/bootkey, where `bootkey setup-vault` writes
# it and bootkey.service loads it from (LoadCredentialEncrypted=secret-id:…), so one
# file serves the initrd and the booted system.
CREDENTIAL_DIR = Path("/etc/bootkey")
# systemd-creds decrypt: a TPM2 unseal, slow under emulation; bounded like any tool call.
CREDS_TIMEOUT = 60.0
# How long bootkey waits for Vault before it also asks on the console.
PROMPT_AFTER = 3.0
# Modules the key socket path imports, lazily included: hvac/requests resolve these on
# the first request, after every import has run.
_LAZY_MODULES = ("encodings.idna", "encodings.ascii", "encodings.latin_1", "systemd.journal",
                 "systemd.daemon",
                 "concurrent.futures.thread", "http.client", "email.parser", "json.decoder")


# --- what the operator sets -----------------------------------------------------------


@dataclass(frozen=True)
class RootSetup:
    """The lines `bootkey initrd` prints for one volume."""

    crypttab: str
    dracut_conf: str
    kernel_cmdline: str


def root_setup(name: str, luks_uuid: str, *, ip: str = "dhcp") -> RootSetup:
    # No headless=: the prompt is the way in when Vault is away.
    crypttab = f"{name}  UUID={luks_uuid}  {SOCKET_PATH}  luks,x-initrd.attach"
    dracut_conf = 'add_dracutmodules+=" bootkey "\n'
    cmdline = f"root=/dev/mapper/{name} rd.neednet=1 ip={ip}"
    return RootSetup(crypttab, dracut_conf, cmdline)


def credential_path(name: str, directory: Path = CREDENTIAL_DIR) -> Path:
    return directory / f"{name}.cred"


def seal_command(name: str, cred: Path) -> str:
    # tpm2 alone: the host key (/var/lib/systemd/credential.secret) is on the encrypted
    # root, out of the initrd's reach.
    return (f"systemd-creds encrypt --with-key=tpm2 --name={name} /etc/bootkey/secret-id "
            f"{cred}")


def secret_id_sealing(cfg: Config, directory: Path = CREDENTIAL_DIR) -> str:
    """How the secret_id the initrd carries is protected, in one line (for `bootkey
    doctor` and `bootkey initrd`). Starts with "sealed" only when a systemd-creds
    credential is configured and present."""
    ar = cfg.vault.approle
    if ar.secret_id_credential:
        cred = credential_path(ar.secret_id_credential, directory)
        if cred.is_file():
            return (f"sealed: systemd-creds credential {cred}, decrypted by the TPM2 at "
                    "boot only")
        return (f"unsealed: credential {ar.secret_id_credential!r} has no {cred} — seal it: "
                f"`{seal_command(ar.secret_id_credential, cred)}`")
    if ar.wrapped_secret_id_file:
        return (f"unsealed: wrapped secret_id {ar.wrapped_secret_id_file} is single-use, "
                "but anyone with the disk can unwrap it first")
    return (f"unsealed: {ar.secret_id_file} is readable by anyone holding the disk — seal "
            "it with systemd-creds (TPM2), bind it with secret_id_bound_cidrs, revoke it "
            "if the machine is lost")


class CredentialError(BootkeyError):
    """The sealed secret_id cannot be decrypted here (another TPM, or sealed with the
    host key, which the initrd does not have)."""

    exit_code = os.EX_NOPERM  # 77


def decrypt_credential(name: str, cred: Path) -> bytearray:
    """The secret_id from its TPM2-sealed credential, via `systemd-creds decrypt` (the
    initrd's unit does not use LoadCredentialEncrypted=: a credential this TPM cannot
    unseal would fail the unit, and nobody would answer the key socket)."""
    res = _proc.run(["systemd-creds", "decrypt", f"--name={name}", str(cred), "-"],
                    timeout=CREDS_TIMEOUT)
    secret = bytearray(res.stdout.strip())
    if res.returncode != 0 or not secret:
        why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise CredentialError(
            f"{cred}: this machine's TPM2 cannot decrypt the secret_id credential ({why}) "
            f"— seal it on this machine: {seal_command(name, cred)}")
    return secret


def _secret_id_reader(cfg: Config) -> SecretIdReader | None:
    name = cfg.vault.approle.secret_id_credential
    if not name or os.environ.get("CREDENTIALS_DIRECTORY"):
        return None
    cred = credential_path(name)
    return lambda: (decrypt_credential(name, cred), f"systemd credential {cred} (TPM2)")


# --- what the initrd needs ------------------------------------------------------------


def config_files(cfg: Config, config_path: Path) -> list[Path]:
    """The files the key socket reads at boot besides code: config, CA, role/secret ids."""
    ar = cfg.vault.approle
    out = [config_path]
    for p in (cfg.vault.ca_file, ar.role_id_file, ar.wrapped_secret_id_file):
        if p is not None:
            out.append(p)
    if ar.secret_id_credential:
        out.append(credential_path(ar.secret_id_credential))
    elif ar.secret_id_file is not None:
        out.append(ar.secret_id_file)
    return out


def module_files(modules: Mapping[str, object]) -> list[str]:
    """Source and cached bytecode files of the loaded `modules` (sys.modules): exactly
    what the key socket imports, never a whole site-packages."""
    out: set[str] = set()
    for mod in list(modules.values()):
        f = getattr(mod, "__file__", None)
        if not f or not os.path.isfile(f):
            continue
        out.add(f)
        if f.endswith(".py"):
            spec = getattr(mod, "__spec__", None)
            cached = getattr(spec, "cached", None) if spec else None
            if cached and os.path.isfile(cached):
                out.add(cached)
    return sorted(out)


def parse_ldd(output: str) -> list[str]:
    """Library paths from `ldd` output ("libffi.so.8 => /lib/…/libffi.so.8 (0x…)")."""
    out = []
    for line in output.splitlines():
        _, arrow, rest = line.partition("=>")
        path = rest.split("(")[0].strip() if arrow else ""
        if path.startswith("/"):
            out.append(path)
    return out


def shared_libraries(files: Iterable[str]) -> list[str]:
    """What the extension modules link: dracut resolves libraries of executables only,
    and lib-dynload's modules are not executable (_ctypes needs libffi, _ssl libssl)."""
    import subprocess

    libs: set[str] = set()
    for f in files:
        if ".so" in os.path.basename(f):
            proc = subprocess.run(["ldd", f], capture_output=True, text=True, check=False,
                                  timeout=30)
            libs.update(parse_ldd(proc.stdout))
    return sorted(libs)


def runtime_files(config_path: Path) -> list[str]:
    """Everything the dracut module copies besides the interpreter: the modules the key
    socket path imports (imported here, in this process), then the config files."""
    import importlib

    for name in _LAZY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    cfg = config_mod.load(config_path)
    VaultSession.from_config(cfg)  # builds the hvac clients: their lazy imports too
    files = module_files(sys.modules)
    files += shared_libraries(files)
    files += [str(p) for p in config_files(cfg, config_path) if p.exists()]
    return files


# --- the key socket in the initrd -----------------------------------------------------


class InitrdKeys:
    """The key provider: one Vault session, logged in on the first request. When Vault
    has not answered within PROMPT_AFTER it also asks on the console (systemd's password
    agents), and whichever answers first is sent: a typed passphrase is never held up."""

    def __init__(self, cfg: Config, ask_dir: Path = askpassword.ASK_DIR) -> None:
        self.cfg = cfg
        self.ask_dir = ask_dir
        self._closing = threading.Event()
        self.session = VaultSession.from_config(cfg, sleep=self._sleep,
                                                read_secret_id=_secret_id_reader(cfg))
        self._lock = threading.Lock()
        self._volumes: dict[str, Volume] = {}

    def _sleep(self, seconds: float) -> None:
        # Vault retries end when the initrd service stops, not at their deadline.
        if self._closing.wait(seconds):
            raise DeadlineExceeded("the initrd key service is stopping")

    def close(self) -> None:
        self._closing.set()

    def _volume(self, name: str) -> Volume | None:
        with self._lock:
            if name not in self._volumes:
                vols, _ = unlock.resolve_volumes(self.cfg)
                self._volumes = {v.name: v for v in vols}
            return self._volumes.get(name)

    def is_managed(self, name: str) -> bool:
        if self._volume(name) is not None:
            return True
        # crypttab names this socket only for bootkey's volumes: say why it declines.
        print(f"bootkey: volume {name}: no device here carries this host's bootkey token "
              f"(host_id {self.cfg.host_id or 'from /etc/machine-id'}) — type the "
              "passphrase at the prompt", file=sys.stderr, flush=True)
        return False

    def vault_key(self, vol: Volume, deadline: float) -> SecretBuffer | None:
        try:
            with self._lock:
                if not self.session.logged_in:
                    self.session.login(max(0.0, deadline - time.monotonic()))
            return unlock.key_for_volume(self.session, vol, deadline)
        except BootkeyError as e:
            if self._closing.is_set():
                return None
            # stderr goes to the console too (StandardError=journal+console): the operator
            # at the prompt reads why nobody typed for them.
            print(f"bootkey: volume {vol.name}: no key from Vault: {e} — type the "
                  "passphrase at the prompt", file=sys.stderr, flush=True)
            return None

    def key_for(self, volume: str, deadline: float) -> SecretBuffer | None:
        vol = self._volume(volume)
        if vol is None:
            return None
        race = _Race()
        threading.Thread(target=lambda: race.offer_vault(self.vault_key(vol, deadline)),
                         name=f"vault-{volume}", daemon=True).start()
        typed: SecretBuffer | None = None
        # Vault usually answers within this: then nobody sees a prompt at all.
        if race.vault_done.wait(max(0.0, min(PROMPT_AFTER, deadline - time.monotonic()))):
            return race.close()
        try:
            with askpassword.PassphrasePrompt(
                    f"Please enter passphrase for disk {volume} (bootkey is asking Vault):",
                    f"cryptsetup:{vol.device}", self.ask_dir) as prompt:
                typed = prompt.wait(deadline, race.vault_done)
        except OSError as e:
            log.warning("volume %s: no console prompt while waiting for Vault: %s", volume, e)
        if typed is None:  # cancelled at the console, or no prompt: Vault alone now
            race.vault_done.wait(max(0.0, deadline - time.monotonic()))
        vault = race.close()
        if typed is not None:
            if vault is not None:
                vault.close()
            log.info("volume %s: sending the passphrase typed at the console", volume)
            return typed
        return vault


class _Race:
    """The Vault fetch's result, handed over once; a key that arrives after the decision
    is wiped at once."""

    def __init__(self) -> None:
        self.vault_done = threading.Event()
        self._lock = threading.Lock()
        self._key: SecretBuffer | None = None
        self._closed = False

    def offer_vault(self, key: SecretBuffer | None) -> None:
        with self._lock:
            if self._closed:
                if key is not None:
                    key.close()
                return
            self._key = key
        self.vault_done.set()

    def close(self) -> SecretBuffer | None:
        with self._lock:
            self._closed = True
            key, self._key = self._key, None
            return key


def serve(cfg: Config, stop: threading.Event, ask_dir: Path = askpassword.ASK_DIR) -> int:
    keys = InitrdKeys(cfg, ask_dir)
    sock_cfg = KeysocketConfig(path=SOCKET_PATH, timeout=cfg.keysocket.timeout)
    try:
        with KeySocketServer(sock_cfg, keys.key_for, keys.is_managed):
            log.info("initrd: serving keys on %s", SOCKET_PATH)
            stop.wait()
    finally:
        keys.close()
    return 0


def main(argv: Iterable[str] = ()) -> int:
    """`bootkey-initrd [--list-files | --credential] [CONFIG]`, the initrd's entry point
    (no argparse or CLI: only what unlocking imports ends up in the initrd). For the
    dracut module: --list-files prints what to install, --credential the sealed
    secret_id's file if the config names one (then systemd-creds and the TPM2 libraries
    go in too)."""
    args = list(argv)
    list_files = "--list-files" in args
    credential = "--credential" in args
    rest = [a for a in args if a not in ("--list-files", "--credential")]
    config_path = Path(rest[0]) if rest else DEFAULT_CONFIG
    from bootkey import journal

    journal.setup()
    try:
        if list_files:
            sys.stdout.write("".join(f"{f}\n" for f in runtime_files(config_path)))
            return 0
        if credential:
            name = config_mod.load(config_path).vault.approle.secret_id_credential
            if name:
                print(credential_path(name))
            return 0
        cfg = config_mod.load(config_path)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        return serve(cfg, stop)
    except BootkeyError as e:
        print(f"bootkey-initrd: {e}", file=sys.stderr)
        return e.exit_code
