"""Provision a real OpenBao the way an operator would for bootkey (`bootkey setup-vault`),
with a fresh machine-id shaped host_id per test so tests never see each other's keys."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import hvac

from bootkey import config as cfgmod
from bootkey import setup_vault
from tests.support.scan import register_secret


def new_host_id() -> str:
    """A machine-id shaped host id (32 hex chars): unique per test, exact policy glob."""
    return secrets.token_hex(16)


@dataclass
class VaultEnv:
    address: str
    host_id: str
    role_id: str
    secret_id_file: Path
    enroll_token: str
    kv_version: int
    kv_mount: str
    ca_file: Path | None = None

    def toml(self, extra: str = "", *, deadline: str = "20s") -> str:
        return (
            f'host_id = "{self.host_id}"\n'
            f"[vault]\naddress = [\"{self.address}\"]\ntimeout = \"2s\"\n"
            + (f'ca_file = "{self.ca_file}"\n' if self.ca_file else "")
            + f"[vault.approle]\nrole_id = \"{self.role_id}\"\n"
            f"secret_id_file = \"{self.secret_id_file}\"\n"
            f"[vault.kv]\nmount = \"{self.kv_mount}\"\nversion = {self.kv_version}\n"
            # the agent's control socket next to the secret_id: never the system's
            f"[control]\npath = \"{self.secret_id_file.parent / 'control.sock'}\"\n"
            f"[unlock]\ndeadline = \"{deadline}\"\nretry_initial = \"50ms\"\n"
            f"retry_max = \"500ms\"\n" + extra
        )

    def config(self, extra: str = "", **kw: str) -> cfgmod.Config:
        return cfgmod.parse(self.toml(extra, **kw))


def provision(root: hvac.Client, workdir: Path, *, kv_version: int = 2,
              host_id: str | None = None, ca_file: Path | None = None) -> VaultEnv:
    host_id = host_id or new_host_id()
    mount = "secret" if kv_version == 2 else "kv1"
    vcfg = cfgmod.VaultConfig.model_validate(
        {"address": root.url, "kv": {"mount": mount, "version": kv_version}})
    workdir.mkdir(parents=True, exist_ok=True)
    want = setup_vault.Want(vcfg, host_id)
    setup_vault.execute(root, setup_vault.plan(setup_vault.observe(root, want), want),
                        lambda _: None)
    # The secret_id file is the test's input (the whole-suite secrets scan treats a file
    # the product wrote as a leak), so the test issues and writes it; setup-vault's own
    # deliveries are tested in tests/test_setup_vault.py.
    secret_id = root.auth.approle.generate_secret_id(
        setup_vault.role_name(host_id), mount_point=vcfg.approle.mount)["data"]["secret_id"]
    register_secret(secret_id.encode(), f"secret_id of host {host_id}", host_credential=True)
    sid = workdir / f"secret-id-{host_id}"
    sid.write_text(secret_id)
    sid.chmod(0o600)
    role_id = setup_vault.read_role_id(root, want)
    assert role_id
    token = setup_vault.issue_enroll_token(root, vcfg, host_id)
    return VaultEnv(root.url, host_id, role_id, sid, token, kv_version, mount, ca_file)
