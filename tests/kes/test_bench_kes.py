"""The KES benchmark scripts run end to end (tiny runs; the numbers are not checked)."""

from __future__ import annotations

import shutil

import pytest

from bench import kes as bench_kes
from bench import kes_stdlib_tls as bench_stdlib_tls

needs_load_tools = pytest.mark.skipif(
    shutil.which("ab") is None or shutil.which("nginx") is None or shutil.which("go") is None,
    reason="ab/nginx/go come from scripts/setup.sh")


@pytest.mark.slow
@needs_load_tools
def test_bench_quick_runs_against_the_full_endpoint_and_nginx(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_kes.main(["--quick", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "| bootkey, 1 worker | generate |" in out  # ab, HTTP/1.1
    assert "| nginx, 1 worker | static JSON |" in out
    # The MinIO-shaped Go client: h2 to bootkey and nginx, and bootkey offering only HTTP/1.1.
    assert "| bootkey, 1 worker, h2 | decrypt |" in out
    assert "| bootkey, 1 worker, HTTP/1.1 only (before) | generate |" in out
    assert "| nginx, 1 worker, h2 | static JSON |" in out
    assert "in-process server CPU per request (full h2)" in out
    assert "TRIVIAL" not in out  # kes.service is there: the full endpoint was measured


@pytest.mark.slow
@needs_load_tools
def test_stdlib_tls_probe_runs_and_its_server_takes_self_signed_clients_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The probe refuses to measure (SystemExit) unless its stdlib server accepts a
    # self-signed Ed25519 client and refuses a client without a certificate: its figures
    # in docs/benchmarks.md are only worth something for a server that meets that.
    assert bench_stdlib_tls.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| kes.tls_session |" in out
    assert "| stdlib ssl |" in out
