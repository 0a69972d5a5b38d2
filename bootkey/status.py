"""What `bootkey status` shows: the snapshot's parts, built from facts, and its table.

The agent assembles the snapshot (`Agent.snapshot`) from these builders and sends it over
the control socket as JSON; `bootkey status` renders it. Without an agent, the command
builds the same shape from the config and the LUKS headers, with `agent.running` false.

Invariant: a snapshot holds names, states, times and counts only: never a key, a token
or a secret_id (the control socket's promise). The builders take the pieces they read,
not the objects that hold secrets.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bootkey import luks, unlock
from bootkey.config import AppRoleConfig, Config, VaultConfig
from bootkey.unlock import VolumeResult
from bootkey.vault import VaultSession
from bootkey_core.duration import format_duration

Snapshot = dict[str, Any]


def iso(wall: float | None) -> str | None:
    """Seconds since the epoch → `2026-12-04T17:50:01Z` (None stays None)."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def volume_entry(r: VolumeResult, when: float | None) -> dict[str, Any]:
    """One volume as the agent last handled it."""
    return {"name": r.name, "luks_uuid": r.luks_uuid, "device": r.device,
            "state": r.outcome.value, "result": "ok" if r.ok else r.reason,
            "when": iso(when)}


def secret_id_source(ar: AppRoleConfig, credentials_dir: str | None) -> str:
    """Where the configured secret_id comes from (VaultSession's order), named with its
    path: what `status` can say before a login, or without an agent."""
    if ar.secret_id is not None:
        return "config"
    if ar.secret_id_credential:
        return f"systemd credential {ar.secret_id_credential}"
    cred = Path(credentials_dir) / "secret-id" if credentials_dir else None
    if cred is not None and cred.exists() and cred.read_bytes().strip():
        return "systemd credential secret-id"
    if ar.wrapped_secret_id_file:
        return f"wrapped token {ar.wrapped_secret_id_file} (unwrapped once)"
    if ar.secret_id_file:
        removed = " (removed after login)" if ar.remove_secret_id_file else ""
        return f"file {ar.secret_id_file}{removed}"
    return "none configured"


def vault_facts(session: VaultSession | None, vcfg: VaultConfig, *,
                wall: float | None = None) -> dict[str, Any]:
    """The Vault part of the snapshot: the address in use and the session's access
    outlook (token TTL/period/renewable, secret_id facts, re-login, warning); before a
    login, what the config says."""
    wall = time.time() if wall is None else wall
    out: dict[str, Any] = {
        "addresses": list(vcfg.address), "logged_in": False, "relogin_possible": None,
        "secret_id_source": secret_id_source(vcfg.approle,
                                             os.environ.get("CREDENTIALS_DIRECTORY"))}
    outlook = session.access() if session is not None and session.logged_in else None
    if session is None or outlook is None:
        return out
    out.update(outlook.as_dict())
    ttl = outlook.token_ttl
    out.update({"logged_in": True, "address": session.raw_client().url,
                "token_expires": None if ttl is None else iso(wall + ttl)})
    return out


def offline(cfg: Config) -> Snapshot:
    """No agent answers: what the config and the LUKS headers say (no Vault call)."""
    volumes, failed = unlock.resolve_volumes(cfg)
    vols = [{"name": v.name, "luks_uuid": v.luks_uuid, "device": v.device,
             "state": "open" if luks.is_active(v.name) else "closed",
             "result": f"from {v.source}", "when": None} for v in volumes]
    vols += [volume_entry(r, None) for r in failed]
    return {"agent": {"running": False, "mode": cfg.unlock.mode},
            "volumes": sorted(vols, key=lambda v: v["name"]),
            "vault": vault_facts(None, cfg.vault)}


def duration(seconds: float | None) -> str:
    """`5400` → `1h30m`; None (not known) → `-`."""
    return "-" if seconds is None else format_duration(seconds)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _agent_line(a: dict[str, Any]) -> str:
    if not a.get("running"):
        return "not running — `systemctl start bootkey` (below: what the config and " \
               "LUKS headers say)"
    parts = [f"running (pid {a['pid']}, since {a['since']})", f"mode {a['mode']}",
             "ready" if a.get("ready") else "starting"]
    wd = a.get("watchdog") or {}
    if wd.get("stale"):
        parts.append(f"WATCHDOG WITHHELD: {', '.join(wd['stale'])} not progressing")
    elif wd.get("interval"):
        parts.append(f"watchdog ok ({len(wd.get('loops', []))} loops)")
    text = ", ".join(parts)
    return text + (f"\n{'':12}{a['status']}" if a.get("status") else "")


def _vault_line(v: dict[str, Any]) -> str:
    if not v.get("logged_in"):
        return (f"not logged in ({', '.join(v.get('addresses', []))}); secret_id: "
                f"{v.get('secret_id_source')}")
    ttl = "token never expires" if v.get("token_ttl") is None else \
        f"token ttl {duration(v['token_ttl'])} (until {v.get('token_expires')})"
    kind = f"periodic ({duration(v['token_period'])})" if v.get("token_period") else \
        "renewable" if v.get("token_renewable") else "not renewable"
    relogin = {True: "possible", False: "NOT possible", None: "unknown"}[
        v.get("relogin_possible")]
    if v.get("access_until"):
        relogin += f" until {v['access_until']}"
    lines = [f"{v['address']}, {ttl}, {kind}",
             f"secret_id: {v.get('secret_id_source')}; re-login {relogin}"]
    if v.get("warning"):
        lines.append(f"WARNING: {v['warning']}")
    return f"\n{'':12}".join(lines)


def _component_line(name: str, c: dict[str, Any] | None) -> str:
    if not c or not c.get("enabled"):
        return "off"
    if name == "keysocket":
        return f"{c['path']}" + (" (socket from systemd)" if c.get("activated") else "")
    if name == "hotplug":
        return f"watching block devices ({c.get('source')} events)"
    if name == "kes":
        r = c.get("requests", {})
        return (f"listening on {c.get('listening')}, {c.get('keys_cached', 0)} keys cached, "
                f"requests {r.get('success', 0)} ok / {r.get('error', 0)} client error / "
                f"{r.get('failure', 0)} server error")
    if name == "metrics":
        return f"http://{c.get('address')}/metrics"
    return "on"


def render(snap: Snapshot) -> str:
    """The snapshot as the table an operator reads at 3 a.m."""
    lines = [f"{'agent':12}{_agent_line(snap.get('agent', {}))}"]
    vols = snap.get("volumes", [])
    if vols:
        rows = [["VOLUME", "LUKS UUID", "DEVICE", "STATE", "RESULT", "WHEN"]]
        rows += [[v["name"], v.get("luks_uuid") or "-", v.get("device") or "-", v["state"],
                  v.get("result") or "-", v.get("when") or "-"] for v in vols]
        lines += ["", *_table(rows), ""]
    else:
        lines.append(f"{'volumes':12}none configured or enrolled")
    if "vault" in snap:
        lines.append(f"{'vault':12}{_vault_line(snap['vault'])}")
    for key, label in (("keysocket", "key socket"), ("hotplug", "hotplug"), ("kes", "kes"),
                       ("metrics", "metrics")):
        if key in snap:
            lines.append(f"{label:12}{_component_line(key, snap[key])}")
    return "\n".join(lines)
