"""`python -m tests.support.wedgeable_agent ARGS…` runs bootkey's CLI in a process where
a signal wedges one of the agent's real loops, as a deadlock there would:

- SIGUSR1: the main thread (its handler blocks for ever);
- SIGUSR2: the embedded KES server's event loop (a callback that blocks for ever is
  put on it, like a handler that never yields).

The agent installs no handler for either signal."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading
from types import FrameType

from bootkey.cli import main


def _block(*_: object) -> None:
    threading.Event().wait()


def _wedge_event_loop(signum: int, frame: FrameType | None) -> None:
    loops = [o for o in gc.get_objects()
             if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    for loop in loops:  # the agent's only running loop is KES's
        loop.call_soon_threadsafe(_block)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _block)
    signal.signal(signal.SIGUSR2, _wedge_event_loop)
    sys.exit(main())
