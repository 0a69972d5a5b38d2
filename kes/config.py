"""KES configuration: the `[kes]` section of bootkey.toml and KES's own YAML file, one model.

`KesConfig` is the typed `[kes]` section of bootkey.config.Config. The TOML section uses
KES's YAML names (shared/kes-api.md §10), so a KES config translates
line by line: `[kes.admin] identity`, `[kes.tls] key/cert/auth/ca`, `[kes.policy.<name>]
allow/deny/identities`, `[kes.cache.expiry] any/unused/offline`, `[kes.keystore.vault] …`.

KES YAML rules kept: unknown keys are ignored (TOML: refused, as everywhere in bootkey); a
scalar may be `${VAR}` — the whole trimmed value — and the variable must exist
(`kesconf: referenced env. variable 'X' in line 'N' not found`); policy allow/deny
patterns are never expanded; `root:` (KES <= v0.17.1) is read as `admin.identity`.
Durations are Go durations ("5m0s", "1h30m", "250ms") or seconds. The model base and the
error formatter are bootkey_core.model's; `keystore.vault` keeps KES's names here and
maps itself onto bootkey_core.vault_config (`VaultSection.connection()`), the schema the
one Vault session reads.
"""

from __future__ import annotations

import logging
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from bootkey_core.duration import Duration  # Go-style durations, as KES YAML writes them
from bootkey_core.errors import ConfigError
from bootkey_core.model import Model, config_error
from bootkey_core.vault_config import AppRoleConfig, VaultConnection
from kes import policy as pol


class AdminConfig(Model):
    identity: str = ""


class VaultPKISection(Model):
    """bootkey extension: the server certificate issued by Vault's PKI engine at start
    (`<mount>/issue/<role>`), private key only in memory, renewed at 2/3 of its life."""

    mount: str = "pki"
    role: str
    common_name: str = "localhost"
    ip_sans: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    alt_names: list[str] = Field(default_factory=lambda: ["localhost"])
    ttl: str = "720h"


class TLSSection(Model):
    key: Path | None = None
    cert: Path | None = None
    password: str = ""
    auth: str = ""
    ca: Path | None = None
    proxy: dict[str, Any] = Field(default_factory=dict)  # parsed, ignored (as current KES)
    vault_pki: VaultPKISection | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TLSSection:
        if self.vault_pki is not None and (self.key is not None or self.cert is not None):
            raise ValueError("set key and cert, or vault_pki, not both")
        return self

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: str) -> str:
        if v.strip().lower() not in ("", "off", "on"):
            raise ValueError(f"{v!r}: tls.auth must be \"on\" or \"off\"")
        return v.strip().lower()


class APIRoute(Model):
    skip_auth: bool = False
    timeout: Duration | None = None


class PolicySection(Model):
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    identities: list[str] = Field(default_factory=list)


class ExpirySection(Model):
    # The documented defaults, not upstream's slip that makes an empty section any=30s.
    any: Duration = 300.0
    unused: Duration = 30.0
    offline: Duration = 0.0


class CacheSection(Model):
    expiry: ExpirySection = ExpirySection()


class LogSection(Model):
    error: str = "on"
    audit: str = "on"

    @field_validator("error", "audit")
    @classmethod
    def _level(cls, v: str) -> str:
        log_level(v)
        return v


class KeySpec(Model):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not pol.valid_name(v):
            raise ValueError(f"key name {v!r} is empty, too long or contains invalid characters")
        return v


class TransitSection(Model):
    engine: str = "transit"
    key: str = ""


class AppRoleSection(Model):
    engine: str = "approle"
    namespace: str = ""
    id: str = ""
    secret: str = Field(default="", repr=False)


class VaultTLS(Model):
    key: Path | None = None
    cert: Path | None = None
    ca: Path | None = None


class VaultStatus(Model):
    ping: Duration = 10.0


