"""Migration: volumes formatted and stored the way vaultlocker does it (key = base64 text
of 512 random bytes, used verbatim as the passphrase; `luksFormat --uuid`; stored at
`<backend>/<hostname>/<uuid>`, field dmcrypt_key; KV v1 and v2) are unlocked by
`bootkey unlock --check` after `bootkey import-vaultlocker`. (vaultlocker uses
cryptsetup's default KDF; the images here use PBKDF2 1000 iterations to stay fast —
bootkey's import does not depend on the KDF.)"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid

import hvac

from bootkey import luks
from tests.enroll.conftest import Env
from tests.support.bao import DevBao
from tests.support.luksimg import header_digest


def vaultlocker_mount(root: hvac.Client, version: int) -> str:
    mount = f"vaultlocker-v{version}"
    if f"{mount}/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("kv", path=mount, options={"version": str(version)})
    return mount


def vaultlocker_volume(env: Env, root: hvac.Client, mount: str, version: int, host: str, *,
                       name: str, store_key: str | None = None,
                       ext: str = "img") -> tuple[str, str, str]:
    """Format like vaultlocker (`cryptsetup --batch-mode --uuid U --key-file - luksFormat`)
    and store like vaultlocker. Returns (device, uuid, key text). The Env's `[unlock]
    search` glob finds `*.img`; another `ext` hides the image from it."""
    key = base64.b64encode(os.urandom(512)).decode()
    u = str(uuid.uuid4())
    dev = str(env.tmp / f"{name}.{ext}")
    subprocess.run(["truncate", "-s", "20M", dev], check=True)
    subprocess.run(["cryptsetup", "--batch-mode", "--uuid", u, "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", "luksFormat", dev],
                   input=key.encode(), check=True)
    secret = {"dmcrypt_key": store_key or key}
    if version == 2:
        root.secrets.kv.v2.create_or_update_secret(f"{host}/{u}", secret, mount_point=mount)
    else:
        root.secrets.kv.v1.create_or_update_secret(f"{host}/{u}", secret, mount_point=mount)
    return dev, u, key


def operator_token(bao: DevBao, env: Env, mount: str) -> str:
    root = bao.client()
    root.sys.create_or_update_policy(f"vl-read-{env.host}", (
        f'path "{mount}/*" {{ capabilities = ["read", "list"] }}\n'
        f'path "{mount}/data/*" {{ capabilities = ["read"] }}\n'
        f'path "{mount}/metadata/*" {{ capabilities = ["list"] }}\n'))
    tok: str = root.auth.token.create(
        policies=[f"bootkey-enroll-{env.host}", f"vl-read-{env.host}"], ttl="10m",
    )["auth"]["client_token"]
    return tok


def test_import_vaultlocker(env: Env, bao: DevBao) -> None:
    root = bao.client()
    version = env.vault.kv_version
    mount = vaultlocker_mount(root, version)
    host = f"vl-{env.host[:8]}"
    a, ua, ka = vaultlocker_volume(env, root, mount, version, host, name="a")
    b, ub, kb = vaultlocker_volume(env, root, mount, version, host, name="b")
    c, uc, _ = vaultlocker_volume(env, root, mount, version, host, name="c",
                                  store_key=base64.b64encode(b"\0" * 512).decode())
    gone = str(uuid.uuid4())  # vaultlocker knows it; no such device on this host
    if version == 2:
        root.secrets.kv.v2.create_or_update_secret(f"{host}/{gone}", {"dmcrypt_key": "x"},
                                                   mount_point=mount)
    else:
        root.secrets.kv.v1.create_or_update_secret(f"{host}/{gone}", {"dmcrypt_key": "x"},
                                                   mount_point=mount)
    c_before = header_digest(c)
    tok = operator_token(bao, env, mount)
    res = env.bootkey("import-vaultlocker", "--backend", mount, "--hostname", host, "--json",
                      extra_env={"VAULT_TOKEN": tok})
    out = {v["luks_uuid"]: v for v in json.loads(res.stdout)["volumes"]}
    assert out[ua]["status"] == "migrated" and out[ub]["status"] == "migrated", out
    assert out[gone]["status"] == "skipped" and "no device" in out[gone]["reason"]
    assert out[uc]["status"] == "failed" and "does not open" in out[uc]["reason"]
    assert res.returncode == 81  # one volume failed: its code
    assert header_digest(c) == c_before  # the volume whose key did not fit: untouched

    for dev, key in ((a, ka), (b, kb)):
        st = env.state(dev)
        assert st.keys == [(1, "active")] and st.token_slots == [{1}]
        assert st.keyslots == {1}  # vaultlocker's keyslot 0 removed ...
        assert luks.test_key(dev, key.encode()) is luks.KeyTest.WRONG_KEY
    chk = env.unlock_check()
    assert chk[a]["result"] == "verified" and chk[b]["result"] == "verified", chk
    assert chk[a]["name"] == f"crypt-{ua}"  # vaultlocker's mapping name, kept

    # re-running is harmless: nothing enrolled twice, nothing else removed
    res = env.bootkey("import-vaultlocker", "--backend", mount, "--hostname", host,
                      extra_env={"VAULT_TOKEN": tok})
    assert env.state(a).keyslots == {1} and env.state(a).keys == [(1, "active")]


def test_import_keep_old_slot(env2: Env, bao: DevBao) -> None:
    env = env2
    root = bao.client()
    mount = vaultlocker_mount(root, 1)
    host = f"vk-{env.host[:8]}"
    a, _, ka = vaultlocker_volume(env, root, mount, 1, host, name="a")
    tok = operator_token(bao, env, mount)
    res = env.bootkey("import-vaultlocker", "--backend", mount, "--hostname", host,
                      "--keep-old-slot", extra_env={"VAULT_TOKEN": tok})
    assert res.returncode == 0, res.stderr
    assert "migrated" in res.stdout and "kept" in res.stdout
    assert env.state(a).keyslots == {0, 1}
    assert luks.test_key(a, ka.encode(), 0) is luks.KeyTest.OK
    assert env.boot_check(a) == "verified"


def test_import_killed_then_rerun(env2: Env, bao: DevBao) -> None:
    """SIGKILL after bootkey's key is committed but before vaultlocker's keyslot goes:
    the volume opens either way, and a re-run removes the old keyslot."""
    env = env2
    root = bao.client()
    mount = vaultlocker_mount(root, 1)
    host = f"vx-{env.host[:8]}"
    a, _, ka = vaultlocker_volume(env, root, mount, 1, host, name="a")
    tok = operator_token(bao, env, mount)
    args = ("import-vaultlocker", "--backend", mount, "--hostname", host)
    res = env.bootkey(*args, extra_env={"VAULT_TOKEN": tok}, kill_at="Activate")
    assert res.returncode == -9
    assert env.boot_check(a) == "verified"
    assert luks.test_key(a, ka.encode()) is luks.KeyTest.OK
    res = env.bootkey(*args, extra_env={"VAULT_TOKEN": tok})
    assert res.returncode == 0, res.stderr
    assert env.state(a).keyslots == {1} and env.state(a).keys == [(1, "active")]
    assert luks.test_key(a, ka.encode()) is luks.KeyTest.WRONG_KEY
    assert env.backups() == []


def test_import_finds_a_volume_listed_in_the_config(env2: Env, bao: DevBao) -> None:
    """A volume named by path in [[volume]], outside every scan and `search` glob."""
    env = env2
    root = bao.client()
    mount = vaultlocker_mount(root, 2)
    host = f"vc-{env.host[:8]}"
    dev, u, key = vaultlocker_volume(env, root, mount, 2, host, name="listed", ext="luks")
    tok = operator_token(bao, env, mount)
    args = ("import-vaultlocker", "--backend", mount, "--hostname", host, "--json")
    unlisted = env.bootkey(*args, extra_env={"VAULT_TOKEN": tok})
    (vol,) = json.loads(unlisted.stdout)["volumes"]
    assert vol["status"] == "skipped" and "no device" in vol["reason"], vol  # not found ...
    with env.cfg_file.open("a") as f:  # ... until the config lists it
        f.write(f'\n[[volume]]\nname = "listed"\ndevice = "{dev}"\n')
    res = env.bootkey(*args, extra_env={"VAULT_TOKEN": tok})
    assert res.returncode == 0, res.stderr
    (vol,) = json.loads(res.stdout)["volumes"]
    assert vol["status"] == "migrated" and vol["device"] == dev and vol["luks_uuid"] == u, vol
    assert env.state(dev).keyslots == {1}  # vaultlocker's keyslot removed
    assert luks.test_key(dev, key.encode()) is luks.KeyTest.WRONG_KEY
    chk = env.unlock_check("listed")
    assert chk[dev]["result"] == "verified" and chk[dev]["name"] == "listed", chk
