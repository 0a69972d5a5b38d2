"""`bootkey agent` keeps its Vault access past many token max TTLs (issue #12.2), with
every secret_id source, while KES serves without a key cache and at the end a newly
attached image still unlocks; and it warns at start when it can foresee losing access.

The role gives tokens `token_ttl=2s`, `token_max_ttl=5s`. The four agents (one per
secret_id source) run side by side against one OpenBao, so ten max-TTL cycles of each
take one minute of wall time, not four.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import hvac

from kes.identity import of_certificate
from tests.kes.server_util import Pki
from tests.support.bao import DevBao, free_port
from tests.support.certs import make_leaf
from tests.support.luksimg import enroll_direct, make_image
from tests.support.notify import NotifyListener
from tests.support.vaultenv import VaultEnv
from tests.support.wait import wait_for
from tests.test_agent import start_agent, stop

SOURCES = ("file", "file removed after reading", "systemd credential", "wrapped token")
MAX_TTL = 5.0
CYCLES = 10
LOGGED_IN = "logged in to Vault with AppRole"


def _role(env: VaultEnv) -> str:
    return f"bootkey-boot-{env.host_id}"


@dataclass
class KesClient:
    """Calls generate then decrypt on one key, over and over, counting the answers."""

    port: int
    ctx: ssl.SSLContext
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def call(self, conn: http.client.HTTPSConnection, path: str, body: dict[str, str]
             ) -> tuple[int, bytes]:
        conn.request("POST", path, body=json.dumps(body))
        r = conn.getresponse()
        return r.status, r.read()

    def run(self) -> None:
        ctx = base64.b64encode(b"bucket/object").decode()
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                           timeout=20)
        try:
            while not self.stop.wait(0.05):  # pacing, so four clients share two cores
                code, body = self.call(conn, "/v1/key/generate/minio-k", {"context": ctx})
                if code != 200:
                    self.failed.append(f"generate {code} {body!r}")
                    continue
                dek = json.loads(body)
                code, body = self.call(conn, "/v1/key/decrypt/minio-k",
                                       {"ciphertext": dek["ciphertext"], "context": ctx})
                if code != 200 or json.loads(body)["plaintext"] != dek["plaintext"]:
                    self.failed.append(f"decrypt {code} {body!r}")
                    continue
                self.ok += 1
        finally:
            conn.close()


@dataclass
class RunningAgent:
    source: str
    proc: subprocess.Popen[str]
    log: Path
    notify: NotifyListener
    client: KesClient
    thread: threading.Thread

    def logins(self) -> int:
        return self.log.read_text().count(LOGGED_IN)


def _approle_lines(source: str, env: VaultEnv, root: hvac.Client, d: Path
                   ) -> tuple[str, dict[str, str]]:
    """The [vault.approle] settings and extra environment for one secret_id source."""
    sid = root.auth.approle.generate_secret_id(_role(env))["data"]["secret_id"]
    if source == "wrapped token":
        wrapped = root.auth.approle.generate_secret_id(_role(env), wrap_ttl="120s")
        (d / "wrapped").write_text(wrapped["wrap_info"]["token"])
        return f'wrapped_secret_id_file = "{d / "wrapped"}"\n', {}
    if source == "systemd credential":
        creds = d / "credentials"
        creds.mkdir()
        (creds / "bootkey-sid").write_text(sid)
        return 'secret_id_credential = "bootkey-sid"\n', {"CREDENTIALS_DIRECTORY": str(creds)}
    (d / "secret-id").write_text(sid)
    removed = "remove_secret_id_file = true\n" if source.endswith("after reading") else ""
    return f'secret_id_file = "{d / "secret-id"}"\n{removed}', {}


def _start(source: str, env: VaultEnv, root: hvac.Client, pki: Pki, tmp: Path, *,
           kes_prefix: str) -> RunningAgent:
    d = tmp / source.replace(" ", "-")
    d.mkdir()
    approle, extra_env = _approle_lines(source, env, root, d)
    client = make_leaf(None, f"minio-{d.name}", kind="ed25519", client=True)
    srv_cert, srv_key = pki.write_client(pki.server, "server")
    port = free_port()
    (d / "empty").mkdir()
    text = env.toml(f"""
