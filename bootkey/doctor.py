"""`bootkey doctor`: gather the facts each check needs and hand them to the verdicts in
bootkey.doctor_checks.

Invariant: doctor changes nothing it did not create. It logs in with AppRole twice (the
second login proves re-login works) and revokes both tokens; it never unwraps a wrapped
secret_id (that would use it up) and never removes a secret_id file, whatever
`remove_secret_id_file` says. Files (units, crypttab, fstab) are read under `root`, so a
mounted image can be checked too; the kernel checks (memlock, device-mapper) are this
machine's.
"""

from __future__ import annotations

import ctypes
import email.utils
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions as hx
import requests

from bootkey import _proc, config, crypttab, initrd, keystore, unlock
from bootkey import doctor_checks as dc
from bootkey.config import AppRoleConfig, Config
from bootkey.doctor_checks import Check, Status
from bootkey.vault import AccessOutlook, VaultSession
from bootkey_core.errors import BootkeyError

log = logging.getLogger(__name__)

UNIT = "bootkey.service"
SOCKET_UNIT = "bootkey-cryptsetup.socket"
# systemd's unit search path for system units, highest priority first (systemd.unit(5))
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "usr/local/lib/systemd/system",
             "usr/lib/systemd/system", "lib/systemd/system")
# a doctor run must answer in seconds, not wait out the boot deadline
VAULT_DEADLINE = 10.0
TOOL_TIMEOUT = 10.0
MCL_CURRENT, MCL_FUTURE = 1, 2


class ChecksFailed(BootkeyError):
    """At least one doctor check failed (each is listed with its fix)."""

    exit_code = 90


@dataclass(frozen=True)
class Where:
    """Where doctor reads files: `/` normally, a mounted image's root otherwise."""

    root: Path = Path("/")

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")


# ---- config ------------------------------------------------------------------------------


def check_config(path: str | None) -> tuple[Check, Config | None]:
    try:
        cfg = config.load(path)
        host = cfg.resolved_host_id()
    except BootkeyError as e:
        return Check("config", Status.FAIL, "; ".join(str(e).splitlines()),
                     "fix the field named (docs/configuration.md)"), None
    shown = path or os.environ.get("BOOTKEY_CONFIG") or str(config.DEFAULT_PATH)
    return Check("config", Status.PASS, f"{shown}: valid; host_id {host}"), cfg


# ---- Vault: reachable, TLS, clock ------------------------------------------------------------


def probe_vault(address: str, ca_file: Path | None, timeout: float,
                now: float | None = None) -> tuple[Check, float | None]:
    """sys/health on one address: the verdict, and the clock skew (this host minus Vault)."""
    verify: bool | str = str(ca_file) if ca_file else True
    try:
        res = requests.get(f"{address}/v1/sys/health", timeout=timeout, verify=verify)
    except requests.exceptions.SSLError as e:
        if "WRONG_VERSION_NUMBER" in str(e):
            return dc.not_tls(address), None
        return dc.tls_failed(address, str(ca_file) if ca_file else None, _tls_reason(e)), None
    except (requests.ConnectionError, requests.Timeout) as e:
        kind = "timed out" if isinstance(e, requests.Timeout) else "connection failed"
        return dc.reachable(address, None, kind), None
    except OSError as e:  # requests: "Could not find a suitable TLS CA certificate bundle"
        return dc.ca_unreadable(address, str(ca_file), str(e)[:120]), None
    skew = None
    date = res.headers.get("Date")
    if date:
        try:
            skew = (now or time.time()) - email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            skew = None
    return dc.reachable(address, res.status_code, None), skew


def _tls_reason(e: Exception) -> str:
    m = re.search(r"certificate verify failed: ([^(')\"]+)", str(e))
    if m:
        return m.group(1).strip()
    return "TLS handshake failed"


# ---- Vault: login, token, re-login, capabilities ----------------------------------------------


def _source(ar: AppRoleConfig, cred_dir: str | None) -> tuple[str, Check | None]:
    """Where the agent's secret_id comes from, and a check if doctor must not (or cannot)
    log in with it from here. Mirrors VaultSession's order."""
    if ar.secret_id_credential:
        if not cred_dir:
            return "credential", Check(
                "approle login", Status.WARN,
                f"not tried: the secret_id is the systemd credential "
                f"{ar.secret_id_credential!r}, readable only inside the unit",
                "run doctor with the unit's credential: systemd-run --pipe --wait -p "
                "LoadCredentialEncrypted=secret-id:/etc/bootkey/secret-id.cred bootkey doctor")
        return f"credential {ar.secret_id_credential}", None
    cred = Path(cred_dir) / "secret-id" if cred_dir else None
    if cred is not None and cred.exists() and cred.read_bytes().strip():
        return "credential secret-id", None
    if ar.wrapped_secret_id_file:
        return f"wrapped {ar.wrapped_secret_id_file}", None  # see check_wrapped
    if ar.secret_id_file and not ar.secret_id_file.exists() and ar.remove_secret_id_file:
        return f"file {ar.secret_id_file}", Check(
            "approle login", Status.WARN,
            f"not tried: {ar.secret_id_file} is gone (remove_secret_id_file = true: the agent "
            "removed it after its login)",
            "to check the login, run doctor before the agent's first start, or use a "
            "systemd credential (bootkey setup-vault)")
    return f"file {ar.secret_id_file}", None


