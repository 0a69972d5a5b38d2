"""Enroll, rotate, unenroll and rewrap: declared step sequences, planned from observed
state, run by a separate executor.

Invariant: at every instant the volume opens with a key Vault holds (or with the key the
operator already had), and Vault keeps every key a keyslot uses.

The modules, in the order a run goes through them (STYLE rules 3-5, 20):
- `steps`: the steps as data and the declared sequences `ENROLL`, `ENROLL_FORMAT`,
  `ROTATE`, `RECOVER` (rotate --unlock-key-file after exit 81), `UNENROLL`; each step
  says what remains if the process dies right after it.
- `observe`: the header and the Vault entry as a plain `View` (which Vault key opens
  which keyslot).
- `plan`: pure planners from a `View` to a `Plan`. A half-done state plans to the rest of
  the sequence, so a crashed run resumes by observing and planning again; no journal.
- `execute` (with `run`, the state the steps share): runs the steps, calls `after_step`
  after each; `rollback` undoes a failure before the commit point (`Activate`).
- `rundir`: the root-only run directory (header backups, device locks); `blank`: the
  checks before `--format`.
- `operations`: `enroll`, `rotate`, `unenroll` as the CLI calls them.

docs/enroll.md walks through every crash point and what re-running does. The names below
are what callers outside this package use.
"""

from bootkey.enroll import steps
from bootkey.enroll.execute import execute
from bootkey.enroll.observe import KeyView, View, location_of, observe
from bootkey.enroll.operations import Outcome, enroll, rotate, unenroll
from bootkey.enroll.plan import (
    MAX_KEYSLOTS,
    free_keyslot,
    plan_enroll,
    plan_format,
    plan_rewrap,
    plan_rotate,
    plan_unenroll,
)
from bootkey.enroll.run import Run
from bootkey.enroll.rundir import RunDir
from bootkey.enroll.steps import *  # noqa: F403  (the steps, sequences and Plan)

__all__ = [
    "MAX_KEYSLOTS", "KeyView", "Outcome", "Run", "RunDir", "View", "enroll", "execute",
    "free_keyslot", "location_of", "observe", "plan_enroll", "plan_format", "plan_rewrap",
    "plan_rotate", "plan_unenroll", "rotate", "unenroll",
]
__all__ += steps.__all__
