"""A Vault PKI engine on a real OpenBao, with a role the KES server certificate comes from."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import hvac


@dataclass
class VaultPki:
    root: hvac.Client
    mount: str
    role: str
    ca_file: Path


def enable_pki(root: hvac.Client, tmp_path: Path, role: str = "kes") -> VaultPki:
    """A fresh PKI mount with a root CA and a role for localhost/IP SANs (EC P-256, 1 h)."""
    mount = f"pki-{secrets.token_hex(4)}"
    root.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "24h"})
    ca = root.secrets.pki.generate_root("internal", "bootkey test root", mount_point=mount)
    root.secrets.pki.create_or_update_role(
        role, mount_point=mount,
        extra_params={"allow_localhost": True, "allowed_domains": ["localhost"],
                      "allow_bare_domains": True, "allow_ip_sans": True, "max_ttl": "1h",
                      "not_before_duration": "1s", "key_type": "ec", "key_bits": 256},
    )
    ca_file = tmp_path / "vault-ca.pem"
    ca_file.write_text(ca["data"]["certificate"])
    return VaultPki(root, mount, role, ca_file)