[kes]
enabled = true
address = "127.0.0.1:{port}"
[kes.admin]
identity = "{of_certificate(client.cert)}"
[kes.tls]
cert = "{srv_cert}"
key = "{srv_key}"
[kes.cache.expiry]
any = "1ms"
unused = "1ms"
[kes.keystore.vault]
engine = "secret"
version = "v2"
prefix = "{kes_prefix}"
""", deadline="120s")
    text = text.replace(f'secret_id_file = "{env.secret_id_file}"\n', approle)
    text = text.replace("[unlock]\n", f'[unlock]\nsearch = ["{d / "empty"}/*.img"]\n')
    cfg_file = d / "bootkey.toml"
    cfg_file.write_text(text)
    notify = NotifyListener(d / "notify.sock")
    log = d / "agent.log"
    env_vars = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bootkey.cli", "--config", str(cfg_file), "agent", "--check"],
            env={**env_vars, "NOTIFY_SOCKET": str(notify.path), **extra_env},
            stdout=subprocess.DEVNULL, stderr=err, text=True)
    kc = KesClient(port, pki.client_context(client, f"minio-{d.name}"))
    return RunningAgent(source, proc, log, notify, kc, threading.Thread(target=kc.run))


def test_agent_keeps_vault_access_for_ten_max_ttls_with_every_secret_id_source(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path) -> None:
    env = vault_env2
    root = bao.client()
    role = _role(env)
    prefix = f"kes-{env.host_id}"
    root.sys.create_or_update_policy(f"kes-{env.host_id}", (
        f'path "secret/data/{prefix}/*" {{ capabilities = ["create", "read"] }}\n'
        f'path "secret/metadata/{prefix}/*" {{ capabilities = ["list", "read"] }}\n'))
    root.auth.approle.create_or_update_approle(
        role, token_policies=[role, f"kes-{env.host_id}"], token_period="0", token_ttl="2s",
        token_max_ttl=f"{MAX_TTL:g}s")
    later = tmp_path / "later"
    later.mkdir()
    enroll_direct(env.config(), env.enroll_token, make_image(later / "hot.img"), name="hot")
    pki = Pki.create(tmp_path)
    agents = [_start(s, env, root, pki, tmp_path, kes_prefix=prefix) for s in SOURCES]
    loop = ""
    try:
        for a in agents:
            a.notify.wait_for(lambda m: m == "READY=1")
        # one key for all (the same Vault prefix), created through the first agent
        conn = http.client.HTTPSConnection("127.0.0.1", agents[0].client.port,
                                           context=agents[0].client.ctx, timeout=20)
        conn.request("POST", "/v1/key/create/minio-k")
        assert conn.getresponse().status == 200
        conn.close()
        started = time.monotonic()
        for a in agents:
            a.thread.start()
        for a in agents:
            wait_for(lambda a=a: a.logins() > CYCLES  # type: ignore[misc]
                     and time.monotonic() - started >= CYCLES * MAX_TTL,
                     timeout=CYCLES * MAX_TTL * 3, what=f"{a.source}: {CYCLES} re-logins",
                     interval=0.2)
        for a in agents:
            a.client.stop.set()
            a.thread.join(30)
        # a volume that appears now is opened with a key fetched with a fresh token
        loop = subprocess.run(["losetup", "-f", "--show", str(later / "hot.img")],
                              capture_output=True, text=True, check=True).stdout.strip()
        for a in agents:
            a.notify.wait_for(lambda m: m == "STATUS=1/1 volumes verified", timeout=60)
    finally:
        for a in agents:
            a.client.stop.set()
            if a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        codes = {a.source: a.proc.wait(30) for a in agents}
        for a in agents:
            a.notify.close()
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
    for a in agents:
        log = a.log.read_text()
        assert codes[a.source] == 0, log
        errors = [ln for ln in log.splitlines() if "kes" in ln or "rror" in ln]
        assert not a.client.failed, (a.source, a.client.failed[:3], errors[:5])
        assert a.client.ok >= CYCLES, (a.source, a.client.ok)
        assert "Vault access:" not in log, log  # a reusable secret_id: nothing foreseen
        assert f"hotplug: {loop} appeared, unlocking hot" in log


def test_single_use_secret_id_and_non_periodic_token_warn_at_start(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path) -> None:
    env = vault_env2
    root = bao.client()
    role = _role(env)
    root.sys.create_or_update_policy(
        f"{role}-lookup",
        f'path "auth/approle/role/{role}/secret-id/lookup" {{ capabilities = ["update"] }}\n')
    root.auth.approle.create_or_update_approle(
        role, token_policies=[role, f"{role}-lookup"], token_period="0", token_ttl="1h",
        token_max_ttl="2h", secret_id_num_uses=1)
    env.secret_id_file.write_text(
        root.auth.approle.generate_secret_id(role)["data"]["secret_id"])
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(env.toml())
    notify = NotifyListener(tmp_path / "notify.sock")
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "READY=1")
    finally:
        rc, err = stop(proc)
        notify.close()
    assert rc == 0, err
    assert "Vault access: access ends when the token reaches its max TTL" in err
    assert "set token_period on the AppRole role" in err
