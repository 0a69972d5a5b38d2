"""`bootkey setup-vault`: set up Vault for this host (bootkey.setup_vault plans and
executes; this module picks the config, the admin token and the secret_id delivery)."""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import sys
from pathlib import Path

from bootkey import config, setup_vault
from bootkey.commands.common import load_config
from bootkey.operator_token import operator_token
from bootkey_core.duration import parse_duration
from bootkey_core.errors import ConfigError, UsageError

HELP = """\
Set up Vault/OpenBao for this host, idempotently: enable AppRole, KV (the configured
version) and the derived transit key if missing; write the boot and enroll policies
(`bootkey policy`); create this host's AppRole role with a periodic token (renews for
ever); issue a secret_id; print the bootkey.toml lines. A second run changes nothing.

The admin token comes from $VAULT_TOKEN or $BAO_TOKEN, else stdin (never argv).

secret_id delivery (--secret-id):
  credential  systemd-creds encrypt → /etc/bootkey/secret-id.cred (default if
              systemd-creds exists; bootkey.service loads it)
  wrapped     a response-wrapping token → /etc/bootkey/secret-id.wrapped (the default
              without systemd-creds; unwrapped once by the agent)
  file        the secret_id in a 0600 file → /etc/bootkey/secret-id
  none        issue none

examples:
  VAULT_TOKEN=$(cat ~/.vault-token) bootkey setup-vault --dry-run
  bao print token | bootkey setup-vault --secret-id wrapped

See docs/vault-setup.md.
"""

_DEFAULT_PATHS = {
    "credential": Path("/etc/bootkey/secret-id.cred"),
    "wrapped": Path("/etc/bootkey/secret-id.wrapped"),
    "file": Path("/etc/bootkey/secret-id"),
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("setup-vault", help="set up Vault for this host (idempotent)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="print the Vault calls it would make; change nothing")
    p.add_argument("--host-id", help="the host (default: from the config, else "
                                     "/etc/machine-id)")
    p.add_argument("--secret-id", choices=["auto", *_DEFAULT_PATHS, "none"], default="auto",
                   help="how the secret_id reaches the host (default: credential if "
                        "systemd-creds exists, else wrapped)")
    p.add_argument("--secret-id-path", type=Path, metavar="FILE",
                   help="where to write it (defaults above)")
    p.add_argument("--wrap-ttl", default="24h", metavar="TTL",
                   help="lifetime of a wrapped secret_id before the agent unwraps it "
                        "(default 24h)")
    p.add_argument("--token-period", default="1h", metavar="TIME",
                   help="the role's token_period: the agent renews within it (default 1h)")
    p.add_argument("--new-secret-id", action="store_true",
                   help="issue a secret_id even if the delivery file exists")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> config.Config:
    if args.config or os.environ.get("BOOTKEY_CONFIG") or config.DEFAULT_PATH.exists():
        return load_config(args)
    # a fresh host being prepared: the documented defaults, at $VAULT_ADDR if set
    addr = os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
    return config.Config.model_validate({"vault": {"address": addr}} if addr else {})


def _admin_token() -> str:
    token = operator_token(None, os.environ)  # $VAULT_TOKEN, then $BAO_TOKEN, never argv
    if not token:
        token = (getpass.getpass("Vault admin token: ") if sys.stdin.isatty()
                 else sys.stdin.readline()).strip()
    if not token:
        raise ConfigError("setup-vault: no admin token — set $VAULT_TOKEN (or $BAO_TOKEN) or "
                          "pipe it on stdin")
    return token


def _delivery(args: argparse.Namespace, say: setup_vault.Say) -> setup_vault.Delivery | None:
    kind: str = args.secret_id
    has_creds = shutil.which("systemd-creds") is not None
    if kind == "auto":
        kind = "credential" if has_creds else "wrapped"
        if not has_creds:
            say("note: systemd-creds not found: the secret_id goes out response-wrapped")
    if kind == "none":
        return None
    if kind == "credential" and not has_creds:
        raise UsageError("setup-vault: --secret-id credential needs systemd-creds (systemd ≥ "
                         "250), not found on PATH — use --secret-id wrapped")
    path: Path = args.secret_id_path or _DEFAULT_PATHS[kind]
    if kind == "credential":
        return setup_vault.Credential(path)
    if kind == "wrapped":
        return setup_vault.WrappedFile(path, args.wrap_ttl)
    return setup_vault.PlainFile(path)


def run(args: argparse.Namespace) -> int:
    try:
        period = int(parse_duration(args.token_period))
        parse_duration(args.wrap_ttl)
    except ValueError as e:
        raise UsageError(f"setup-vault: {e}") from None
    if period < 1:
        raise UsageError("setup-vault: --token-period must be at least 1s")
    cfg = _config(args)

    def say(line: str) -> None:
        print(line, flush=True)

    want = setup_vault.Want(cfg.vault, args.host_id or cfg.resolved_host_id(),
                            token_period=period, secret_id=_delivery(args, say),
                            new_secret_id=args.new_secret_id)
    client = setup_vault.admin_client(cfg.vault, _admin_token())
    steps = setup_vault.plan(setup_vault.observe(client, want), want)
    if args.dry_run:
        changes = [s for s in steps if not isinstance(s, setup_vault.Unchanged)]
        for s in steps:
            say(s.show() if isinstance(s, setup_vault.Unchanged) else f"would: {s.show()}")
        say(f"dry run: {len(changes)} change(s) planned, none made")
    else:
        setup_vault.execute(client, steps, say)
        n = sum(1 for s in steps if not isinstance(s, setup_vault.Unchanged))
        say(f"{n} change(s) made" if n else "nothing to change: Vault is already set up")
    role_id = setup_vault.read_role_id(client, want)
    say(f"\n# bootkey.toml for host {want.host_id}:")
    sys.stdout.write(setup_vault.config_lines(want, role_id))
    return 0
