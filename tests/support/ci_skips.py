"""In CI, a skipped test fails the run unless it is on the allow-list below.

A skip that nobody reads is a test that quietly stopped running: a missing apt package,
a tool renamed, a fixture that lost its server. `scripts/setup.sh` installs everything the
suite needs on a fresh Debian machine, so under `CI=true` (as `.ci/run` runs) every test
must run, except where the machine itself decides and the test says why.

Each allow-list entry is an fnmatch pattern on the test's node id, with the reason it may
skip in CI. Outside CI (a developer's laptop without qemu, say) skips are reported as
usual and do not fail the run.
"""

from __future__ import annotations

import fnmatch
import os

import pytest

ALLOWED_IN_CI: dict[str, str] = {
    # Opening a volume needs device-mapper; CI machines have none, so this test proves the
    # clear error there. On a machine with device-mapper, tests/vm covers opening instead.
    "tests/test_unlock.py::test_open_without_device_mapper_is_a_clear_error":
        "skips only where device-mapper exists",
    # The fake journald binds /run/systemd/journal/socket; where a real journald runs, the
    # socket is taken and the test must not steal it.
    "tests/test_journal.py::*": "skips only where a real journald owns the socket",
    # Loop devices and uevents need a kernel that lets the container have them; these
    # machines may or may not. The hotplug path is proven in tests/vm either way.
    "tests/test_hotplug.py::*": "skips where loop devices or uevents are not available",
}


def allowed(nodeid: str) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in ALLOWED_IN_CI)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


class SkipGuard:
    def __init__(self) -> None:
        self.unexpected: list[tuple[str, str]] = []

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail") or allowed(report.nodeid):
            return
        reason = ""
        if isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        self.unexpected.append((report.nodeid, reason))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.unexpected:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"CI: {len(self.unexpected)} test(s) skipped that must run in CI "
                 "(install what they need in scripts/setup.sh, or add them to "
                 "tests/support/ci_skips.py ALLOWED_IN_CI with the reason):"]
        lines += [f"  {nodeid}: {reason}" for nodeid, reason in self.unexpected]
        if reporter is not None:
            for line in lines:
                reporter.write_line(line, red=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        config.pluginmanager.register(SkipGuard(), "bootkey-ci-skip-guard")
