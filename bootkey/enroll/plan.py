"""Planning: pure functions from an observed `View` to a `Plan` (a tuple of steps in the
order of the declared sequences in `bootkey.enroll.steps`).

Invariant: every plan keeps "the volume opens with a key Vault holds (or the operator's
key), and Vault keeps every key a keyslot uses": no `KillSlot` comes before a
`TestSlotAlone`/`ProveRemaining` that proves another keyslot, the proven keyslot is never
killed, a keyslot that is not ours (`_ours`) is never killed, and `DropKeys` comes after
the `KillSlot` of the keyslots it drops (or drops keys that open no keyslot). A half-done
state plans to the rest of its sequence, so a crashed run resumes by planning again (no
journal file). tests/enroll/test_plan.py checks these rules for any observed state
(hypothesis).

Crash windows: none (pure: no I/O).
"""

from __future__ import annotations

from collections.abc import Sequence

from bootkey.enroll.observe import KeyView, View
from bootkey.enroll.steps import (
    Activate,
    AddKeyslot,
    AddRecoveryKey,
    BackupHeader,
    DeleteEntry,
    DestroyOldVersions,
    DropKeys,
    Format,
    Generate,
    ImportToken,
    KillSlot,
    Plan,
    ProveRemaining,
    RemoveBackup,
    RemoveToken,
    Rewrap,
    Seal,
    Step,
    TestSlotAlone,
    UnsealKey,
    VaultReadBack,
    VaultWrite,
)
from bootkey.keystore import Entry
from bootkey_core.errors import (
    LastKeyslot,
    NoFreeKeyslot,
    UsageError,
    VaultConflict,
    VaultNotFound,
    WrongKey,
)

MAX_KEYSLOTS = 32  # LUKS2_KEYSLOTS_MAX in libcryptsetup


def free_keyslot(used: frozenset[int], want: int | None, device: str) -> int:
    if want is not None:
        if not 0 <= want < MAX_KEYSLOTS:
            raise UsageError(f"--keyslot {want}: LUKS2 keyslots are 0-{MAX_KEYSLOTS - 1}")
        if want in used:
            raise UsageError(f"{device}: keyslot {want} is in use — choose a free one or "
                             "omit --keyslot")
        return want
    for n in range(MAX_KEYSLOTS):
        if n not in used:
            return n
    raise NoFreeKeyslot(f"{device}: cannot enroll: all {MAX_KEYSLOTS} keyslots are in use — "
                        "remove an unused one with `cryptsetup luksKillSlot`")


def _with_backup(header_steps: Sequence[Step]) -> list[Step]:
    return [BackupHeader(), *header_steps, RemoveBackup()] if header_steps else []


def _fresh_key(n: int, *, create: bool, formatting: str | None = None) -> list[Step]:
    return [Generate(n), Seal(n), VaultWrite(n, create, formatting), VaultReadBack(n)]


def _finish_pending(v: View, p: KeyView, *, have_unlock_key: bool,
                    retire: tuple[int, ...] = ()) -> tuple[list[Step], list[Step], bool]:
    """Steps that take a pending key to active: (key steps, header steps, needs key)."""
    n = p.keyslot
    key_steps: list[Step] = [UnsealKey(n)]
    header: list[Step] = []
    needs = False
    if not p.in_header:
        needs = True
        header.append(AddKeyslot(n))
    if not v.tokens_for(n):
        header.append(ImportToken(n))
    header += [TestSlotAlone(n), Activate(n, retire)]
    return key_steps, header, needs and not have_unlock_key


def _ours(v: View, k: KeyView) -> bool:
    """Keyslot `k.keyslot` is bootkey's to remove: its Vault key opens it, or one of our
    tokens still names it. The second covers a luksKillSlot cut short: cryptsetup wipes
    the keyslot's area first and rewrites the metadata after, and only that rewrite
    takes the keyslot out of its tokens — so a keyslot nothing opens that our token still
    names is one of ours half removed, never a slot someone else has added since."""
    return k.in_header and (k.opens or bool(v.tokens_for(k.keyslot)))


