"""The Vault session against a real OpenBao: every secret_id source, fail-over, renewal
and re-login, KV create-only, error classification."""

from __future__ import annotations

import os
from pathlib import Path

import hvac
import pytest

from bootkey import config as cfgmod
from bootkey.vault import VaultSession, WaitInfo
from bootkey_core.errors import (
    ConfigError,
    VaultAuthFailed,
    VaultConflict,
    VaultDenied,
    VaultUnavailable,
)
from tests.support.bao import DevBao, free_port
from tests.support.vaultenv import VaultEnv


def session(env: VaultEnv, extra: str = "", **kw: object) -> VaultSession:
    cfg = env.config(extra)
    return VaultSession.from_config(cfg, **kw)  # type: ignore[arg-type]


def boot_role(env: VaultEnv) -> str:
    return f"bootkey-boot-{env.host_id}"


def test_secret_id_file_removed_only_after_successful_login(vault_env2: VaultEnv) -> None:
    text = vault_env2.toml().replace("[vault.approle]\n",
                                     "[vault.approle]\nremove_secret_id_file = true\n")
    s = VaultSession.from_config(cfgmod.parse(text))
    good = vault_env2.secret_id_file.read_text()
    vault_env2.secret_id_file.write_text("wrong")
    with pytest.raises(VaultAuthFailed):
        s.login()
    assert vault_env2.secret_id_file.exists()  # a failed boot can try again
    vault_env2.secret_id_file.write_text(good + "\n")  # trailing newline from `echo`
    s.login()
    assert s.logged_in and not vault_env2.secret_id_file.exists()


