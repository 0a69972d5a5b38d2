"""The last line of `bootkey unlock` (pure logic): one cause for every volume is named
with its fix; different causes are a count, exit 1 (docs/errors.md)."""

from __future__ import annotations

from bootkey.unlock import Outcome, VolumeResult, summarize
from bootkey_core.errors import BootkeyError, VaultUnavailable, WrongKey


def failed(name: str, err: BootkeyError) -> VolumeResult:
    return VolumeResult(name, f"/dev/{name}", Outcome.FAILED, reason=str(err),
                        exit_code=err.exit_code, error=err)


def test_one_cause_for_all_names_it_and_the_fix() -> None:
    login = VaultUnavailable("Vault unreachable while trying to log in with AppRole "
                             "(auth/approle/login)")
    err = summarize([failed("a", login), failed("b", login)])
    assert err is not None and err.exit_code == 69
    assert str(err) == ("Vault unreachable while trying to log in with AppRole "
                        "(auth/approle/login): 2 of 2 volumes failed — check that Vault is "
                        "reachable and unsealed, then run again (the agent retries by itself)")


def test_same_code_different_causes_is_a_count_with_that_code() -> None:
    err = summarize([failed("a", WrongKey("a: cannot open: wrong key — fix a")),
                     failed("b", WrongKey("b: cannot open: wrong key — fix b"))])
    assert err is not None and (str(err), err.exit_code) == ("2 of 2 volumes failed", 81)


def test_one_volume_is_its_own_error_and_success_is_none() -> None:
    e = WrongKey("a: cannot open: wrong key — fix")
    assert summarize([failed("a", e)]) is e
    assert summarize([VolumeResult("a", "/dev/a", Outcome.VERIFIED)]) is None
    mixed = summarize([VolumeResult("a", "/dev/a", Outcome.VERIFIED), failed("b", e)])
    assert mixed is not None and (str(mixed), mixed.exit_code) == ("1 of 2 volumes failed", 1)
