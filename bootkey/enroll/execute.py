"""The executor: what each step does (`_RUNNERS`), and `execute()`, which runs a plan's
steps in order and calls `after_step` after each.

Invariant: each step verifies its own result before the next starts; an irreversible
step runs only with its proof (`KillSlot` needs the `SlotVerified` that only
`TestSlotAlone`/`ProveRemaining` build, and `luks.kill_slot` checks it). When a step
fails before the commit point (`Activate`), `rollback` restores the header and withdraws
the pending key this run wrote, and the error is re-raised.

Crash windows: the process may die after any step (the crash tests SIGKILL it from
`after_step`) or inside one (cryptsetup's own updates are atomic per metadata write,
except `luksKillSlot`, which wipes the keyslot's area before it rewrites the metadata —
see `plan._ours`). Each step's docstring in `bootkey.enroll.steps` says what remains.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from bootkey import keystore, luks
from bootkey.enroll import steps as st
from bootkey.enroll.observe import RECOVERY_TOKEN_TYPE
from bootkey.enroll.rollback import rollback
from bootkey.enroll.run import Run, with_keys
from bootkey.enroll.steps import AfterStep, Plan, Step
from bootkey.keystore import BootkeyToken, Entry, SealedKey
from bootkey_core.errors import (
    CryptsetupFailed,
    LastKeyslot,
    UsageError,
    VaultBadAnswer,
    VaultConflict,
    VaultNotFound,
    WrongKey,
)
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

# Recovery keys: Crockford base32 (no I, L, O, U: nothing to misread), 8 groups of 4 =
# 160 bits; added with cryptsetup's default (benchmarked argon2id) KDF because a human
# may type it and it must resist guessing on a stolen disk.
_RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RECOVERY_GROUPS = 8


def _generate(r: Run, s: st.Generate) -> None:
    r.new_key = SecretBuffer.random(keystore.KEY_BYTES)


def _seal(r: Run, s: st.Seal) -> None:
    r.sealed = keystore.seal(r.session, r.loc, r.require("new key", r.new_key))


def _vault_write(r: Run, s: st.VaultWrite) -> None:
    if r.sealed is None:
        raise UsageError("internal: st.VaultWrite before st.Seal")
    key = SealedKey(keyslot=s.keyslot, sealed=r.sealed, created_at=keystore.now(),
                    state="pending")
    loc = r.loc
    if s.create:
        entry = Entry(host_id=loc.host_id, luks_uuid=loc.luks_uuid, name=r.name, keys=[key],
                      formatting=s.formatting)
        r.session.kv_write(loc.kv_mount, loc.kv_version, loc.path, entry.to_kv(),
                           create_only=True)
        r.withdraw = (s.keyslot, True)
        return
    cur, version = r.read()
    if cur is None:
        raise VaultNotFound(f"{loc.display}: the entry vanished during the rotate — re-run")
    if cur.key_for_slot(s.keyslot) is not None:
        raise VaultConflict(f"{loc.display}: already holds a key for keyslot {s.keyslot} — "
                            "re-run to resume")
    r.write(with_keys(cur, [*cur.keys, key]), version)
    r.withdraw = (s.keyslot, False)


def _vault_read_back(r: Run, s: st.VaultReadBack) -> None:
    entry = keystore.read_entry(r.session, r.loc)
    got = entry.key_for_slot(s.keyslot) if entry else None
    if got is None or got.sealed != r.sealed:
        raise VaultBadAnswer(f"{r.loc.display}: read back does not match what was written — "
                             "is another writer using this path?")
    with keystore.unseal(r.session, r.loc, got) as back:
        if not back.equals(r.require("new key", r.new_key)):
            raise VaultBadAnswer(f"{r.loc.display}: the stored key does not unseal to the "
                                 "generated key")


def _unseal_key(r: Run, s: st.UnsealKey) -> None:
    entry = keystore.read_entry(r.session, r.loc)
    got = entry.key_for_slot(s.keyslot) if entry else None
    if got is None:
        raise VaultNotFound(f"{r.loc.display}: no key for keyslot {s.keyslot} — re-run")
    buf = keystore.unseal(r.session, r.loc, got)
    if s.role == "unlock":
        if r.unlock_key is not None:
            r.unlock_key.close()
        r.unlock_key = buf
    else:
        if r.new_key is not None:
            r.new_key.close()
        r.new_key = buf
        r.sealed = got.sealed


def _backup_header(r: Run, s: st.BackupHeader) -> None:
    path = r.rundir.backup_path(r.loc.luks_uuid)
    luks.header_backup(r.device, path)
    os.chmod(path, 0o600)
    r.backup = path
    r.restorable = True


def _add_keyslot(r: Run, s: st.AddKeyslot) -> None:
    got = luks.add_key(r.device, r.require("unlock key", r.unlock_key),
                       r.require("new key", r.new_key), keyslot=s.keyslot)
    if got != s.keyslot:
        raise CryptsetupFailed(f"{r.device}: new key went to keyslot {got}, not "
                                    f"{s.keyslot}")


def _format(r: Run, s: st.Format) -> None:
    luks.format_volume(r.device, r.require("new key", r.new_key), uuid=s.luks_uuid,
                       keyslot=s.keyslot)


def _import_token(r: Run, s: st.ImportToken) -> None:
    tok = BootkeyToken.for_location(r.loc, s.keyslot, r.name)
    luks.import_token(r.device, tok.to_json())


def _test_slot_alone(r: Run, s: st.TestSlotAlone) -> None:
    try:
        r.proof = luks.verify_slot(r.device, r.require("new key", r.new_key), s.keyslot)
    except WrongKey:
        raise WrongKey(f"{r.device}: the new key does not open keyslot {s.keyslot} alone — "
                       "nothing was removed") from None


def _prove_remaining(r: Run, s: st.ProveRemaining) -> None:
    key = r.require("unlock key", r.unlock_key)
    for n in s.candidates:
        if luks.test_key(r.device, key, n) is luks.KeyTest.OK:
            r.proof = luks.verify_slot(r.device, key, n)
            return
    raise WrongKey(f"{r.device}: the --unlock-key-file key opens none of the keyslots that "
                   f"would remain ({', '.join(map(str, s.candidates))}) — nothing changed; "
                   "give the key of a keyslot that stays")


def _activate(r: Run, s: st.Activate) -> None:
    cur, version = r.read()
    if cur is None or cur.key_for_slot(s.keyslot) is None:
        raise VaultNotFound(f"{r.loc.display}: the pending key vanished — re-run")
    state = {s.keyslot: "active", **{n: "retiring" for n in s.retire}}
    keys = [k.model_copy(update={"state": state[k.keyslot]}) if k.keyslot in state else k
            for k in cur.keys]
    r.write(with_keys(cur, keys, formatting=None), version)
    r.restorable = False  # committed: from here on a re-run finishes, nothing rolls back
    r.withdraw = None


def _recovery_text() -> SecretBuffer:
    chars = [secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_GROUPS * 4)]
    text = "-".join("".join(chars[i:i + 4]) for i in range(0, len(chars), 4))
    buf = SecretBuffer.from_bytes(bytearray(text.encode()))
    del text, chars
    return buf


def _add_recovery_key(r: Run, s: st.AddRecoveryKey) -> None:
    rec = _recovery_text()
    # pbkdf=(): cryptsetup's benchmarked argon2id, the strong KDF a typed key needs
    n = luks.add_key(r.device, r.require("new key", r.new_key), rec, pbkdf=())
    luks.import_token(r.device, {"type": RECOVERY_TOKEN_TYPE, "keyslots": [str(n)]})
    r.recovery_key, r.recovery_keyslot = rec, n


def _kill_slot(r: Run, s: st.KillSlot) -> None:
    if r.proof is None:
        raise LastKeyslot(f"{r.device}: refusing to remove keyslot {s.keyslot}: no keyslot "
                          "was proven to work")
    luks.kill_slot(r.device, s.keyslot, proof=r.proof)


def _remove_token(r: Run, s: st.RemoveToken) -> None:
    luks.remove_token(r.device, s.token_id)


def _drop_keys(r: Run, s: st.DropKeys) -> None:
    cur, version = r.read()
    r.restorable = False  # the backup names keyslots whose keys are leaving Vault
    if cur is None:
        return
    keys = [k for k in cur.keys if k.keyslot not in s.keyslots]
    if keys == cur.keys:
        return
    if not keys:
        r.session.kv_delete(r.loc.kv_mount, r.loc.kv_version, r.loc.path)
        return
    r.write(with_keys(cur, keys), version)


def _destroy_old_versions(r: Run, s: st.DestroyOldVersions) -> None:
    meta = r.session.kv_metadata(r.loc.kv_mount, r.loc.path)
    if not meta:
        return
    current = int(meta.get("current_version") or 0)
    old = sorted(int(v) for v, m in (meta.get("versions") or {}).items()
                 if int(v) < current and not (m or {}).get("destroyed"))
    if old:
        r.session.kv_destroy_versions(r.loc.kv_mount, r.loc.path, old)


def _delete_entry(r: Run, s: st.DeleteEntry) -> None:
    r.restorable = False
    r.session.kv_delete(r.loc.kv_mount, r.loc.kv_version, r.loc.path)


def _rewrap(r: Run, s: st.Rewrap) -> None:
    cur, version = r.read()
    if cur is None:
        raise VaultNotFound(f"{r.loc.display}: not enrolled")
    keys = [k.model_copy(update={"sealed": r.session.transit_rewrap(
        r.loc.transit_mount, r.loc.transit_key, k.sealed, r.loc.context)}) for k in cur.keys]
    r.write(with_keys(cur, keys), version)


def _remove_backup(r: Run, s: st.RemoveBackup) -> None:
    r.rundir.backup_path(r.loc.luks_uuid).unlink(missing_ok=True)
    r.backup = None
    r.restorable = False


_RUNNERS: dict[type[Step], Callable[[Run, Any], None]] = {
    st.Generate: _generate,
    st.Seal: _seal,
    st.VaultWrite: _vault_write,
    st.VaultReadBack: _vault_read_back,
    st.UnsealKey: _unseal_key,
    st.BackupHeader: _backup_header,
    st.AddKeyslot: _add_keyslot,
    st.Format: _format,
    st.ImportToken: _import_token,
    st.TestSlotAlone: _test_slot_alone,
    st.ProveRemaining: _prove_remaining,
    st.Activate: _activate,
    st.AddRecoveryKey: _add_recovery_key,
    st.KillSlot: _kill_slot,
    st.RemoveToken: _remove_token,
    st.DropKeys: _drop_keys,
    st.DestroyOldVersions: _destroy_old_versions,
    st.DeleteEntry: _delete_entry,
    st.Rewrap: _rewrap,
    st.RemoveBackup: _remove_backup,
}


def execute(plan: Plan, run: Run, after_step: AfterStep | None = None) -> None:
    """Run the steps in order; each verifies its own result before the next starts.
    On a failure before the commit point, roll back (header restore, withdraw the
    pending Vault key) and re-raise."""
    try:
        for step in plan.steps:
            log.debug("%s: %s", run.device, step)
            _RUNNERS[type(step)](run, step)
            run.log.append(str(step))
            if after_step is not None:
                after_step(step)
    except BaseException as e:
        rollback(run, e)
        raise

