"""Set up a Vault for bootkey the way an operator would: KV and transit engines, the
derived transit key, AppRole, and the least-privilege policies of bootkey.policy.

Used by `bootkey demo` and the tests; an operator with a root-ish token can follow the
same steps by hand (docs/vault-setup.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import hvac
import hvac.exceptions

from bootkey import policy
from bootkey.config import VaultConfig


def ensure_engines(root: hvac.Client, vault: VaultConfig) -> None:
    """Mount KV (at the configured version), transit and AppRole if missing; create the
    derived transit key."""
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    kv = vault.kv
    if f"{kv.mount}/" not in mounts:
        root.sys.enable_secrets_engine("kv", path=kv.mount,
                                       options={"version": str(kv.version)})
    tr = vault.transit
    if f"{tr.mount}/" not in mounts:
        root.sys.enable_secrets_engine("transit", path=tr.mount)
    if f"{vault.approle.mount}/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle", path=vault.approle.mount)
    keys: list[str] = []
    with contextlib.suppress(hvac.exceptions.InvalidPath):
        keys = root.secrets.transit.list_keys(mount_point=tr.mount)["data"]["keys"]
    if tr.key not in keys:
        # derived: every (host, volume) context gets its own key, so a sealed key moved
        # to another entry does not unseal
        root.secrets.transit.create_key(tr.key, derived=True, mount_point=tr.mount)


@dataclass(frozen=True)
class HostCredentials:
    role_id: str
    secret_id: str
    enroll_token: str
    boot_policy: str
    enroll_policy: str


def create_host(root: hvac.Client, vault: VaultConfig, host_id: str, *,
                token_ttl: str = "1h") -> HostCredentials:
    """Policies, an AppRole role for booting, a secret_id, and an enrollment token."""
    boot, enroll = f"bootkey-boot-{host_id}", f"bootkey-enroll-{host_id}"
    root.sys.create_or_update_policy(boot, policy.boot_policy(vault, host_id))
    root.sys.create_or_update_policy(enroll, policy.enroll_policy(vault, host_id))
    am = vault.approle.mount
    root.auth.approle.create_or_update_approle(
        boot, token_policies=[boot], token_ttl=token_ttl, token_max_ttl="24h",
        secret_id_ttl="0", mount_point=am)
    role_id = root.auth.approle.read_role_id(boot, mount_point=am)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(boot, mount_point=am)["data"]["secret_id"]
    tok = root.auth.token.create(policies=[enroll, boot], ttl="2h")["auth"]["client_token"]
    return HostCredentials(role_id, secret_id, tok, boot, enroll)
