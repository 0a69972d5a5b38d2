"""`bootkey unlock --check` against a real OpenBao and real LUKS2 images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bootkey import keystore
from bootkey.vault import VaultSession
from tests.support.luksimg import enroll_direct, header_digest, make_image
from tests.support.vaultenv import VaultEnv

BOOTKEY = [sys.executable, "-m", "bootkey.cli"]


def run_bootkey(cfg_file: Path, *args: str,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BOOTKEY, "--config", str(cfg_file), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_config(tmp: Path, env: VaultEnv, extra: str = "", **kw: str) -> Path:
    p = tmp / "bootkey.toml"
    p.write_text(env.toml(extra, **kw))
    return p


def test_check_several_volumes_found_by_token(vault_env: VaultEnv, tmp_path: Path) -> None:
    cfg = vault_env.config()
    imgs = [make_image(tmp_path / f"v{i}.img") for i in range(3)]
    enrolled = [enroll_direct(cfg, vault_env.enroll_token, d, name=f"vol{i}")
                for i, d in enumerate(imgs)]
    cfg_file = write_config(tmp_path, vault_env)
    cfg_file.write_text(vault_env.toml().replace(
        "[unlock]\n", f'[unlock]\nsearch = ["{tmp_path}/*.img"]\n'))
    res = run_bootkey(cfg_file, "unlock", "--all", "--check", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    got = {v["name"]: v for v in out["volumes"]}
    assert set(got) == {"vol0", "vol1", "vol2"}
    for i, e in enumerate(enrolled):
        assert got[f"vol{i}"]["result"] == "verified"
        assert got[f"vol{i}"]["keyslot"] == e.keyslot
        assert got[f"vol{i}"]["luks_uuid"] == e.luks_uuid


def test_missing_vault_entry_fails_alone(vault_env2: VaultEnv, tmp_path: Path) -> None:
    cfg = vault_env2.config()
    a = enroll_direct(cfg, vault_env2.enroll_token, make_image(tmp_path / "a.img"), name="a")
    b = enroll_direct(cfg, vault_env2.enroll_token, make_image(tmp_path / "b.img"), name="b")
    VaultSession(cfg.vault, token=vault_env2.enroll_token).kv_delete(
        b.location.kv_mount, b.location.kv_version, b.location.path)
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(
        f'[[volume]]\nname = "a"\ndevice = "{a.device}"\n'
        f'[[volume]]\nname = "b"\ndevice = "{b.device}"\n'))
    res = run_bootkey(cfg_file, "unlock", "a", "b", "--check", "--json")
    out = {v["name"]: v for v in json.loads(res.stdout)["volumes"]}
    assert out["a"]["result"] == "verified"
    assert out["b"]["result"] == "failed"
    assert "no key in Vault" in out["b"]["reason"] and b.location.display in out["b"]["reason"]
    assert res.returncode == 1  # some succeeded, some failed


def test_wrong_key_in_vault_clear_error_header_unchanged(vault_env2: VaultEnv,
                                                          tmp_path: Path) -> None:
    cfg = vault_env2.config()
    dev = make_image(tmp_path / "w.img")
    enr = enroll_direct(cfg, vault_env2.enroll_token, dev, name="w")
    # Replace the sealed key with a validly sealed *different* key.
    session = VaultSession(cfg.vault, token=vault_env2.enroll_token)
    from bootkey_core.secret import SecretBuffer

    with SecretBuffer.random(64) as other:
        sealed = keystore.seal(session, enr.location, other)
    entry = keystore.read_entry(session, enr.location)
    assert entry is not None
    bad = keystore.Entry(host_id=entry.host_id, luks_uuid=entry.luks_uuid, name="w", keys=[
        keystore.SealedKey(keyslot=enr.keyslot, sealed=sealed, created_at=keystore.now())])
    session.kv_write(enr.location.kv_mount, 2, enr.location.path, bad.to_kv())
    before = header_digest(dev)
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(f'[[volume]]\nname = "w"\ndevice = "{dev}"\n'))
    res = run_bootkey(cfg_file, "unlock", "w", "--check")
    assert res.returncode == 81, res.stderr
    assert "volume w" in res.stderr and "does not open keyslot" in res.stderr
    assert header_digest(dev) == before


def test_unknown_volume_name_is_usage_error(vault_env2: VaultEnv, tmp_path: Path) -> None:
    cfg_file = write_config(tmp_path, vault_env2)
    res = run_bootkey(cfg_file, "unlock", "nosuch", "--check")
    assert res.returncode == 64
    assert "nosuch: no such volume" in res.stderr


def test_wrong_secret_id_fails_fast(vault_env2: VaultEnv, tmp_path: Path) -> None:
    cfg = vault_env2.config()
    enroll_direct(cfg, vault_env2.enroll_token, make_image(tmp_path / "s.img"), name="s")
    vault_env2.secret_id_file.write_text("00000000-0000-0000-0000-000000000000")
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(
        f'[[volume]]\nname = "s"\ndevice = "{tmp_path}/s.img"\n', deadline="60s"))
    res = run_bootkey(cfg_file, "unlock", "--all", "--check", timeout=30)
    assert res.returncode == 80, res.stderr
    assert "cannot log in" in res.stderr and "secret_id" in res.stderr


@pytest.mark.parametrize("bad", ["[vault]\ntimeout = 'soon'\n", "[unlock]\nparalel = 3\n"])
def test_bad_config_one_line_per_problem(tmp_path: Path, bad: str) -> None:
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(bad)
    res = run_bootkey(cfg_file, "unlock", "--all", "--check")
    assert res.returncode == 78
    assert str(cfg_file) in res.stderr
    assert "Traceback" not in res.stderr


def test_open_without_device_mapper_is_a_clear_error(vault_env2: VaultEnv,
                                                      tmp_path: Path) -> None:
    """This machine has no device-mapper (the VM tests open volumes for real); opening
    must say so and point at --check, not dump cryptsetup's noise."""
    if Path("/sys/module/dm_mod").exists():
        pytest.skip("device-mapper is available here: opening is covered by tests/vm")
    cfg = vault_env2.config()
    dev = make_image(tmp_path / "d.img")
    enroll_direct(cfg, vault_env2.enroll_token, dev, name="d")
    before = header_digest(dev)
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(f'[[volume]]\nname = "d"\ndevice = "{dev}"\n'))
    res = run_bootkey(cfg_file, "unlock", "d")
    assert res.returncode == 84, res.stderr
    assert "device-mapper is not available" in res.stderr and "--check" in res.stderr
    assert header_digest(dev) == before
