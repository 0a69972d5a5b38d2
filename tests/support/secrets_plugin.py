"""Whole-suite secrets scan (issue #14.5): at the end of every pytest run, look for every
registered secret in everything the run produced; a hit fails the run.

Registered secrets: every key a test creates or unseals and the credentials the suite
hands out — `tests.support.scan.register_secret(buf, "what")` from helpers
(`luksimg.enroll_direct`, `vaultenv.provision`, the KES fuzz keys), or the session fixture
`secrets_registry` from tests.

Scanned, for each secret in raw, hex, HEX, base64, base64url and repr form (a run of half
the encoded length is enough):
- every test report: pytest's captured stdout, stderr and log sections, and the failure
  text (`longrepr`), i.e. whatever a CI log would show;
- every file under the run's tmp_path_factory base dir (the tmp_path of each test, the
  session `bao` server's workdir and log) and under directories registered with
  `secrets_registry.watch(dir)`. LUKS images and files over 64 MiB are not read.

What counts as a leak: any hit in captured output, and any hit in a file, except a test's
own input or a secret's declared home. A file is a test input when test code (tests/ or
bench/, in the pytest process) opened it for writing and it holds exactly one secret and
nothing else (whitespace aside): a key file handed to cryptsetup, an operator's
passphrase file. A declared home is the file a test asked the product to write a secret
to (`register(secret, what, home=path)`: the secret_id file `setup-vault` writes), again
holding that one secret and nothing else. Any other file the product wrote — a bootkey
or KES subprocess, bootkey/kes code running in-process, bao — and any log the test opened
for a subprocess to write into is a leak if it holds a secret, whatever else it holds.

The report names the file or test and section, the secret's label and the encoding; never
the secret. The scanner's own behaviour is proven by tests/test_secrets_scan.py on planted
leaks, not by leaking in the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.scan import REGISTRY, Leak, SecretsRegistry

_captured: list[tuple[str, bytes]] = []
_leaks: list[Leak] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and len(args) == 3:
        REGISTRY.note_open(*args)


_hook_installed = False


def pytest_configure(config: pytest.Config) -> None:
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: once per process
        sys.addaudithook(_audit)
        _hook_installed = True


@pytest.fixture(scope="session")
def secrets_registry() -> SecretsRegistry:
    """The run's registry: `register(key, "what")` for every key a test makes or unseals."""
    return REGISTRY


@pytest.fixture(scope="session", autouse=True)
def _scan_tmp_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    REGISTRY.watch(tmp_path_factory.getbasetemp())


def report_blobs(report: pytest.TestReport) -> list[tuple[str, bytes]]:
    """What a test report shows: captured sections and the failure text."""
    out = [(f"{report.nodeid} [{report.when}] {title}", text.encode("utf-8", "replace"))
           for title, text in report.sections]
    if report.longrepr is not None:
        out.append((f"{report.nodeid} [{report.when}] failure text",
                    report.longreprtext.encode("utf-8", "replace")))
    return out


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _captured.extend(report_blobs(report))


def scan_run(registry: SecretsRegistry, captured: list[tuple[str, bytes]],
             roots: list[Path]) -> list[Leak]:
    """Every leak of a registered secret in the captured output or the files."""
    return registry.scan(captured) + registry.scan_files(roots)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REGISTRY.secrets:
        return
    _leaks.extend(scan_run(REGISTRY, _captured, list(REGISTRY.watched_dirs)))
    if _leaks and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REGISTRY.secrets:
        return
    if not _leaks:
        terminalreporter.write_line(
            f"secrets scan: {len(REGISTRY.secrets)} secrets, no leak")
        return
    terminalreporter.section("secrets scan: LEAKS", sep="=", red=True, bold=True)
    for leak in _leaks:
        terminalreporter.write_line(f"LEAK {leak}")