def _retire(v: View, retire: Sequence[KeyView]) -> list[Step]:
    """Kill the retiring keyslots that are still ours (`_ours`), remove tokens left
    naming no live keyslot, drop the keys from Vault, shred old versions."""
    going = frozenset(k.keyslot for k in retire)
    steps: list[Step] = [KillSlot(k.keyslot) for k in retire if _ours(v, k)]
    steps += [RemoveToken(t) for t in v.orphan_tokens(keep=going)]
    steps.append(DropKeys(tuple(sorted(going))))
    if v.kv_version == 2:
        steps.append(DestroyOldVersions())
    return steps


def plan_enroll(v: View, *, keyslot: int | None = None, have_unlock_key: bool = True,
                recovery_key: bool = False) -> Plan:
    """Enroll an existing LUKS2 volume, or finish an interrupted enroll."""
    if v.entry is None:
        n = free_keyslot(v.keyslots, keyslot, v.device)
        steps = [*_fresh_key(n, create=True),
                 *_with_backup([AddKeyslot(n), ImportToken(n), TestSlotAlone(n), Activate(n)])]
        if recovery_key:
            steps.insert(-1, AddRecoveryKey())
        return Plan(tuple(steps), f"enroll into keyslot {n}", not have_unlock_key)
    pending = v.by_state("pending")
    if v.working("active") and (pending or v.by_state("retiring")):
        return Plan((), f"already enrolled (keyslot {v.working('active')[0].keyslot}); a "
                        "rotate is in flight — finish it with `bootkey rotate`")
    if pending:
        p = pending[-1]
        if p.in_header and not p.opens:
            raise VaultConflict(
                f"{v.device}: cannot resume enroll: keyslot {p.keyslot} now holds another key"
                " — remove the stale entry with `bootkey unenroll --purge` and enroll again")
        keys, header, needs = _finish_pending(v, p, have_unlock_key=have_unlock_key)
        if recovery_key:
            header.append(AddRecoveryKey())
        return Plan(tuple(keys + _with_backup(header)),
                    f"resume enroll of keyslot {p.keyslot}", needs)
    working = v.working("active")
    if not working:
        raise VaultConflict(
            f"{v.device} (UUID {v.luks_uuid}): Vault already has an entry for this volume but "
            "none of its keys opens a keyslot — `bootkey unenroll --purge` it, then enroll")
    n = working[0].keyslot
    tidy: list[Step] = []
    if not v.tokens_for(n):
        tidy.append(ImportToken(n))
    tidy += [RemoveToken(t) for t in v.orphan_tokens()]
    if recovery_key:
        tidy = [UnsealKey(n), TestSlotAlone(n), *tidy, *_replace_recovery(v)]
    return Plan(tuple(_with_backup(tidy)),
                f"already enrolled (keyslot {n})" + (": tidying up" if tidy else ""))


def _replace_recovery(v: View) -> list[Step]:
    old = [KillSlot(s) for t in sorted(v.recovery_tokens) for s in sorted(v.recovery_tokens[t])
           if s in v.keyslots]
    return [*old, *[RemoveToken(t) for t in sorted(v.recovery_tokens)], AddRecoveryKey()]


def plan_format(device: str, *, luks_uuid: str, keyslot: int | None,
                resume: Entry | None, recovery_key: bool = False) -> Plan:
    """Make a blank device a LUKS2 volume whose first keyslot is the Vault key. `resume`
    is the pending entry an interrupted run left for this device."""
    if resume is not None:
        n = resume.keys[-1].keyslot
        steps: list[Step] = [UnsealKey(n), Format(n, luks_uuid)]
        summary = f"resume format into keyslot {n}"
    else:
        n = free_keyslot(frozenset(), keyslot, device)
        steps = [*_fresh_key(n, create=True, formatting=device), Format(n, luks_uuid)]
        summary = f"format with the Vault key in keyslot {n}"
    steps += [ImportToken(n), TestSlotAlone(n), Activate(n)]
    if recovery_key:
        steps.append(AddRecoveryKey())
    return Plan(tuple(steps), summary)


