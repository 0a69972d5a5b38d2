"""`bootkey policy [--enroll]`: print the Vault HCL policy a booting host (or enrollment)
needs. The text comes from bootkey.policy; this module only picks host and config."""

from __future__ import annotations

import argparse
import os
import sys

from bootkey import config, policy
from bootkey.commands.common import load_config

HELP = """\
Print the least-privilege Vault policy for this host as HCL.

  boot (default): read this host's sealed keys, transit-decrypt with contexts of this host
  --enroll:       also create/update/delete them, encrypt and rewrap (for `bootkey enroll`)

examples:
  bootkey policy | bao policy write bootkey-boot-$(cat /etc/machine-id) -
  bootkey policy --enroll --host-id web-7 | bao policy write bootkey-enroll-web-7 -
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="print the Vault policy bootkey needs",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--enroll", action="store_true",
                   help="the enrollment policy instead of the boot policy")
    p.add_argument("--host-id", help="the host to print it for (default: from the config, "
                                     "else /etc/machine-id)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.config or os.environ.get("BOOTKEY_CONFIG") or config.DEFAULT_PATH.exists():
        cfg = load_config(args)
    else:  # no config yet (a fresh host being prepared): the documented defaults
        cfg = config.Config()
    host = args.host_id or cfg.resolved_host_id()
    make = policy.enroll_policy if args.enroll else policy.boot_policy
    sys.stdout.write(make(cfg.vault, host))
    return 0
