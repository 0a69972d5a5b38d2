"""`bootkey unlock`: open (or, with --check, verify) volumes once and exit."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from bootkey import unlock
from bootkey.commands.common import load_config, print_json, table
from bootkey.unlock import Outcome, VolumeResult
from bootkey.vault import VaultSession
from bootkey_core import secret
from bootkey_core.errors import BootkeyError, UsageError

HELP = """\
Fetch each volume's sealed key from Vault, unseal it into locked memory and open the
volume (or, with --check, test the key against its keyslot without activating anything).

Volumes are the [[volume]] entries of the config plus every device that carries this
host's bootkey LUKS2 token (written by `bootkey enroll`).

examples:
  bootkey unlock --all --check     verify every volume; works without device-mapper
  bootkey unlock data logs         open two volumes by name
  bootkey unlock --all --json      machine-readable results

exit status: 0 when every requested volume succeeded; otherwise the failing volume's
code (1 when several failed for different reasons). See docs/errors.md.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("unlock", help="open (or --check) volumes with keys from Vault",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="volume names or devices (default with --all: every volume)")
    p.add_argument("--all", action="store_true", help="every configured or enrolled volume")
    p.add_argument("--check", action="store_true",
                   help="verify keys against their keyslots; activate nothing")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--require-mlock", action="store_true",
                   help="fail if memory cannot be locked (default: warn)")
    p.set_defaults(run=run)


def render(results: Sequence[VolumeResult]) -> str:
    rows = [["VOLUME", "DEVICE", "RESULT", "TIME"]]
    for r in results:
        what = r.outcome.value if r.ok else f"FAILED: {r.reason}"
        if r.ok and r.keyslot is not None:
            what += f" (keyslot {r.keyslot})"
        rows.append([r.name, r.device, what, f"{r.seconds:.2f}s"])
    ok = sum(1 for r in results if r.ok)
    return table(rows) + f"\n{ok}/{len(results)} volumes ok"


def run(args: argparse.Namespace) -> int:
    if not args.all and not args.names:
        raise UsageError("unlock: name the volumes to unlock, or pass --all")
    if args.all and args.names:
        raise UsageError("unlock: give either --all or volume names, not both")
    cfg = load_config(args)
    secret.harden_process(require_mlock=args.require_mlock)
    t_start = time.monotonic()
    deadline_at = t_start + cfg.unlock.deadline
    volumes, failed = unlock.resolve_volumes(cfg, names=args.names or None)
    if not volumes and not failed:
        print("no volumes: nothing configured and no device carries a bootkey token",
              file=sys.stderr)
        return 0
    results: list[VolumeResult] = list(failed)
    if volumes:
        session = VaultSession.from_config(cfg)
        try:
            session.login()
        except BootkeyError as e:
            results += [VolumeResult(v.name, v.device, Outcome.FAILED, v.luks_uuid,
                                     reason=str(e), exit_code=e.exit_code, error=e)
                        for v in volumes]
        else:
            results += unlock.unlock_all(session, volumes, check=args.check,
                                         parallel=cfg.unlock.parallel,
                                         deadline_at=deadline_at)
    if args.json:
        print_json({"volumes": [r.as_json() for r in results],
                    "seconds": round(time.monotonic() - t_start, 4)})
    else:
        print(render(results))
    err = unlock.summarize(results)
    if err is None:
        return 0
    if not args.json:
        print(f"bootkey: {err}", file=sys.stderr)
    return err.exit_code
