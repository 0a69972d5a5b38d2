"""A step that *fails* (rather than the process dying) before the commit point is rolled
back: header bytes identical to before, the pending Vault key withdrawn. After the commit
point nothing is undone and a re-run finishes. The failure is injected through the
executor's after_step hook, on real cryptsetup and a real OpenBao."""

from __future__ import annotations

import pytest

from bootkey import enroll, keystore
from bootkey_core.errors import BootkeyError
from tests.enroll.conftest import Env, secret_of
from tests.enroll.test_crash import assert_done, boundaries, do_enroll, do_rotate
from tests.support.luksimg import PASSPHRASE, header_digest

pytestmark = pytest.mark.slow  # one case per step boundary, like test_crash.py


class Injected(BootkeyError):
    exit_code = 99


def fail_after(name: str, nth: int) -> enroll.AfterStep:
    seen = 0

    def hook(step: enroll.Step) -> None:
        nonlocal seen
        if step.name == name:
            seen += 1
            if seen == nth:
                raise Injected(f"injected failure after {name}")

    return hook


def committed(seq: tuple[type[enroll.Step], ...], point: tuple[str, int]) -> bool:
    names = [c.__name__ for c in seq]
    return names.index(point[0]) >= names.index("Activate")


@pytest.mark.parametrize("point", boundaries(enroll.ENROLL), ids=lambda p: f"{p[0]}#{p[1]}")
def test_enroll_failure_rolls_back_before_commit(env: Env, point: tuple[str, int]) -> None:
    dev = env.image()
    before = header_digest(dev)
    with secret_of(PASSPHRASE) as pw, pytest.raises(Injected):
        enroll.enroll(env.cfg, env.session(), env.host, dev, unlock_key=pw,
                      rundir=env.rundir, after_step=fail_after(*point))
    if committed(enroll.ENROLL, point):
        do_enroll(env, dev)(env.session(), None)
        assert_done(env, dev)
        return
    assert header_digest(dev) == before
    assert not env.state(dev).entry_exists
    assert env.backups() == []


@pytest.mark.parametrize("point", boundaries(enroll.ROTATE), ids=lambda p: f"{p[0]}#{p[1]}")
def test_rotate_failure_rolls_back_before_commit(env2: Env, point: tuple[str, int]) -> None:
    env = env2
    dev = env.image()
    do_enroll(env, dev)(env.session(), None)
    before = header_digest(dev)
    keys = keystore.read_entry(env.session(), env.loc(dev))
    with pytest.raises(Injected):
        enroll.rotate(env.cfg, env.session(), env.host, dev, rundir=env.rundir,
                      after_step=fail_after(*point))
    if committed(enroll.ROTATE, point):
        assert env.vault_key_opens(dev)
        do_rotate(env, dev)(env.session(), None)
        assert_done(env, dev)
        return
    assert header_digest(dev) == before
    assert keystore.read_entry(env.session(), env.loc(dev)) == keys
    assert env.backups() == []
