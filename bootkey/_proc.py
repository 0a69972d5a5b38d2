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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _env() -> dict[str, str]:
    env = dict(_ENV)
    path = os.environ.get("PATH")
    if path:
        env["PATH"] = path
    return env


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
    env = _env()
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


@contextmanager
def spawned(
    argv: Sequence[str],
    *,
    output: Path,
    env: Mapping[str, str] | None = None,
    stop_timeout: float = 10.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a long-lived child (a server) for the duration of the `with` block.

    Same environment rule as `run` (plus `env`); stdout and stderr go to `output`. On
    leaving the block the child gets SIGTERM, then SIGKILL after `stop_timeout` seconds:
    it never outlives its owner's block."""
    full = {**_env(), **(env or {})}
    log.debug("spawn %s", " ".join(argv))
    with open(output, "ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=full, close_fds=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