class VaultSection(Model):
    # Empty endpoint inside bootkey.toml: use the agent's own Vault session.
    endpoint: str = ""
    engine: str = "kv"
    version: Literal["v1", "v2", ""] = ""
    namespace: str = ""
    prefix: str = ""
    transit: TransitSection | None = None
    approle: AppRoleSection | None = None
    kubernetes: dict[str, Any] | None = None
    tls: VaultTLS = VaultTLS()
    status: VaultStatus = VaultStatus()
    token: str = Field(default="", repr=False)  # bootkey extension: a static token

    @model_validator(mode="after")
    def _checks(self) -> VaultSection:
        if self.transit is not None and not self.transit.key:
            raise ValueError("transit: key is required when the transit section is present")
        if self.approle is not None and (not self.approle.id or not self.approle.secret):
            raise ValueError("invalid approle config: set both id and secret")
        if self.kubernetes is not None:
            raise ValueError("kubernetes auth is not supported by bootkey — use approle")
        if (self.tls.key is None) != (self.tls.cert is None):
            raise ValueError("tls: set both key and cert, or neither")
        return self

    @property
    def kv_version(self) -> int:
        return 2 if self.version == "v2" else 1

    def connection(self, timeout: float = 15.0) -> VaultConnection | None:
        """This section in the one Vault schema the session reads; None when `endpoint`
        is empty (inside the agent: use the agent's session)."""
        if not self.endpoint:
            return None
        ar = self.approle
        approle = AppRoleConfig(
            mount=(ar.engine or "approle") if ar else "approle",
            # KES: approle.namespace "" = the section's namespace, "/" = the root one
            namespace=ar.namespace or None if ar else None,
            role_id=ar.id if ar else None,
            secret_id=SecretStr(ar.secret) if ar else None,
            secret_id_file=None)
        return VaultConnection(
            address=[self.endpoint], ca_file=self.tls.ca, client_cert=self.tls.cert,
            client_key=self.tls.key, namespace=self.namespace, timeout=timeout,
            token=SecretStr(self.token) if self.token and ar is None else None,
            approle=approle)


class KeystoreSection(Model):
    vault: VaultSection | None = None


class KesConfig(Model):
    enabled: bool = False
    version: Literal["v1", ""] = ""
    address: str = "127.0.0.1:7373"
    admin: AdminConfig = AdminConfig()
    tls: TLSSection = TLSSection()
    api: dict[str, APIRoute] = Field(default_factory=dict)
    policy: dict[str, PolicySection] = Field(default_factory=dict)
    cache: CacheSection = CacheSection()
    log: LogSection = LogSection()
    keys: list[KeySpec] = Field(default_factory=list)
    keystore: KeystoreSection = KeystoreSection()
    workers: int = Field(default=1, ge=1, le=64)  # bootkey extension

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        host_port(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> KesConfig:
        names = [k.name for k in self.keys]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"keys: key {n!r} is listed twice")
        self.policy_set()  # raises on contradictions
        return self

    def policy_set(self) -> pol.PolicySet:
        try:
            return pol.PolicySet.build(self.admin.identity, [
                pol.Policy(name, tuple(p.allow), tuple(p.deny), tuple(p.identities))
                for name, p in self.policy.items()])
        except pol.PolicyConfigError as e:
            raise ValueError(f"policy: {e}") from None

    def host_port(self) -> tuple[str, int]:
        return host_port(self.address)


def host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port — use e.g. \"127.0.0.1:7373\"")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - KES's own default


