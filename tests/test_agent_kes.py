"""`bootkey agent` with `[kes] enabled = true`: the embedded KES endpoint serves over mTLS
and keeps its master keys in Vault through the agent's own AppRole session."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.bao import DevBao
from tests.support.kesagent import curl, kes_agent
from tests.support.notify import NotifyListener
from tests.support.vaultenv import VaultEnv


def test_agent_serves_kes_with_keys_in_vault(vault_env2: VaultEnv, bao: DevBao,
                                             tmp_path: Path) -> None:
    root = bao.client()
    ka = kes_agent(vault_env2, bao, tmp_path)
    prefix, port = ka.prefix, ka.port
    pki, cli_cert, cli_key = ka.pki, ka.cli_cert, ka.cli_key
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(ka.toml()))
    notify = NotifyListener(tmp_path / "notify.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bootkey.cli", "--config", str(cfg_file), "agent", "--check"],
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        base = f"https://127.0.0.1:{port}"
        assert curl(pki, cli_cert, cli_key, f"{base}/v1/key/create/minio-k", "") == (200, "")
        code, body = curl(pki, cli_cert, cli_key, f"{base}/v1/key/generate/minio-k",
                          json.dumps({"context": base64.b64encode(b"ctx").decode()}))
        assert code == 200, body
        dek = json.loads(body)
        code, body = curl(pki, cli_cert, cli_key, f"{base}/v1/key/decrypt/minio-k",
                          json.dumps({"ciphertext": dek["ciphertext"],
                                      "context": base64.b64encode(b"ctx").decode()}))
        assert code == 200 and json.loads(body)["plaintext"] == dek["plaintext"]
        code, body = curl(pki, cli_cert, cli_key, f"{base}/v1/key/create/other", "")
        assert (code, json.loads(body)) == \
            (403, {"message": "not authorized: insufficient permissions"})
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        notify.close()
    assert proc.returncode == 0, err
    # the master key went to Vault through the agent's session, in KES's layout
    stored = root.secrets.kv.v2.read_secret_version(f"{prefix}/minio-k", mount_point="secret",
                                                    raise_on_deleted_version=True)
    assert list(stored["data"]["data"]) == ["minio-k"]
