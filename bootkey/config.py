"""bootkey's configuration: the TOML file of DESIGN §10 as frozen pydantic models.

This is the one place bootkey's defaults live; the parts other code shares come from
elsewhere: the model base and error formatter (bootkey_core.model), the Vault connection
and AppRole schema (bootkey_core.vault_config) and the typed `[kes]` section
(kes.config.KesConfig). `parse(text, source)` is pure so tests can feed strings;
`load(path)` reads the file. Every validation error becomes one `ConfigError` line
naming the file, the field and the fix. Modules get their own section (`cfg.unlock`,
`cfg.vault`, `cfg.kes`), not the whole Config.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from bootkey_core.duration import Duration
from bootkey_core.errors import ConfigError
from bootkey_core.model import Model, config_error
from bootkey_core.vault_config import AppRoleConfig, VaultConnection
from kes.config import KesConfig

__all__ = ["AppRoleConfig", "Config", "KVConfig", "KeysocketConfig", "TransitConfig",
           "UnlockConfig", "VaultConfig", "VolumeConfig", "check_volume_name", "load", "parse"]

DEFAULT_PATH = Path("/etc/bootkey/bootkey.toml")
MACHINE_ID = Path("/etc/machine-id")


class KVConfig(Model):
    mount: str = "secret"
    version: Literal[1, 2] = 2
    prefix: str = "bootkey"

    @field_validator("mount", "prefix")
    @classmethod
    def _no_slashes_at_ends(cls, v: str) -> str:
        return v.strip("/")


class TransitConfig(Model):
    mount: str = "transit"
    key: str = "bootkey"


class VaultConfig(VaultConnection):
    """`[vault]`: the connection and login (bootkey_core.vault_config, shared with KES)
    plus where bootkey's sealed keys live."""

    kv: KVConfig = KVConfig()
    transit: TransitConfig = TransitConfig()


class UnlockConfig(Model):
    deadline: Duration = 300.0
    parallel: int = Field(default=8, ge=1, le=256)
    # Tests shorten this; production wants a short first retry and a cap that keeps the
    # agent answering within a watchdog period.
    retry_initial: Duration = 0.5
    retry_max: Duration = 30.0
    # Where to look for volumes that carry a bootkey token, besides every block device:
    # globs of image files or device links (e.g. "/var/lib/images/*.img").
    search: list[str] = Field(default_factory=list)
    # agent: `bootkey agent` opens the volumes itself. socket: systemd-cryptsetup opens
    # them and asks the agent for each key on the key socket.
    mode: Literal["agent", "socket"] = "agent"
    # Type=notify: READY=1 goes out when the first unlock round is done, or after this
    # long at the latest, so a Vault outage never holds boot; the agent keeps retrying
    # until `deadline` and mounts follow their devices whenever they open.
    ready_timeout: Duration = 30.0


# The mapping name at unlock (/dev/mapper/NAME): device-mapper allows 127 bytes and
# no '/'; the first character is alphanumeric so a name never looks like an option.
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}")
VOLUME_NAME_RULE = "letters, digits, _ . + - (at most 127, starting with a letter or digit)"


def check_volume_name(name: str) -> str:
    """The one volume-name rule ([[volume]] name, `enroll --name`): returns `name`, or
    raises ValueError saying what a usable name looks like."""
    if not _VOLUME_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable mapping name: {VOLUME_NAME_RULE}")
    return name


VolumeName = Annotated[str, AfterValidator(check_volume_name)]


class VolumeConfig(Model):
    name: VolumeName
    device: str
    readonly: bool = False
    discard: bool = False


class KeysocketConfig(Model):
    path: Path = Path("/run/bootkey/cryptsetup.sock")
    timeout: Duration = 30.0
    # where systemd-cryptsetup looks for <volume>.key when crypttab says `none`
    keys_dir: Path = Path("/run/cryptsetup-keys.d")


class ControlConfig(Model):
    path: Path = Path("/run/bootkey/control.sock")  # `bootkey status` asks the agent here


class MetricsConfig(Model):
    # Prometheus text at http://<address>/metrics, without TLS or auth: localhost only.
    address: str | None = None

    @field_validator("address")
    @classmethod
    def _localhost(cls, v: str | None) -> str | None:
        if v is not None:
            loopback_port(v)
        return v


def loopback_port(address: str) -> tuple[str, int]:
    """`127.0.0.1:9273` → ("127.0.0.1", 9273); ValueError unless host is a loopback one."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{address!r} is not host:port — use e.g. \"127.0.0.1:9273\"")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host} is not a localhost address — metrics have no TLS or auth, "
                         "so bootkey serves them on 127.0.0.1, ::1 or localhost only")
    return host, int(port)


class Config(Model):
    host_id: str | None = None
    vault: VaultConfig = VaultConfig()
    unlock: UnlockConfig = UnlockConfig()
    volume: list[VolumeConfig] = Field(default_factory=list)
    keysocket: KeysocketConfig = KeysocketConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    kes: KesConfig = KesConfig()

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError(f"{v!r} is not a usable host_id: letters, digits, _ . -")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for v in self.volume:
            if v.name in seen:
                raise ValueError(f"volume name {v.name!r} appears twice")
            seen.add(v.name)
        return self

    def resolved_host_id(self) -> str:
        """The configured host_id, else /etc/machine-id."""
        if self.host_id:
            return self.host_id
        try:
            mid = MACHINE_ID.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"host_id: cannot read {MACHINE_ID}: {e.strerror} — set host_id in the config"
            ) from None
        if not mid:
            raise ConfigError(f"host_id: {MACHINE_ID} is empty — set host_id in the config")
        return mid


def parse(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a Config; raise ConfigError with one line per problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e} — fix the syntax") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise config_error(e, source) from None


def load(path: Path | str | None = None) -> Config:
    """Read the config file: `path`, else $BOOTKEY_CONFIG, else /etc/bootkey/bootkey.toml."""
    p = Path(path or os.environ.get("BOOTKEY_CONFIG") or DEFAULT_PATH)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: cannot read the config: no such file — create it (see docs/configuration.md)"
            " or pass --config"
        ) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config: {e.strerror}") from None
    return parse(text, str(p))
