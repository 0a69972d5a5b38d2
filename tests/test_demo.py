"""The README's first command: `bootkey demo` does the whole job and cleans up."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_enrolls_verifies_rotates_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "BOOTKEY_DEMO_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "bootkey.cli", "demo"], capture_output=True,
                         text=True, timeout=180, env=env, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "3/3 volumes ok" in out
    # Vault was set up by `bootkey setup-vault`, as an operator would, with a periodic token
    assert "2. bootkey setup-vault" in out and "7 change(s) made" in out
    assert "changed    role approle/role/bootkey-boot-" in out
    for name in ("data", "logs", "backup"):
        assert f"enrolled {name}" in out
    assert "bootkey rotate data" in out and "verified (keyslot 2)" in out
    assert list(tmp_path.iterdir()) == []  # work dir, images, credentials: all gone
    # the dev server is gone too
    m = re.search(r"OpenBao dev server on http://127.0.0.1:(\d+)", out)
    assert m, out
    port = int(m.group(1))
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
