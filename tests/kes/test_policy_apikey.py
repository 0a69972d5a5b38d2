"""Name rules, policy matching (current KES semantics) and `kes:v1:` API keys."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from kes import policy
from kes.apikey import APIKey, InvalidAPIKey
from kes.identity import of_certificate
from kes.policy import Policy, PolicyConfigError, PolicySet

A = "a" * 64
B = "b" * 64
ADMIN = "c" * 64


@pytest.mark.parametrize("name,ok", [
    ("my-key", True), ("minio_default", True), ("K1", True), ("a" * 80, True),
    ("", False), ("a" * 81, False), ("-a", False), ("a-", False), ("_", False),
    ("a/b", False), ("a.b", False), ("a*", False), ("ä", False), ("a b", False),
    ("__", True),
])
def test_valid_name(name: str, ok: bool) -> None:
    assert policy.valid_name(name) is ok


@pytest.mark.parametrize("pattern,ok", [
    ("", True), ("*", True), ("my-", True), ("my-*", True), ("a*b", False),
    ("**", False), ("a/b*", False), ("a" * 81, False),
])
def test_valid_pattern(pattern: str, ok: bool) -> None:
    assert policy.valid_pattern(pattern) is ok


def test_list_prefix_keys_keep_star_policies_strip_it() -> None:
    assert policy.list_prefix("*", strip_star=False) == ""
    assert policy.list_prefix("abc*", strip_star=False) == "abc*"
    assert policy.list_prefix("abc*", strip_star=True) == "abc"


@pytest.mark.parametrize("pattern,path,ok", [
    ("/v1/key/generate/minio-*", "/v1/key/generate/minio-default", True),
    ("/v1/key/generate/minio-*", "/v1/key/generate/other", False),
    ("/v1/status", "/v1/status", True),
    ("/v1/status", "/v1/status/", False),
    ("/v1/key/list/*", "/v1/key/list/", True),
    ("/v1/key/list/*", "/v1/key/list", False),
    ("/v1/key/*/x", "/v1/key/a/x", False),   # `*` in the middle is literal
    ("/v1/key/?", "/v1/key/a", False),
    ("", "/v1/status", False),
    ("*", "/anything", True),
])
def test_pattern_matches(pattern: str, path: str, ok: bool) -> None:
    assert policy.pattern_matches(pattern, path) is ok


def test_deny_wins_and_admin_bypasses() -> None:
    ps = PolicySet.build(ADMIN, [Policy(
        "minio", allow=("/v1/key/generate/my-app*",), deny=("/v1/key/generate/my-app-internal*",),
        identities=(A,))])
    assert ps.allowed(A, "/v1/key/generate/my-app-1")
    assert not ps.allowed(A, "/v1/key/generate/my-app-internal-1")
    assert not ps.allowed(A, "/v1/key/decrypt/my-app-1")
    assert not ps.allowed(B, "/v1/key/generate/my-app-1")      # unknown identity
    assert not ps.allowed(None, "/v1/key/generate/my-app-1")
    assert ps.allowed(ADMIN, "/v1/key/delete/anything")


def test_disabled_admin_matches_nobody() -> None:
    ps = PolicySet.build("disabled", [])
    assert not ps.allowed("disabled", "/v1/status")
    assert not ps.is_admin("disabled")


@pytest.mark.parametrize("policies,msg", [
    ([Policy("p", identities=(ADMIN,))], "admin identity"),
    ([Policy("p", identities=(A,)), Policy("q", identities=(A,))], "assigned to policies"),
    ([Policy("bad/name")], "policy name 'bad/name'"),
    ([Policy("p"), Policy("p")], "defined twice"),
])
def test_contradictory_policy_sets_are_refused(policies: list[Policy], msg: str) -> None:
    with pytest.raises(PolicyConfigError, match=msg):
        PolicySet.build(ADMIN, policies)


def test_api_key_vector_from_kms_go() -> None:
    key = APIKey.parse("kes:v1:AGaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs")
    assert key.identity == "ea9826089311fe44d7590408ede9150f7c637b6cab0a91ee6fe1aa5d9fb366f6"
    assert str(key) == "kes:v1:AGaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs"
    assert APIKey.parse("AGaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs").identity == key.identity
    assert "AGaV" not in repr(key)


@pytest.mark.parametrize("text,msg", [
    ("kes:v1:AAAA", "invalid length"),
    ("kes:v1:not base64!", "invalid length"),
    ("kes:v1:AWaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs", "unsupported type"),
])
def test_api_key_errors_are_kms_go_texts(text: str, msg: str) -> None:
    with pytest.raises(InvalidAPIKey, match=msg):
        APIKey.parse(text)


def test_api_key_certificate_is_what_minio_builds() -> None:
    key = APIKey.generate()
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = key.certificate(now)
    assert of_certificate(cert) == key.identity
    assert cert.subject.rfc4514_string() == f"CN={key.identity}"
    assert cert.issuer == cert.subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=90)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert APIKey.parse(str(key)).identity == key.identity
