"""Whole operations, what `bootkey enroll|rotate|unenroll` call: lock the device, observe,
plan, and execute the plan.

Invariant: at every instant the volume opens with a key Vault holds (or with the key the
operator already had), and Vault keeps every key a keyslot uses. Each operation holds
the device's lock (`RunDir.lock`) from observing to the last step, so the plan it runs is
planned from what no one else is changing; bad input is refused while planning, before
anything is written.

Crash windows: those of the steps it runs (`bootkey.enroll.steps`); re-running the same
operation observes what is there and finishes or rolls back (docs/enroll.md).
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field, replace
from typing import Any

from bootkey import keystore, luks
from bootkey.config import Config
from bootkey.enroll.blank import blank_check, check_block_device_free
from bootkey.enroll.execute import execute
from bootkey.enroll.observe import View, location_of, observe
from bootkey.enroll.plan import plan_enroll, plan_format, plan_rewrap, plan_rotate, plan_unenroll
from bootkey.enroll.run import Run
from bootkey.enroll.rundir import RunDir
from bootkey.enroll.steps import AddKeyslot, AfterStep, Plan, RemoveBackup
from bootkey.keystore import Entry, Location
from bootkey.vault import VaultSession
from bootkey_core.errors import UsageError, VaultBadAnswer, WrongKey
from bootkey_core.secret import SecretBuffer


@dataclass
class Outcome:
    device: str
    luks_uuid: str
    vault_path: str
    summary: str
    steps: list[str]
    keyslots: list[int] = field(default_factory=list)
    recovery_key: SecretBuffer | None = None
    recovery_keyslot: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "luks_uuid": self.luks_uuid,
                "vault_path": self.vault_path, "summary": self.summary,
                "steps": self.steps, "keyslots": self.keyslots}


def _outcome(run: Run, plan: Plan, session: VaultSession) -> Outcome:
    entry = keystore.read_entry(session, run.loc)
    slots = sorted(k.keyslot for k in entry.keys) if entry else []
    out = Outcome(run.device, run.loc.luks_uuid, run.loc.display, plan.summary,
                  list(run.log), slots, run.recovery_key, run.recovery_keyslot)
    run.recovery_key = None  # handed over: the caller shows it once, then closes it
    return out



def _find_formatting(session: VaultSession, cfg: Config, host_id: str,
                     device: str) -> tuple[str, Entry] | None:
    """An interrupted `enroll --format` of this device: a pending entry naming it."""
    base = keystore.location_for(cfg, host_id, "x")
    prefix = base.path.rsplit("/", 1)[0]
    for name in session.kv_list(base.kv_mount, base.kv_version, prefix):
        luks_uuid = name.rstrip("/")
        loc = keystore.location_for(cfg, host_id, luks_uuid)
        try:
            entry = keystore.read_entry(session, loc)
        except VaultBadAnswer:
            continue
        if entry and entry.formatting == device and all(k.state == "pending"
                                                        for k in entry.keys):
            return luks_uuid, entry
    return None


def enroll(cfg: Config, session: VaultSession, host_id: str, device: str, *,
           name: str | None = None, unlock_key: SecretBuffer | None = None,
           keyslot: int | None = None, format_device: bool = False, force: bool = False,
           recovery_key: bool = False, dry_run: bool = False, rundir: RunDir | None = None,
           after_step: AfterStep | None = None) -> Outcome:
    """`bootkey enroll`: see plan_enroll / plan_format."""
    rundir = rundir or RunDir.from_env()
    with rundir.lock(device):
        version = luks.probe_magic(device)
        hdr = luks.inspect(device) if version == 2 else None
        resume_fmt: tuple[str, Entry] | None = None
        if format_device:
            if hdr is not None:
                loc = location_of(cfg, host_id, hdr)
                entry = keystore.read_entry(session, loc)
                # Ours already (an interrupted or finished `enroll --format`, or enrolled
                # before): finish or report instead of formatting — unless --force asks
                # to destroy a volume that was not in the middle of our format.
                formatting_ours = entry is not None and (entry.formatting == device
                                                         or not force)
                if not formatting_ours and not force:
                    blank_check(device)  # raises NotBlank naming the LUKS header
                if not formatting_ours:
                    hdr = None  # --force: format over it
            else:
                check_block_device_free(device)
                if not force:
                    blank_check(device)
                resume_fmt = _find_formatting(session, cfg, host_id, device)
        if hdr is None and format_device:
            luks_uuid = resume_fmt[0] if resume_fmt else str(uuidlib.uuid4())
            loc = keystore.location_for(cfg, host_id, luks_uuid)
            plan = plan_format(device, luks_uuid=luks_uuid, keyslot=keyslot,
                               resume=resume_fmt[1] if resume_fmt else None,
                               recovery_key=recovery_key)
        else:
            hdr = hdr or luks.inspect(device)  # raises NotLuks (with LUKS1 conversion hint)
            loc = location_of(cfg, host_id, hdr)
            view = observe(session, device, loc, hdr)
            plan = plan_enroll(view, keyslot=keyslot, have_unlock_key=unlock_key is not None,
                               recovery_key=recovery_key)
            if plan.needs_unlock_key:
                raise UsageError(f"{device}: enroll needs an existing passphrase or keyfile "
                                 "of this volume — pass --unlock-key-file FILE (or - for "
                                 "stdin)")
            if unlock_key is not None:
                _check_unlock_key(device, unlock_key, plan, "enroll")
        plan = _and_stale_backup(plan, rundir, loc.luks_uuid)
        run = Run(device, loc, session, rundir, name=name, unlock_key=unlock_key)
        if dry_run:
            return Outcome(device, loc.luks_uuid, loc.display, plan.summary + " (dry run)",
                           [str(s) for s in plan.steps])
        try:
            execute(plan, run, after_step)
            return _outcome(run, plan, session)
        finally:
            run.unlock_key = None  # the caller's buffer: the caller closes it
            run.close()


def _check_unlock_key(device: str, key: SecretBuffer, plan: Plan, verb: str) -> None:
    """Refuse, before anything is written, an operator key that would have to authorise
    a new keyslot but opens none."""
    if any(isinstance(s, AddKeyslot) for s in plan.steps) and \
            luks.test_key(device, key) is not luks.KeyTest.OK:
        raise WrongKey(f"{device}: cannot {verb}: the unlock key opens no keyslot — "
                       "nothing changed; check --unlock-key-file (read byte-exact: "
                       "a trailing newline counts)")


def _and_stale_backup(plan: Plan, rundir: RunDir, luks_uuid: str) -> Plan:
    """An interrupted run may have left its header backup; once this run has brought
    the volume to a finished state the backup is obsolete (and holds every keyslot)."""
    if any(isinstance(s, RemoveBackup) for s in plan.steps) or \
            not (rundir.backups / f"{luks_uuid}.luksheader").exists():
        return plan
    return replace(plan, steps=(*plan.steps, RemoveBackup()))


def _view_for(cfg: Config, session: VaultSession, host_id: str,
              device: str) -> tuple[View, Location]:
    hdr = luks.inspect(device)
    loc = location_of(cfg, host_id, hdr)
    return observe(session, device, loc, hdr), loc


def rotate(cfg: Config, session: VaultSession, host_id: str, device: str, *,
           rewrap: bool = False, unlock_key: SecretBuffer | None = None,
           dry_run: bool = False, rundir: RunDir | None = None,
           after_step: AfterStep | None = None) -> Outcome:
    """`bootkey rotate`: see plan_rotate / plan_rewrap. `unlock_key` (the operator's
    passphrase or keyfile) is used only when no Vault key opens the volume any more: it
    then authorises the new keyslot (exit 81's recovery)."""
    rundir = rundir or RunDir.from_env()
    with rundir.lock(device):
        view, loc = _view_for(cfg, session, host_id, device)
        plan = plan_rewrap(view) if rewrap else \
            plan_rotate(view, have_unlock_key=unlock_key is not None)
        operator_key = unlock_key if plan.by_operator_key else None
        if operator_key is not None:
            _check_unlock_key(device, operator_key, plan, "re-key")
        plan = _and_stale_backup(plan, rundir, loc.luks_uuid)
        if dry_run:
            return Outcome(device, loc.luks_uuid, loc.display, plan.summary + " (dry run)",
                           [str(s) for s in plan.steps])
        # the token is rewritten for the new keyslot: carry the volume's name over
        name = view.entry.name if view.entry else None
        run = Run(device, loc, session, rundir, name=name, unlock_key=operator_key)
        try:
            execute(plan, run, after_step)
            return _outcome(run, plan, session)
        finally:
            if run.unlock_key is operator_key:  # the caller's buffer: the caller closes it
                run.unlock_key = None
            run.close()


def unenroll(cfg: Config, session: VaultSession, host_id: str, device: str, *,
             purge: bool = False, unlock_key: SecretBuffer | None = None,
             dry_run: bool = False, rundir: RunDir | None = None,
             after_step: AfterStep | None = None) -> Outcome:
    rundir = rundir or RunDir.from_env()
    with rundir.lock(device):
        view, loc = _view_for(cfg, session, host_id, device)
        plan = plan_unenroll(view, purge=purge, have_unlock_key=unlock_key is not None)
        plan = _and_stale_backup(plan, rundir, loc.luks_uuid)
        if dry_run:
            return Outcome(device, loc.luks_uuid, loc.display, plan.summary + " (dry run)",
                           [str(s) for s in plan.steps])
        run = Run(device, loc, session, rundir, unlock_key=unlock_key)
        try:
            execute(plan, run, after_step)
            return _outcome(run, plan, session)
        finally:
            run.unlock_key = None
            run.close()
