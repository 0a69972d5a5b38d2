"""The one writer of Vault policy HCL.

`bootkey policy` (bootkey.policy: a host's boot and enrollment rules) and
`bootkey kes vault-policy` (kes.vaultstore: the KES keystore's rules) both describe their
needs as `Rule` values and print them with `hcl()`, so every policy bootkey prints has
the same shape and quoting.

>>> print(hcl([Rule("secret/data/x/*", ("read",))]), end="")
path "secret/data/x/*" {
  capabilities = ["read"]
}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    path: str
    capabilities: tuple[str, ...]
    # parameter → allowed value globs ([] = any value); set, only these parameters pass
    allowed_parameters: Mapping[str, Sequence[str]] = field(default_factory=dict)
    comment: str = ""  # lines printed above the block, each prefixed with "# "


def _quoted(items: Sequence[str]) -> str:
    return ", ".join(f'"{i}"' for i in items)


def _block(r: Rule) -> str:
    out = "".join(f"# {line}\n" for line in r.comment.splitlines())
    out += f'path "{r.path}" {{\n  capabilities = [{_quoted(r.capabilities)}]\n'
    if r.allowed_parameters:
        out += "  allowed_parameters = {\n"
        out += "".join(f'    "{k}" = [{_quoted(v)}]\n' for k, v in r.allowed_parameters.items())
        out += "  }\n"
    return out + "}\n"


def hcl(rules: Sequence[Rule], header: str = "") -> str:
    """The policy text: `header` as comment lines, then one block per rule, blank-line
    separated."""
    head = "".join(f"# {line}\n" for line in header.splitlines())
    return head + "\n".join(_block(r) for r in rules)