def check_wrapped(cfg: Config, path: Path) -> Check:
    """A wrapped secret_id: look the wrapping token up (sys/wrapping/lookup) instead of
    unwrapping it, which would use it up."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return Check("approle login", Status.WARN,
                     f"not tried: {path} is gone (the agent unwraps it once and removes it)",
                     "to check the login, use a systemd credential (bootkey setup-vault)")
    except OSError as e:
        return Check("approle login", Status.FAIL, f"{path}: cannot read: {e.strerror}",
                     "make it readable by root")
    client = _client(cfg)
    try:
        res = client.adapter.request("POST", "/v1/sys/wrapping/lookup", json={"token": token})
    except (hx.VaultError, requests.RequestException):
        return Check("approle login", Status.FAIL,
                     f"{path}: the wrapping token is invalid, expired or already used",
                     "issue a new one: bootkey setup-vault --new-secret-id")
    data = (res or {}).get("data") or {} if isinstance(res, dict) else {}
    return Check("approle login", Status.WARN,
                 f"not tried: unwrapping would use up {path} (a valid wrapping token for "
                 f"{data.get('creation_path', '?')}, ttl {data.get('creation_ttl', '?')} s)",
                 "the agent unwraps it at its first start; afterwards run doctor again")


def _client(cfg: Config) -> hvac.Client:
    v = cfg.vault
    c = hvac.Client(url=v.address[0], timeout=v.timeout, namespace=v.namespace or None,
                    verify=str(v.ca_file) if v.ca_file else True)
    c.token = None  # hvac would pick up $VAULT_TOKEN or ~/.vault-token: not ours to send
    return c


def _session(cfg: Config) -> VaultSession:
    # never remove the agent's secret_id file: doctor is a bystander
    ar = cfg.vault.approle.model_copy(update={"remove_secret_id_file": False})
    vcfg = cfg.vault.model_copy(update={"approle": ar})
    return VaultSession(vcfg, deadline=VAULT_DEADLINE, retry_initial=0.2, retry_max=2.0)


def check_access(cfg: Config, host_id: str, volumes: Sequence[unlock.Volume]) -> list[Check]:
    """Login, the token's facts, capabilities for every path this host needs, re-login."""
    source, skip = _source(cfg.vault.approle, os.environ.get("CREDENTIALS_DIRECTORY"))
    if skip is not None:
        return [skip]
    wrapped = cfg.vault.approle.wrapped_secret_id_file
    if source.startswith("wrapped ") and wrapped is not None:
        return [check_wrapped(cfg, wrapped)]
    session = _session(cfg)
    out: list[Check] = []
    try:
        session.login()
    except BootkeyError as e:
        return [Check("approle login", Status.FAIL, str(e).split(" — ")[0],
                      (str(e).split(" — ", 1)[1:] or ["check role_id and the secret_id"])[0])]
    out.append(Check("approle login", Status.PASS,
                     f"logged in with role_id and secret_id ({source})"))
    client = session.raw_client()
    first = client.token
    try:
        # the session's own access outlook: what the agent would see after this login
        o = session.access()
        facts = _facts(o) if o else dc.token_facts(client.auth.token.lookup_self()["data"])
        out.append(dc.token(facts))
        out += dc.capabilities(*_capabilities(client, cfg, host_id, volumes))
        second: str | None = None
        try:
            session.login()  # the agent's re-login: with the secret_id it holds
        except BootkeyError as e:
            second = str(e).split(" — ")[0]
        until = o.access_until.isoformat(timespec="seconds") if o and o.access_until else None
        out.append(dc.relogin(facts, second, source, until))
    finally:
        _revoke(session, first)
    return out


def _facts(o: AccessOutlook) -> dc.TokenFacts:
    # token_ttl None: the token never expires
    return dc.TokenFacts(ttl=o.token_ttl if o.token_ttl is not None else float("inf"),
                         period=o.token_period or 0.0, explicit_max_ttl=0.0,
                         renewable=o.token_renewable)


def _capabilities(client: hvac.Client, cfg: Config, host_id: str,
                  volumes: Sequence[unlock.Volume]
                  ) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    tr = cfg.vault.transit
    needed = [(f"kv read {v.name}", v.location.display, "read") for v in volumes]
    if not volumes:  # nothing enrolled yet: the host's prefix, as a new volume will use it
        probe = keystore.location_for(cfg, host_id, "new-volume").display
        needed.append(("kv read (no volumes yet)", probe, "read"))
    needed.append(("transit decrypt", f"{tr.mount}/decrypt/{tr.key}", "update"))
    res = client.adapter.request("POST", "/v1/sys/capabilities-self",
                                 json={"paths": [p for _, p, _ in needed]})
    data: dict[str, Any] = res.get("data", res) if isinstance(res, dict) else {}
    return needed, {p: list(data.get(p) or []) for _, p, _ in needed}