def plan_rotate(v: View, *, have_unlock_key: bool = False) -> Plan:
    """A new key into a new keyslot, tested, then the old keyslot killed and its Vault
    copy retired — or the rest of an interrupted rotate. When no Vault key opens the
    volume any more, the operator's key (`have_unlock_key`) authorises the new keyslot
    instead: see `_plan_recover`."""
    if v.entry is None:
        raise VaultNotFound(f"{v.device} (UUID {v.luks_uuid}): not enrolled — "
                            f"`bootkey enroll {v.device}` first")
    active = v.working("active")
    pending = v.by_state("pending")
    retiring = v.by_state("retiring")
    if not active and any(k.state != "pending" for k in v.keys):
        if have_unlock_key:
            return _plan_recover(v)
        raise WrongKey(f"{v.device} (UUID {v.luks_uuid}): no Vault key opens its keyslot — "
                       "cannot rotate with it; re-key it with an existing passphrase or "
                       f"keyfile: `bootkey rotate {v.device} --unlock-key-file FILE`")
    if pending:
        if not active:
            raise UsageError(f"{v.device}: an enroll is in flight — finish it with "
                             "`bootkey enroll`")
        p = pending[-1]
        if p.in_header and not p.opens:
            # The keyslot was taken by another key since: the pending key never got in.
            # Withdraw it and rotate afresh.
            rest = View(v.device, v.luks_uuid, v.keyslots, v.tokens, v.entry,
                        tuple(k for k in v.keys if k is not p), v.kv_version)
            fresh = plan_rotate(rest)
            return Plan((DropKeys((p.keyslot,)), *fresh.steps),
                        f"withdraw the stale pending key of keyslot {p.keyslot}, then "
                        + fresh.summary)
        a = active[0].keyslot
        old = tuple(k.keyslot for k in v.by_state("active"))
        keys, header, _ = _finish_pending(v, p, have_unlock_key=True, retire=old)
        if not p.in_header:
            keys.insert(0, UnsealKey(a, "unlock"))
        going = [k for k in v.keys if k.state in ("active", "retiring")]
        return Plan(tuple(keys + _with_backup(header + _retire(v, going))),
                    f"resume rotate to keyslot {p.keyslot}")
    if retiring:
        b = active[0].keyslot
        return Plan(tuple([UnsealKey(b), TestSlotAlone(b), *_with_backup(_retire(v, retiring))]),
                    f"finish rotate: retire keyslot(s) {sorted(k.keyslot for k in retiring)}")
    if not active:  # an entry without keys
        raise WrongKey(f"{v.device} (UUID {v.luks_uuid}): no Vault key opens its keyslot — "
                       "cannot rotate; re-enroll with `bootkey enroll --unlock-key-file`")
    a = active[0].keyslot
    n = free_keyslot(v.keyslots, None, v.device)
    olds = [k for k in v.keys if k.state == "active"]
    steps: list[Step] = [AddKeyslot(n), ImportToken(n), TestSlotAlone(n),
                         Activate(n, tuple(k.keyslot for k in olds))]
    return Plan(tuple([UnsealKey(a, "unlock"), *_fresh_key(n, create=False),
                       *_with_backup(steps + _retire(v, olds))]),
                f"rotate keyslot {a} → {n}")


