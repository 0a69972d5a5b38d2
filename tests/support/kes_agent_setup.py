"""An agent with the embedded KES endpoint, as tests set it up: a keystore policy on
the host's AppRole role, a server certificate, a MinIO-like client certificate, and the
`[kes]` TOML with a `minio` policy."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from kes.identity import of_certificate
from tests.kes.server_util import Pki
from tests.support.bao import DevBao, free_port
from tests.support.certs import make_leaf
from tests.support.vaultenv import VaultEnv

MINIO_ALLOW = ("/v1/key/create/minio-*", "/v1/key/generate/minio-*", "/v1/key/decrypt/minio-*")


@dataclass
class KesAgent:
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
        return f"""
[kes]
enabled = true
address = "127.0.0.1:{self.port}"
[kes.admin]
identity = "disabled"
[kes.tls]
cert = "{self.srv_cert}"
key = "{self.srv_key}"
[kes.policy.minio]
allow = [{", ".join(f'"{a}"' for a in allow)}]
identities = ["{self.identity}"]
[kes.keystore.vault]
engine = "secret"
version = "v2"
prefix = "{self.prefix}"
"""

    def curl(self, path: str, body: str | None = None) -> tuple[int, str]:
        """(status, body) of a request as the MinIO client."""
        return curl(self.pki, self.cli_cert, self.cli_key, f"{self.base}{path}", body)


def curl(pki: Pki, cert: Path, key: Path, url: str, body: str | None = None) -> tuple[int, str]:
    args = ["curl", "-sS", "--cacert", str(pki.ca_file), "--cert", str(cert), "--key", str(key),
            "-o", "-", "-w", "\n%{http_code}", url]
    if body is not None:
        args += ["-X", "POST", "--data-binary", body]
    out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


def kes_agent(env: VaultEnv, bao: DevBao, tmp_path: Path) -> KesAgent:
    root = bao.client()
    prefix = f"kes-{env.host_id}"
    root.sys.create_or_update_policy(prefix, (
        f'path "secret/data/{prefix}/*" {{ capabilities = ["create", "read"] }}\n'
        f'path "secret/metadata/{prefix}/*" {{ capabilities = ["list", "read"] }}\n'))
    role = f"bootkey-boot-{env.host_id}"
    root.auth.approle.create_or_update_approle(role, token_policies=[role, prefix],
                                               token_ttl="1h")
    pki = Pki.create(tmp_path)
    srv_cert, srv_key = pki.write_client(pki.server, "server")
    client = make_leaf(None, "minio", kind="ed25519", client=True)  # self-signed, as MinIO's
    cli_cert, cli_key = pki.write_client(client, "minio")
    return KesAgent(pki, srv_cert, srv_key, cli_cert, cli_key, of_certificate(client.cert),
                    prefix, free_port())
