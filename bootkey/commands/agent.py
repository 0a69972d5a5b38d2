"""`bootkey agent`: run as the boot service (Type=notify)."""

from __future__ import annotations

import argparse

from bootkey.agent import Agent
from bootkey.commands.common import load_config

HELP = """\
Run bootkey's boot service: log in to Vault (retrying while it is unreachable or sealed),
unlock every configured or enrolled volume, report READY=1 to systemd, then stay up to
renew the Vault token and serve the crypttab key socket, hotplugged volumes and KES.

Started by bootkey.service; run by hand it logs to stderr. With --check it verifies keys
instead of opening volumes (useful on a machine without device-mapper).
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agent", help="run the boot service (systemd Type=notify)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="verify keys against keyslots instead of opening volumes")
    p.add_argument("--require-mlock", action="store_true",
                   help="exit if memory cannot be locked (default: warn and go on)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return Agent(cfg, check=args.check, require_mlock=args.require_mlock,
                 reload_config=lambda: load_config(args)).run()
