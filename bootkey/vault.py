"""bootkey's door to the one Vault session (bootkey_core.vault): the session built from
bootkey.toml's `[vault]` and `[unlock]` sections.

All logging in, renewal, fail-over and error classification live in
bootkey_core.vault.VaultSession, which KES uses too; this module only adds the
constructor from bootkey's Config, so `bootkey` code and tests can say
`VaultSession.from_config(cfg)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bootkey.config import Config
from bootkey_core import vault as core
from bootkey_core.vault import AccessOutlook, Backoff, SecretIdReader, WaitHook, WaitInfo

__all__ = ["AccessOutlook", "Backoff", "SecretIdReader", "VaultSession", "WaitHook", "WaitInfo"]


class VaultSession(core.VaultSession):
    @classmethod
    def from_config(cls, cfg: Config, *, on_wait: WaitHook | None = None,
                    token: str | None = None,
                    sleep: Callable[[float], None] = time.sleep,
                    read_secret_id: SecretIdReader | None = None) -> VaultSession:
        u = cfg.unlock
        return cls(cfg.vault, deadline=u.deadline, retry_initial=u.retry_initial,
                   retry_max=u.retry_max, on_wait=on_wait, token=token, sleep=sleep,
                   read_secret_id=read_secret_id)
