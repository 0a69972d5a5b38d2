"""The KES benchmark script runs end to end (tiny runs; the numbers are not checked)."""

from __future__ import annotations

import shutil

import pytest

from bench import kes as bench_kes


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ab") is None or shutil.which("nginx") is None,
                    reason="ab/nginx come from scripts/setup.sh")
def test_bench_quick_runs_against_the_full_endpoint_and_nginx(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_kes.main(["--quick", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "| bootkey, 1 worker | generate |" in out
    assert "| nginx, 1 worker | static JSON |" in out
    assert "TRIVIAL" not in out  # kes.service is there: the full endpoint was measured