def _plan_recover(v: View) -> Plan:
    """Re-key a volume that no Vault key opens any more (exit 81: its keyslot was killed
    or changed outside bootkey, or the Vault entry was replaced), authorised by the
    operator's passphrase or keyfile — or finish an interrupted recovery.

    Like a rotate: a new key is written to Vault as pending before its keyslot exists,
    proven alone, then committed; the old keys leave Vault only after that. A keyslot
    whose Vault key does not open it is never killed: nothing proves it is ours (it may
    hold the operator's key). Before the commit, our tokens stop naming such keyslots, so
    no later rotate or unenroll takes one for a half-killed keyslot of ours (`_ours`).
    An old key that still opens its keyslot (a retiring one) is retired as a rotate does."""
    old = [k for k in v.keys if k.state != "pending"]
    unclaim = frozenset(t for k in old if k.in_header and not k.opens
                        for t in v.tokens_for(k.keyslot)) | frozenset(v.orphan_tokens())
    pending = v.by_state("pending")
    if pending and pending[-1].in_header and not pending[-1].opens:
        p = pending[-1]  # its keyslot was taken by another key since: withdraw it
        rest = View(v.device, v.luks_uuid, v.keyslots, v.tokens, v.entry,
                    tuple(k for k in v.keys if k is not p), v.kv_version)
        fresh = _plan_recover(rest)
        return Plan((DropKeys((p.keyslot,)), *fresh.steps),
                    f"withdraw the stale pending key of keyslot {p.keyslot}, then "
                    + fresh.summary, by_operator_key=True)
    retire = tuple(k.keyslot for k in old)
    if pending:
        n = pending[-1].keyslot
        keys, header, _ = _finish_pending(v, pending[-1], have_unlock_key=True, retire=retire)
        summary = f"resume re-keying into keyslot {n}"
    else:
        # not a keyslot number Vault still holds a key for: the new key joins the entry
        n = free_keyslot(v.keyslots | {k.keyslot for k in old}, None, v.device)
        keys = _fresh_key(n, create=False)
        header = [AddKeyslot(n), ImportToken(n), TestSlotAlone(n), Activate(n, retire)]
        summary = f"re-key with the operator's key into keyslot {n}"
    unclaim -= frozenset(v.tokens_for(n))  # a token already naming the new keyslot stays
    header[-1:-1] = [RemoveToken(t) for t in sorted(unclaim)]  # before the commit
    # what the header shows once the commit is reached: keyslot n exists, unclaim is gone
    claimed = View(v.device, v.luks_uuid, v.keyslots | {n},
                   {t: s for t, s in v.tokens.items() if t not in unclaim}, v.entry, v.keys,
                   v.kv_version)
    left = sorted(k.keyslot for k in old if k.in_header and not k.opens)
    if left:
        summary += f"; keyslot(s) {left} left in place (no Vault key opens them)"
    return Plan(tuple(keys + _with_backup(header + _retire(claimed, old))), summary,
                by_operator_key=True)


def plan_unenroll(v: View, *, purge: bool, have_unlock_key: bool) -> Plan:
    """Remove bootkey's keyslots and tokens (and with `purge` the Vault entry), never the
    last keyslot: the operator's key must open one that stays."""
    ours = frozenset(k.keyslot for k in v.keys if _ours(v, k))
    if not ours and not v.tokens and (v.entry is None or not purge):
        # The state unenroll asks for already holds (e.g. a finished or crashed-after-the-
        # last-step run): success, like `rm -f`.
        return Plan((), "not enrolled — nothing to do")
    others = v.keyslots - ours
    steps: list[Step] = []
    if ours:
        if not others:
            raise LastKeyslot(
                f"{v.device}: refusing to unenroll: bootkey's keyslot(s) {sorted(ours)} are "
                "the only ones — add a passphrase first (`cryptsetup luksAddKey`)")
        if not have_unlock_key:
            raise UsageError(
                f"{v.device}: unenroll needs the key of a keyslot that stays, to prove the "
                "volume still opens — pass it with --unlock-key-file FILE (or - for stdin)")
        steps.append(ProveRemaining(tuple(sorted(others))))
    header: list[Step] = [KillSlot(s) for s in sorted(ours)]
    header += [RemoveToken(t) for t in v.orphan_tokens(keep=ours)]
    steps += _with_backup(header)
    if purge and v.entry is not None:
        steps.append(DeleteEntry())
    return Plan(tuple(steps), f"unenroll keyslot(s) {sorted(ours)}"
                + (" and purge the Vault entry" if purge else ""))


def plan_rewrap(v: View) -> Plan:
    if v.entry is None:
        raise VaultNotFound(f"{v.device} (UUID {v.luks_uuid}): not enrolled — nothing to "
                            "rewrap")
    return Plan((Rewrap(),), "rewrap the sealed keys under the newest transit key version")

