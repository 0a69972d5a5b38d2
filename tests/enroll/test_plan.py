"""The planners are pure: plain `View` values in, steps out. These pin the declared
sequences, each resume case, the refusals, and (property) the safety rules for any
observed state: no keyslot is killed before another is proven, the proven one is never
killed, and no Vault key leaves while its keyslot may still exist."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootkey import enroll as e
from bootkey.keystore import Entry, SealedKey
from bootkey_core.errors import (
    BootkeyError,
    LastKeyslot,
    NoFreeKeyslot,
    UsageError,
    VaultConflict,
    WrongKey,
)

SEALED = "vault:v1:AAAA"


def view(slots: set[int], keys: list[tuple[int, str, bool]] | None,
         tokens: dict[int, set[int]] | None = None, kv_version: int = 2) -> e.View:
    """keys: (keyslot, state, opens); None = no Vault entry."""
    entry = None if keys is None else Entry(
        host_id="h", luks_uuid="u",
        keys=[SealedKey(keyslot=n, sealed=SEALED, created_at="t", state=s)  # type: ignore[arg-type]
              for n, s, _ in keys])
    kv = tuple(e.KeyView(n, s, n in slots, o and n in slots) for n, s, o in keys or [])
    return e.View("/dev/x", "u", frozenset(slots),
                  {t: frozenset(s) for t, s in (tokens or {}).items()}, entry, kv, kv_version)


def kinds(plan: e.Plan) -> tuple[type[e.Step], ...]:
    return tuple(type(s) for s in plan.steps)


def test_fresh_enroll_is_the_declared_sequence() -> None:
    plan = e.plan_enroll(view({0}, None))
    assert kinds(plan) == e.ENROLL
    assert e.AddKeyslot(1) in plan.steps and e.Activate(1) in plan.steps


def test_fresh_rotate_is_the_declared_sequence() -> None:
    plan = e.plan_rotate(view({0, 1}, [(1, "active", True)], {0: {1}}))
    assert kinds(plan)[:-1] == (*e.ROTATE[:-1], e.DestroyOldVersions)
    assert plan.steps[0] == e.UnsealKey(1, "unlock")
    assert e.Activate(2, (1,)) in plan.steps and e.KillSlot(1) in plan.steps
    assert e.plan_rotate(view({0, 1}, [(1, "active", True)], {0: {1}}, kv_version=1)) \
        .names.count("DestroyOldVersions") == 0


def test_format_sequence() -> None:
    plan = e.plan_format("/dev/x", luks_uuid="u", keyslot=None, resume=None)
    assert kinds(plan) == e.ENROLL_FORMAT


@pytest.mark.parametrize(("slots", "tokens", "expect"), [
    ({0}, {}, ["UnsealKey", "BackupHeader", "AddKeyslot", "ImportToken", "TestSlotAlone",
               "Activate", "RemoveBackup"]),
    ({0, 1}, {}, ["UnsealKey", "BackupHeader", "ImportToken", "TestSlotAlone", "Activate",
                  "RemoveBackup"]),
    ({0, 1}, {3: {1}}, ["UnsealKey", "BackupHeader", "TestSlotAlone", "Activate",
                        "RemoveBackup"]),
])
def test_enroll_resume(slots: set[int], tokens: dict[int, set[int]],
                       expect: list[str]) -> None:
    plan = e.plan_enroll(view(slots, [(1, "pending", True)], tokens))
    assert plan.names == expect
    assert plan.summary == "resume enroll of keyslot 1"


def test_enroll_resume_needs_the_unlock_key_only_to_add_the_keyslot() -> None:
    assert e.plan_enroll(view({0}, [(1, "pending", True)]), have_unlock_key=False) \
        .needs_unlock_key
    assert not e.plan_enroll(view({0, 1}, [(1, "pending", True)]), have_unlock_key=False) \
        .needs_unlock_key


def test_enroll_refuses_taken_keyslot_and_stale_entry() -> None:
    with pytest.raises(VaultConflict):
        e.plan_enroll(view({0, 1}, [(1, "pending", False)]))
    with pytest.raises(VaultConflict, match="unenroll --purge"):
        e.plan_enroll(view({0}, [(1, "active", True)]))


def test_enrolled_is_done_or_tidied() -> None:
    assert e.plan_enroll(view({0, 1}, [(1, "active", True)], {0: {1}})).steps == ()
    tidy = e.plan_enroll(view({0, 1}, [(1, "active", True)], {0: {1}, 4: set()}))
    assert tidy.names == ["BackupHeader", "RemoveToken", "RemoveBackup"]


def test_recovery_key_again_replaces_the_old_one() -> None:
    v = view({0, 1, 5}, [(1, "active", True)], {0: {1}})
    v = e.View(v.device, v.luks_uuid, v.keyslots, v.tokens, v.entry, v.keys, 2,
               {7: frozenset({5})})
    plan = e.plan_enroll(v, recovery_key=True)
    assert plan.names == ["BackupHeader", "UnsealKey", "TestSlotAlone", "KillSlot",
                          "RemoveToken", "AddRecoveryKey", "RemoveBackup"]
    assert e.KillSlot(5) in plan.steps and e.RemoveToken(7) in plan.steps


def test_rotate_resume_after_commit_retires_old() -> None:
    plan = e.plan_rotate(view({0, 1, 2}, [(1, "retiring", True), (2, "active", True)],
                              {0: {1}, 1: {2}}))
    assert plan.names == ["UnsealKey", "TestSlotAlone", "BackupHeader", "KillSlot",
                          "RemoveToken", "DropKeys", "DestroyOldVersions", "RemoveBackup"]
    gone = e.plan_rotate(view({0, 2}, [(1, "retiring", True), (2, "active", True)],
                              {0: set(), 1: {2}}))
    assert "KillSlot" not in gone.names and e.RemoveToken(0) in gone.steps


def test_a_kill_cut_short_is_finished_but_a_stranger_keyslot_is_left_alone() -> None:
    # Keyslot 1 retiring, in the header, opened by nothing, still named by our token:
    # luksKillSlot was interrupted after wiping the area. Finish the kill.
    half = e.plan_rotate(view({0, 1, 2}, [(1, "retiring", False), (2, "active", True)],
                              {0: {1}, 1: {2}}))
    assert e.KillSlot(1) in half.steps
    # The same keyslot number, but no token of ours names it: not ours to kill.
    stranger = e.plan_rotate(view({0, 1, 2}, [(1, "retiring", False), (2, "active", True)],
                                  {0: set(), 1: {2}}))
    assert e.KillSlot(1) not in stranger.steps and e.DropKeys((1,)) in stranger.steps
    # unenroll: the half-killed keyslot is removed along with the working one.
    plan = e.plan_unenroll(view({0, 1, 2}, [(1, "retiring", False), (2, "active", True)],
                                {0: {1}, 1: {2}}), purge=False, have_unlock_key=True)
    assert {e.KillSlot(1), e.KillSlot(2)} <= set(plan.steps)
    assert e.ProveRemaining((0,)) in plan.steps


def test_rotate_withdraws_a_pending_key_whose_keyslot_was_taken() -> None:
    plan = e.plan_rotate(view({0, 1, 2}, [(1, "active", True), (2, "pending", False)],
                              {0: {1}}))
    assert plan.steps[0] == e.DropKeys((2,))
    assert e.AddKeyslot(3) in plan.steps


def test_recover_is_the_declared_sequence_and_never_kills_a_keyslot_it_cannot_open() -> None:
    # keyslot 1 still there but its Vault key no longer opens it (entry replaced)
    changed = view({0, 1}, [(1, "active", False)], {0: {1}})
    plan = e.plan_rotate(changed, have_unlock_key=True)
    assert kinds(plan)[:-1] == (*e.RECOVER[:-1], e.DestroyOldVersions)
    assert plan.by_operator_key and e.AddKeyslot(2) in plan.steps
    assert e.RemoveToken(0) in plan.steps and e.Activate(2, (1,)) in plan.steps
    assert "KillSlot" not in plan.names and e.DropKeys((1,)) in plan.steps
    assert "keyslot(s) [1] left in place" in plan.summary
    # keyslot 1 killed with the passphrase: its token names nothing; 1 stays Vault's number
    killed = e.plan_rotate(view({0}, [(1, "active", False)], {0: set()}), have_unlock_key=True)
    assert kinds(killed)[:-1] == (*e.RECOVER[:-1], e.DestroyOldVersions)
    assert e.AddKeyslot(2) in killed.steps and e.RemoveToken(0) in killed.steps


def test_recover_needs_the_operator_key_and_says_so() -> None:
    with pytest.raises(WrongKey, match="--unlock-key-file FILE"):
        e.plan_rotate(view({0, 1}, [(1, "active", False)], {0: {1}}))
    # with a working Vault key the operator's key is not used
    plan = e.plan_rotate(view({0, 1}, [(1, "active", True)], {0: {1}}), have_unlock_key=True)
    assert not plan.by_operator_key and plan.steps[0] == e.UnsealKey(1, "unlock")


@pytest.mark.parametrize(("slots", "tokens", "expect"), [
    # pending key written, keyslot not added yet: the operator's key adds it
    ({0, 1}, {0: {1}}, ["UnsealKey", "BackupHeader", "AddKeyslot", "ImportToken",
                        "TestSlotAlone", "RemoveToken", "Activate", "DropKeys",
                        "DestroyOldVersions", "RemoveBackup"]),
    # keyslot added and token imported, the old token already taken off keyslot 1
    ({0, 1, 2}, {1: {2}}, ["UnsealKey", "BackupHeader", "TestSlotAlone", "Activate",
                           "DropKeys", "DestroyOldVersions", "RemoveBackup"]),
    # keyslot 1 killed (its token names nothing); a token names keyslot 2 before it
    # exists: only the empty token goes, the one for the new keyslot stays
    ({0}, {0: set(), 1: {2}}, ["UnsealKey", "BackupHeader", "AddKeyslot", "TestSlotAlone",
                               "RemoveToken", "Activate", "DropKeys", "DestroyOldVersions",
                               "RemoveBackup"]),
])
def test_recover_resume(slots: set[int], tokens: dict[int, set[int]],
                        expect: list[str]) -> None:
    v = view(slots, [(1, "active", False), (2, "pending", True)], tokens)
    plan = e.plan_rotate(v, have_unlock_key=True)
    assert plan.names == expect
    assert not {e.RemoveToken(t) for t, s in tokens.items() if 2 in s} & set(plan.steps)


def test_after_the_recover_commit_a_plain_rotate_finishes_without_killing() -> None:
    v = view({0, 1, 2}, [(1, "retiring", False), (2, "active", True)], {1: {2}})
    plan = e.plan_rotate(v)
    assert "KillSlot" not in plan.names and e.DropKeys((1,)) in plan.steps


def test_free_keyslot() -> None:
    assert e.free_keyslot(frozenset({0, 1, 3}), None, "d") == 2
    with pytest.raises(NoFreeKeyslot):
        e.free_keyslot(frozenset(range(32)), None, "d")
    with pytest.raises(UsageError):
        e.free_keyslot(frozenset({0}), 0, "d")
    with pytest.raises(UsageError):
        e.free_keyslot(frozenset(), 32, "d")


def test_unenroll_refusals_and_order() -> None:
    with pytest.raises(LastKeyslot):
        e.plan_unenroll(view({1}, [(1, "active", True)], {0: {1}}), purge=True,
                        have_unlock_key=True)
    with pytest.raises(UsageError):
        e.plan_unenroll(view({0, 1}, [(1, "active", True)], {0: {1}}), purge=False,
                        have_unlock_key=False)
    plan = e.plan_unenroll(view({0, 1}, [(1, "active", True)], {0: {1}}), purge=True,
                           have_unlock_key=True)
    assert plan.names == ["ProveRemaining", "BackupHeader", "KillSlot", "RemoveToken",
                          "RemoveBackup", "DeleteEntry"]


STATES = st.sampled_from(["active", "pending", "retiring"])
KEYS = st.lists(st.tuples(st.integers(0, 5), STATES, st.booleans()), max_size=3,
                unique_by=lambda k: k[0])


@given(slots=st.sets(st.integers(0, 5)), keys=st.none() | KEYS,
       tokens=st.dictionaries(st.integers(0, 3), st.sets(st.integers(0, 5)), max_size=3),
       op=st.sampled_from(["enroll", "rotate", "recover", "unenroll", "purge"]))
def test_safety_rules_hold_for_any_state(slots: set[int], keys: list[tuple[int, str, bool]]
                                         | None, tokens: dict[int, set[int]],
                                         op: str) -> None:
    v = view(slots, keys, tokens)
    try:
        plan = {"enroll": lambda: e.plan_enroll(v),
                "rotate": lambda: e.plan_rotate(v),
                "recover": lambda: e.plan_rotate(v, have_unlock_key=True),
                "unenroll": lambda: e.plan_unenroll(v, purge=False, have_unlock_key=True),
                "purge": lambda: e.plan_unenroll(v, purge=True, have_unlock_key=True)}[op]()
    except BootkeyError:
        return  # a refusal changes nothing
    proven: int | None = None
    killed: set[int] = set()
    for s in plan.steps:
        if isinstance(s, e.TestSlotAlone):
            proven = s.keyslot
        if isinstance(s, e.ProveRemaining):
            assert not set(s.candidates) & {k.keyslot for k in v.keys if k.opens}
            proven = -1  # one of the candidates, none of which is killed below
        if isinstance(s, e.KillSlot):
            assert proven is not None, plan  # never before a proof
            assert s.keyslot != proven
            killed.add(s.keyslot)
        if isinstance(s, e.DropKeys):
            # a Vault key leaves only once its keyslot is gone or not its own
            for n in s.keyslots:
                kv = next((k for k in v.keys if k.keyslot == n), None)
                assert kv is None or not kv.opens or n in killed, plan
        if isinstance(s, e.DeleteEntry):
            assert all(k.keyslot in killed for k in v.keys if k.opens), plan
