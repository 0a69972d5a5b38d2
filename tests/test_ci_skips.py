"""The CI skip guard: a skipped test fails a CI run unless the allow-list names it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ci_skips

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("tool missing")
'''


def _run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.support.ci_skips",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path, env=env)


def test_an_unlisted_skip_fails_a_ci_run_and_names_the_test(tmp_path: Path) -> None:
    res = _run_pytest(tmp_path, ci="true")
    assert res.returncode == 1, res.stdout
    assert "test_sample.py::test_skips: " in res.stdout
    assert "tool missing" in res.stdout
    assert "ALLOWED_IN_CI" in res.stdout


def test_outside_ci_a_skip_is_only_reported(tmp_path: Path) -> None:
    res = _run_pytest(tmp_path, ci=None)
    assert res.returncode == 0, res.stdout
    assert "1 passed, 1 skipped" in res.stdout


def test_the_allow_list_matches_node_ids_by_pattern() -> None:
    assert ci_skips.allowed("tests/test_journal.py::test_anything[x]")
    assert not ci_skips.allowed("tests/test_systemd_units.py::test_units_verify")
    for pattern, reason in ci_skips.ALLOWED_IN_CI.items():
        assert pattern.startswith("tests/") and reason, pattern