def _revoke(session: VaultSession, *tokens: str | None) -> None:
    client = session.raw_client()
    for tok in {*tokens, client.token}:
        if not tok:
            continue
        client.token = tok
        try:
            client.auth.token.revoke_self()
        except (hx.VaultError, requests.RequestException) as e:
            log.debug("could not revoke doctor's token: %s", type(e).__name__)


# ---- this machine ---------------------------------------------------------------------------


def _mlockall_error() -> str | None:
    """Try what the agent does at start (mlockall), then undo it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        libc.munlockall()
        return None
    return os.strerror(ctypes.get_errno())


def _memlock_kib() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft // 1024


@dataclass(frozen=True)
class UnitFacts:
    installed: bool
    limit_memlock: str | None
    service_enabled: bool
    socket_enabled: bool


def unit_facts(where: Where) -> UnitFacts:
    """bootkey.service as installed under `where`: its LimitMEMLOCK= after drop-ins, and
    whether it (or the key socket) is enabled (a .wants/ link)."""
    unit = next((where.path(d) / UNIT for d in UNIT_DIRS if (where.path(d) / UNIT).exists()),
                None)
    limit: str | None = None
    files = [unit] if unit else []
    for d in reversed(UNIT_DIRS):  # drop-ins: lowest priority first, the last one wins
        files += sorted((where.path(d) / f"{UNIT}.d").glob("*.conf"))
    for f in files:
        try:
            for line in f.read_text().splitlines():
                m = re.match(r"\s*LimitMEMLOCK\s*=\s*(\S*)", line)
                if m:
                    limit = m.group(1) or None
        except OSError:
            continue
    etc = where.path("etc/systemd/system")
    return UnitFacts(unit is not None, limit, any(etc.glob(f"*.wants/{UNIT}")),
                     any(etc.glob(f"*.wants/{SOCKET_UNIT}")))


def cryptsetup_version() -> Check:
    try:
        res = _proc.run(["cryptsetup", "--version"], timeout=TOOL_TIMEOUT)
    except FileNotFoundError:
        return dc.cryptsetup_version(None, "cryptsetup not found on PATH")
    except _proc.ProcTimeout as e:
        return dc.cryptsetup_version(None, str(e))
    if res.returncode != 0:
        return dc.cryptsetup_version(None, f"exit {res.returncode}: {res.stderr.strip()}")
    return dc.cryptsetup_version(res.stdout.decode(errors="replace"), None)


def device_mapper_present() -> bool:
    if Path("/sys/class/misc/device-mapper").exists():
        return True
    try:
        return "device-mapper" in Path("/proc/misc").read_text()
    except OSError:
        return False


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


# ---- all of it ----------------------------------------------------------------------------


def run_checks(config_path: str | None, where: Where = Where()) -> list[Check]:
    """Every check, in the order an operator would fix things."""
    out: list[Check] = []
    cfg_check, cfg = check_config(config_path)
    out.append(cfg_check)
    volumes: list[unlock.Volume] = []
    if cfg is not None:
        host = cfg.resolved_host_id()
        volumes, failed = unlock.resolve_volumes(cfg, host)
        out += [Check(f"volume {f.name}", Status.WARN, f"{f.device}: {f.reason}",
                      "fix [[volume]] device = in the config") for f in failed]
        probes = [probe_vault(a, cfg.vault.ca_file, cfg.vault.timeout)
                  for a in cfg.vault.address]
        out += dc.failover([c for c, _ in probes])
        skews = [s for c, s in probes if c.status is Status.PASS]
        if skews:
            out.append(dc.clock_skew(skews[0]))
            out += check_access(cfg, host, volumes)
        else:
            out.append(Check("approle login", Status.WARN,
                             "not tried: no Vault address answered", "fix the Vault checks above"))
    unit = unit_facts(where)
    out.append(dc.memlock(_memlock_kib(), _mlockall_error(), unit.limit_memlock))
    out.append(dc.unit_memlock(unit.installed, unit.limit_memlock))
    out.append(cryptsetup_version())
    out.append(dc.device_mapper(device_mapper_present()))
    mode = cfg.unlock.mode if cfg else "agent"
    out.append(dc.unit_enabled(unit.installed, unit.service_enabled, unit.socket_enabled,
                               mode))
    if cfg is not None:
        opts = crypttab.Options(socket_path=str(cfg.keysocket.path))
        tab = _read(where.path("etc/crypttab"))
        out += dc.tab_lines(volumes, crypttab.Mode(mode), tab, _read(where.path("etc/fstab")),
                            opts)
        sealed = dc.initrd_secret_id(dc.initrd_volumes(tab), initrd.secret_id_sealing(cfg))
        if sealed is not None:
            out.append(sealed)
    return out
