"""Resolve volumes, fetch and unseal their keys, open (or verify) them in parallel.

One Vault login serves every volume; each volume is a small pipeline (read entry →
unseal → open or test) run on a bounded pool, so one slow or broken volume never holds
up the others. A key lives in a SecretBuffer only while its volume is being handled.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydantic import ValidationError

from bootkey import keystore, luks
from bootkey.config import Config, VolumeConfig
from bootkey.journal import fields
from bootkey.keystore import BootkeyToken, Location
from bootkey.vault import VaultSession
from bootkey_core.errors import (
    BootkeyError,
    DeadlineExceeded,
    PartialFailure,
    UsageError,
    VaultNotFound,
    WrongKey,
)
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

# Block devices that never hold a LUKS volume of ours: opened mappings, ram disks, CD-ROMs.
_SKIP_PREFIXES = ("dm-", "ram", "zram", "sr", "fd", "nbd")


class Outcome(Enum):
    OPENED = "opened"
    ALREADY_OPEN = "already open"
    VERIFIED = "verified"
    FAILED = "failed"


@dataclass(frozen=True)
class Volume:
    name: str
    device: str
    luks_uuid: str
    location: Location
    keyslots: frozenset[int]  # keyslots named by the bootkey token (empty if none)
    readonly: bool = False
    discard: bool = False
    source: str = "config"  # "config" or "token"
    # keyslots in the header when it was read; unlock right after resolving trusts them
    header_keyslots: frozenset[int] = frozenset()


@dataclass
class VolumeResult:
    name: str
    device: str
    outcome: Outcome
    luks_uuid: str = ""
    keyslot: int | None = None
    reason: str | None = None
    exit_code: int = 0
    seconds: float = 0.0
    error: BootkeyError | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.FAILED

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name, "device": self.device, "luks_uuid": self.luks_uuid,
            "result": self.outcome.value, "seconds": round(self.seconds, 4),
        }
        if self.keyslot is not None:
            out["keyslot"] = self.keyslot
        if self.reason:
            out["reason"] = self.reason
            out["exit_code"] = self.exit_code
        return out


def default_name(luks_uuid: str) -> str:
    """systemd's name for an unnamed LUKS volume."""
    return f"luks-{luks_uuid}"


def bootkey_token(hdr: luks.Header) -> BootkeyToken | None:
    for tok in hdr.tokens_of_type(keystore.TOKEN_TYPE).values():
        try:
            return BootkeyToken.model_validate(tok)
        except ValidationError:
            log.warning("ignoring a malformed bootkey token", extra=fields(device=hdr.device))
    return None


def candidate_devices(search: Iterable[str] = ()) -> list[str]:
    """Every block device of this host (from sysfs, no udev needed) plus search globs."""
    out: list[str] = []
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        names = []
    for n in names:
        if n.startswith(_SKIP_PREFIXES):
            continue
        if n.startswith("loop") and not Path(f"/sys/class/block/{n}/loop").exists():
            continue  # unattached loop device
        dev = f"/dev/{n}"
        if os.path.exists(dev):
            out.append(dev)
    for pattern in search:
        out.extend(sorted(glob.glob(pattern)))
    return out


def volume_from_header(hdr: luks.Header, cfg: Config, host_id: str,
                       vc: VolumeConfig | None) -> Volume | None:
    tok = bootkey_token(hdr)
    if tok is not None and tok.host_id != host_id:
        if vc is None:
            return None  # another host's volume: not ours to open
        log.warning("%s: token names host %s, configured here as %s",
                    hdr.device, tok.host_id, vc.name)
    loc = tok.location(hdr.uuid) if tok and tok.host_id == host_id else \
        keystore.location_for(cfg, host_id, hdr.uuid)
    slots = frozenset(int(s) for s in tok.keyslots) if tok else frozenset()
    present = frozenset(hdr.keyslots)
    if vc is not None:
        return Volume(vc.name, hdr.device, hdr.uuid, loc, slots, vc.readonly, vc.discard,
                      "config", present)
    if tok is None:
        return None
    return Volume(tok.name or default_name(hdr.uuid), hdr.device, hdr.uuid, loc, slots,
                  source="token", header_keyslots=present)


