"""The one base for configuration models and the one way their errors are told.

Both bootkey.toml (bootkey.config) and KES's YAML (kes.config) parse into frozen
pydantic models built on `Model`: unknown settings are refused, values never change
after parsing. `config_error` turns pydantic's ValidationError into one ConfigError line
per problem: `<file>: <field.path[0]>: <what is wrong or the fix>`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bootkey_core.errors import ConfigError


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as an operator writes it: `volume[0].name`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _hint(err: Any, docs: str) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown setting — check the spelling against {docs}"
    if kind == "missing":
        return "required — add it"
    return str(err["msg"]).removeprefix("Value error, ")


def config_error(e: ValidationError, source: str,
                 docs: str = "docs/configuration.md") -> ConfigError:
    """One line per problem, each naming the file and the field."""
    return ConfigError("\n".join(f"{source}: {field_path(err['loc'])}: {_hint(err, docs)}"
                                 for err in e.errors()))
