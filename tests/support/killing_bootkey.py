"""bootkey's CLI with a crash injected: `python tests/support/killing_bootkey.py
STEP[#N] BOOTKEY-ARGS...` runs `bootkey BOOTKEY-ARGS...` and SIGKILLs itself right after
the Nth step named STEP (default the first), e.g. `AddKeyslot#2` — a power cut at that
step boundary, through the same argument parsing and wiring the shipped CLI has.

The product reads no test intent: this launcher hands the hook to `bootkey.cli.main`'s
`after_step` parameter, which the step executor calls after every step. Run it by path
(it needs only bootkey importable), so it works from any working directory.
"""

from __future__ import annotations

import os
import signal
import sys

from bootkey import cli
from bootkey.enroll import AfterStep, Step


def kill_after(name: str, nth: int = 1) -> AfterStep:
    """An after_step hook that SIGKILLs this process after the nth step called `name`."""
    seen = 0

    def hook(step: Step) -> None:
        nonlocal seen
        if step.name == name:
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def kill_at(spec: str) -> AfterStep:
    """`kill_after` from "STEP" or "STEP#N"."""
    name, _, nth = spec.partition("#")
    return kill_after(name, int(nth or 1))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: killing_bootkey.py STEP[#N] BOOTKEY-ARGS...", file=sys.stderr)
        return 64
    return cli.main(argv[1:], after_step=kill_at(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
