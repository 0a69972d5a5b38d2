"""Every bad input: a one-line message naming the thing and the fix, a distinct exit code,
and nothing changed (header bytes identical, no Vault entry left behind)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from bootkey import enroll
from tests.enroll.conftest import Env
from tests.support.bao import DevBao
from tests.support.luksimg import header_digest


def file_digest(path: str) -> str:
    return header_digest(path)


def assert_refused(env: Env, res: subprocess.CompletedProcess[str], code: int,
                   *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr, res.stdout)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if "[VAULT_PATH=" not in ln]
    assert len(lines) == 1, res.stderr  # one line (besides an info log of the login)
    assert lines[0].startswith("bootkey: ")
    for n in needles:
        assert n in lines[0], lines[0]


def no_entries(env: Env) -> bool:
    kv = env.cfg.vault.kv
    return env.session().kv_list(kv.mount, kv.version, f"{kv.prefix}/{env.host}") == []


def test_luks1_volume(env2: Env) -> None:
    env = env2
    dev = str(env.tmp / "old.img")
    subprocess.run(["truncate", "-s", "20M", dev], check=True)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--pbkdf",
                    "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", dev],
                   input=env.passfile().read_bytes(), check=True)
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()))
    assert_refused(env, res, 82, "LUKS1", "cryptsetup convert --type luks2")
    assert file_digest(dev) == before and no_entries(env)


def test_wrong_existing_passphrase(env: Env) -> None:
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile(b"wrong")))
    assert_refused(env, res, 81, dev, "unlock key opens no keyslot", "trailing newline")
    assert file_digest(dev) == before and no_entries(env)


def test_passphrase_with_extra_newline_is_wrong(env2: Env) -> None:
    env = env2  # byte-exact: "pw\n" is not "pw"
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", "-",
                      stdin=b"correct horse battery staple\n")
    assert_refused(env, res, 81)
    assert file_digest(dev) == before and no_entries(env)


def test_missing_unlock_key(env2: Env) -> None:
    env = env2
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev)
    assert_refused(env, res, 64, "--unlock-key-file")
    assert file_digest(dev) == before and no_entries(env)


def test_all_keyslots_in_use(env2: Env) -> None:
    env = env2
    dev = env.image()
    for n in range(1, enroll.MAX_KEYSLOTS):
        subprocess.run(["cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", "--key-file", str(env.passfile()),
                        "--new-key-slot", str(n), dev, "-"], input=b"x%d" % n, check=True)
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()))
    assert_refused(env, res, 85, dev, "all 32 keyslots are in use", "luksKillSlot")
    assert file_digest(dev) == before and no_entries(env)


def test_keyslot_area_full_rolls_back(env: Env) -> None:
    """cryptsetup itself refuses the keyslot (area too small) after Vault was written:
    the pending entry is withdrawn and the header restored."""
    dev = str(env.tmp / "small.img")
    Path(dev).write_bytes(b"")
    subprocess.run(["truncate", "-s", "20M", dev], check=True)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                    "pbkdf2", "--pbkdf-force-iterations", "1000", "--luks2-keyslots-size",
                    "256k", "--key-file=-", dev], input=env.passfile().read_bytes(),
                   check=True, capture_output=True)
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()))
    assert_refused(env, res, 85, dev, "no free keyslot")
    assert file_digest(dev) == before and no_entries(env)
    assert env.backups() == []


def test_keyslot_in_use(env2: Env) -> None:
    env = env2
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--keyslot", "0", "--unlock-key-file",
                      str(env.passfile()))
    assert_refused(env, res, 64, "keyslot 0 is in use")
    assert file_digest(dev) == before and no_entries(env)


def test_busy_device(env2: Env) -> None:
    env = env2
    dev = env.image()
    before = file_digest(dev)
    with env.rundir.lock(dev):  # another bootkey run holds the device
        res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()))
    assert_refused(env, res, 83, dev, "busy")
    assert file_digest(dev) == before and no_entries(env)


def test_vault_write_forbidden(env: Env) -> None:
    """Without an operator token the boot AppRole is used: it may not encrypt or write."""
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()), token=False)
    assert_refused(env, res, 77, "permission denied", "bootkey policy")
    assert file_digest(dev) == before and no_entries(env)


def test_not_a_device(env2: Env) -> None:
    env = env2
    res = env.bootkey("enroll", str(env.tmp / "nope.img"), "--unlock-key-file",
                      str(env.passfile()))
    assert_refused(env, res, 64, "nope.img", "no such device")


def test_plain_file_is_not_luks(env2: Env) -> None:
    env = env2
    dev = str(env.tmp / "zero.img")
    Path(dev).write_bytes(bytes(1 << 20))
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()))
    assert_refused(env, res, 82, "not a LUKS volume", "--format")
    assert Path(dev).read_bytes() == bytes(1 << 20) and no_entries(env)


def test_format_refuses_filesystem_partition_table_and_luks(env2: Env) -> None:
    env = env2
    fs = str(env.tmp / "fs.img")
    subprocess.run(["truncate", "-s", "8M", fs], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", fs], check=True)
    pt = str(env.tmp / "pt.img")
    subprocess.run(["truncate", "-s", "8M", pt], check=True)
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 4096)
    mbr[510:512] = b"\x55\xaa"
    with open(pt, "r+b") as f:
        f.write(mbr)
    lk = env.image("lk")
    for dev, what in ((fs, "ext4"), (pt, "dos partition table"), (lk, "LUKS2 header")):
        before = file_digest(dev)
        res = env.bootkey("enroll", dev, "--format")
        assert_refused(env, res, 89, dev, what, "--force")
        assert file_digest(dev) == before and no_entries(env)


def test_force_without_format(env2: Env) -> None:
    env = env2
    dev = env.image()
    res = env.bootkey("enroll", dev, "--force")
    assert_refused(env, res, 64, "--force only applies with --format")


def test_rotate_not_enrolled(env2: Env) -> None:
    env = env2
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("rotate", dev)
    assert_refused(env, res, 87, "not enrolled", "bootkey enroll")
    assert file_digest(dev) == before and no_entries(env)


def test_unenroll_last_keyslot(env2: Env) -> None:
    env = env2
    dev = str(env.tmp / "only.img")
    subprocess.run(["truncate", "-s", "20M", dev], check=True)
    assert env.bootkey("enroll", dev, "--format").returncode == 0
    before, entry_before = file_digest(dev), env.state(dev).keys
    res = env.bootkey("unenroll", dev, "--purge")
    assert_refused(env, res, 86, "only ones", "luksAddKey")
    assert file_digest(dev) == before and env.state(dev).keys == entry_before


def test_unenroll_needs_a_key_that_stays(env2: Env) -> None:
    env = env2
    dev = env.image()
    assert env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile())).returncode == 0
    before, keys = file_digest(dev), env.state(dev).keys
    res = env.bootkey("unenroll", dev)
    assert_refused(env, res, 64, "--unlock-key-file")
    res = env.bootkey("unenroll", dev, "--unlock-key-file", str(env.passfile(b"nope")))
    assert_refused(env, res, 81, "opens none of the keyslots that would remain")
    assert file_digest(dev) == before and env.state(dev).keys == keys


def test_stale_entry_conflict(env2: Env) -> None:
    """An entry whose keys open no keyslot (e.g. unenrolled without --purge) blocks a
    new enroll until purged: never overwrite a Vault copy silently."""
    env = env2
    dev = env.image()
    pw = str(env.passfile())
    assert env.bootkey("enroll", dev, "--unlock-key-file", pw).returncode == 0
    assert env.bootkey("unenroll", dev, "--unlock-key-file", pw).returncode == 0
    before, keys = file_digest(dev), env.state(dev).keys
    res = env.bootkey("enroll", dev, "--unlock-key-file", pw)
    assert_refused(env, res, 88, "unenroll --purge")
    assert file_digest(dev) == before and env.state(dev).keys == keys


def test_bad_name(env2: Env) -> None:
    env = env2
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--name", "../etc", "--unlock-key-file",
                      str(env.passfile()))
    assert_refused(env, res, 64, "--name", "mapping name")
    assert file_digest(dev) == before and no_entries(env)


def test_kv_write_forbidden_after_seal(env2: Env, bao: DevBao) -> None:
    """A token that may seal (transit) but not write the KV entry: the create-only write is
    refused, nothing is left in Vault and the header is untouched."""
    env = env2
    encrypt = [b for b in env.bootkey("policy", "--enroll", "--host-id", env.host)
               .stdout.split("\n\n") if "/encrypt/" in b]
    policy = env.bootkey("policy", "--host-id", env.host).stdout + "\n" + encrypt[0]
    root = bao.client()
    root.sys.create_or_update_policy(f"seal-only-{env.host}", policy)
    tok = root.auth.token.create(policies=[f"seal-only-{env.host}"], ttl="10m",
                                 )["auth"]["client_token"]
    dev = env.image()
    before = file_digest(dev)
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()),
                      extra_env={"VAULT_TOKEN": tok})
    assert_refused(env, res, 77, "cannot write: permission denied")
    assert file_digest(dev) == before and no_entries(env)