def log_level(v: str) -> int | None:
    """KES level syntax → Python logging level; None = off."""
    s = v.strip().upper()
    if s in ("", "ON"):
        return logging.INFO
    if s == "OFF":
        return None
    m = re.fullmatch(r"(DEBUG|INFO|WARN|ERROR)([+-]\d+)?|(-?\d+)", s)
    if not m:
        raise ValueError(f"{v!r}: use on, off, DEBUG, INFO, WARN or ERROR")
    if m.group(3):
        # slog levels: DEBUG=-4, INFO=0, WARN=4, ERROR=8 → logging 10/20/30/40.
        return 20 + int(m.group(3)) * 10 // 4
    base = {"DEBUG": 10, "INFO": 20, "WARN": 30, "ERROR": 40}[m.group(1)]
    return base + (int(m.group(2)) * 10 // 4 if m.group(2) else 0)


# ---- loading


def _errors(e: ValidationError, source: str) -> ConfigError:
    return config_error(e, source, docs="docs/kes.md")


def from_section(section: dict[str, Any], source: str = "bootkey.toml [kes]") -> KesConfig:
    """Validate the `[kes]` table of bootkey.toml (unknown keys refused)."""
    try:
        return KesConfig.model_validate(section)
    except ValidationError as e:
        raise _errors(e, source) from None


def parse_yaml(text: str, source: str = "<kes config>",
               env: dict[str, str] | None = None) -> KesConfig:
    """A KES server config file (kesconf) → KesConfig. Raises ConfigError."""
    env = dict(os.environ) if env is None else env
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{source}: empty config file — add admin, tls and keystore")
        _expand_env(node, env, path=())
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e} — fix the syntax") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if "root" in data and "admin" not in data:
        data["admin"] = {"identity": data["root"]}  # KES <= v0.17.1 spelling
    if not (data.get("admin") or {}).get("identity"):
        raise ConfigError(f"{source}: admin.identity: required — set it to an identity or "
                          "\"disabled\"")
    ks = data.get("keystore") or {}
    others = [k for k in ks if k != "vault"]
    if others or not ks:
        raise ConfigError(f"{source}: keystore: bootkey serves keys from Vault only — "
                          f"configure keystore.vault (found: {', '.join(others) or 'none'})")
    if not (ks.get("vault") or {}).get("endpoint"):
        raise ConfigError(f"{source}: keystore.vault.endpoint: required — add it")
    data = _prune(data, KesConfig)
    data["enabled"] = True
    data.setdefault("address", "0.0.0.0:7373")
    try:
        return KesConfig.model_validate(data)
    except ValidationError as e:
        raise _errors(e, source) from None


def load_yaml(path: Path | str) -> KesConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the KES config: {e.strerror}") from None
    return parse_yaml(text, str(p))


_ENV = re.compile(r"\$\{([^}]*)\}")
_YAML11_BOOLS = {"on", "off", "yes", "no", "y", "n"}


def _expand_env(node: yaml.Node, env: dict[str, str], path: tuple[str, ...]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _expand_env(v, env, (*path, str(k.value)))
    elif isinstance(node, yaml.SequenceNode):
        # Policy allow/deny patterns are literal; only `identities` entries expand.
        if len(path) == 3 and path[0] == "policy" and path[2] in ("allow", "deny"):
            return
        for v in node.value:
            _expand_env(v, env, path)
    elif isinstance(node, yaml.ScalarNode) and isinstance(node.value, str):
        if node.style is None and node.value.lower() in _YAML11_BOOLS:
            # Go's yaml.v3 (YAML 1.2) reads `on`/`off`/`yes`/`no` as strings, PyYAML as
            # booleans; KES files say `log.error: on` and mean the string.
            node.tag = "tag:yaml.org,2002:str"
            return
        m = _ENV.fullmatch(node.value.strip())
        if m:
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"kesconf: referenced env. variable '{name}' in line "
                                  f"'{node.start_mark.line + 1}' not found")
            node.value = env[name]
            node.tag = "tag:yaml.org,2002:str"


def _prune(data: Any, model: Any) -> Any:
    """Drop keys KES would ignore (unknown keys) so the strict model accepts the file."""
    if not isinstance(data, dict) or not (isinstance(model, type)
                                          and issubclass(model, BaseModel)):
        return data
    out: dict[str, Any] = {}
    for k, v in data.items():
        field = model.model_fields.get(k)
        if field is None:
            continue
        out[k] = _prune_value(v, field.annotation)
    return out


def _prune_value(v: Any, ann: Any) -> Any:
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if origin is dict and len(args) == 2 and isinstance(v, dict):
        return {k: _prune(x, args[1]) for k, x in v.items()}
    if origin is list and args and isinstance(v, list):
        return [_prune(x, args[0]) for x in v]
    for a in (args or (ann,)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return _prune(v, a)
    return v
