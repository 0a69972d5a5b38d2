"""`bootkey agent` with its embedded KES endpoint, for tests that fault the Vault behind
it: start it on a given config, call KES over kept-alive mTLS as MinIO does, and find the
agent's own Vault token (to revoke it, or to watch it being renewed)."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import requests

from kes.identity import of_certificate
from tests.kes.server_util import Pki
from tests.support.bao import free_port
from tests.support.certs import make_leaf
from tests.support.notify import NotifyListener

CONTEXT = {"context": base64.b64encode(b"bucket/object").decode()}


@dataclass
class KesAgent:
    proc: subprocess.Popen[str]
    notify: NotifyListener
    base: str
    pki: Pki
    cert: Path
    key: Path
    http: requests.Session = field(default_factory=requests.Session)

    def call(self, path: str, body: dict[str, str]) -> tuple[int, str]:
        """One KES call on a kept-alive mTLS connection: calls follow each other within
        milliseconds, as a MinIO's do."""
        r = self.http.post(self.base + path, data=json.dumps(body), timeout=20,
                           cert=(str(self.cert), str(self.key)), verify=str(self.pki.ca_file))
        return r.status_code, r.text

    def create_and_generate(self, name: str) -> dict[str, str]:
        assert self.call(f"/v1/key/create/{name}", {}) == (200, "")
        code, body = self.call(f"/v1/key/generate/{name}", CONTEXT)
        assert code == 200, body
        dek: dict[str, str] = json.loads(body)
        return dek

    def decrypt(self, name: str, dek: dict[str, str]) -> tuple[int, str]:
        return self.call(f"/v1/key/decrypt/{name}", {"ciphertext": dek["ciphertext"], **CONTEXT})

    def decrypts(self, name: str, dek: dict[str, str]) -> bool:
        code, body = self.decrypt(name, dek)
        return code == 200 and json.loads(body)["plaintext"] == dek["plaintext"]


def grant_kes(root: hvac.Client, host_id: str) -> str:
    """A KES keystore prefix (KV v2 at secret/) the host's boot AppRole may use; its
    policy is named like the prefix."""
    prefix = f"kes-{host_id}"
    root.sys.create_or_update_policy(prefix, (
        f'path "secret/data/{prefix}/*" {{ capabilities = ["create", "read"] }}\n'
        f'path "secret/metadata/{prefix}/*" {{ capabilities = ["list", "read"] }}\n'))
    role = f"bootkey-boot-{host_id}"
    root.auth.approle.create_or_update_approle(role, token_policies=[role, prefix])
    return prefix


def start_kes_agent(tmp: Path, config: Callable[[str], str], prefix: str,
                    start: Callable[[Path, NotifyListener], subprocess.Popen[str]],
                    extra: str = "") -> KesAgent:
    """Write `config(kes_section + extra)` and start the agent with `start`; returns once
    it is READY."""
    pki = Pki.create(tmp)
    srv_cert, srv_key = pki.write_client(pki.server, "server")
    client = make_leaf(None, "minio", kind="ed25519", client=True)
    cli_cert, cli_key = pki.write_client(client, "minio")
    port = free_port()
    allow = [f"/v1/key/{op}/minio-*" for op in ("create", "generate", "decrypt")]
    kes = (f'[kes]\nenabled = true\naddress = "127.0.0.1:{port}"\n'
           'admin = { identity = "disabled" }\n'
           f'tls = {{ cert = "{srv_cert}", key = "{srv_key}" }}\n'
           f"policy.minio = {{ allow = {json.dumps(allow)}, "
           f'identities = ["{of_certificate(client.cert)}"] }}\n'
           f'keystore.vault = {{ engine = "secret", version = "v2", prefix = "{prefix}" }}\n')
    cfg_file = tmp / "bootkey.toml"
    cfg_file.write_text(config(kes + extra))
    notify = NotifyListener(tmp / "notify.sock")
    proc = start(cfg_file, notify)
    notify.wait_for(lambda m: m == "READY=1")
    return KesAgent(proc, notify, f"https://127.0.0.1:{port}", pki, cli_cert, cli_key)


def agent_token(root: hvac.Client, role: str, since: float) -> dict[str, Any]:
    """The lookup of the one live token `role` issued at or after `since` (wall clock,
    whole seconds): the agent's, when only the agent logs in with that role."""
    found: list[dict[str, Any]] = []
    for acc in root.list("auth/token/accessors")["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(acc)["data"]
        except hvac.exceptions.VaultError:
            continue  # expired meanwhile
        if (data.get("meta") or {}).get("role_name") == role and data["creation_time"] >= since:
            found.append(data)
    assert len(found) == 1, f"expected the agent's token only, found {len(found)}"
    return found[0]
