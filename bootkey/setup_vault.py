"""Set up a Vault (or OpenBao) for one bootkey host: engines, the derived transit key,
AppRole, the boot and enroll policies, a role with a periodic token, and a secret_id.

Three parts, so the decisions are testable on values:
- `observe(client, want)` reads what Vault has (GETs and LISTs only);
- `plan(seen, want)` is pure: it turns what Vault has into a list of steps, each either
  `Unchanged` or a `VaultCall` (method, path, body) or `IssueSecretId`;
- `execute(client, steps)` makes exactly those calls, in order.

Invariant: a second run against the same Vault plans no change (every step `Unchanged`),
and `--dry-run` only ever observes. A Vault whose existing mounts or transit key
contradict the config (KV v1 where the config says v2, a transit key that is not
derived) is refused before any change, naming the setting to fix.

Policy text comes from bootkey.policy (what `bootkey policy` prints), never written here.
The role's token is periodic (`token_period`): it renews for ever, so the agent never
needs to log in again while it runs (docs/vault-setup.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions as hx
import requests

from bootkey import _proc, policy
from bootkey.config import VaultConfig
from bootkey_core.errors import (
    BootkeyError,
    ConfigError,
    VaultBadAnswer,
    VaultDenied,
    VaultUnavailable,
)

log = logging.getLogger(__name__)

# systemd-creds encrypt derives a key (host key and/or TPM2); bounded like any tool call.
CREDS_TIMEOUT = 30.0


def boot_policy_name(host_id: str) -> str:
    return f"bootkey-boot-{host_id}"


def enroll_policy_name(host_id: str) -> str:
    return f"bootkey-enroll-{host_id}"


def role_name(host_id: str) -> str:
    return boot_policy_name(host_id)


# ---- how the secret_id reaches the host -----------------------------------------------


@dataclass(frozen=True)
class WrappedFile:
    """A response-wrapping token in a file: the agent unwraps it once, then removes it."""

    path: Path
    wrap_ttl: str = "24h"

    def config_line(self) -> str:
        return f'wrapped_secret_id_file = "{self.path}"'


@dataclass(frozen=True)
class Credential:
    """`systemd-creds encrypt --name=NAME - PATH`: sealed to this host (and its TPM2)."""

    path: Path
    name: str = "secret-id"

    def config_line(self) -> str:
        return f'secret_id_credential = "{self.name}"'


@dataclass(frozen=True)
class PlainFile:
    """The secret_id itself in a 0600 file (hosts without systemd-creds, the demo)."""

    path: Path

    def config_line(self) -> str:
        return f'secret_id_file = "{self.path}"'


Delivery = WrappedFile | Credential | PlainFile


# ---- what we want, what Vault has ------------------------------------------------------


@dataclass(frozen=True)
class Want:
    vault: VaultConfig
    host_id: str
    token_period: int = 3600  # seconds
    secret_id: Delivery | None = None
    new_secret_id: bool = False  # issue one even if the delivery file exists

    @property
    def role(self) -> str:
        return role_name(self.host_id)

    def role_params(self) -> dict[str, Any]:
        """The role as Vault stores it. Periodic token, no max TTL: renewal never ends.
        A reusable, non-expiring secret_id: the agent can log in again after a restart."""
        return {
            "token_policies": [boot_policy_name(self.host_id)],
            "token_period": self.token_period,
            "token_ttl": 0,
            "token_max_ttl": 0,
            "secret_id_num_uses": 0,
            "secret_id_ttl": 0,
        }

    def policies(self) -> dict[str, str]:
        return {
            boot_policy_name(self.host_id): policy.boot_policy(self.vault, self.host_id),
            enroll_policy_name(self.host_id): policy.enroll_policy(self.vault, self.host_id),
        }


@dataclass(frozen=True)
class Mount:
    type: str
    version: int | None = None  # KV only


@dataclass(frozen=True)
class Seen:
    """What Vault has, as far as this host's set-up is concerned."""

    auth: dict[str, str]  # "approle/" -> "approle"
    mounts: dict[str, Mount]  # "secret/" -> Mount("kv", 2)
    transit_key_derived: bool | None  # None: no such key
    policies: Mapping[str, str | None]  # name -> text (None: absent)
    role: dict[str, Any] | None  # the role's stored parameters, None: absent
    delivery_exists: bool


