"""`bootkey initrd`: print what the operator sets to open the root volume in the initrd."""

from __future__ import annotations

import argparse
import sys

from bootkey import initrd, unlock
from bootkey.commands.common import load_config
from bootkey_core.errors import UsageError

HELP = """\
Print the /etc/crypttab line (x-initrd.attach, keyfile = bootkey's initrd key socket),
the dracut configuration and the kernel command line that open the root volume in the
initrd with its key from Vault, and how the secret_id in the initrd is protected.
Nothing is written: review, then paste.

examples:
  bootkey initrd                       the volume named "root" (or the only one)
  bootkey initrd --name cryptroot --ip eth0:dhcp

See docs/initrd.md.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("initrd", help="print the set-up that opens the root volume in the initrd",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help='the root volume (default: "root", or the only volume)')
    p.add_argument("--ip", default="dhcp",
                   help="the kernel's ip= for the initrd's network (default: dhcp)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    volumes, _failed = unlock.resolve_volumes(cfg)
    by_name = {v.name: v for v in volumes}
    if args.name:
        vol = by_name.get(args.name)
    elif "root" in by_name:
        vol = by_name["root"]
    else:
        vol = volumes[0] if len(volumes) == 1 else None
    if vol is None:
        known = ", ".join(sorted(by_name)) or "none"
        raise UsageError(f"initrd: no volume {args.name or 'root'!r} (volumes: {known}) — "
                         "enroll the root device with `bootkey enroll DEVICE --name root` "
                         "or pass --name")
    s = initrd.root_setup(vol.name, vol.luks_uuid, ip=args.ip)
    sys.stdout.write(
        "# /etc/crypttab — systemd-cryptsetup in the initrd reads the key from bootkey\n"
        f"{s.crypttab}\n\n"
        "# /etc/dracut.conf.d/bootkey.conf — then: dracut -f\n"
        f"{s.dracut_conf}\n"
        "# kernel command line (e.g. GRUB_CMDLINE_LINUX in /etc/default/grub)\n"
        f"{s.kernel_cmdline}\n\n"
        f"# secret_id: {initrd.secret_id_sealing(cfg)}\n"
    )
    return 0
