"""Vault access that lasts (issue #12.2), against a real OpenBao: the session keeps the
secret_id in locked memory for re-login after its source is gone, reads the token's and
the secret_id's facts, and warns at login when it can foresee losing access."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from bootkey import config as cfgmod
from bootkey.vault import VaultSession
from bootkey_core.vault import AccessOutlook, outlook, renew_in
from tests.support.bao import DevBao
from tests.support.vaultenv import VaultEnv
from tests.support.wait import wait_for


def role_of(env: VaultEnv) -> str:
    return f"bootkey-boot-{env.host_id}"


def let_role_see_its_secret_ids(root: hvac.Client, env: VaultEnv, **role: object) -> None:
    """The recommended extra grant (docs/configuration.md): the host may look up its
    own secret_id, so the session knows whether it can log in again."""
    name = role_of(env)
    root.sys.create_or_update_policy(
        f"{name}-lookup",
        f'path "auth/approle/role/{name}/secret-id/lookup" {{ capabilities = ["update"] }}\n')
    root.auth.approle.create_or_update_approle(
        name, token_policies=[name, f"{name}-lookup"], **role)


def login_with_role(root: hvac.Client, env: VaultEnv, **role: object
                    ) -> tuple[VaultSession, AccessOutlook]:
    """Set the role up, issue a fresh secret_id, log in: the session and what it
    foresees."""
    let_role_see_its_secret_ids(root, env, **role)
    env.secret_id_file.write_text(
        root.auth.approle.generate_secret_id(role_of(env))["data"]["secret_id"])
    s = VaultSession.from_config(env.config())
    s.login()
    o = s.access()
    assert o is not None
    return s, o


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    got: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                got.append(record.getMessage())

    h = Catch()
    lg = logging.getLogger("bootkey.vault")
    lg.addHandler(h)
    yield got
    lg.removeHandler(h)


def test_single_use_secret_id_and_non_periodic_token_warn_at_login(
        vault_env2: VaultEnv, bao: DevBao, warnings: list[str]) -> None:
    s, o = login_with_role(bao.client(), vault_env2, token_period="0", token_ttl="2s",
                        token_max_ttl="5s", secret_id_num_uses=1)
    assert o.secret_id_known and o.relogin_possible is False
    assert o.token_period is None and o.token_renewable
    assert o.warning is not None and "token_period" in o.warning
    assert any("token_period on the AppRole role" in w for w in warnings)
    # ...and again when renewal reaches the max TTL, instead of a login that must fail
    def renewed_until_warned() -> bool:
        s.renew_or_relogin()
        return any("cannot be replaced" in w for w in warnings)

    wait_for(renewed_until_warned, timeout=15, what="the max-TTL warning", interval=0.5)
    assert s.logins == 1


def test_periodic_token_renews_forever_and_says_nothing(
        vault_env2: VaultEnv, bao: DevBao, warnings: list[str]) -> None:
    _, o = login_with_role(bao.client(), vault_env2, token_period="1h")
    assert o.token_period == 3600 and o.warning is None
    assert o.relogin_possible is True and o.secret_id_uses_left == 0  # unlimited
    assert o.secret_id_source == "file" and not warnings


def test_expiring_secret_id_with_non_periodic_token_names_when(
        vault_env2: VaultEnv, bao: DevBao) -> None:
    _, o = login_with_role(bao.client(), vault_env2, token_period="0", secret_id_ttl="1h")
    assert o.access_until is not None
    left = o.access_until - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=55) < left <= dt.timedelta(hours=1)
    assert o.warning is not None and "secret_id_ttl" in o.warning


def test_denied_secret_id_lookup_is_unknown_not_a_guess(vault_env2: VaultEnv) -> None:
    s = VaultSession.from_config(vault_env2.config())
    s.login()
    o = s.access()
    assert o is not None and not o.secret_id_known and o.relogin_possible is None
    assert o.warning is None and o.token_ttl is not None and o.token_ttl > 3000


@pytest.mark.parametrize("source", ["removed file", "wrapped token"])
def test_relogin_after_the_source_is_gone(vault_env2: VaultEnv, bao: DevBao, tmp_path: Path,
                                         source: str) -> None:
    root = bao.client()
    if source == "wrapped token":
        wrapped = root.auth.approle.generate_secret_id(role_of(vault_env2), wrap_ttl="60s")
        path = tmp_path / "wrapped"
        path.write_text(wrapped["wrap_info"]["token"])
        setting = f'wrapped_secret_id_file = "{path}"\n'
    else:
        path = vault_env2.secret_id_file
        setting = "remove_secret_id_file = true\n"
    s = VaultSession.from_config(cfgmod.parse(
        vault_env2.toml().replace("[vault.approle]\n", f"[vault.approle]\n{setting}")))
    s.login()
    assert not path.exists()
    old = s.raw_client().token
    root.auth.token.revoke(old)  # as if it had reached its max TTL
    s.renew_or_relogin()
    assert s.logins == 2 and s.raw_client().token != old
    assert s.raw_client().is_authenticated()


def test_outlook_rules() -> None:
    base = {"token_ttl": 10.0, "token_renewable": True, "source": "file",
            "secret_id_known": False, "secret_id_uses_left": None, "secret_id_expires": None}
    static = outlook(token_period=None, logs_in=False, **base)  # type: ignore[arg-type]
    assert static.relogin_possible is False and static.warning is not None
    assert "given a token" in static.warning
    periodic = outlook(token_period=60.0, logs_in=False, **base)  # type: ignore[arg-type]
    assert periodic.warning is None
    unknown = outlook(token_period=None, logs_in=True, **base)  # type: ignore[arg-type]
    assert unknown.relogin_possible is None and unknown.warning is None


@pytest.mark.parametrize("ttl,due", [(3.0, 2.0), (0.0, 0.05), (float("inf"), 3600.0),
                                     (1e6, 3600.0)])
def test_renewal_is_due_at_two_thirds(ttl: float, due: float) -> None:
    assert renew_in(ttl) == pytest.approx(due)
