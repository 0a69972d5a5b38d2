"""KES authorization and name rules (shared/kes-api.md §5.2, §6). Pure functions.

Invariant: a request is allowed iff the caller is the admin identity, or the caller is
assigned to exactly one policy, no deny pattern of that policy matches the decoded path
and at least one allow pattern does. Patterns use the current KES semantics: a trailing
`*` is a prefix match, anything else must equal the path; `*` elsewhere, `?` and `[…]`
are literal.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

MAX_NAME = 80  # KES validName/validPattern: at most 80 bytes

_NAME_CHARS = re.compile(r"[0-9A-Za-z_-]+")


@functools.lru_cache(maxsize=4096)  # checked on every key request, mostly for one name
def valid_name(name: str) -> bool:
    """Key, policy and identity names: 1-80 of [0-9A-Za-z_-], no leading/trailing `-`,
    not exactly `_`."""
    if not name or len(name.encode()) > MAX_NAME or name == "_":
        return False
    if name[0] == "-" or name[-1] == "-":
        return False
    return _NAME_CHARS.fullmatch(name) is not None


def valid_pattern(pattern: str) -> bool:
    """List patterns: empty, `*`, or name characters with `*` only as the last one."""
    if len(pattern.encode()) > MAX_NAME:
        return False
    body = pattern[:-1] if pattern.endswith("*") else pattern
    return body == "" or _NAME_CHARS.fullmatch(body) is not None


def list_prefix(pattern: str, *, strip_star: bool) -> str:
    """The name prefix a list pattern stands for. `*` and "" list everything. Key listing
    uses the rest literally (KES does not strip a trailing `*` there, so `abc*` matches
    nothing); policy and identity listings strip it."""
    if pattern in ("", "*"):
        return ""
    if strip_star and pattern.endswith("*"):
        return pattern[:-1]
    return pattern


def pattern_matches(pattern: str, path: str) -> bool:
    if not pattern:
        return False
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern


@dataclass(frozen=True)
class Policy:
    name: str
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()

    def allows(self, path: str) -> bool:
        if any(pattern_matches(p, path) for p in self.deny):
            return False
        return any(pattern_matches(p, path) for p in self.allow)


DECISION_CACHE = 4096  # (identity, path) answers remembered per policy set


class PolicyConfigError(ValueError):
    """The policy set contradicts itself (name rules, double assignment)."""


@dataclass(frozen=True)
class PolicySet:
    """Static policies and identity assignments, as loaded from the config."""

    admin: str = ""
    policies: Mapping[str, Policy] = field(default_factory=dict)
    _by_identity: Mapping[str, Policy] = field(default_factory=dict, repr=False)
    _allowed: Callable[[str | None, str], bool] = field(init=False, repr=False, compare=False)

    @classmethod
    def build(cls, admin: str, policies: Iterable[Policy]) -> PolicySet:
        admin = admin.strip().lower()
        by_name: dict[str, Policy] = {}
        by_id: dict[str, Policy] = {}
        for p in policies:
            if not valid_name(p.name):
                raise PolicyConfigError(
                    f"policy name '{p.name}' is empty, too long or contains invalid characters")
            if p.name in by_name:
                raise PolicyConfigError(f"policy '{p.name}' is defined twice")
            by_name[p.name] = p
            for raw in p.identities:
                ident = raw.strip().lower()
                if not ident:
                    continue
                if ident == admin:
                    raise PolicyConfigError(
                        f"policy '{p.name}': identity {ident} is the admin identity — "
                        "remove it from the policy")
                if ident in by_id:
                    raise PolicyConfigError(
                        f"identity {ident} is assigned to policies '{by_id[ident].name}' and "
                        f"'{p.name}' — assign it to one")
                by_id[ident] = p
        return cls(admin=admin, policies=by_name, _by_identity=by_id)

    def is_admin(self, identity: str | None) -> bool:
        # A non-hex admin such as "disabled" matches no certificate identity.
        return bool(identity) and identity == self.admin and _is_hex_identity(self.admin)

    def policy_of(self, identity: str | None) -> Policy | None:
        return self._by_identity.get(identity or "")

    def identities(self) -> dict[str, Policy]:
        return dict(self._by_identity)

    def __post_init__(self) -> None:
        # Remembered per (identity, path): a policy set never changes (a reload builds a
        # new one), and MinIO asks the same question for every object.
        object.__setattr__(self, "_allowed",
                           functools.lru_cache(maxsize=DECISION_CACHE)(self._decide))

    def allowed(self, identity: str | None, path: str) -> bool:
        return self._allowed(identity, path)

    def _decide(self, identity: str | None, path: str) -> bool:
        if self.is_admin(identity):
            return True
        pol = self.policy_of(identity)
        return pol is not None and pol.allows(path)


def _is_hex_identity(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)
