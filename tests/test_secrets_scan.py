"""No key in logs, output or files: run enroll-like setup, `unlock --check` and the
agent with a known key, then search everything they produced for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bootkey_core.secret import SecretBuffer
from tests.support.bao import DevBao
from tests.support.luksimg import enroll_direct, make_image
from tests.support.notify import NotifyListener
from tests.support.scan import files_under, find_key
from tests.support.vaultenv import VaultEnv


def test_known_key_never_printed_logged_or_written(vault_env2: VaultEnv, tmp_path: Path,
                                                   bao: DevBao) -> None:
    keys = [os.urandom(64) for _ in range(2)]
    cfg = vault_env2.config()
    vols = tmp_path / "vols"
    vols.mkdir()
    for i, k in enumerate(keys):
        enroll_direct(cfg, vault_env2.enroll_token, make_image(vols / f"s{i}.img"),
                      name=f"s{i}", key=SecretBuffer.from_bytes(bytearray(k)))
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml().replace(
        "[unlock]\n", f'[unlock]\nsearch = ["{vols}/*.img"]\n'))
    outputs: list[tuple[str, bytes]] = []
    for args in (["unlock", "--all", "--check"], ["unlock", "--all", "--check", "--json"],
                 ["--debug", "unlock", "--all", "--check"]):
        res = subprocess.run([sys.executable, "-m", "bootkey.cli", "--config", str(cfg_file),
                              *args], capture_output=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        outputs += [(f"{args} stdout", res.stdout), (f"{args} stderr", res.stderr)]
    notify = NotifyListener(tmp_path / "notify.sock")
    agent = subprocess.Popen(
        [sys.executable, "-m", "bootkey.cli", "--debug", "--config", str(cfg_file), "agent",
         "--check"], env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        environ = Path(f"/proc/{agent.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=20)
        notify.close()
    outputs += [("agent stdout", out), ("agent stderr", err), ("agent environ", environ),
                ("agent argv", cmdline),
                ("sd_notify", "\n".join(notify.messages).encode())]
    # the images hold the key only wrapped by the keyslot's KDF; everything else is text
    blobs = outputs + list(files_under(tmp_path, skip_suffixes=(".img",)))
    blobs += list(files_under(bao.workdir))
    for k in keys:
        assert find_key(k, blobs) == []
    # and the scanner does find a key where there is one
    assert find_key(keys[0], [("probe", keys[0].hex().encode())]) == ["probe: hex"]
