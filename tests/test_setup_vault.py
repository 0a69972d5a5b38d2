"""`bootkey setup-vault`: the plan on values, then the command against fresh OpenBao
servers: idempotent, `--dry-run` changes nothing, and what it prints lets a host enroll
and unlock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

from bootkey import config, policy, setup_vault
from bootkey_core.errors import ConfigError
from tests.support.bao import DevBao
from tests.support.vaultenv import new_host_id

# ---- the plan, on values -----------------------------------------------------------------

VCFG = config.VaultConfig()
HOST = "0123456789abcdef0123456789abcdef"


def _want(**kw: Any) -> setup_vault.Want:
    return setup_vault.Want(VCFG, HOST, **kw)


def _fresh() -> setup_vault.Seen:
    return setup_vault.Seen(auth={"token/": "token"},
                            mounts={"secret/": setup_vault.Mount("kv", 2)},
                            transit_key_derived=None, policies={}, role=None,
                            delivery_exists=False)


def test_plan_on_a_fresh_vault_enables_writes_and_issues() -> None:
    want = _want(secret_id=setup_vault.WrappedFile(Path("/x/w")))
    steps = setup_vault.plan(_fresh(), want)
    calls = [(s.method, s.path) for s in steps if isinstance(s, setup_vault.VaultCall)]
    assert calls == [
        ("POST", "sys/auth/approle"),
        ("POST", "sys/mounts/transit"),
        ("POST", "transit/keys/bootkey"),
        ("PUT", f"sys/policies/acl/bootkey-boot-{HOST}"),
        ("PUT", f"sys/policies/acl/bootkey-enroll-{HOST}"),
        ("POST", f"auth/approle/role/bootkey-boot-{HOST}"),
    ]
    by_path = {s.path: s.body for s in steps if isinstance(s, setup_vault.VaultCall)}
    # the policy text is what `bootkey policy` prints, and the token is periodic
    assert by_path[f"sys/policies/acl/bootkey-boot-{HOST}"]["policy"] == \
        policy.boot_policy(VCFG, HOST)
    role = by_path[f"auth/approle/role/bootkey-boot-{HOST}"]
    assert role["token_period"] == 3600 and role["token_max_ttl"] == 0
    assert role["secret_id_num_uses"] == 0
    assert isinstance(steps[-1], setup_vault.IssueSecretId)
    assert "X-Vault-Wrap-TTL: 24h" in steps[-1].show()


def test_plan_on_a_set_up_vault_changes_nothing() -> None:
    want = _want(secret_id=setup_vault.PlainFile(Path("/x/s")))
    seen = setup_vault.Seen(
        auth={"approle/": "approle"},
        mounts={"secret/": setup_vault.Mount("kv", 2), "transit/": setup_vault.Mount("transit")},
        transit_key_derived=True, policies=want.policies(),
        role={**want.role_params(), "token_policies": [f"bootkey-boot-{HOST}"],
              "bind_secret_id": True},
        delivery_exists=True)
    steps = setup_vault.plan(seen, want)
    assert all(isinstance(s, setup_vault.Unchanged) for s in steps)
    # a role with a shorter period is rewritten, and --new-secret-id issues one
    seen2 = setup_vault.Seen(**{**seen.__dict__, "role": {**seen.role, "token_period": 60}})  # type: ignore[dict-item]
    steps = setup_vault.plan(seen2, _want(secret_id=setup_vault.PlainFile(Path("/x/s")),
                                          new_secret_id=True))
    changed = [s.item for s in steps if not isinstance(s, setup_vault.Unchanged)]
    assert changed == [f"role approle/role/bootkey-boot-{HOST}", "secret_id"]


@pytest.mark.parametrize(("mounts", "derived", "field"), [
    ({"secret/": setup_vault.Mount("kv", 1)}, None, "vault.kv"),
    ({"secret/": setup_vault.Mount("kv", 2), "transit/": setup_vault.Mount("kv", 2)}, None,
     "vault.transit.mount"),
    ({"secret/": setup_vault.Mount("kv", 2), "transit/": setup_vault.Mount("transit")}, False,
     "vault.transit.key"),
])
def test_plan_refuses_a_vault_that_contradicts_the_config(
        mounts: dict[str, setup_vault.Mount], derived: bool | None, field: str) -> None:
    seen = setup_vault.Seen(auth={}, mounts=mounts, transit_key_derived=derived, policies={},
                            role=None, delivery_exists=False)
    with pytest.raises(ConfigError, match=f"^{field}: "):
        setup_vault.plan(seen, _want())


# ---- the command, against real OpenBao -------------------------------------------------------


@pytest.fixture
def fresh_bao(tmp_path: Path) -> Iterator[DevBao]:
    """A Vault nobody has set up (dev mode: only KV v2 at secret/)."""
    server = DevBao(tmp_path / "bao").start()
    yield server
    server.stop()


def _cli(cfg: Path, *args: str, token: str | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "BAO_TOKEN")}
    if token:
        env["VAULT_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "bootkey.cli", "--config", str(cfg), *args],
                          input=stdin or "", capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def _snapshot(c: hvac.Client) -> dict[str, Any]:
    """Everything setup-vault may change, as Vault shows it."""
    def strip(ms: dict[str, Any]) -> dict[str, Any]:
        return {p: (m["type"], (m.get("options") or {}).get("version"))
                for p, m in ms.items() if isinstance(m, dict) and "type" in m}

    auth = strip(c.sys.list_auth_methods()["data"])
    mounts = strip(c.sys.list_mounted_secrets_engines()["data"])
    pols = sorted(c.sys.list_acl_policies()["data"]["keys"])
    roles: list[str] = []
    if "approle/" in auth:
        try:
            roles = sorted(c.auth.approle.list_roles()["data"]["keys"])
        except hvac.exceptions.InvalidPath:
            roles = []
    keys: list[str] = []
    if "transit/" in mounts:
        try:
            keys = c.secrets.transit.list_keys()["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            keys = []
    return {"auth": auth, "mounts": mounts, "policies": pols, "roles": roles, "keys": keys}


def _config(tmp: Path, bao: DevBao, host: str, extra: str = "") -> Path:
    cfg = tmp / "bootkey.toml"
    cfg.write_text(f'host_id = "{host}"\n[vault]\naddress = "{bao.address}"\n'
                   f'[unlock]\ndeadline = "20s"\nsearch = ["{tmp}/img/*.img"]\n' + extra)
    return cfg


def test_twice_on_fresh_openbao_then_enroll_and_unlock_with_what_it_printed(
        fresh_bao: DevBao, tmp_path: Path) -> None:
    host = new_host_id()
    cfg = _config(tmp_path, fresh_bao, host)
    wrapped = tmp_path / "secret-id.wrapped"
    args = ("setup-vault", "--secret-id", "wrapped", "--secret-id-path", str(wrapped))

    first = _cli(cfg, *args, stdin=fresh_bao.root_token + "\n")  # admin token on stdin
    assert first.returncode == 0, first.stderr
    assert "changed    auth approle/" in first.stdout
    assert "changed    transit key transit/keys/bootkey" in first.stdout
    assert "7 change(s) made" in first.stdout
    assert wrapped.stat().st_mode & 0o777 == 0o600
    after_first = _snapshot(fresh_bao.client())

    second = _cli(cfg, *args, token=fresh_bao.root_token)  # admin token from $VAULT_TOKEN
    assert second.returncode == 0, second.stderr
    report = second.stdout.split("\n\n")[0].splitlines()
    assert len(report) == 9 and all(line.startswith("unchanged  ") for line in report[:8])
    assert report[-1] == "nothing to change: Vault is already set up"
    assert _snapshot(fresh_bao.client()) == after_first
    assert second.stdout.split("[vault.approle]")[1] == first.stdout.split("[vault.approle]")[1]

    role = fresh_bao.client().auth.approle.read_role(f"bootkey-boot-{host}")["data"]
    assert role["token_period"] == 3600 and role["token_max_ttl"] == 0

    # the host: paste the printed lines, enroll with an operator token, unlock --check
    printed = first.stdout.split(f"# bootkey.toml for host {host}:\n")[1]
    assert f'wrapped_secret_id_file = "{wrapped}"' in printed
    with cfg.open("a") as f:
        f.write(printed)
    (tmp_path / "img").mkdir()
    img = tmp_path / "img" / "data.img"
    with img.open("wb") as f:
        f.truncate(32 << 20)  # blank: `enroll --format` makes it LUKS2 with a Vault key
    vcfg = config.VaultConfig.model_validate({"address": fresh_bao.address})
    enroll_token = setup_vault.issue_enroll_token(fresh_bao.client(), vcfg, host)
    res = _cli(cfg, "enroll", str(img), "--format", "--name", "data", token=enroll_token)
    assert res.returncode == 0, res.stderr
    res = _cli(cfg, "unlock", "--all", "--check")
    assert res.returncode == 0, res.stderr
    assert "1/1 volumes ok" in res.stdout and "verified" in res.stdout
    assert not wrapped.exists()  # unwrapped once, then removed


def test_dry_run_changes_nothing(fresh_bao: DevBao, tmp_path: Path) -> None:
    cfg = _config(tmp_path, fresh_bao, new_host_id())
    sid = tmp_path / "sid"
    before = _snapshot(fresh_bao.client())
    res = _cli(cfg, "setup-vault", "--dry-run", "--secret-id", "file", "--secret-id-path",
               str(sid), token=fresh_bao.root_token)
    assert res.returncode == 0, res.stderr
    assert "would: POST /v1/sys/auth/approle {\"type\": \"approle\"}" in res.stdout
    assert "would: POST /v1/transit/keys/bootkey {\"derived\": true}" in res.stdout
    assert "dry run: 7 change(s) planned, none made" in res.stdout
    assert _snapshot(fresh_bao.client()) == before
    assert not sid.exists()


def test_a_vault_that_contradicts_the_config_is_refused_and_left_alone(
        fresh_bao: DevBao, tmp_path: Path) -> None:
    cfg = _config(tmp_path, fresh_bao, new_host_id(), "[vault.kv]\nversion = 1\n")
    before = _snapshot(fresh_bao.client())
    res = _cli(cfg, "setup-vault", "--secret-id", "none", token=fresh_bao.root_token)
    assert res.returncode == 78
    assert "vault.kv: secret/ is KV v2 on this Vault, the config says KV v1" in res.stderr
    assert _snapshot(fresh_bao.client()) == before


def test_no_admin_token_is_a_config_error(fresh_bao: DevBao, tmp_path: Path) -> None:
    cfg = _config(tmp_path, fresh_bao, new_host_id())
    res = _cli(cfg, "setup-vault", "--secret-id", "none")
    assert res.returncode == 78
    assert "no admin token — set $VAULT_TOKEN" in res.stderr


def test_credential_delivery_is_sealed_with_systemd_creds(fresh_bao: DevBao,
                                                          tmp_path: Path) -> None:
    """`--secret-id credential` as on a host: systemd-creds seals it with the host key.
    The host key lives in /var/lib/systemd; a private mount namespace puts a fresh one
    there, so this machine's own is never created or touched."""
    tools = [shutil.which(t) for t in ("unshare", "systemd-creds")]
    assert all(tools), "util-linux and systemd are missing: scripts/setup.sh installs them"
    host = new_host_id()
    cfg = _config(tmp_path, fresh_bao, host)
    cred, plain, keydir = tmp_path / "secret-id.cred", tmp_path / "plain", tmp_path / "hostkey"
    keydir.mkdir()
    script = (
        f"mount --bind {keydir} /var/lib/systemd && "
        f"{sys.executable} -m bootkey.cli --config {cfg} setup-vault --secret-id credential "
        f"--secret-id-path {cred} && "
        f"systemd-creds decrypt --name=secret-id {cred} {plain}")
    res = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                         text=True, timeout=120, check=False,
                         env={**os.environ, "VAULT_TOKEN": fresh_bao.root_token})
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'secret_id_credential = "secret-id"' in res.stdout
    assert cred.stat().st_mode & 0o777 == 0o600
    assert plain.read_text().strip() not in cred.read_text()  # sealed, not plain
    role_id = setup_vault.read_role_id(
        fresh_bao.client(), setup_vault.Want(config.VaultConfig(), host))
    login = hvac.Client(url=fresh_bao.address).auth.approle.login(
        role_id, plain.read_text().strip(), use_token=False)
    assert login["auth"]["client_token"]
    assert sorted(login["auth"]["token_policies"]) == [f"bootkey-boot-{host}", "default"]


def test_a_token_without_admin_rights_is_refused_naming_the_path(
        fresh_bao: DevBao, tmp_path: Path) -> None:
    weak = fresh_bao.client().auth.token.create(policies=["default"], ttl="10m")
    cfg = _config(tmp_path, fresh_bao, new_host_id())
    before = _snapshot(fresh_bao.client())
    res = _cli(cfg, "setup-vault", "--secret-id", "none", token=weak["auth"]["client_token"])
    assert res.returncode == 77, res.stderr
    assert "sys/auth: cannot list auth methods: permission denied (403)" in res.stderr
    assert _snapshot(fresh_bao.client()) == before
