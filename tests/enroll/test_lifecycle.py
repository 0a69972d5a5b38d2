"""enroll → unlock --check → rotate → unlock --check → unenroll, through the `bootkey`
CLI, on real LUKS2 images and a real OpenBao (KV v2 and v1), asserting Vault contents and
keyslots after each step."""

from __future__ import annotations

import base64
import json

import pytest

from bootkey import enroll, keystore, luks
from tests.enroll.conftest import Env
from tests.support.bao import DevBao
from tests.support.luksimg import header_digest


def test_enroll_rotate_unenroll(env: Env) -> None:
    dev = env.image("data")
    pw = env.passfile()

    res = env.bootkey("enroll", dev, "--name", "data", "--unlock-key-file", str(pw), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["keyslots"] == [1]
    # the executed operation log is the declared sequence
    assert [x.split("(")[0] for x in out["steps"]] == [c.__name__ for c in enroll.ENROLL]
    st = env.state(dev)
    assert st.keyslots == {0, 1}
    assert st.token_slots == [{1}]
    assert st.keys == [(1, "active")]
    assert env.vault_key_opens(dev) == [1]
    assert env.passphrase_opens(dev)
    assert env.backups() == []  # removed after success
    assert (env.rundir.backups.stat().st_mode & 0o777) == 0o700
    # the token names the Vault location, never the key
    loc = env.loc(dev)
    entry = keystore.read_entry(env.session(), loc)
    assert entry is not None and entry.name == "data" and entry.formatting is None
    assert entry.keys[0].sealed.startswith("vault:v")

    chk = env.unlock_check()
    assert chk["_rc"]["rc"] == 0, chk
    assert chk[dev]["result"] == "verified" and chk[dev]["keyslot"] == 1
    assert chk[dev]["name"] == "data"

    sealed_before = entry.keys[0].sealed
    outputs = [res.stdout + res.stderr]
    res = env.bootkey("rotate", "data")  # by name, found from the token
    assert res.returncode == 0, res.stderr
    outputs.append(res.stdout + res.stderr)
    # neither key ever shows up in what the commands print, in any common encoding
    rotated = keystore.read_entry(env.session(), loc)
    assert rotated is not None
    for sealed_key in (entry.keys[0], *rotated.keys):
        with keystore.unseal(env.session(), loc, sealed_key) as key:
            raw = bytes(key.view)
        for form in (raw.hex(), base64.b64encode(raw).decode(), raw[:16].hex()):
            assert all(form not in o for o in outputs)
    st = env.state(dev)
    assert st.keyslots == {0, 2}
    assert st.token_slots == [{2}]
    assert st.keys == [(2, "active")]
    assert env.vault_key_opens(dev) == [2]
    entry = keystore.read_entry(env.session(), loc)
    assert entry is not None and entry.keys[0].sealed != sealed_before
    if env.vault.kv_version == 2:  # retired sealed key destroyed in every old version
        meta = env.session().kv_metadata(loc.kv_mount, loc.path)
        assert meta is not None
        cur = int(meta["current_version"])
        assert all(v["destroyed"] for n, v in meta["versions"].items() if int(n) < cur)
    chk = env.unlock_check()
    assert chk[dev]["result"] == "verified" and chk[dev]["keyslot"] == 2

    res = env.bootkey("rotate", dev, "--rewrap")
    assert res.returncode == 0, res.stderr
    assert env.state(dev).keys == [(2, "active")]
    assert env.vault_key_opens(dev) == [2]

    res = env.bootkey("unenroll", dev, "--unlock-key-file", str(pw))
    assert res.returncode == 0, res.stderr
    st = env.state(dev)
    assert st.keyslots == {0} and st.token_slots == []
    assert st.keys == [(2, "active")]  # without --purge the Vault copy stays
    assert env.passphrase_opens(dev)

    res = env.bootkey("unenroll", dev, "--purge")
    assert res.returncode == 0, res.stderr
    st = env.state(dev)
    assert not st.entry_exists and st.keyslots == {0} and st.token_slots == []
    assert env.backups() == []


def test_enroll_twice_is_idempotent(env2: Env) -> None:
    env = env2
    dev = env.image()
    pw = env.passfile()
    assert env.bootkey("enroll", dev, "--unlock-key-file", str(pw)).returncode == 0
    before = env.state(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(pw))
    assert res.returncode == 0, res.stderr
    assert "already enrolled" in res.stdout
    assert env.state(dev) == before


def test_enroll_keyslot_and_stdin_key(env2: Env) -> None:
    env = env2
    pw = b"pass with\nnewline\n"
    dev = env.image(passphrase=pw)
    res = env.bootkey("enroll", dev, "--keyslot", "7", "--unlock-key-file", "-", stdin=pw)
    assert res.returncode == 0, res.stderr
    assert env.state(dev).keys == [(7, "active")]
    assert env.vault_key_opens(dev) == [7]


def test_format_blank_image(env2: Env) -> None:
    env = env2
    dev = str(env.tmp / "blank.img")
    with open(dev, "wb") as f:
        f.truncate(20 << 20)
    res = env.bootkey("enroll", dev, "--format", "--name", "fresh", "--json")
    assert res.returncode == 0, res.stderr
    st = env.state(dev)
    assert st.keyslots == {0} and st.token_slots == [{0}] and st.keys == [(0, "active")]
    assert env.vault_key_opens(dev) == [0]
    assert env.boot_check(dev) == "verified"


@pytest.mark.slow  # argon2id at cryptsetup's defaults: ~10 s to add, ~2 s per test
def test_recovery_key_shown_once_and_opens(env2: Env) -> None:
    """--recovery-key: a typable key in its own keyslot with argon2id, printed once, not
    stored in Vault or the header."""
    env = env2
    dev = str(env.tmp / "rec.img")
    with open(dev, "wb") as f:
        f.truncate(20 << 20)
    res = env.bootkey("enroll", dev, "--format", "--recovery-key", "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    rec, slot = out["recovery_key"], out["recovery_keyslot"]
    assert len(rec) == 8 * 4 + 7 and slot == 1
    hdr = luks.inspect(dev)
    assert hdr.keyslots[slot].kdf == "argon2id"
    assert luks.test_key(dev, rec.encode(), slot) is luks.KeyTest.OK
    assert [t["keyslots"] for t in hdr.tokens_of_type("bootkey-recovery").values()] == [["1"]]
    assert rec not in json.dumps(hdr.raw)
    entry = keystore.read_entry(env.session(), env.loc(dev))
    assert entry is not None and rec not in entry.model_dump_json()
    assert env.state(dev).keys == [(0, "active")]
    # the recovery key is a keyslot that stays: unenroll accepts it as the proof
    res = env.bootkey("unenroll", dev, "--purge", "--unlock-key-file", "-", stdin=rec.encode())
    assert res.returncode == 0, res.stderr
    assert set(luks.inspect(dev).keyslots) == {1} and not env.state(dev).entry_exists


def test_dry_run_changes_nothing(env2: Env) -> None:
    env = env2
    dev = env.image()
    before = header_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "(dry run)" in res.stdout and "AddKeyslot(keyslot=1)" in res.stdout
    assert header_digest(dev) == before and not env.state(dev).entry_exists


def test_rewrap_follows_transit_key_rotation(env2: Env, bao: DevBao) -> None:
    """--rewrap re-seals under the newest transit key version; the volume is untouched."""
    env = env2
    dev = env.image()
    assert env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile())).returncode == 0
    root = bao.client()
    root.secrets.transit.rotate_key("bootkey")
    latest = root.secrets.transit.read_key("bootkey")["data"]["latest_version"]
    before = header_digest(dev)
    res = env.bootkey("rotate", dev, "--rewrap")
    assert res.returncode == 0, res.stderr
    entry = keystore.read_entry(env.session(), env.loc(dev))
    assert entry is not None and entry.keys[0].sealed.startswith(f"vault:v{latest}:")
    assert header_digest(dev) == before
    assert env.boot_check(dev) == "verified"
