"""`bootkey status`: ask the running agent what it is doing, or say it is not running."""

from __future__ import annotations

import argparse

from bootkey import control, status
from bootkey.commands.common import load_config, print_json

HELP = """\
Show what the agent is doing: each volume (LUKS UUID, device, state, last result and
when), the Vault session (address, token TTL, secret_id source, whether it can log in
again), the key socket, hotplug and KES. The agent answers on its control socket
([control] path, root only).

When no agent runs, it shows what the config and the LUKS headers say and exits 3.

examples:
  bootkey status              the table
  bootkey status --json       the same as JSON, for monitoring

exit status: 0 agent running; 3 agent not running; 78 config error.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="what the running agent is doing",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    rc = 0
    try:
        snap = control.ask(cfg.control.path, "status")["status"]
    except control.AgentNotRunning as e:
        snap, rc = status.offline(cfg), e.exit_code
    if args.json:
        print_json(snap)
    else:
        print(status.render(snap))
    return rc
