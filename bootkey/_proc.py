"""The one place bootkey runs a subprocess.

Every call has a timeout (boot must never hang on a stuck tool), a minimal environment
(`PATH` and `LC_ALL=C`, so messages are parseable and no secret leaks in through the
environment), stdin from `DEVNULL` unless the caller passes bytes, and the child is
killed if anything goes wrong on our side. Secret input goes on stdin only, never argv.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str


class ProcTimeout(Exception):
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{argv[0]}: no answer within {timeout:g} s")
        self.argv = tuple(argv)


def run(
    argv: Sequence[str],
    *,
    stdin: bytes | bytearray | memoryview | None = None,
    timeout: float = 60.0,
) -> Completed:
    """Run argv; return its exit code and output. Never raises on a non-zero exit.

    `stdin` may hold a key: it is written to a pipe and never stored by this function.
    """
    env = dict(_ENV)
    path = os.environ.get("PATH")
    if path:
        env["PATH"] = path
    log.debug("run %s", " ".join(argv))
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        close_fds=True,
    ) as proc:
        try:
            out, err = proc.communicate(
                # bytearray/memoryview go straight to the pipe: no extra copy of a key
                input=stdin, timeout=timeout  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ProcTimeout(argv, timeout) from None
        except BaseException:
            proc.kill()
            raise
    return Completed(tuple(argv), proc.returncode, out, err.decode("utf-8", "replace"))
