"""`bootkey` command line: parse arguments, call the library, map errors to exit codes.

The single exit point: a `BootkeyError` prints one line (no traceback unless --debug) and
exits with its code; anything else is a bug and exits EX_SOFTWARE with a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Any

from bootkey import __version__
from bootkey_core.errors import BootkeyError

# Subcommand modules under bootkey.commands, in the order `--help` lists them.
_COMMAND_MODULES = (
    "unlock",
    "agent",
    "status",
    "enroll",
    "policy",
    "crypttab",
    "initrd",
    "kes",
    "demo",
    "setup_vault",
    "doctor",
)

EPILOG = """\
examples:
  bootkey unlock --all --check        verify every volume's Vault key, open nothing
  bootkey unlock --all                open every configured or enrolled volume
  bootkey policy                      print the Vault policy a booting host needs
  bootkey status                      what the running agent is doing

configuration: /etc/bootkey/bootkey.toml (--config or $BOOTKEY_CONFIG); see docs/.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootkey",
        description="Unlock LUKS volumes at boot with keys sealed in Vault/OpenBao.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bootkey {__version__}")
    parser.add_argument(
        "--config", metavar="FILE",
        help="config file (default: $BOOTKEY_CONFIG or /etc/bootkey/bootkey.toml)",
    )
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        import_module(f"bootkey.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *,
         after_step: Callable[[Any], None] | None = None) -> int:
    """`after_step` reaches the step executor of enroll/rotate/unenroll/import-vaultlocker
    (bootkey.enroll.execute), which calls it after every step; the shipped entry point
    passes none. The crash tests' launcher (tests/support/killing_bootkey.py) passes one
    that SIGKILLs the process."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.after_step = after_step
    from bootkey import journal

    journal.setup(debug=args.debug)
    try:
        rc: int = args.run(args)
        return rc
    except BootkeyError as e:
        print(f"bootkey: {e}", file=sys.stderr)
        if args.debug:
            logging.getLogger("bootkey").exception("details")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:
        logging.getLogger("bootkey").exception("bootkey: internal error (a bug: please report)")
        return os.EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
