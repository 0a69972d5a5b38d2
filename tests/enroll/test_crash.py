"""Crash safety: SIGKILL enroll, enroll --format and rotate at every step boundary and at
random moments; afterwards the volume opens with the original passphrase or a Vault-held
key, no keyslot lacks its Vault key, and re-running the same operation finishes the job
with no orphan keyslot, token, Vault entry or header backup.

The operation runs in a forked child (cheap: no interpreter start) whose `after_step`
hook SIGKILLs itself; random-moment kills SIGKILL the child's whole process group, so a
cryptsetup run in flight dies too, as on power loss. One test goes through the CLI end to
end, run by the test-side launcher tests/support/killing_bootkey.py (the product reads
no test intent: the launcher passes its hook to `bootkey.cli.main(after_step=…)`)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from bootkey import enroll, keystore, luks
from bootkey.vault import VaultSession
from tests.enroll.conftest import Env, secret_of
from tests.support.killing_bootkey import kill_after as kill_after_step
from tests.support.luksimg import PASSPHRASE

# The whole module: ~60 kill-and-resume cases, each a few real cryptsetup and Vault round
# trips. `pytest -m "not slow"` leaves them out of a quick edit-test loop; CI runs them.
pytestmark = pytest.mark.slow

Op = Callable[[VaultSession, enroll.AfterStep | None], object]


def in_child(env: Env, op: Op, *, kill_after: tuple[str, int] | None = None,
             kill_at: float | None = None) -> int:
    """Run `op` in a forked child; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.setpgid(0, 0)
            op(env.session(), kill_after_step(*kill_after) if kill_after else None)
        except BaseException:  # the parent judges by the state left behind
            code = 3
        os._exit(code)
    if kill_at is not None:
        deadline = time.monotonic() + kill_at
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
        with contextlib.suppress(ProcessLookupError):  # it may have just finished
            os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    # A grandchild caught between fork and exec still holds the device lock until it is
    # gone too (a power cut has no such straggler): wait for the whole group to vanish.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            break
    return status


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def do_enroll(env: Env, dev: str) -> Op:
    def op(session: VaultSession, hook: enroll.AfterStep | None) -> object:
        with secret_of(PASSPHRASE) as pw:
            return enroll.enroll(env.cfg, session, env.host, dev, unlock_key=pw,
                                 rundir=env.rundir, after_step=hook)
    return op


def do_rotate(env: Env, dev: str) -> Op:
    def op(session: VaultSession, hook: enroll.AfterStep | None) -> object:
        return enroll.rotate(env.cfg, session, env.host, dev, rundir=env.rundir,
                             after_step=hook)
    return op


def do_format(env: Env, dev: str) -> Op:
    def op(session: VaultSession, hook: enroll.AfterStep | None) -> object:
        return enroll.enroll(env.cfg, session, env.host, dev, format_device=True,
                             rundir=env.rundir, after_step=hook)
    return op


def assert_safe(env: Env, dev: str) -> None:
    """The invariant at any instant: the volume opens with the original passphrase or a
    Vault key, and every keyslot but the passphrase's has its key in Vault — or is a
    retiring one that a kill cut short inside cryptsetup left without key material (its
    area is wiped before its metadata goes), which a re-run removes."""
    if luks.probe_magic(dev) != 2:
        return  # --format crashed before luksFormat: nothing to open yet
    vault_slots = env.vault_key_opens(dev)
    assert env.passphrase_opens(dev) or vault_slots
    others = set(luks.inspect(dev).keyslots) - {0}
    entry = keystore.read_entry(env.session(), env.loc(dev))
    retiring = {k.keyslot for k in entry.keys if k.state == "retiring"} if entry else set()
    if env.passphrase_opens(dev, PASSPHRASE):
        assert others <= set(vault_slots) | retiring, (others, vault_slots, retiring)


