"""Config parsing: defaults, durations, one line per problem naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootkey import config
from bootkey_core.duration import parse_duration
from bootkey_core.errors import ConfigError


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), (" 2s ", 2.0), (7, 7.0),
    (1.5, 1.5), ("1h30m", 5400.0), ("5m0s", 300.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "5 minutes", "-3s", -1, True, "", "2 s", "5x"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(bad)


def test_defaults_match_the_design() -> None:
    c = config.parse("")
    assert c.vault.kv.mount == "secret" and c.vault.kv.version == 2
    assert c.vault.kv.prefix == "bootkey"
    assert (c.vault.transit.mount, c.vault.transit.key) == ("transit", "bootkey")
    assert c.vault.approle.secret_id_file == Path("/etc/bootkey/secret-id")
    assert c.unlock.deadline == 300 and c.unlock.parallel == 8 and c.unlock.mode == "agent"
    assert c.keysocket.path == Path("/run/bootkey/cryptsetup.sock")


def test_single_address_string_and_trailing_slash() -> None:
    c = config.parse('[vault]\naddress = "https://vault:8200/"\n')
    assert c.vault.address == ["https://vault:8200"]


def test_every_problem_is_one_line_with_file_and_field() -> None:
    text = ('[vault]\naddress = ["vault:8200"]\ntimeout = "soon"\n'
            '[unlock]\nparallel = 0\nmod = "agent"\n'
            '[[volume]]\nname = "bad name"\ndevice = "/dev/x"\n'
            '[[volume]]\ndevice = "/dev/y"\n')
    with pytest.raises(ConfigError) as e:
        config.parse(text, "/etc/bootkey/bootkey.toml")
    lines = str(e.value).splitlines()
    assert all(ln.startswith("/etc/bootkey/bootkey.toml: ") for ln in lines)
    fields = [ln.split(": ")[1] for ln in lines]
    assert fields == ["vault.address", "vault.timeout", "unlock.parallel", "unlock.mod",
                      "volume[0].name", "volume[1].name"]
    assert "is not a URL" in lines[0] and "unknown setting" in lines[3]
    assert "required — add it" in lines[5]


def test_duplicate_volume_names() -> None:
    with pytest.raises(ConfigError, match="volume name 'a' appears twice"):
        config.parse('[[volume]]\nname = "a"\ndevice = "/x"\n[[volume]]\nname = "a"\n'
                     'device = "/y"\n')


def test_toml_syntax_error() -> None:
    with pytest.raises(ConfigError, match=r"^f.toml: not valid TOML: .* — fix the syntax$"):
        config.parse("[vault\n", "f.toml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file — create it"):
        config.load(tmp_path / "nope.toml")


def test_host_id_from_machine_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(config, "MACHINE_ID", mid)
    assert config.parse("").resolved_host_id() == "0123456789abcdef0123456789abcdef"
    mid.write_text("")
    with pytest.raises(ConfigError, match="is empty — set host_id"):
        config.parse("").resolved_host_id()


@pytest.mark.parametrize("name", ["data", "crypt-5c1e", "a.b+c_d", "x" * 127])
def test_volume_name_rule_accepts_mapping_names(name: str) -> None:
    assert config.check_volume_name(name) == name
    assert config.parse(f'[[volume]]\nname = "{name}"\ndevice = "/x"\n').volume[0].name == name


@pytest.mark.parametrize("name", ["", "-data", "a/b", "a b", "x" * 128, ".hidden"])
def test_volume_name_rule_refuses_what_device_mapper_cannot_use(name: str) -> None:
    with pytest.raises(ValueError, match="not a usable mapping name: letters, digits"):
        config.check_volume_name(name)
