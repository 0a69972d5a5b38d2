"""Where an operator command's Vault token comes from: enroll, rotate, unenroll and
import-vaultlocker act with the operator's rights (the policy `bootkey policy --enroll`
prints), not with the host's boot AppRole.

Invariant: a token never comes from argv (other users see it in /proc). The order is
`--token-file FILE`, then $VAULT_TOKEN, then $BAO_TOKEN (the names the vault and bao
CLIs read); with none of them the command logs in with the config's AppRole.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bootkey.config import Config
from bootkey.vault import VaultSession
from bootkey_core.errors import ConfigError

ENV_NAMES = ("VAULT_TOKEN", "BAO_TOKEN")  # first set, non-empty one wins


def operator_token(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The operator's token, or None: log in with the config's AppRole instead."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{token_file}: cannot read the Vault token: {e.strerror}") \
                from None
        if not token:
            raise ConfigError(f"{token_file}: the Vault token file is empty")
        return token
    for name in ENV_NAMES:
        if environ.get(name):
            return environ[name].strip()
    return None


def operator_session(cfg: Config, token_file: Path | None,
                     environ: Mapping[str, str]) -> VaultSession:
    """A Vault session with the operator's token, else logged in with the AppRole."""
    token = operator_token(token_file, environ)
    session = VaultSession.from_config(cfg, token=token)
    if token is None:
        session.login()
    return session
