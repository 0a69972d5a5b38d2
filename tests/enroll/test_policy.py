"""The policies `bootkey policy` prints, applied to a real OpenBao, are least privilege:
a boot token unlocks its own volumes and can do nothing else — no writes, no other
host's prefix, no decrypt under another host's context; the enroll token is confined to
its own host the same way."""

from __future__ import annotations

import pytest

from bootkey import keystore, luks
from bootkey.vault import VaultSession
from bootkey_core.errors import VaultBadAnswer, VaultDenied
from bootkey_core.secret import SecretBuffer
from tests.enroll.conftest import Env, secret_of
from tests.support.bao import DevBao
from tests.support.vaultenv import new_host_id, provision


def printed_policy(env: Env, host: str, *, enroll: bool = False) -> str:
    res = env.bootkey("policy", "--host-id", host, *(["--enroll"] if enroll else []))
    assert res.returncode == 0, res.stderr
    return res.stdout


def token_with(bao: DevBao, name: str, hcl: str) -> str:
    root = bao.client()
    root.sys.create_or_update_policy(name, hcl)
    tok: str = root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    return tok


@pytest.fixture
def two_hosts(env: Env, bao: DevBao) -> tuple[Env, str, str, keystore.Location, str]:
    """Host A (env) and host B, each with an enrolled volume; returns A's env, A's boot
    token (from the printed policy), B's host id, B's volume location, B's sealed key."""
    dev = env.image("a")
    res = env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile()))
    assert res.returncode == 0, res.stderr
    b = provision(bao.client(), env.tmp / "b", kv_version=env.vault.kv_version,
                  host_id=new_host_id())
    b_cfg = b.config()
    b_session = VaultSession(b_cfg.vault, token=b.enroll_token, deadline=10)
    b_loc = keystore.location_for(b_cfg, b.host_id, "0b0b0b0b-0000-4000-8000-000000000000")
    with SecretBuffer.random(64) as k:
        sealed = keystore.seal(b_session, b_loc, k)
    entry = keystore.Entry(host_id=b.host_id, luks_uuid=b_loc.luks_uuid,
                           keys=[keystore.SealedKey(keyslot=1, sealed=sealed,
                                                    created_at=keystore.now())])
    b_session.kv_write(b_loc.kv_mount, b_loc.kv_version, b_loc.path, entry.to_kv())
    boot = token_with(bao, f"printed-boot-{env.host}", printed_policy(env, env.host))
    return env, boot, b.host_id, b_loc, sealed


def test_boot_policy_is_least_privilege(two_hosts: tuple[Env, str, str, keystore.Location,
                                                         str]) -> None:
    env, boot_token, _, b_loc, b_sealed = two_hosts
    s = VaultSession(env.cfg.vault, token=boot_token, deadline=5)
    dev = str(env.tmp / "a.img")
    loc = env.loc(dev)

    # unlocks its own volume
    entry = keystore.read_entry(s, loc)
    assert entry is not None
    with keystore.unseal(s, loc, entry.keys[0]) as key:
        assert luks.test_key(dev, key, entry.keys[0].keyslot) is luks.KeyTest.OK

    # cannot write, create, delete or encrypt
    with pytest.raises(VaultDenied):
        s.kv_write(loc.kv_mount, loc.kv_version, loc.path, {"x": "y"})
    other = loc.path.rsplit("/", 1)[0] + "/new-volume"
    with pytest.raises(VaultDenied):
        s.kv_write(loc.kv_mount, loc.kv_version, other, {"x": "y"})
    with pytest.raises(VaultDenied):
        s.kv_delete(loc.kv_mount, loc.kv_version, loc.path)
    with secret_of(b"k" * 64) as k, pytest.raises(VaultDenied):
        keystore.seal(s, loc, k)
    with pytest.raises(VaultDenied):
        s.transit_rewrap(loc.transit_mount, loc.transit_key, entry.keys[0].sealed,
                         loc.context)

    # cannot read another host's prefix
    with pytest.raises(VaultDenied):
        s.kv_read(b_loc.kv_mount, b_loc.kv_version, b_loc.path)

    # cannot decrypt under another host's context (policy refuses the parameter) ...
    with pytest.raises(VaultDenied):
        s.transit_decrypt(b_loc.transit_mount, b_loc.transit_key, b_sealed, b_loc.context)
    # ... and another host's sealed key is not authentic under our own context
    fake = keystore.Location(loc.kv_mount, loc.kv_version, loc.path, loc.transit_mount,
                             loc.transit_key, env.host, b_loc.luks_uuid)
    with pytest.raises(VaultBadAnswer, match="not authentic"):
        s.transit_decrypt(fake.transit_mount, fake.transit_key, b_sealed, fake.context)


def test_enroll_policy_confined_to_own_host(two_hosts: tuple[Env, str, str,
                                                             keystore.Location, str],
                                            bao: DevBao) -> None:
    env, _, _, b_loc, b_sealed = two_hosts
    tok = token_with(bao, f"printed-enroll-{env.host}",
                     printed_policy(env, env.host, enroll=True))
    s = VaultSession(env.cfg.vault, token=tok, deadline=5)
    mine = keystore.location_for(env.cfg, env.host, "1a1a1a1a-0000-4000-8000-000000000000")
    with SecretBuffer.random(64) as k:
        sealed = keystore.seal(s, mine, k)  # own context: allowed
        s.kv_write(mine.kv_mount, mine.kv_version, mine.path, {"probe": sealed},
                   create_only=True)
        with pytest.raises(VaultDenied):  # another host's context: refused
            keystore.seal(s, b_loc, k)
    with pytest.raises(VaultDenied):
        s.kv_write(b_loc.kv_mount, b_loc.kv_version, b_loc.path, {"x": "y"})
    with pytest.raises(VaultDenied):
        s.kv_read(b_loc.kv_mount, b_loc.kv_version, b_loc.path)
    with pytest.raises(VaultDenied):
        s.transit_decrypt(b_loc.transit_mount, b_loc.transit_key, b_sealed, b_loc.context)
    # no access to the transit key's configuration beyond reading it
    root = bao.client()
    root.token = tok
    with pytest.raises(Exception, match="permission denied"):
        root.write("transit/keys/bootkey/config", deletion_allowed=True)
    with pytest.raises(Exception, match="permission denied"):
        root.secrets.transit.export_key("bootkey", "encryption-key")


def test_boot_role_end_to_end(env: Env) -> None:
    """`bootkey unlock --check` with only the AppRole (boot policy) verifies the volume."""
    dev = env.image("e2e")
    assert env.bootkey("enroll", dev, "--unlock-key-file", str(env.passfile())).returncode == 0
    chk = env.unlock_check()
    assert chk[dev]["result"] == "verified", chk

