"""The one schema of a Vault connection and its AppRole login.

bootkey.toml's `[vault]` is this schema plus where bootkey's keys live (bootkey.config);
KES's `keystore.vault` YAML section is mapped onto it by kes.config
(`VaultSection.connection()`), so `bootkey_core.vault.VaultSession` — the only code that
logs in — reads one kind of value whichever file it came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from bootkey_core.duration import Duration
from bootkey_core.model import Model

DEFAULT_ADDRESS = "http://127.0.0.1:8200"


class AppRoleConfig(Model):
    mount: str = "approle"
    # The namespace to log in in when it differs from the connection's (KES
    # `approle.namespace`); "/" is the root namespace.
    namespace: str | None = None
    role_id: str | None = None
    role_id_file: Path | None = None
    # Inline secret_id (KES YAML `approle.secret`); bootkey.toml should name a file or a
    # systemd credential instead, so the config file holds no secret.
    secret_id: SecretStr | None = None
    secret_id_file: Path | None = Path("/etc/bootkey/secret-id")
    secret_id_credential: str | None = None
    wrapped_secret_id_file: Path | None = None
    remove_secret_id_file: bool = False

    @model_validator(mode="after")
    def _one_role_id(self) -> AppRoleConfig:
        if self.role_id is not None and self.role_id_file is not None:
            raise ValueError("set role_id or role_id_file, not both")
        return self


class VaultConnection(Model):
    address: list[str] = Field(default_factory=lambda: [DEFAULT_ADDRESS], min_length=1)
    ca_file: Path | None = None
    # A TLS client certificate for Vault (KES `keystore.vault.tls.cert`/`key`).
    client_cert: Path | None = None
    client_key: Path | None = None
    namespace: str = ""
    timeout: Duration = 5.0
    # A static token instead of AppRole (KES `keystore.vault.token`): it is renewed while
    # Vault allows, but nothing can log in again once it expires.
    token: SecretStr | None = None
    approle: AppRoleConfig = AppRoleConfig()

    @field_validator("address", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("address")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for a in v:
            if not re.match(r"^https?://[^/\s]+", a):
                raise ValueError(f"{a!r} is not a URL: use e.g. \"https://vault.example:8200\"")
        return [a.rstrip("/") for a in v]

    @model_validator(mode="after")
    def _client_pair(self) -> VaultConnection:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("set both client_cert and client_key, or neither")
        return self
