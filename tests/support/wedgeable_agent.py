"""`python -m tests.support.wedgeable_agent ARGS…` runs bootkey's CLI, in a process where
SIGUSR1 wedges the main thread: the handler blocks for ever, as a deadlock in the
agent's main loop would. The agent never installs a SIGUSR1 handler of its own."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from bootkey.cli import main


def _wedge(signum: int, frame: FrameType | None) -> None:
    threading.Event().wait()


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _wedge)
    sys.exit(main())
