"""Where a volume's sealed key lives in Vault, what the entry looks like, seal/unseal.

Layout (DESIGN §3): KV `<mount>/<prefix>/<host_id>/<luks_uuid>`; the entry holds one or
more transit-sealed keys (`vault:vN:...`, any N), each naming the keyslot it opens, plus
metadata. More than one key exists only while a rotate is in flight. Sealing uses the
derived transit key with context `<host_id>/<luks_uuid>`, so a sealed key copied to
another host's or volume's entry does not unseal.

The LUKS2 token `{"type": "bootkey", "keyslots": [...], ...}` carries the same location
(never the key), so a volume is found and unlocked from its header alone.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bootkey.config import Config
from bootkey.vault import VaultSession
from bootkey_core.errors import VaultBadAnswer
from bootkey_core.secret import SecretBuffer

ENTRY_FORMAT = 1
TOKEN_TYPE = "bootkey"
KEY_BYTES = 64
_SEALED = re.compile(r"^vault:v\d+:[A-Za-z0-9+/=]+$")


@dataclass(frozen=True)
class Location:
    """A volume's place in Vault: KV entry and transit key."""

    kv_mount: str
    kv_version: int
    path: str  # inside the mount: <prefix>/<host_id>/<luks_uuid>
    transit_mount: str
    transit_key: str
    host_id: str
    luks_uuid: str

    @property
    def context(self) -> bytes:
        return f"{self.host_id}/{self.luks_uuid}".encode()

    @property
    def display(self) -> str:
        return VaultSession.kv_api_path(self.kv_mount, self.kv_version, self.path)


def location_for(cfg: Config, host_id: str, luks_uuid: str) -> Location:
    kv, tr = cfg.vault.kv, cfg.vault.transit
    path = "/".join(p for p in (kv.prefix, host_id, luks_uuid) if p)
    return Location(kv.mount, kv.version, path, tr.mount, tr.key, host_id, luks_uuid)


class SealedKey(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    keyslot: int = Field(ge=0, le=31)
    sealed: str
    created_at: str
    # "active": in use. "pending": written by an enroll/rotate that has not finished;
    # its keyslot may or may not exist yet (resume decides from the header).
    # "retiring": replaced by a rotate; its keyslot is about to be killed (bootkey.enroll).
    state: Literal["active", "pending", "retiring"] = "active"

    @field_validator("sealed")
    @classmethod
    def _sealed(cls, v: str) -> str:
        if not _SEALED.match(v):
            raise ValueError("not a transit ciphertext (vault:vN:...)")
        return v


class Entry(BaseModel):
    """The KV entry of one volume."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal[1] = 1
    host_id: str
    luks_uuid: str
    name: str | None = None
    keys: list[SealedKey]
    # Set only between the Vault write and luksFormat of `bootkey enroll --format`: the
    # device being formatted, so a re-run finds this entry while the device is still blank.
    formatting: str | None = None

    def to_kv(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def key_for_slot(self, keyslot: int) -> SealedKey | None:
        return next((k for k in self.keys if k.keyslot == keyslot), None)


class BootkeyToken(BaseModel):
    """The LUKS2 token bootkey writes next to its keyslot."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["bootkey"] = "bootkey"
    keyslots: list[str]
    version: int = 1
    host_id: str
    kv_mount: str
    kv_version: Literal[1, 2]
    kv_path: str
    transit_mount: str
    transit_key: str
    name: str | None = None

    def location(self, luks_uuid: str) -> Location:
        return Location(self.kv_mount, self.kv_version, self.kv_path, self.transit_mount,
                        self.transit_key, self.host_id, luks_uuid)

    @classmethod
    def for_location(cls, loc: Location, keyslot: int, name: str | None) -> BootkeyToken:
        return cls(keyslots=[str(keyslot)], host_id=loc.host_id, kv_mount=loc.kv_mount,
                   kv_version=loc.kv_version,  # type: ignore[arg-type]
                   kv_path=loc.path, transit_mount=loc.transit_mount,
                   transit_key=loc.transit_key, name=name)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_entry(session: VaultSession, loc: Location,
               deadline: float | None = None) -> Entry | None:
    data = session.kv_read(loc.kv_mount, loc.kv_version, loc.path, deadline)
    if data is None:
        return None
    return parse_entry(data, loc)


def parse_entry(data: dict[str, Any], loc: Location) -> Entry:
    try:
        entry = Entry.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise VaultBadAnswer(
            f"{loc.display}: not a bootkey entry ({where}: {first['msg']}) — was it written "
            "by another tool? `bootkey import-vaultlocker` migrates vaultlocker entries"
        ) from None
    if entry.luks_uuid != loc.luks_uuid or entry.host_id != loc.host_id:
        raise VaultBadAnswer(f"{loc.display}: entry belongs to {entry.host_id}/"
                             f"{entry.luks_uuid}, not this volume")
    if not entry.keys:
        raise VaultBadAnswer(f"{loc.display}: entry holds no key")
    return entry


def unseal(session: VaultSession, loc: Location, key: SealedKey,
           deadline: float | None = None) -> SecretBuffer:
    """Transit-decrypt one sealed key into locked memory."""
    return session.transit_decrypt(loc.transit_mount, loc.transit_key, key.sealed,
                                   loc.context, deadline)


def seal(session: VaultSession, loc: Location, key: SecretBuffer) -> str:
    return session.transit_encrypt(loc.transit_mount, loc.transit_key, key, loc.context)