def resolve_volumes(cfg: Config, host_id: str | None = None,
                    names: Sequence[str] | None = None,
                    scan: bool = True) -> tuple[list[Volume], list[VolumeResult]]:
    """Configured volumes plus (if `scan`) every device carrying this host's bootkey
    token. Returns (volumes, failures to resolve). `names` restricts to those names
    (or device paths); an unknown name is a UsageError."""
    host = host_id or cfg.resolved_host_id()
    volumes: list[Volume] = []
    failed: list[VolumeResult] = []
    # (header, its [[volume]] entry or None); configured ones first, so they win a UUID
    found: list[tuple[luks.Header, VolumeConfig | None]] = []
    for vc in cfg.volume:
        try:
            found.append((luks.inspect(luks.resolve_device(vc.device)), vc))
        except BootkeyError as e:
            failed.append(VolumeResult(vc.name, vc.device, Outcome.FAILED, reason=str(e),
                                       exit_code=e.exit_code, error=e))
    if scan:
        luks2 = [d for d in candidate_devices(cfg.unlock.search) if luks.probe_magic(d) == 2]
        with ThreadPoolExecutor(max_workers=max(1, min(cfg.unlock.parallel, len(luks2))),
                                thread_name_prefix="scan") as pool:
            found += [(h, None) for h in pool.map(_inspect_or_none, luks2) if h is not None]
    seen_uuids: set[str] = set()
    for hdr, entry in found:
        if entry is None and hdr.uuid in seen_uuids:  # scanned again: configured already
            continue
        vol = volume_from_header(hdr, cfg, host, entry)
        if vol:
            volumes.append(vol)
            seen_uuids.add(vol.luks_uuid)
    if names:
        wanted = set(names)
        chosen = [v for v in volumes if v.name in wanted or v.device in wanted]
        chosen_f = [f for f in failed if f.name in wanted or f.device in wanted]
        known = {v.name for v in chosen} | {v.device for v in chosen} | \
            {f.name for f in chosen_f} | {f.device for f in chosen_f}
        unknown = sorted(wanted - known)
        if unknown:
            raise UsageError(
                f"{', '.join(unknown)}: no such volume — list it under [[volume]] in the "
                "config or enroll it (`bootkey enroll DEVICE`)"
            )
        return chosen, chosen_f
    return volumes, failed


def _inspect_or_none(dev: str) -> luks.Header | None:
    try:
        return luks.inspect(dev)
    except BootkeyError:
        return None


KeyUse = Callable[[Volume, SecretBuffer, int], Outcome]


def check_key(vol: Volume, key: SecretBuffer, keyslot: int) -> Outcome:
    if luks.test_key(vol.device, key, keyslot) is not luks.KeyTest.OK:
        raise WrongKey(f"volume {vol.name} ({vol.device}): the Vault key does not open "
                       f"keyslot {keyslot} — re-key it with an existing passphrase or "
                       f"keyfile: `bootkey rotate {vol.name} --unlock-key-file FILE`")
    return Outcome.VERIFIED


def open_with_key(vol: Volume, key: SecretBuffer, keyslot: int) -> Outcome:
    res = luks.open_volume(vol.device, vol.name, key, readonly=vol.readonly,
                           discard=vol.discard)
    return Outcome.OPENED if res is luks.OpenResult.OPENED else Outcome.ALREADY_OPEN


