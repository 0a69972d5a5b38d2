"""The declared import rules (pyproject.toml [tool.importlinter]) hold for the tree.

They keep the layers honest: bootkey_core at the bottom, kes never importing bootkey,
only cli/commands/agent wiring, and the protocol cores free of sockets, subprocesses,
TLS and Vault clients so they stay testable on plain values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout
