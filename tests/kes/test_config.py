"""KES configuration: bootkey.toml [kes] and KES YAML files with their ${VAR} rules."""

from __future__ import annotations

import tomllib

import pytest

from bootkey_core.duration import parse_duration
from bootkey_core.errors import ConfigError
from kes import config as kconf

ADMIN = "ad" * 32
APP = "1f" * 32

KES_YAML = """
version: v1
address: 0.0.0.0:7373
admin:
  identity: ${KES_ADMIN}
tls:
  key: ./server.key
  cert: ./server.cert
  auth: "off"
  proxy:
    identities: []
api:
  /v1/ready:
    skip_auth: true
    timeout: 15s
policy:
  my-app:
    allow:
    - /v1/key/generate/my-app*
    - ${NOT_EXPANDED}
    deny: [ "/v1/key/generate/my-app-internal*" ]
    identities: [ "${APP_IDENTITY}" ]
cache:
  expiry:
    any: 5m0s
    unused: 20s
    offline: 1h30m
log:
  error: on
  audit: off
keys:
  - name: k1
keystore:
  vault:
    endpoint: https://127.0.0.1:8200
    engine: kv
    version: v2
    prefix: tenant-1
    transit: { engine: "", key: "my-key" }
    approle: { engine: "", id: "${ROLE_ID}", secret: "${SECRET_ID}" }
    status: { ping: 10s }
    future_option: ignored
unknown_top_level: ignored
"""
ENV = {"KES_ADMIN": ADMIN, "APP_IDENTITY": APP, "ROLE_ID": "r", "SECRET_ID": "s"}


def test_kes_yaml_is_read_like_kes() -> None:
    cfg = kconf.parse_yaml(KES_YAML, env=ENV)
    assert cfg.enabled and cfg.address == "0.0.0.0:7373"
    assert cfg.admin.identity == ADMIN
    assert cfg.policy["my-app"].identities == [APP]
    assert cfg.policy["my-app"].allow[1] == "${NOT_EXPANDED}"  # patterns are literal
    assert cfg.cache.expiry == kconf.ExpirySection(any=300, unused=20, offline=5400)
    assert cfg.api["/v1/ready"] == kconf.APIRoute(skip_auth=True, timeout=15)
    v = cfg.keystore.vault
    assert v is not None and v.kv_version == 2 and v.prefix == "tenant-1"
    assert v.transit is not None and v.transit.key == "my-key"
    assert v.approle is not None and (v.approle.id, v.approle.secret) == ("r", "s")
    assert [k.name for k in cfg.keys] == ["k1"]
    assert cfg.policy_set().allowed(APP, "/v1/key/generate/my-app-1")
    assert kconf.log_level(cfg.log.audit) is None


def test_missing_env_var_names_variable_and_line() -> None:
    env = dict(ENV)
    del env["ROLE_ID"]
    with pytest.raises(ConfigError) as e:
        kconf.parse_yaml(KES_YAML, env=env)
    line = next(i for i, s in enumerate(KES_YAML.splitlines(), 1) if "${ROLE_ID}" in s)
    assert str(e.value) == f"kesconf: referenced env. variable 'ROLE_ID' in line '{line}' not found"


def test_partial_interpolation_is_literal() -> None:
    cfg = kconf.parse_yaml(KES_YAML.replace("prefix: tenant-1", "prefix: a-${X}"), env=ENV)
    assert cfg.keystore.vault is not None and cfg.keystore.vault.prefix == "a-${X}"


@pytest.mark.parametrize("change,msg", [
    (("identity: ${KES_ADMIN}", "identity: \"\""), "admin.identity: required"),
    (("    endpoint: https://127.0.0.1:8200\n", ""), "keystore.vault.endpoint: required"),
    (("  vault:", "  fs:\n    path: /x\n  vaultx:"), "Vault only"),
    (("auth: \"off\"", "auth: maybe"), "tls.auth must be"),
    (("any: 5m0s", "any: -1s"), "cannot be negative"),
    (("any: 5m0s", "any: soon"), "not a duration"),
    (("- name: k1", "- name: k1\n  - name: k1"), "listed twice"),
    (("${APP_IDENTITY}", "${KES_ADMIN}"), "admin identity"),
    (("secret: \"${SECRET_ID}\"", "secret: \"\""), "approle"),
    (("address: 0.0.0.0:7373", "address: nowhere"), "not host:port"),
])
def test_kes_yaml_errors_name_the_field(change: tuple[str, str], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        kconf.parse_yaml(KES_YAML.replace(*change), env=ENV)


def test_legacy_root_is_admin() -> None:
    text = KES_YAML.replace("admin:\n  identity: ${KES_ADMIN}", f"root: {ADMIN}")
    assert kconf.parse_yaml(text, env=ENV).admin.identity == ADMIN


TOML = f"""
[kes]
enabled = true
address = "127.0.0.1:7373"
[kes.admin]
identity = "{ADMIN}"
[kes.tls]
key = "/etc/bootkey/kes.key"
cert = "/etc/bootkey/kes.crt"
[kes.policy.minio]
allow = ["/v1/key/generate/minio-*", "/v1/status"]
identities = ["{APP}"]
[kes.cache.expiry]
any = "5m"
[kes.keystore.vault]
engine = "secret"
version = "v2"
prefix = "kes"
"""


def test_toml_section_mirrors_yaml_names() -> None:
    cfg = kconf.from_section(tomllib.loads(TOML)["kes"])
    assert cfg.enabled and cfg.host_port() == ("127.0.0.1", 7373)
    assert cfg.cache.expiry == kconf.ExpirySection()  # documented defaults: 5m/30s/0
    assert cfg.keystore.vault is not None and cfg.keystore.vault.endpoint == ""


def test_toml_section_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"tls\.kye: unknown setting"):
        kconf.from_section(tomllib.loads(TOML.replace('key = "/etc', 'kye = "/etc'))["kes"],
                           "kes")


def test_empty_section_defaults() -> None:
    cfg = kconf.from_section({})
    assert not cfg.enabled and cfg.address == "127.0.0.1:7373"
    assert cfg.cache.expiry.any == 300 and cfg.cache.expiry.unused == 30


@pytest.mark.parametrize("text,seconds", [
    ("5m0s", 300), ("1h30m", 5400), ("250ms", 0.25), ("0", 0), ("1.5s", 1.5), (45, 45),
])
def test_go_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)  # one parser for TOML and KES YAML


@pytest.mark.parametrize("level,value", [
    ("on", 20), ("", 20), ("off", None), ("DEBUG", 10), ("WARN", 30), ("ERROR+4", 50),
    ("8", 40),
])
def test_log_levels(level: str, value: int | None) -> None:
    assert kconf.log_level(level) == value
