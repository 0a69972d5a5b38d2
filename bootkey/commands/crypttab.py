"""`bootkey crypttab`: print /etc/crypttab and /etc/fstab lines for bootkey's volumes."""

from __future__ import annotations

import argparse
import sys

from bootkey import crypttab, unlock
from bootkey.commands.common import load_config
from bootkey_core.errors import UsageError

HELP = """\
Print the /etc/crypttab and /etc/fstab lines for every configured or enrolled volume,
with the options that keep boot from ever waiting on Vault (_netdev, nofail,
headless=true, device timeouts). Nothing is written: review, then paste.

modes:
  agent    bootkey.service opens the volumes; fstab mounts each one when it appears
  socket   systemd-cryptsetup opens them, reading keys from bootkey's key socket

examples:
  bootkey crypttab                         agent mode, mount points under /mnt
  bootkey crypttab --mode socket           crypttab lines naming the key socket
  bootkey crypttab --mount-root /srv --fstype ext4

See docs/crypttab.md for what each option is for.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("crypttab", help="print crypttab/fstab lines for bootkey volumes",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=[m.value for m in crypttab.Mode], default="agent",
                   help="who opens the volumes (default: agent)")
    p.add_argument("--mount-root", default="/mnt", metavar="DIR",
                   help="fstab mount points are DIR/<volume> (default: /mnt)")
    p.add_argument("--fstype", default="auto", help="fstab file system type (default: auto)")
    p.add_argument("--device-timeout", default="2min", metavar="TIME",
                   help="x-systemd.device-timeout= for each line (default: 2min)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    volumes, failed = unlock.resolve_volumes(cfg)
    for f in failed:
        print(f"bootkey: volume {f.name} ({f.device}): skipped: {f.reason}", file=sys.stderr)
    opts = crypttab.Options(socket_path=str(cfg.keysocket.path), mount_root=args.mount_root,
                            fstype=args.fstype, device_timeout=args.device_timeout)
    try:
        text = crypttab.render(volumes, crypttab.Mode(args.mode), opts)
    except ValueError as e:
        raise UsageError(f"crypttab: {e}") from None
    sys.stdout.write(text)
    return 1 if failed else 0