def test_secret_id_from_systemd_credential(vault_env2: VaultEnv, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secret-id").write_text(vault_env2.secret_id_file.read_text())
    vault_env2.secret_id_file.unlink()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = session(vault_env2)
    s.login()
    assert s.logged_in


def test_credential_named_but_not_under_systemd(vault_env2: VaultEnv,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = vault_env2.toml().replace("[vault.approle]\n",
                                     '[vault.approle]\nsecret_id_credential = "sid"\n')
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        VaultSession.from_config(cfgmod.parse(text)).login()


def test_wrapped_secret_id_unwrapped_exactly_once(vault_env2: VaultEnv, bao: DevBao,
                                                  tmp_path: Path) -> None:
    root = bao.client()
    wrapped = root.auth.approle.generate_secret_id(boot_role(vault_env2), wrap_ttl="60s")
    wfile = tmp_path / "wrapped"
    wfile.write_text(wrapped["wrap_info"]["token"])
    text = vault_env2.toml().replace(
        "[vault.approle]\n", f'[vault.approle]\nwrapped_secret_id_file = "{wfile}"\n')
    s = VaultSession.from_config(cfgmod.parse(text))
    s.login()
    assert s.logged_in
    assert not wfile.exists()  # used up: removed
    wfile.write_text(wrapped["wrap_info"]["token"])  # an attacker replays it
    with pytest.raises(VaultAuthFailed, match="already used"):
        VaultSession.from_config(cfgmod.parse(text)).login()


def test_fails_over_to_the_second_address(vault_env2: VaultEnv) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    text = vault_env2.toml().replace(f'address = ["{vault_env2.address}"]',
                                     f'address = ["{dead}", "{vault_env2.address}"]')
    s = VaultSession.from_config(cfgmod.parse(text))
    s.login()
    assert s.raw_client().url == vault_env2.address


def test_renewal_refused_means_relogin(vault_env2: VaultEnv, bao: DevBao) -> None:
    s = session(vault_env2)
    s.login()
    old = s.raw_client().token
    bao.client().auth.token.revoke(old)
    s.renew_or_relogin()
    assert s.raw_client().token != old
    assert s.raw_client().is_authenticated()


def test_renewal_extends_ttl(vault_env2: VaultEnv) -> None:
    s = session(vault_env2)
    s.login()
    token = s.raw_client().token
    s.renew_or_relogin()
    assert s.raw_client().token == token and s.token_ttl() > 3000


def test_denied_path_names_it_and_the_fix(vault_env2: VaultEnv) -> None:
    s = session(vault_env2)
    s.login()
    other = "bootkey/someone-else/0000"
    with pytest.raises(VaultDenied) as e:
        s.kv_read("secret", 2, other)
    assert f"secret/data/{other}" in str(e.value) and "bootkey policy" in str(e.value)
    assert e.value.exit_code == 77


def test_kv_create_only(vault_env: VaultEnv) -> None:
    s = VaultSession(vault_env.config().vault, token=vault_env.enroll_token)
    path = f"bootkey/{vault_env.host_id}/create-only"
    s.kv_write(vault_env.kv_mount, vault_env.kv_version, path, {"a": "1"}, create_only=True)
    with pytest.raises(VaultConflict):
        s.kv_write(vault_env.kv_mount, vault_env.kv_version, path, {"a": "2"},
                   create_only=True)
    assert s.kv_read(vault_env.kv_mount, vault_env.kv_version, path) == {"a": "1"}


def test_unreachable_gives_up_at_the_deadline(vault_env2: VaultEnv) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    text = vault_env2.toml().replace(f'address = ["{vault_env2.address}"]',
                                     f'address = ["{dead}"]')
    waits: list[float] = []
    s = VaultSession.from_config(cfgmod.parse(text), on_wait=lambda w: waits.append(w.next_in),
                                 sleep=lambda _s: None)
    s.deadline = 0.0
    with pytest.raises(VaultUnavailable, match="unreachable"):
        s.login()


def test_retry_waits_grow_with_full_jitter(vault_env2: VaultEnv) -> None:
    """Back-off: each wait is drawn from [0, min(cap, initial * 2^n)]."""
    dead = f"http://127.0.0.1:{free_port()}"
    text = vault_env2.toml().replace(f'address = ["{vault_env2.address}"]',
                                     f'address = ["{dead}"]')
    waits: list[float] = []
    attempts: list[int] = []

    def fake_sleep(_s: float) -> None:
        if len(waits) >= 8:
            raise KeyboardInterrupt

    def on_wait(w: WaitInfo) -> None:
        waits.append(w.next_in)
        attempts.append(w.attempt)

    s = VaultSession.from_config(
        cfgmod.parse(text),
        on_wait=on_wait,
        sleep=fake_sleep)
    s.deadline = 3600
    with pytest.raises(KeyboardInterrupt):
        s.login()
    assert attempts == list(range(1, 9))
    cfg = cfgmod.parse(text).unlock
    for n, w in enumerate(waits):
        assert 0 <= w <= min(cfg.retry_max, cfg.retry_initial * 2 ** (n + 1))
    assert len(set(waits)) > 1  # jittered, not a fixed schedule


def test_namespace_header_is_sent(vault_env2: VaultEnv, bao: DevBao) -> None:
    root = bao.client()
    ns = "ns" + os.urandom(3).hex()
    root.sys.create_namespace(ns)
    nsroot = hvac.Client(url=bao.address, token="root", namespace=ns)
    nsroot.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    nsroot.secrets.kv.v2.create_or_update_secret("hello", secret={"x": "y"},
                                                 mount_point="secret")
    text = vault_env2.toml().replace("[vault]\n", f'[vault]\nnamespace = "{ns}"\n')
    s = VaultSession(cfgmod.parse(text).vault, token="root")
    assert s.kv_read("secret", 2, "hello") == {"x": "y"}


def test_blank_credential_falls_back_to_secret_id_file(vault_env2: VaultEnv, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """bootkey.service's `SetCredential=secret-id:\\x20` fallback for hosts that keep the
    secret_id in a plain file."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secret-id").write_bytes(b" ")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = session(vault_env2)
    s.login()
    assert s.logged_in
