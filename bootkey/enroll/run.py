"""`Run`: what the steps of one plan share while it executes (the device, its Vault
location, the keys in play, the proof a kill needs, what a rollback must undo), and the
check-and-set helpers every Vault-writing step uses.

Invariant: keys live only in `SecretBuffer`s that `close()` wipes; `restorable` is true
only between a header backup and the commit point (`Activate`), and `withdraw` names the
pending key this run wrote until it is committed — the two facts `rollback` acts on.

Crash windows: none of its own (in memory only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootkey import keystore, luks
from bootkey.enroll.rundir import RunDir
from bootkey.keystore import Entry, Location, SealedKey
from bootkey.vault import VaultSession
from bootkey_core.errors import UsageError
from bootkey_core.secret import SecretBuffer


@dataclass
class Run:
    """Everything the steps share while a plan executes. Keys are wiped by close()."""

    device: str
    loc: Location
    session: VaultSession
    rundir: RunDir
    name: str | None = None
    unlock_key: SecretBuffer | None = None  # operator's key, or an unsealed active key
    new_key: SecretBuffer | None = None
    sealed: str | None = None
    proof: luks.SlotVerified | None = None
    recovery_key: SecretBuffer | None = None
    recovery_keyslot: int | None = None
    backup: Path | None = None
    restorable: bool = False  # before the commit point: a failure restores the header
    withdraw: tuple[int, bool] | None = None  # (keyslot, entry created) written this run
    log: list[str] = field(default_factory=list)

    def close(self) -> None:
        for buf in (self.unlock_key, self.new_key, self.recovery_key):
            if buf is not None:
                buf.close()

    # Vault helpers ------------------------------------------------------------------

    def read(self) -> tuple[Entry | None, int | None]:
        """The entry and (KV v2) its current version, for check-and-set writes."""
        version: int | None = None
        if self.loc.kv_version == 2:
            meta = self.session.kv_metadata(self.loc.kv_mount, self.loc.path)
            if meta:
                version = int(meta.get("current_version") or 0)
        return keystore.read_entry(self.session, self.loc), version

    def write(self, entry: Entry, version: int | None) -> None:
        loc = self.loc
        self.session.kv_write(loc.kv_mount, loc.kv_version, loc.path, entry.to_kv(),
                              cas=version if loc.kv_version == 2 else None)

    def require(self, what: str, buf: SecretBuffer | None) -> SecretBuffer:
        if buf is None:
            raise UsageError(f"{self.device}: internal: step needs the {what}")
        return buf

def with_keys(entry: Entry, keys: list[SealedKey], **changes: Any) -> Entry:
    return entry.model_copy(update={"keys": keys, **changes})

