"""Where the operator's Vault token comes from (bootkey.operator_token): --token-file
first, then $VAULT_TOKEN, then $BAO_TOKEN, else the config's AppRole; a token file that
cannot be read or is empty is a config error naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootkey.operator_token import operator_session, operator_token
from bootkey_core.errors import ConfigError
from tests.enroll.conftest import Env


def test_token_file_wins_over_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("s.fromfile\n")  # as `bao print token > file` leaves it
    env = {"VAULT_TOKEN": "s.vault", "BAO_TOKEN": "s.bao"}
    assert operator_token(f, env) == "s.fromfile"


@pytest.mark.parametrize(("environ", "expect"), [
    ({"VAULT_TOKEN": "s.vault", "BAO_TOKEN": "s.bao"}, "s.vault"),
    ({"VAULT_TOKEN": "", "BAO_TOKEN": "s.bao"}, "s.bao"),
    ({"BAO_TOKEN": "s.bao"}, "s.bao"),
    ({}, None),
])
def test_environment_order(environ: dict[str, str], expect: str | None) -> None:
    assert operator_token(None, environ) == expect


def test_unreadable_or_empty_token_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read the Vault token"):
        operator_token(missing, {"VAULT_TOKEN": "s.vault"})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"{empty}: the Vault token file is empty"):
        operator_token(empty, {})


def test_sessions_with_the_operator_token_and_with_the_approle(env: Env) -> None:
    f = env.tmp / "token"
    f.write_text(env.vault.enroll_token)
    op = operator_session(env.cfg, f, {})
    assert op.raw_client().auth.token.lookup_self()["data"]["id"] == env.vault.enroll_token
    boot = operator_session(env.cfg, None, {})  # no token anywhere: the host's AppRole
    assert boot.raw_client().auth.token.lookup_self()["data"]["id"] != env.vault.enroll_token
