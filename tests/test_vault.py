"""The Vault session against a real OpenBao: every secret_id source, fail-over, renewal
and re-login, KV create-only, error classification."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from bootkey_core.vault import RYW_WAIT, _Written
from tests.support.bao import DevBao, free_port
from tests.support.proxy import HttpFront
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


# ---- read-your-writes (a standby that has not seen the session's own write yet) -------


@pytest.fixture
def front(bao: DevBao) -> Iterator[HttpFront]:
    f = HttpFront(bao.address).start()
    yield f
    f.stop()


def through(env: VaultEnv, front: HttpFront) -> VaultSession:
    vcfg = env.config().vault.model_copy(update={"address": [front.address]})
    return VaultSession(vcfg, token=env.enroll_token)


def gets(front: HttpFront, api: str) -> int:
    return sum(1 for m, p, _ in front.seen if m == "GET" and p == api)


def test_read_of_own_write_waits_out_a_lagging_standby(vault_env: VaultEnv,
                                                       front: HttpFront) -> None:
    """The front answers 404 three times, as a standby would before the write reached
    it: the session reads again, and the caller sees what it wrote."""
    s = through(vault_env, front)
    mount, version = vault_env.kv_mount, vault_env.kv_version
    path = f"bootkey/{vault_env.host_id}/ryw"
    s.kv_write(mount, version, path, {"a": "1"})
    api = "/v1/" + VaultSession.kv_api_path(mount, version, path)
    front.answer(api, 404, times=3)
    assert s.kv_read(mount, version, path) == {"a": "1"}
    assert gets(front, api) == 4


def test_read_of_a_path_not_written_is_not_repeated(vault_env2: VaultEnv,
                                                    front: HttpFront) -> None:
    """The boot path: reads of entries this session did not write cost one request."""
    s = through(vault_env2, front)
    path = f"bootkey/{vault_env2.host_id}/never-written"
    api = "/v1/" + VaultSession.kv_api_path(vault_env2.kv_mount, 2, path)
    front.answer(api, 404)
    assert s.kv_read(vault_env2.kv_mount, 2, path) is None
    assert gets(front, api) == 1


def test_read_of_own_write_gives_up_within_ryw_wait(vault_env2: VaultEnv,
                                                    front: HttpFront) -> None:
    """A node that never catches up: the last answer stands after RYW_WAIT, no hang."""
    s = through(vault_env2, front)
    path = f"bootkey/{vault_env2.host_id}/lagging"
    s.kv_write(vault_env2.kv_mount, 2, path, {"a": "1"})
    api = "/v1/" + VaultSession.kv_api_path(vault_env2.kv_mount, 2, path)
    front.answer(api, 404)
    t0 = time.monotonic()
    assert s.kv_read(vault_env2.kv_mount, 2, path) is None
    assert time.monotonic() - t0 < RYW_WAIT + 1.0
    assert 2 < gets(front, api) < 20  # a few ms apart, growing: no busy loop


def test_what_counts_as_older_than_the_own_write(vault_env2: VaultEnv) -> None:
    """Pure logic: which answers are older than the write the session remembers."""
    s = VaultSession(vault_env2.config().vault, token="unused")
    v3 = _Written(0.0, version=3)

    def entry(version: int) -> dict[str, Any]:
        return {"data": {"data": {"a": "1"}, "metadata": {"version": version}}}

    assert s._older(v3, entry(2), False, False)
    assert not s._older(v3, entry(3), False, False)
    assert not s._older(v3, entry(4), False, False)
    assert not s._older(v3, entry(1), False, True)  # ?version=1 asked for version 1
    assert s._older(v3, {"data": {"current_version": 2}}, False, False)  # metadata
    assert s._older(v3, None, True, False)  # 404
    gone = _Written(0.0, deleted=True)
    assert not s._older(gone, None, True, False)
    assert s._older(gone, entry(3), False, False)
    v1 = _Written(0.0, fingerprint=s._fingerprint({"a": "1"}))
    assert not s._older(v1, {"data": {"a": "1"}}, False, False)
    assert s._older(v1, {"data": {"a": "2"}}, False, False)
    # Answers that are not entries are not remembered: nothing to read back.
    s._remember("POST", "transit/decrypt/k", {"ciphertext": "vault:v1:x"},
                {"data": {"plaintext": "eA=="}})
    s._remember("DELETE", "secret/metadata/h/e", None, None)
    assert s._own_write("transit/decrypt/k") is None
    assert s._own_write("secret/data/h/e") == s._own_write("secret/metadata/h/e")
    assert s._own_write("secret/data/h/e") is not None
