"""Observed state: what one volume's LUKS2 header and Vault entry show, as plain values.

Invariant: observing changes nothing. `observe()` reads the header and the entry and, for
each Vault key whose keyslot exists, tests that key against that keyslot alone
(`open --test-passphrase --key-slot N`); the planners (`bootkey.enroll.plan`) decide only
from the resulting `View`, so a crashed run is resumed by observing again.

Crash windows: none (read-only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from bootkey import keystore, luks
from bootkey.config import Config
from bootkey.keystore import BootkeyToken, Entry, Location
from bootkey.vault import VaultSession

RECOVERY_TOKEN_TYPE = "bootkey-recovery"


@dataclass(frozen=True)
class KeyView:
    keyslot: int
    state: str
    in_header: bool
    opens: bool  # the Vault key opens this keyslot alone (False when not in the header)


@dataclass(frozen=True)
class View:
    """What the header and Vault show for one volume. Plain values: planners are pure."""

    device: str
    luks_uuid: str
    keyslots: frozenset[int]
    tokens: Mapping[int, frozenset[int]]  # this location's bootkey tokens: id → keyslots
    entry: Entry | None
    keys: tuple[KeyView, ...] = ()
    kv_version: int = 2
    recovery_tokens: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def by_state(self, state: str) -> list[KeyView]:
        return [k for k in self.keys if k.state == state]

    def working(self, state: str = "active") -> list[KeyView]:
        return [k for k in self.keys if k.state == state and k.opens]

    def tokens_for(self, keyslot: int) -> list[int]:
        return sorted(t for t, s in self.tokens.items() if keyslot in s)

    def orphan_tokens(self, keep: frozenset[int] = frozenset()) -> list[int]:
        """Tokens naming no keyslot that exists (or only keyslots about to go)."""
        live = self.keyslots - keep
        return sorted(t for t, s in self.tokens.items() if not s & live)


def observe(session: VaultSession, device: str, loc: Location,
            hdr: luks.Header | None = None) -> View:
    """Read header and entry; unseal each Vault key whose keyslot exists and test it
    against that keyslot alone."""
    hdr = hdr or luks.inspect(device)
    entry = keystore.read_entry(session, loc)
    tokens: dict[int, frozenset[int]] = {}
    for tid, raw in hdr.tokens_of_type(keystore.TOKEN_TYPE).items():
        try:
            tok = BootkeyToken.model_validate(raw)
        except ValidationError:
            continue
        if tok.host_id == loc.host_id and tok.kv_path == loc.path:
            tokens[tid] = frozenset(int(s) for s in tok.keyslots)
    recovery = {tid: frozenset(hdr.token_keyslots(tid))
                for tid in hdr.tokens_of_type(RECOVERY_TOKEN_TYPE)}
    keys: list[KeyView] = []
    for k in entry.keys if entry else []:
        present = k.keyslot in hdr.keyslots
        opens = False
        if present:
            with keystore.unseal(session, loc, k) as key:
                opens = luks.test_key(device, key, k.keyslot) is luks.KeyTest.OK
        keys.append(KeyView(k.keyslot, k.state, present, opens))
    return View(device, hdr.uuid, frozenset(hdr.keyslots), tokens, entry, tuple(keys),
                loc.kv_version, recovery)




def location_of(cfg: Config, host_id: str, hdr: luks.Header) -> Location:
    """The Vault location a volume's bootkey token names, else the configured one."""
    for raw in hdr.tokens_of_type(keystore.TOKEN_TYPE).values():
        try:
            tok = BootkeyToken.model_validate(raw)
        except ValidationError:
            continue
        if tok.host_id == host_id:
            return tok.location(hdr.uuid)
    return keystore.location_for(cfg, host_id, hdr.uuid)