# ---- steps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unchanged:
    item: str
    detail: str

    def show(self) -> str:
        return f"unchanged  {self.item}: {self.detail}"


@dataclass(frozen=True)
class VaultCall:
    item: str
    method: str
    path: str
    body: dict[str, Any]

    def show(self) -> str:
        body = {k: (f"<{len(v.splitlines())} lines of `bootkey policy`>"
                    if k == "policy" else v) for k, v in self.body.items()}
        return f"{self.method} /v1/{self.path} {json.dumps(body)}"


@dataclass(frozen=True)
class IssueSecretId:
    item: str
    mount: str
    role: str
    delivery: Delivery

    @property
    def path(self) -> str:
        return f"auth/{self.mount}/role/{self.role}/secret-id"

    def show(self) -> str:
        d = self.delivery
        if isinstance(d, WrappedFile):
            return f"POST /v1/{self.path} (X-Vault-Wrap-TTL: {d.wrap_ttl}) → {d.path}"
        if isinstance(d, Credential):
            return f"POST /v1/{self.path} → systemd-creds encrypt --name={d.name} - {d.path}"
        return f"POST /v1/{self.path} → {d.path} (mode 0600)"


Step = Unchanged | VaultCall | IssueSecretId


def plan(seen: Seen, want: Want) -> list[Step]:
    """The steps that bring Vault from `seen` to `want`. Pure.

    Raises ConfigError when Vault contradicts the config in a way a change here must not
    paper over (an existing mount or key used differently)."""
    v = want.vault
    steps: list[Step] = []
    am = v.approle.mount
    have_auth = seen.auth.get(f"{am}/")
    if have_auth is None:
        steps.append(VaultCall(f"auth {am}/", "POST", f"sys/auth/{am}", {"type": "approle"}))
    elif have_auth != "approle":
        raise ConfigError(f"vault.approle.mount: {am}/ is a {have_auth} auth method on this "
                          "Vault — choose another mount")
    else:
        steps.append(Unchanged(f"auth {am}/", "AppRole enabled"))

    kv = v.kv
    have_kv = seen.mounts.get(f"{kv.mount}/")
    if have_kv is None:
        steps.append(VaultCall(f"secrets {kv.mount}/", "POST", f"sys/mounts/{kv.mount}",
                               {"type": "kv", "options": {"version": str(kv.version)}}))
    elif have_kv.type != "kv" or (have_kv.version or 1) != kv.version:
        what = f"KV v{have_kv.version or 1}" if have_kv.type == "kv" else have_kv.type
        raise ConfigError(f"vault.kv: {kv.mount}/ is {what} on this Vault, the config says "
                          f"KV v{kv.version} — set [vault.kv] version/mount to match")
    else:
        steps.append(Unchanged(f"secrets {kv.mount}/", f"KV v{kv.version}"))

    tr = v.transit
    have_tr = seen.mounts.get(f"{tr.mount}/")
    if have_tr is None:
        steps.append(VaultCall(f"secrets {tr.mount}/", "POST", f"sys/mounts/{tr.mount}",
                               {"type": "transit"}))
    elif have_tr.type != "transit":
        raise ConfigError(f"vault.transit.mount: {tr.mount}/ is {have_tr.type} on this Vault "
                          "— choose another mount")
    else:
        steps.append(Unchanged(f"secrets {tr.mount}/", "transit enabled"))
    key_item = f"transit key {tr.mount}/keys/{tr.key}"
    if seen.transit_key_derived is None:
        # derived: every (host, volume) context gets its own key, so a sealed key moved
        # to another entry does not unseal
        steps.append(VaultCall(key_item, "POST", f"{tr.mount}/keys/{tr.key}",
                               {"derived": True}))
    elif not seen.transit_key_derived:
        raise ConfigError(f"vault.transit.key: {tr.mount}/keys/{tr.key} exists but is not "
                          "derived — bootkey needs a derived key: set another key name")
    else:
        steps.append(Unchanged(key_item, "derived key exists"))

    for name, text in want.policies().items():
        if seen.policies.get(name) == text:
            steps.append(Unchanged(f"policy {name}", "as `bootkey policy` prints it"))
        else:
            steps.append(VaultCall(f"policy {name}", "PUT", f"sys/policies/acl/{name}",
                                   {"policy": text}))

    params = want.role_params()
    role_item = f"role {am}/role/{want.role}"
    if seen.role is not None and all(_same(seen.role.get(k), val)
                                     for k, val in params.items()):
        steps.append(Unchanged(role_item, f"periodic token ({want.token_period} s)"))
    else:
        steps.append(VaultCall(role_item, "POST", f"auth/{am}/role/{want.role}", params))

    d = want.secret_id
    if d is not None:
        if seen.delivery_exists and not want.new_secret_id:
            steps.append(Unchanged("secret_id", f"{d.path} exists — kept "
                                                "(--new-secret-id issues another)"))
        else:
            steps.append(IssueSecretId("secret_id", am, want.role, d))
    return steps


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, list):
        return isinstance(have, list) and sorted(map(str, have)) == sorted(map(str, want))
    try:
        return int(have) == int(want)
    except (TypeError, ValueError):
        return bool(have == want)


