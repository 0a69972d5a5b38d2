"""`bootkey agent` with its embedded KES endpoint, as tests set it up: a keystore prefix
the host's AppRole may use (`grant_kes`), a server certificate and a MinIO-like
self-signed client certificate with the `[kes]` TOML naming them (`KesSetup`,
`kes_setup`), an agent started on that config and called over kept-alive mTLS as MinIO
does (`start_kes_agent`, `KesAgent`), and the agent's own Vault token (`agent_token`)."""

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
from tests.support.bao import DevBao, free_port
from tests.support.certs import make_leaf
from tests.support.notify import NotifyListener
from tests.support.vaultenv import VaultEnv

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


MINIO_ALLOW = ("/v1/key/create/minio-*", "/v1/key/generate/minio-*", "/v1/key/decrypt/minio-*")


@dataclass
class KesSetup:
    """What a `[kes]` section names: certificates, the MinIO client's identity, a port."""

    pki: Pki
    srv_cert: Path
    srv_key: Path
    cli_cert: Path
    cli_key: Path
    identity: str
    prefix: str
    port: int

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def toml(self, allow: tuple[str, ...] = MINIO_ALLOW) -> str:
        return (f'[kes]\nenabled = true\naddress = "127.0.0.1:{self.port}"\n'
                'admin = { identity = "disabled" }\n'
                f'tls = {{ cert = "{self.srv_cert}", key = "{self.srv_key}" }}\n'
                f"policy.minio = {{ allow = {json.dumps(list(allow))}, "
                f'identities = ["{self.identity}"] }}\n'
                f'keystore.vault = {{ engine = "secret", version = "v2", '
                f'prefix = "{self.prefix}" }}\n')

    def curl(self, path: str, body: str | None = None) -> tuple[int, str]:
        """(status, body) of a request as the MinIO client."""
        return curl(self.pki, self.cli_cert, self.cli_key, f"{self.base}{path}", body)


def kes_setup(tmp: Path, prefix: str) -> KesSetup:
    pki = Pki.create(tmp)
    srv_cert, srv_key = pki.write_client(pki.server, "server")
    client = make_leaf(None, "minio", kind="ed25519", client=True)  # self-signed, as MinIO's
    cli_cert, cli_key = pki.write_client(client, "minio")
    return KesSetup(pki, srv_cert, srv_key, cli_cert, cli_key, of_certificate(client.cert),
                    prefix, free_port())


def kes_agent(env: VaultEnv, bao: DevBao, tmp_path: Path) -> KesSetup:
    """A keystore prefix granted to the env's host and a `[kes]` section for it."""
    return kes_setup(tmp_path, grant_kes(bao.client(), env.host_id))


def curl(pki: Pki, cert: Path, key: Path, url: str, body: str | None = None) -> tuple[int, str]:
    args = ["curl", "-sS", "--cacert", str(pki.ca_file), "--cert", str(cert), "--key", str(key),
            "-o", "-", "-w", "\n%{http_code}", url]
    if body is not None:
        args += ["-X", "POST", "--data-binary", body]
    out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


def start_kes_agent(tmp: Path, config: Callable[[str], str], prefix: str,
                    start: Callable[[Path, NotifyListener], subprocess.Popen[str]],
                    extra: str = "") -> KesAgent:
    """Write `config(kes_section + extra)` and start the agent with `start`; returns once
    it is READY."""
    kes = kes_setup(tmp, prefix)
    cfg_file = tmp / "bootkey.toml"
    cfg_file.write_text(config(kes.toml() + extra))
    notify = NotifyListener(tmp / "notify.sock")
    proc = start(cfg_file, notify)
    notify.wait_for(lambda m: m == "READY=1")
    return KesAgent(proc, notify, kes.base, kes.pki, kes.cli_cert, kes.cli_key)


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