def candidate_keys(session: VaultSession, vol: Volume, deadline_at: float, *,
                   fresh_header: bool = True) -> list[keystore.SealedKey]:
    """The sealed keys worth trying, best first: active before pending/retiring, and
    only those whose keyslot exists in the header."""
    remaining = deadline_at - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded(f"volume {vol.name}: unlock deadline passed")
    entry = keystore.read_entry(session, vol.location, remaining)
    if entry is None:
        raise VaultNotFound(
            f"volume {vol.name} (UUID {vol.luks_uuid}): no key in Vault at "
            f"{vol.location.display} — enroll it with `bootkey enroll {vol.device}`"
        )
    hdr_slots = set(luks.inspect(vol.device).keyslots) if fresh_header or \
        not vol.header_keyslots else vol.header_keyslots
    keys = sorted((k for k in entry.keys if k.keyslot in hdr_slots),
                  key=lambda k: (k.state != "active", -k.keyslot))
    if not keys:
        raise WrongKey(f"volume {vol.name} (UUID {vol.luks_uuid}): none of the keyslots "
                       "Vault holds keys for exists in the header — re-key it with an "
                       "existing passphrase or keyfile: "
                       f"`bootkey rotate {vol.name} --unlock-key-file FILE`")
    return keys


def key_for_volume(session: VaultSession, vol: Volume, deadline_at: float) -> SecretBuffer:
    """An unsealed key proven to open its keyslot (for the crypttab key socket). The
    caller owns and must close the buffer."""
    for k in candidate_keys(session, vol, deadline_at):
        key = keystore.unseal(session, vol.location, k, deadline_at - time.monotonic())
        if luks.test_key(vol.device, key, k.keyslot) is luks.KeyTest.OK:
            return key
        key.close()
    raise WrongKey(f"volume {vol.name} (UUID {vol.luks_uuid}): no Vault key opens it — "
                   "re-key it with an existing passphrase or keyfile: "
                   f"`bootkey rotate {vol.name} --unlock-key-file FILE`")


def unlock_one(session: VaultSession, vol: Volume, use: KeyUse,
               deadline_at: float) -> VolumeResult:
    """Fetch, unseal and use the key(s) of one volume. Never raises."""
    t0 = time.monotonic()
    ex = fields(volume=vol.name, luks_uuid=vol.luks_uuid, vault_path=vol.location.display)
    try:
        if use is open_with_key and luks.is_active(vol.name):
            return VolumeResult(vol.name, vol.device, Outcome.ALREADY_OPEN, vol.luks_uuid,
                                seconds=time.monotonic() - t0)
        last: BootkeyError | None = None
        for k in candidate_keys(session, vol, deadline_at, fresh_header=False):
            with keystore.unseal(session, vol.location, k,
                                 deadline_at - time.monotonic()) as key:
                try:
                    outcome = use(vol, key, k.keyslot)
                except WrongKey as e:
                    last = e
                    continue
            log.info("volume %s %s", vol.name, outcome.value, extra=ex)
            return VolumeResult(vol.name, vol.device, outcome, vol.luks_uuid, k.keyslot,
                                seconds=time.monotonic() - t0)
        raise last if last else WrongKey(f"volume {vol.name}: no key worked")
    except BootkeyError as e:
        log.error("volume %s: %s", vol.name, e, extra=ex)
        return VolumeResult(vol.name, vol.device, Outcome.FAILED, vol.luks_uuid,
                            reason=str(e), exit_code=e.exit_code, error=e,
                            seconds=time.monotonic() - t0)


def unlock_all(session: VaultSession, volumes: Sequence[Volume], *, check: bool,
               parallel: int, deadline_at: float) -> list[VolumeResult]:
    use: KeyUse = check_key if check else open_with_key
    if not volumes:
        return []
    with ThreadPoolExecutor(max_workers=min(parallel, len(volumes)),
                            thread_name_prefix="unlock") as pool:
        return list(pool.map(lambda v: unlock_one(session, v, use, deadline_at), volumes))


def summarize(results: Sequence[VolumeResult]) -> BootkeyError | None:
    """None if every volume succeeded, else the error to exit with."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return None
    if len(failed) == len(results) and len({r.exit_code for r in failed}) == 1:
        err = failed[0].error
        if len(failed) == 1 and err is not None:
            return err
        e = PartialFailure(f"{len(failed)} of {len(results)} volumes failed")
        e.exit_code = failed[0].exit_code
        return e
    return PartialFailure(f"{len(failed)} of {len(results)} volumes failed")
