"""`bootkey doctor [--json]`: run bootkey.doctor's checks and print them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bootkey import doctor
from bootkey.commands.common import print_json, table
from bootkey.doctor_checks import Check, Status

HELP = """\
Check everything bootkey needs on this host, each with pass, warn or fail and the fix:
the config; each Vault address (reachable, TLS and CA); AppRole login; the token
(periodic or renewable, TTLs); the policy (sys/capabilities-self for every volume's KV
path and transit decrypt); a second login (re-login possible); clock skew against Vault;
memory locking (RLIMIT_MEMLOCK, the unit's LimitMEMLOCK=); cryptsetup and device-mapper;
the unit enabled; /etc/crypttab and /etc/fstab lines.

Doctor logs in twice and revokes both tokens. It never unwraps a wrapped secret_id and
never removes a secret_id file.

exit status: 0 when nothing failed (warnings allowed), 90 when a check failed, 64/78 on
bad arguments or an unreadable config path. See docs/operations.md.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("doctor", help="check this host's set-up; each problem with its fix",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="read units, crypttab and fstab under DIR (default /)")
    p.set_defaults(run=run)


def render(checks: Sequence[Check]) -> str:
    rows = [["STATUS", "CHECK", "DETAIL"]]
    for c in checks:
        rows.append([c.status.value.upper(), c.name, c.detail])
        if c.fix and c.status is not Status.PASS:
            rows.append(["", "", f"fix: {c.fix}"])
    n = {s: sum(1 for c in checks if c.status is s) for s in Status}
    return (table(rows) + f"\n{n[Status.PASS]} passed, {n[Status.WARN]} warnings, "
            f"{n[Status.FAIL]} failed")


def run(args: argparse.Namespace) -> int:
    checks = doctor.run_checks(args.config, doctor.Where(args.root))
    if args.json:
        print_json([c.as_json() for c in checks])
    else:
        print(render(checks))
    sys.stdout.flush()
    failed = [c.name for c in checks if c.status is Status.FAIL]
    if failed:
        raise doctor.ChecksFailed(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}"
                                  " — apply the fixes listed")
    return 0