def assert_done(env: Env, dev: str, *, passphrase_slot: bool = True) -> int:
    """Finished: one bootkey keyslot, one token naming it, one active key, no backup."""
    st = env.state(dev)
    base = {0} if passphrase_slot else set()
    ours = st.keyslots - base
    assert len(ours) == 1, st
    (n,) = ours
    assert st.token_slots == [{n}], st
    assert st.keys == [(n, "active")], st
    assert env.vault_key_opens(dev) == [n]
    if passphrase_slot:
        assert env.passphrase_opens(dev)
    assert env.backups() == []
    return n


def host_entries(env: Env) -> list[str]:
    kv = env.cfg.vault.kv
    return env.session().kv_list(kv.mount, kv.version, f"{kv.prefix}/{env.host}")


def boundaries(seq: tuple[type[enroll.Step], ...]) -> list[tuple[str, int]]:
    seen: dict[str, int] = {}
    out = []
    for cls in seq:
        seen[cls.__name__] = seen.get(cls.__name__, 0) + 1
        out.append((cls.__name__, seen[cls.__name__]))
    return out


@pytest.mark.parametrize("point", boundaries(enroll.ENROLL), ids=lambda p: f"{p[0]}#{p[1]}")
def test_enroll_killed_at_every_step(env: Env, point: tuple[str, int]) -> None:
    dev = env.image()
    status = in_child(env, do_enroll(env, dev), kill_after=point)
    assert killed(status)
    assert_safe(env, dev)
    if env.state(dev).token_slots:
        assert env.boot_check(dev) == "verified"
    do_enroll(env, dev)(env.session(), None)  # re-run: finishes
    assert assert_done(env, dev) == 1
    assert len(host_entries(env)) == 1


@pytest.mark.parametrize("point", boundaries(enroll.ROTATE), ids=lambda p: f"{p[0]}#{p[1]}")
def test_rotate_killed_at_every_step(env: Env, point: tuple[str, int]) -> None:
    dev = env.image()
    do_enroll(env, dev)(env.session(), None)
    before = keystore.read_entry(env.session(), env.loc(dev))
    assert before is not None
    status = in_child(env, do_rotate(env, dev), kill_after=point)
    assert killed(status)
    assert_safe(env, dev)
    assert env.vault_key_opens(dev)  # a Vault key opens it at every instant ...
    assert env.boot_check(dev) == "verified"  # ... and `bootkey unlock` finds and uses it
    do_rotate(env, dev)(env.session(), None)
    assert_done(env, dev)
    after = keystore.read_entry(env.session(), env.loc(dev))
    assert after is not None and after.keys[0].sealed != before.keys[0].sealed
    if env.vault.kv_version == 1:
        return
    meta = env.session().kv_metadata(env.cfg.vault.kv.mount, env.loc(dev).path)
    assert meta is not None
    cur = int(meta["current_version"])
    assert all(v["destroyed"] for k, v in meta["versions"].items() if int(k) < cur)


def wipe_keyslot_area(dev: str, keyslot: int) -> None:
    """What a luksKillSlot killed half-way leaves: the keyslot's area overwritten (so
    no key opens it), its metadata and token assignment still in the header."""
    area = luks.inspect(dev).raw["keyslots"][str(keyslot)]["area"]
    with open(dev, "r+b") as f:
        f.seek(int(area["offset"]))
        f.write(os.urandom(int(area["size"])))


def test_rotate_finishes_a_kill_that_cryptsetup_left_half_done(env: Env) -> None:
    dev = env.image()
    do_enroll(env, dev)(env.session(), None)
    assert killed(in_child(env, do_rotate(env, dev), kill_after=("Activate", 1)))
    wipe_keyslot_area(dev, 1)  # then killed inside luksKillSlot 1
    assert env.state(dev).keyslots == {0, 1, 2} and env.vault_key_opens(dev) == [2]
    assert_safe(env, dev)
    do_rotate(env, dev)(env.session(), None)
    assert_done(env, dev)


@pytest.mark.parametrize("point", boundaries(enroll.ENROLL_FORMAT),
                         ids=lambda p: f"{p[0]}#{p[1]}")
