"""Provision a real OpenBao the way an operator would for bootkey: KV mounts (v1 and v2),
a derived transit key, AppRole roles bound to the policies `bootkey policy` prints."""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import hvac

from bootkey import config as cfgmod
from bootkey import policy


def ensure_mounts(root: hvac.Client) -> None:
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    if "secret/" not in mounts:  # dev servers have it; a fresh real server does not
        root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    if "kv1/" not in mounts:
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    if "transit/" not in mounts:
        root.sys.enable_secrets_engine("transit", path="transit")
    auths = root.sys.list_auth_methods()["data"]
    if "approle/" not in auths:
        root.sys.enable_auth_method("approle")
    keys = []
    with contextlib.suppress(hvac.exceptions.InvalidPath):
        keys = root.secrets.transit.list_keys()["data"]["keys"]
    if "bootkey" not in keys:
        root.secrets.transit.create_key("bootkey", derived=True)


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
            f"[unlock]\ndeadline = \"{deadline}\"\nretry_initial = \"50ms\"\n"
            f"retry_max = \"500ms\"\n" + extra
        )

    def config(self, extra: str = "", **kw: str) -> cfgmod.Config:
        return cfgmod.parse(self.toml(extra, **kw))


def provision(root: hvac.Client, workdir: Path, *, kv_version: int = 2,
              host_id: str | None = None, ca_file: Path | None = None) -> VaultEnv:
    ensure_mounts(root)
    host_id = host_id or new_host_id()
    mount = "secret" if kv_version == 2 else "kv1"
    vcfg = cfgmod.VaultConfig.model_validate(
        {"address": root.url, "kv": {"mount": mount, "version": kv_version}}
    )
    boot = f"bootkey-boot-{host_id}"
    enroll = f"bootkey-enroll-{host_id}"
    root.sys.create_or_update_policy(boot, policy.boot_policy(vcfg, host_id))
    root.sys.create_or_update_policy(enroll, policy.enroll_policy(vcfg, host_id))
    root.auth.approle.create_or_update_approle(
        boot, token_policies=[boot], token_ttl="1h", token_max_ttl="4h", secret_id_ttl="1h"
    )
    role_id = root.auth.approle.read_role_id(boot)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(boot)["data"]["secret_id"]
    workdir.mkdir(parents=True, exist_ok=True)
    sid = workdir / f"secret-id-{host_id}"
    sid.write_text(secret_id)
    sid.chmod(0o600)
    tok = root.auth.token.create(policies=[enroll, boot], ttl="2h")["auth"]["client_token"]
    return VaultEnv(root.url, host_id, role_id, sid, tok, kv_version, mount, ca_file)
