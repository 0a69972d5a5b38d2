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

from kes.identity import of_certificate
from tests.kes.server_util import Pki
from tests.support.bao import DevBao, free_port
from tests.support.certs import make_leaf
from tests.support.notify import NotifyListener
from tests.support.vaultenv import VaultEnv


def curl(pki: Pki, cert: Path, key: Path, url: str, body: str | None = None) -> tuple[int, str]:
    args = ["curl", "-sS", "--cacert", str(pki.ca_file), "--cert", str(cert), "--key", str(key),
            "-o", "-", "-w", "\n%{http_code}", url]
    if body is not None:
        args += ["-X", "POST", "--data-binary", body]
    out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


def test_agent_serves_kes_with_keys_in_vault(vault_env2: VaultEnv, bao: DevBao,
                                             tmp_path: Path) -> None:
    root = bao.client()
    prefix = f"kes-{vault_env2.host_id}"
    root.sys.create_or_update_policy(f"kes-{vault_env2.host_id}", (
        f'path "secret/data/{prefix}/*" {{ capabilities = ["create", "read"] }}\n'
        f'path "secret/metadata/{prefix}/*" {{ capabilities = ["list", "read"] }}\n'))
    role = f"bootkey-boot-{vault_env2.host_id}"
    root.auth.approle.create_or_update_approle(
        role, token_policies=[role, f"kes-{vault_env2.host_id}"], token_ttl="1h")
    pki = Pki.create(tmp_path)
    srv_cert, srv_key = pki.write_client(pki.server, "server")
    client = make_leaf(None, "minio", kind="ed25519", client=True)  # self-signed, as MinIO's
    cli_cert, cli_key = pki.write_client(client, "minio")
    port = free_port()
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(f"""
[kes]
enabled = true
address = "127.0.0.1:{port}"
[kes.admin]
identity = "disabled"
[kes.tls]
cert = "{srv_cert}"
key = "{srv_key}"
[kes.policy.minio]
allow = ["/v1/key/create/minio-*", "/v1/key/generate/minio-*", "/v1/key/decrypt/minio-*"]
identities = ["{of_certificate(client.cert)}"]
[kes.keystore.vault]
engine = "secret"
version = "v2"
prefix = "{prefix}"
"""))
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