def test_format_killed_at_every_step(env2: Env, point: tuple[str, int]) -> None:
    env = env2
    dev = str(env.tmp / "blank.img")
    with open(dev, "wb") as f:
        f.truncate(20 << 20)
    status = in_child(env, do_format(env, dev), kill_after=point)
    assert killed(status)
    assert_safe(env, dev)
    if env.state(dev).token_slots:  # once the token is there, unlock finds and opens it
        assert env.boot_check(dev) == "verified"
    do_format(env, dev)(env.session(), None)
    assert assert_done(env, dev, passphrase_slot=False) == 0
    entries = host_entries(env)
    assert entries == [luks.inspect(dev).uuid], entries  # no orphan entry for another UUID


def do_unenroll(env: Env, dev: str) -> Op:
    def op(session: VaultSession, hook: enroll.AfterStep | None) -> object:
        with secret_of(PASSPHRASE) as pw:
            return enroll.unenroll(env.cfg, session, env.host, dev, purge=True, unlock_key=pw,
                                   rundir=env.rundir, after_step=hook)
    return op


@pytest.mark.parametrize("point", boundaries(enroll.UNENROLL), ids=lambda p: f"{p[0]}#{p[1]}")
def test_unenroll_purge_killed_at_every_step(env2: Env, point: tuple[str, int]) -> None:
    env = env2
    dev = env.image()
    do_enroll(env, dev)(env.session(), None)
    status = in_child(env, do_unenroll(env, dev), kill_after=point)
    assert killed(status)
    assert env.passphrase_opens(dev)
    others = set(luks.inspect(dev).keyslots) - {0}
    assert others <= set(env.vault_key_opens(dev))  # a keyslot left keeps its Vault key
    do_unenroll(env, dev)(env.session(), None)
    st = env.state(dev)
    assert st.keyslots == {0} and st.token_slots == [] and not st.entry_exists
    assert env.backups() == [] and host_entries(env) == []


def test_killed_at_random_moments(env2: Env) -> None:
    env = env2
    seed = int(os.environ.get("BOOTKEY_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"crash seed {seed} (BOOTKEY_CRASH_SEED repeats it)")
    dev = env.image()

    def both(session: VaultSession, hook: enroll.AfterStep | None) -> None:
        do_enroll(env, dev)(session, hook)
        do_rotate(env, dev)(session, hook)

    t0 = time.monotonic()
    in_child(env, both)
    span = time.monotonic() - t0  # how long enroll + rotate take here
    kills = 0
    for i in range(int(os.environ.get("BOOTKEY_CRASH_ROUNDS", "8"))):
        dev = env.image(f"r{i}")  # a fresh volume: each round is a whole enroll + rotate
        at = rng.uniform(0, span)
        hit = killed(in_child(env, both, kill_at=at))
        kills += hit
        print(f"round {i}: {'killed' if hit else 'finished before'} {at:.3f} s of {span:.3f}")
        assert_safe(env, dev)
        both(env.session(), None)  # re-running the same commands finishes the job
        assert_done(env, dev)
    assert kills >= 1, f"seed {seed}: no round was killed mid-way"


def test_cli_killed_then_rerun(env2: Env) -> None:
    env = env2
    dev = env.image()
    pw = env.passfile()
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(pw),
                      kill_at="ImportToken")
    assert res.returncode == -signal.SIGKILL
    st = env.state(dev)
    assert st.keys == [(1, "pending")] and st.keyslots == {0, 1} and st.token_slots == [{1}]
    assert env.backups()  # the interrupted run's header backup, root-only
    assert (env.backups()[0].stat().st_mode & 0o777) == 0o600
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(pw))
    assert res.returncode == 0, res.stderr
    assert "resume enroll of keyslot 1" in res.stdout
    assert_done(env, dev)
    chk = env.unlock_check()
    assert chk[dev]["result"] == "verified"
    res = env.bootkey("rotate", dev, kill_at="KillSlot")
    assert res.returncode == -signal.SIGKILL
    assert env.unlock_check()[dev]["result"] == "verified"  # unlock works mid-rotate
    res = env.bootkey("rotate", dev)
    assert res.returncode == 0, res.stderr
    assert "finish rotate" in res.stdout
    assert assert_done(env, dev) == 2
