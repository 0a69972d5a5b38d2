"""SecretBuffer and process hardening."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from bootkey_core.secret import SecretBuffer


def test_buffer_hides_and_wipes() -> None:
    src = bytearray(b"\x00\n" + bytes(range(62)))
    buf = SecretBuffer.from_bytes(src)
    assert src == bytearray(64)  # the source copy was wiped
    assert repr(buf) == str(buf) == "<SecretBuffer 64 bytes>"
    assert buf.equals(b"\x00\n" + bytes(range(62)))
    with pytest.raises(TypeError):
        bytes(buf)
    with pytest.raises(TypeError):
        pickle.dumps(buf)
    view_of_memory = buf._mm  # the mapping itself, to look after close
    buf.close()
    assert view_of_memory.closed and buf.closed
    with pytest.raises(ValueError, match="closed"):
        _ = buf.view


def test_context_manager_wipes_before_unmapping() -> None:
    with SecretBuffer.random(32) as buf:
        mm = buf._mm
        assert any(buf.view)
    assert mm.closed


def test_buffer_is_excluded_from_core_dumps() -> None:
    buf = SecretBuffer.random(64)
    addr = __import__("ctypes").addressof(__import__("ctypes").c_char.from_buffer(buf._mm))
    smaps = Path("/proc/self/smaps").read_text().split("\n")
    # The mapping that holds the buffer: it may start before it, because the kernel merges
    # neighbouring mappings with the same flags (other live SecretBuffers, say).
    start = None
    for i, line in enumerate(smaps):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                start = i
                break
    assert start is not None
    flags = next(ln for ln in smaps[start:] if ln.startswith("VmFlags:"))
    assert " dd" in flags  # MADV_DONTDUMP
    assert " wf" in flags  # MADV_WIPEONFORK
    buf.close()


def test_require_mlock_without_cap_ipc_lock_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text('host_id = "h"\n')
    res = subprocess.run(
        ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
         sys.executable, "-m", "bootkey.cli", "--config", str(cfg), "unlock", "--all",
         "--check", "--require-mlock"], capture_output=True, text=True, timeout=60,
        check=False)
    assert res.returncode == 71, res.stderr
    assert "cannot lock" in res.stderr and "LimitMEMLOCK=infinity" in res.stderr


def test_without_require_mlock_it_warns_and_goes_on(tmp_path: Path) -> None:
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text('host_id = "h"\n')
    res = subprocess.run(
        ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
         sys.executable, "-m", "bootkey.cli", "--config", str(cfg), "unlock", "--all",
         "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert "memory not locked" in res.stderr
    assert res.returncode == 0, res.stderr  # no volumes: nothing to do, not an error