# ---- I/O ---------------------------------------------------------------------------------


def admin_client(vault: VaultConfig, token: str) -> hvac.Client:
    verify: bool | str = str(vault.ca_file) if vault.ca_file else True
    return hvac.Client(url=vault.address[0], token=token, verify=verify,
                       timeout=vault.timeout, namespace=vault.namespace or None)


def _call(client: hvac.Client, method: str, path: str, what: str, *,
          body: dict[str, Any] | None = None, wrap_ttl: str | None = None) -> Any:
    """One admin request; errors become bootkey errors naming the path (no body echo).
    A 404 on a read is an answer (None: absent); on a write it is an error."""
    try:
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        if wrap_ttl:
            kw["wrap_ttl"] = wrap_ttl
        res = client.adapter.request(method, f"/v1/{path}", **kw)
    except (requests.ConnectionError, requests.Timeout) as e:
        kind = "timed out" if isinstance(e, requests.Timeout) else "unreachable"
        raise VaultUnavailable(f"{path}: cannot {what}: Vault {kind} at {client.url}") from None
    except hx.Forbidden:
        raise VaultDenied(f"{path}: cannot {what}: permission denied (403) — use an admin "
                          "token (docs/vault-setup.md lists what it needs)") from None
    except hx.InvalidPath:
        if method == "GET":
            return None
        raise VaultBadAnswer(f"{path}: cannot {what}: no such path (404)") from None
    except (hx.VaultDown, hx.VaultNotInitialized, hx.InternalServerError, hx.BadGateway,
            hx.RateLimitExceeded, hx.UnexpectedError) as e:
        raise VaultUnavailable(f"{path}: cannot {what}: Vault is sealed, uninitialised or "
                               f"failing ({type(e).__name__})") from None
    except hx.VaultError as e:
        detail = "; ".join(str(x) for x in (getattr(e, "errors", None) or []))[:200]
        raise VaultBadAnswer(f"{path}: cannot {what}: Vault refused the request "
                             f"({detail})") from None
    return res if isinstance(res, dict) else None


def observe(client: hvac.Client, want: Want) -> Seen:
    """Read what Vault has for this host. Only GET/LIST requests."""
    v = want.vault
    auth = _call(client, "GET", "sys/auth", "list auth methods") or {}
    mounts = _call(client, "GET", "sys/mounts", "list secrets engines") or {}
    auth_d = auth.get("data", auth)
    mounts_d = mounts.get("data", mounts)
    seen_mounts: dict[str, Mount] = {}
    for path, m in mounts_d.items():
        if isinstance(m, dict) and "type" in m:
            ver = (m.get("options") or {}).get("version")
            seen_mounts[path] = Mount(str(m["type"]), int(ver) if ver else None)
    derived: bool | None = None
    tr = v.transit
    if seen_mounts.get(f"{tr.mount}/", Mount("")).type == "transit":
        key = _call(client, "GET", f"{tr.mount}/keys/{tr.key}", "read the transit key")
        if key is not None:
            derived = bool((key.get("data") or {}).get("derived"))
    pols: dict[str, str | None] = {}
    for name in want.policies():
        res = _call(client, "GET", f"sys/policies/acl/{name}", "read a policy")
        pols[name] = ((res or {}).get("data") or {}).get("policy")
    role = None
    if (auth_d.get(f"{v.approle.mount}/") or {}).get("type") == "approle":
        res = _call(client, "GET", f"auth/{v.approle.mount}/role/{want.role}", "read the role")
        role = (res or {}).get("data")
    return Seen(
        auth={p: str(m.get("type")) for p, m in auth_d.items()
              if isinstance(m, dict) and "type" in m},
        mounts=seen_mounts,
        transit_key_derived=derived,
        policies=pols,
        role=role,
        delivery_exists=bool(want.secret_id and want.secret_id.path.exists()),
    )


