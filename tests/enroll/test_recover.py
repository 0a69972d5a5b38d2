"""Exit 81's advice works: when no Vault key opens the volume any more (its keyslot was
killed with the passphrase, or the Vault entry was replaced), `bootkey unlock --check`
exits 81 naming `bootkey rotate NAME --unlock-key-file FILE`; running exactly that
command with the operator's passphrase re-keys the volume and unlock passes again. A
keyslot no Vault key opens is never killed. Real cryptsetup on image files, real OpenBao.
The re-key is also SIGKILLed after every step of `enroll.RECOVER` and re-run."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from bootkey import enroll, keystore, luks
from bootkey.vault import VaultSession
from bootkey_core.secret import SecretBuffer
from tests.enroll.conftest import Env, secret_of
from tests.enroll.test_crash import assert_done, boundaries, do_enroll, in_child, killed
from tests.support.luksimg import PASSPHRASE, header_digest


def advised(env: Env, dev: str) -> list[str]:
    """`bootkey unlock --check` fails with 81; the command its message advises, argv."""
    res = env.unlock_check(dev)
    assert res["_rc"]["rc"] == 81, res
    vol = res[dev]
    assert vol["result"] == "failed" and vol["exit_code"] == 81, vol
    m = re.search(r"`bootkey (rotate [^`]+ --unlock-key-file FILE)`", str(vol["reason"]))
    assert m, vol["reason"]
    return [a if a != "FILE" else str(env.passfile()) for a in shlex.split(m.group(1))]


def kill_keyslot_with_passphrase(dev: str, keyslot: int) -> None:
    subprocess.run(["cryptsetup", "luksKillSlot", "--key-file", "-", dev, str(keyslot)],
                   input=PASSPHRASE, check=True, capture_output=True, timeout=60)


def replace_vault_key(env: Env, dev: str, keyslot: int) -> None:
    """Another key, properly sealed for this host and volume, where ours was."""
    s = env.session()
    loc = env.loc(dev)
    entry = keystore.read_entry(s, loc)
    assert entry is not None
    with SecretBuffer.random(keystore.KEY_BYTES) as other:
        sealed = keystore.seal(s, loc, other)
    keys = [k.model_copy(update={"sealed": sealed}) if k.keyslot == keyslot else k
            for k in entry.keys]
    s.kv_write(loc.kv_mount, loc.kv_version, loc.path,
               entry.model_copy(update={"keys": keys}).to_kv())


def enrolled(env: Env, dev: str) -> None:
    res = env.bootkey("enroll", dev, "--name", "data", "--unlock-key-file", str(env.passfile()))
    assert res.returncode == 0, res.stderr
    assert env.unlock_check(dev)[dev]["result"] == "verified"


def test_exit_81_after_the_keyslot_was_killed_then_the_advice_recovers(env: Env) -> None:
    dev = env.image()
    enrolled(env, dev)
    kill_keyslot_with_passphrase(dev, 1)
    cmd = advised(env, dev)
    assert cmd[:2] == ["rotate", "data"]
    plain = env.bootkey("rotate", "data")  # without the operator's key: refused, same advice
    assert plain.returncode == 81 and "--unlock-key-file FILE" in plain.stderr, plain.stderr
    res = env.bootkey(*cmd)
    assert res.returncode == 0, res.stderr
    assert "re-key with the operator's key into keyslot 2" in res.stdout
    chk = env.unlock_check(dev)
    assert chk["_rc"]["rc"] == 0 and chk[dev]["result"] == "verified", chk
    st = env.state(dev)
    assert st.keyslots == {0, 2} and st.token_slots == [{2}] and st.keys == [(2, "active")]
    assert env.passphrase_opens(dev) and env.backups() == []
    again = env.bootkey(*cmd)  # re-running is harmless: a plain rotation this time
    assert again.returncode == 0, again.stderr
    assert env.unlock_check(dev)[dev]["result"] == "verified"
    assert env.state(dev).keys == [(1, "active")] and env.passphrase_opens(dev)


def test_exit_81_after_the_vault_entry_was_replaced_keeps_the_keyslot(env2: Env) -> None:
    env = env2
    dev = env.image()
    enrolled(env, dev)
    replace_vault_key(env, dev, 1)
    res = env.bootkey(*advised(env, dev))
    assert res.returncode == 0, res.stderr
    assert "keyslot(s) [1] left in place" in res.stdout
    assert env.unlock_check(dev)[dev]["result"] == "verified"
    st = env.state(dev)
    # keyslot 1 holds a key nobody proved is ours: never killed, no longer ours
    assert st.keyslots == {0, 1, 2} and st.token_slots == [{2}] and st.keys == [(2, "active")]
    unenroll = env.bootkey("unenroll", "data", "--purge", "--unlock-key-file",
                           str(env.passfile()))
    assert unenroll.returncode == 0, unenroll.stderr
    assert env.state(dev).keyslots == {0, 1}  # unenroll leaves the stranger alone too


def test_a_wrong_operator_key_changes_nothing(env2: Env) -> None:
    env = env2
    dev = env.image()
    enrolled(env, dev)
    kill_keyslot_with_passphrase(dev, 1)
    before_hdr, before_keys = header_digest(dev), env.state(dev).keys
    wrong = env.tmp / "wrong"
    wrong.write_bytes(b"not the passphrase")
    res = env.bootkey("rotate", "data", "--unlock-key-file", str(wrong))
    assert res.returncode == 81 and "opens no keyslot" in res.stderr, res.stderr
    assert header_digest(dev) == before_hdr and env.state(dev).keys == before_keys


@pytest.mark.slow
@pytest.mark.parametrize("point", boundaries(enroll.RECOVER), ids=lambda p: f"{p[0]}#{p[1]}")
def test_recover_killed_at_every_step(env2: Env, point: tuple[str, int]) -> None:
    env = env2
    dev = env.image()
    do_enroll(env, dev)(env.session(), None)
    kill_keyslot_with_passphrase(dev, 1)

    def recover(session: VaultSession, hook: enroll.AfterStep | None) -> object:
        with secret_of(PASSPHRASE) as pw:
            return enroll.rotate(env.cfg, session, env.host, dev, unlock_key=pw,
                                 rundir=env.rundir, after_step=hook)

    assert killed(in_child(env, recover, kill_after=point))
    assert env.passphrase_opens(dev)  # the operator's keyslot is never touched
    others = set(luks.inspect(dev).keyslots) - {0}
    assert others <= set(env.vault_key_opens(dev))  # any new keyslot has its Vault key
    recover(env.session(), None)  # the same command again finishes (after DropKeys,
    assert_done(env, dev)         # nothing is left to finish: it rotates once more)
    assert env.boot_check(dev) == "verified"
