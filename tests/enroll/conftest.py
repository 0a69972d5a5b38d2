"""Fixtures for enroll/rotate/unenroll tests: a real OpenBao (tests/conftest.py), real
LUKS2 image files (cryptsetup, PBKDF2 1000 iterations) and helpers to look at the result:
keyslots, bootkey tokens, the Vault entry, whether a Vault key opens the volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootkey import config as cfgmod
from bootkey import enroll, keystore, luks
from bootkey.vault import VaultSession
from bootkey_core.secret import SecretBuffer
from tests.support.luksimg import PASSPHRASE, make_image
from tests.support.scan import register_secret
from tests.support.vaultenv import VaultEnv

BOOTKEY = [sys.executable, "-m", "bootkey.cli"]
# bootkey's CLI that SIGKILLs itself after a given step (the crash tests' launcher)
KILLING_BOOTKEY = [sys.executable, str(Path(__file__).parents[1] / "support" /
                                       "killing_bootkey.py")]


@dataclass
class State:
    keyslots: set[int]
    token_slots: list[set[int]]  # keyslots of each bootkey token
    keys: list[tuple[int, str]]  # (keyslot, state) of the Vault entry's keys, or []
    entry_exists: bool


@dataclass
class Env:
    vault: VaultEnv
    cfg: cfgmod.Config
    cfg_file: Path
    tmp: Path
    rundir: enroll.RunDir

    @property
    def host(self) -> str:
        return self.vault.host_id

    def session(self) -> VaultSession:
        """The operator (enrollment) token."""
        return VaultSession(self.cfg.vault, token=self.vault.enroll_token, deadline=10,
                            retry_initial=0.05, retry_max=0.2)

    def image(self, name: str = "vol", **kw: object) -> str:
        return make_image(self.tmp / f"{name}.img", **kw)  # type: ignore[arg-type]

    def passfile(self, data: bytes = PASSPHRASE) -> Path:
        p = self.tmp / "pass"
        p.write_bytes(data)
        return p

    def loc(self, dev: str) -> keystore.Location:
        return enroll.location_of(self.cfg, self.host, luks.inspect(dev))

    def state(self, dev: str, luks_uuid: str | None = None) -> State:
        hdr = luks.inspect(dev) if luks.probe_magic(dev) == 2 else None
        uid = luks_uuid or (hdr.uuid if hdr else "")
        entry = keystore.read_entry(
            self.session(), keystore.location_for(self.cfg, self.host, uid)) if uid else None
        return State(
            set(hdr.keyslots) if hdr else set(),
            [set(hdr.token_keyslots(t)) for t in hdr.tokens_of_type("bootkey")] if hdr else [],
            [(k.keyslot, k.state) for k in entry.keys] if entry else [],
            entry is not None,
        )

    def vault_key_opens(self, dev: str) -> list[int]:
        """Keyslots that open with a key Vault holds (each tested alone)."""
        loc = self.loc(dev)
        s = self.session()
        entry = keystore.read_entry(s, loc)
        out = []
        slots = set(luks.inspect(dev).keyslots)
        for k in entry.keys if entry else []:
            if k.keyslot in slots:
                with keystore.unseal(s, loc, k) as key:
                    register_secret(key, f"key of {dev} keyslot {k.keyslot} (unsealed)")
                    if luks.test_key(dev, key, k.keyslot) is luks.KeyTest.OK:
                        out.append(k.keyslot)
        return out

    def passphrase_opens(self, dev: str, pw: bytes = PASSPHRASE) -> bool:
        return luks.test_key(dev, pw) is luks.KeyTest.OK

    def backups(self) -> list[Path]:
        d = self.rundir.backups
        return sorted(d.iterdir()) if d.exists() else []

    def bootkey(self, *args: str, stdin: bytes | None = None, token: bool = True,
                extra_env: dict[str, str] | None = None, kill_at: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`bootkey ARGS…`; with `kill_at="STEP[#N]"` through the launcher that SIGKILLs
        the process right after that step."""
        env = {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "BAO_TOKEN")}
        env["BOOTKEY_RUN_DIR"] = str(self.rundir.root)
        if token:
            env["VAULT_TOKEN"] = self.vault.enroll_token
        env.update(extra_env or {})
        cmd = [*KILLING_BOOTKEY, kill_at] if kill_at else BOOTKEY
        res = subprocess.run([*cmd, "--config", str(self.cfg_file), *args], input=stdin,
                             capture_output=True, timeout=timeout, check=False, env=env)
        return subprocess.CompletedProcess(res.args, res.returncode,
                                           res.stdout.decode(), res.stderr.decode())

    def boot_check(self, dev: str) -> str:
        """The lead's unlock path in-process with the boot AppRole: resolve the volume
        from its token, unseal, test. Returns the outcome ("verified" or the failure)."""
        from bootkey import unlock
        vols, failed = unlock.resolve_volumes(self.cfg, names=[dev])
        if failed or not vols:
            return f"unresolved: {failed}"
        s = VaultSession.from_config(self.cfg)
        s.login()
        (res,) = unlock.unlock_all(s, vols, check=True, parallel=1,
                                   deadline_at=time.monotonic() + 20)
        return res.outcome.value if res.ok else f"failed: {res.reason}"

    def unlock_check(self, *names: str) -> dict[str, dict[str, object]]:
        """`bootkey unlock --check --json` with the boot AppRole (no operator token)."""
        res = self.bootkey("unlock", "--check", "--json", *(names or ("--all",)),
                           token=False)
        out = json.loads(res.stdout) if res.stdout.strip() else {"volumes": []}
        return {v["device"]: v for v in out["volumes"]} | {"_rc": {"rc": res.returncode,
                                                                   "err": res.stderr}}


def make_env(vault_env: VaultEnv, tmp_path: Path) -> Env:
    extra = f'search = ["{tmp_path}/*.img"]\n'
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env.toml(extra))
    rundir = enroll.RunDir(tmp_path / "run")
    return Env(vault_env, cfgmod.parse(cfg_file.read_text()), cfg_file, tmp_path, rundir)


@pytest.fixture
def env(vault_env: VaultEnv, tmp_path: Path) -> Env:
    """KV v2 and KV v1 (parametrised by vault_env)."""
    return make_env(vault_env, tmp_path)


@pytest.fixture
def env2(vault_env2: VaultEnv, tmp_path: Path) -> Env:
    """KV v2 only."""
    return make_env(vault_env2, tmp_path)


def secret_of(data: bytes) -> SecretBuffer:
    return SecretBuffer.from_bytes(bytearray(data))
