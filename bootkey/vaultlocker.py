"""Migration from vaultlocker.

vaultlocker keeps each volume's key at `<backend>/<hostname>/<luks_uuid>` (KV v1, or v2
in later versions), field `dmcrypt_key`: the base64 text of 512 random bytes, which it
passes verbatim (the text, not the decoded bytes) to cryptsetup as the passphrase.

Invariant: a volume is only changed after vaultlocker's key has been shown to open it,
and vaultlocker's keyslot is only killed after bootkey's keyslot has been proven to open
the volume alone. vaultlocker's Vault entry is left in place (it is vaultlocker's data;
delete it once the old keyslot is gone and nothing uses vaultlocker any more).
Re-running is safe: an enrolled volume is not enrolled twice, a removed keyslot is not
looked for again.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import hvac.exceptions

from bootkey import enroll, luks, unlock
from bootkey.config import Config
from bootkey.vault import VaultSession
from bootkey_core.errors import BootkeyError, NotLuks
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

FIELD = "dmcrypt_key"
# LUKS1 phdr: magic 6, version 2, cipher-name 32, cipher-mode 32, hash-spec 32,
# payload-offset 4, key-bytes 4, mk-digest 20, salt 32, iterations 4, then uuid 40.
_LUKS1_UUID = slice(168, 208)


@dataclass
class ImportResult:
    luks_uuid: str
    device: str | None
    status: str  # migrated | skipped | failed
    reason: str
    exit_code: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"luks_uuid": self.luks_uuid, "device": self.device, "status": self.status,
                "reason": self.reason, "exit_code": self.exit_code}


def detect_kv_version(session: VaultSession, mount: str) -> int:
    """The backend's KV version, as the Vault CLI finds it (sys/internal/ui/mounts is
    readable by any token with a capability on the mount); vaultlocker's default v1 if
    Vault will not say."""
    try:
        res = session.raw_client().read(f"sys/internal/ui/mounts/{mount}")
    except (hvac.exceptions.VaultError, OSError):
        return 1
    opts = ((res or {}).get("data") or {}).get("options") or {}
    return 2 if str(opts.get("version")) == "2" else 1


def _luks_uuids(devices: list[str]) -> dict[str, tuple[str, int]]:
    """LUKS UUID → (device, LUKS version) for every LUKS device among `devices`."""
    out: dict[str, tuple[str, int]] = {}
    for dev in devices:
        version = luks.probe_magic(dev)
        if version == 2:
            try:
                out.setdefault(luks.inspect(dev).uuid, (dev, 2))
            except BootkeyError:
                continue
        elif version == 1:
            try:
                with open(dev, "rb") as f:
                    head = f.read(_LUKS1_UUID.stop)
            except OSError:
                continue
            uid = head[_LUKS1_UUID].rstrip(b"\0").decode(errors="replace")
            out.setdefault(uid, (dev, 1))
    return out


def configured_devices(cfg: Config) -> list[str]:
    """The devices `[[volume]]` names (a path, UUID=, LABEL=, …) that are present now: a
    volume listed there is found even when no scan or `[unlock] search` glob covers it."""
    out: list[str] = []
    for vc in cfg.volume:
        try:
            dev = luks.resolve_device(vc.device)
        except BootkeyError:
            continue  # not attached (yet): reported as "no device" if vaultlocker has it
        if os.path.exists(dev):
            out.append(os.path.realpath(dev))
    return out


def _old_keyslots(device: str, passphrase: SecretBuffer, exclude: set[int]) -> list[int]:
    hdr = luks.inspect(device)
    return [n for n in sorted(hdr.keyslots) if n not in exclude
            and luks.test_key(device, passphrase, n) is luks.KeyTest.OK]


def import_one(cfg: Config, session: VaultSession, host_id: str, *, luks_uuid: str,
               device: str, passphrase: SecretBuffer, keep_old_slot: bool,
               dry_run: bool = False,
               after_step: enroll.AfterStep | None = None) -> ImportResult:
    if luks.test_key(device, passphrase) is not luks.KeyTest.OK:
        return ImportResult(luks_uuid, device, "failed",
                            "vaultlocker's key does not open this volume — left alone", 81)
    out = enroll.enroll(cfg, session, host_id, device, name=f"crypt-{luks_uuid}",
                        unlock_key=passphrase, dry_run=dry_run, after_step=after_step)
    if dry_run:
        return ImportResult(luks_uuid, device, "migrated", f"would {out.summary}")
    ours = set(out.keyslots)
    note = f"enrolled (bootkey keyslot {', '.join(map(str, sorted(ours)))})"
    old = _old_keyslots(device, passphrase, ours)
    if keep_old_slot:
        return ImportResult(luks_uuid, device, "migrated",
                            f"{note}; vaultlocker keyslot {old} kept")
    if old:
        loc = enroll.location_of(cfg, host_id, luks.inspect(device))
        b = sorted(ours)[-1]
        steps: list[enroll.Step] = [enroll.UnsealKey(b), enroll.TestSlotAlone(b),
                                    enroll.BackupHeader(),
                                    *[enroll.KillSlot(n) for n in old],
                                    enroll.RemoveBackup()]
        run = enroll.Run(device, loc, session, enroll.RunDir.from_env())
        try:
            with run.rundir.lock(device):
                enroll.execute(enroll.Plan(tuple(steps), "remove vaultlocker's keyslot"),
                               run, after_step)
        finally:
            run.close()
    return ImportResult(luks_uuid, device, "migrated",
                        f"{note}; vaultlocker keyslot {old or 'already'} removed")


def import_all(cfg: Config, session: VaultSession, host_id: str, *, backend: str,
               hostname: str | None, kv_version: int | None, keep_old_slot: bool,
               devices: list[str], dry_run: bool = False,
               after_step: enroll.AfterStep | None = None) -> list[ImportResult]:
    host = hostname or socket.gethostname()
    version = kv_version or detect_kv_version(session, backend)
    names = [n.rstrip("/") for n in session.kv_list(backend, version, host)
             if not n.endswith("/")]
    if not names:
        return []
    found = _luks_uuids([*devices, *configured_devices(cfg),
                         *unlock.candidate_devices(cfg.unlock.search)])
    results: list[ImportResult] = []
    for luks_uuid in sorted(names):
        where = VaultSession.kv_api_path(backend, version, f"{host}/{luks_uuid}")
        dev, luks_version = found.get(luks_uuid, (None, 0))
        if dev is None:
            results.append(ImportResult(luks_uuid, None, "skipped",
                                        f"no device with this LUKS UUID here ({where}; "
                                        "looked at --device, [[volume]], every block device "
                                        "and [unlock] search)"))
            continue
        if luks_version == 1:
            e = NotLuks(f"{dev}: LUKS1 volume — convert it with `cryptsetup convert --type "
                        f"luks2 {dev}` (back up the header first), then import again")
            results.append(ImportResult(luks_uuid, dev, "skipped", str(e), e.exit_code))
            continue
        try:
            data = session.kv_read(backend, version, f"{host}/{luks_uuid}")
            text = (data or {}).get(FIELD)
            if not isinstance(text, str) or not text:
                results.append(ImportResult(luks_uuid, dev, "skipped",
                                            f"{where} has no {FIELD} field"))
                continue
            with SecretBuffer.from_bytes(bytearray(text.encode())) as passphrase:
                del text, data
                results.append(import_one(cfg, session, host_id, luks_uuid=luks_uuid,
                                          device=dev, passphrase=passphrase,
                                          keep_old_slot=keep_old_slot, dry_run=dry_run,
                                          after_step=after_step))
        except BootkeyError as e:
            log.error("%s: import failed: %s", dev, e)
            results.append(ImportResult(luks_uuid, dev, "failed", str(e), e.exit_code))
    return results