def read_role_id(client: hvac.Client, want: Want) -> str | None:
    res = _call(client, "GET", f"auth/{want.vault.approle.mount}/role/{want.role}/role-id",
                "read the role_id")
    rid = ((res or {}).get("data") or {}).get("role_id")
    return str(rid) if rid else None


Say = Callable[[str], None]


def execute(client: hvac.Client, steps: Sequence[Step], say: Say) -> None:
    """Make the planned calls in order, saying what each did.

    WARNING: changes Vault. If interrupted, what was done stays done; running again plans
    only what is still missing."""
    for s in steps:
        if isinstance(s, Unchanged):
            say(s.show())
        elif isinstance(s, VaultCall):
            _call(client, s.method, s.path, f"set up {s.item}", body=s.body)
            say(f"changed    {s.item}")
        else:
            _issue_secret_id(client, s)
            say(f"changed    {s.item}: new secret_id → {s.delivery.path}")


def _issue_secret_id(client: hvac.Client, s: IssueSecretId) -> None:
    d = s.delivery
    if isinstance(d, WrappedFile):
        res = _call(client, "POST", s.path, "issue a wrapped secret_id", body={},
                    wrap_ttl=d.wrap_ttl)
        token = ((res or {}).get("wrap_info") or {}).get("token")
        if not token:
            raise VaultBadAnswer(f"{s.path}: answer has no wrapping token")
        _write_private(d.path, token.encode())
        return
    res = _call(client, "POST", s.path, "issue a secret_id", body={})
    sid = ((res or {}).get("data") or {}).get("secret_id")
    if not sid:
        raise VaultBadAnswer(f"{s.path}: answer has no secret_id")
    buf = bytearray(sid.encode())
    try:
        if isinstance(d, PlainFile):
            _write_private(d.path, buf)
        else:
            _encrypt_credential(d, buf)
    finally:
        buf[:] = bytes(len(buf))


def _write_private(path: Path, data: bytes | bytearray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _encrypt_credential(d: Credential, secret: bytearray) -> None:
    # to stdout, then written 0600 here: the file's mode does not depend on the umask
    res = _proc.run(["systemd-creds", "encrypt", f"--name={d.name}", "-", "-"],
                    stdin=secret, timeout=CREDS_TIMEOUT)
    if res.returncode != 0 or not res.stdout:
        last = res.stderr.strip().splitlines()[-1:] or [""]
        raise SetupFailed(f"{d.path}: cannot write the credential: systemd-creds encrypt "
                          f"failed (exit {res.returncode}: {last[0]}) — or use "
                          "--secret-id wrapped")
    _write_private(d.path, res.stdout)


class SetupFailed(BootkeyError):
    """The secret_id could not be written where it was asked to go."""

    exit_code = os.EX_CANTCREAT  # 73


def issue_enroll_token(client: hvac.Client, vault: VaultConfig, host_id: str,
                       ttl: str = "2h") -> str:
    """A short-lived operator token with the enroll (and boot) policy, for `bootkey enroll`."""
    res = _call(client, "POST", "auth/token/create", "create an enroll token",
                body={"policies": [enroll_policy_name(host_id), boot_policy_name(host_id)],
                      "ttl": ttl})
    tok = ((res or {}).get("auth") or {}).get("client_token")
    if not tok:
        raise VaultBadAnswer("auth/token/create: answer has no client token")
    return str(tok)


def config_lines(want: Want, role_id: str | None) -> str:
    """The bootkey.toml lines this set-up needs."""
    lines = ["[vault.approle]",
             f'role_id = "{role_id}"' if role_id else
             f'role_id = ""   # auth/{want.vault.approle.mount}/role/{want.role}/role-id '
             "once the role exists"]
    if want.secret_id is not None:
        lines.append(want.secret_id.config_line())
    return "\n".join(lines) + "\n"
