"""bootkey against a 3-node OpenBao raft cluster, with all three nodes in `[vault] address`:
standbys forward to the active node, a killed or sealed node is failed over, a cluster
without quorum is a clear failure within `unlock.deadline`, and a running bootkey
recovers when the nodes return.

One cluster and one host with 16 enrolled image-file volumes serve the whole module; each
test that hurts the cluster leaves it healed (`healthy` fixture).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootkey import config as cfgmod
from tests.support.kesagent import CONTEXT, KesAgent, agent_token, grant_kes, start_kes_agent
from tests.support.luksimg import PASSPHRASE, enroll_direct, make_image
from tests.support.notify import NotifyListener
from tests.support.raft import RaftCluster, RaftNode
from tests.support.vaultenv import VaultEnv, provision
from tests.support.wait import wait_for
from tests.test_agent import start_agent, stop

BOOTKEY = [sys.executable, "-m", "bootkey.cli"]
VOLUMES = 16


@dataclass
class Fleet:
    """One host on the cluster: AppRole, 16 enrolled volumes under `images`."""

    env: VaultEnv
    images: Path
    cluster: RaftCluster

    def toml(self, addresses: Sequence[str], extra: str = "", *, deadline: str = "30s",
             search: Path | None = None) -> str:
        listed = ", ".join(f'"{a}"' for a in addresses)
        text = self.env.toml(extra, deadline=deadline)
        text = text.replace(f'address = ["{self.env.address}"]', f"address = [{listed}]")
        return text.replace("[unlock]\n",
                            f'[unlock]\nsearch = ["{search or self.images}/*.img"]\n')

    def config_file(self, tmp: Path, addresses: Sequence[str], extra: str = "", *,
                    deadline: str = "30s", search: Path | None = None) -> Path:
        p = tmp / "bootkey.toml"
        p.write_text(self.toml(addresses, extra, deadline=deadline, search=search))
        return p


def standby_first(cluster: RaftCluster) -> list[str]:
    active = cluster.active()
    return [n.address for n in cluster.standbys()] + [active.address]


def active_first(cluster: RaftCluster) -> tuple[RaftNode, list[str]]:
    active = cluster.active()
    return active, [active.address] + [n.address for n in cluster.nodes if n is not active]


def bootkey(cfg_file: Path, *args: str, timeout: float = 90,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BOOTKEY, "--config", str(cfg_file), *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def verified(res: subprocess.CompletedProcess[str]) -> list[str]:
    out = json.loads(res.stdout)
    return sorted(v["name"] for v in out["volumes"] if v["result"] == "verified")


ALL = sorted(f"vol{i:02d}" for i in range(VOLUMES))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RaftCluster]:
    c = RaftCluster(tmp_path_factory.mktemp("raft"))
    try:
        yield c.start()
    finally:
        c.close()  # also the nodes of a start that failed half-way


@pytest.fixture(scope="module")
def fleet(cluster: RaftCluster, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    work = tmp_path_factory.mktemp("fleet")
    env = provision(cluster.root(), work, kv_version=2, ca_file=cluster.ca_file)
    images = work / "images"
    images.mkdir()
    f = Fleet(env, images, cluster)
    cfg = cfgmod.parse(f.toml(cluster.addresses))
    for i in range(VOLUMES):
        enroll_direct(cfg, env.enroll_token, make_image(images / f"vol{i:02d}.img"),
                      name=f"vol{i:02d}")
    return f


@pytest.fixture
def healthy(cluster: RaftCluster) -> Iterator[RaftCluster]:
    """The cluster, healthy at the start, and healed again whatever the test did to it."""
    cluster.heal()
    try:
        yield cluster
    finally:
        cluster.heal()


def enroll_and_rotate(fleet: Fleet, tmp: Path, addresses: Sequence[str]) -> None:
    """`bootkey enroll`, `rotate` and `unlock --check` of a fresh image through `addresses`."""
    solo = tmp / "solo"
    solo.mkdir()
    dev = make_image(solo / "solo.img")
    cfg_file = fleet.config_file(tmp, addresses, search=solo)
    passfile = tmp / "pass"
    passfile.write_bytes(PASSPHRASE)
    operator = {"VAULT_TOKEN": fleet.env.enroll_token}
    res = bootkey(cfg_file, "enroll", dev, "--name", "solo", "--unlock-key-file",
                  str(passfile), env=operator)
    assert res.returncode == 0, res.stderr
    res = bootkey(cfg_file, "rotate", "solo", env=operator)
    assert res.returncode == 0, res.stderr
    res = bootkey(cfg_file, "unlock", "--all", "--check", "--json")
    assert (res.returncode, verified(res)) == (0, ["solo"]), res.stderr


def test_unlock_check_through_a_standby(fleet: Fleet, healthy: RaftCluster,
                                        tmp_path: Path) -> None:
    """Standbys first in the list: they answer reads themselves and forward the login."""
    addresses = standby_first(healthy)
    first = next(n for n in healthy.nodes if n.address == addresses[0])
    assert healthy.leader_address(first) != first.address  # a standby indeed
    assert healthy.ha_status() == {a: a == addresses[-1] for a in addresses}
    res = bootkey(fleet.config_file(tmp_path, addresses), "unlock", "--all", "--check",
                  "--json")
    assert (res.returncode, verified(res)) == (0, ALL), res.stderr


def test_enroll_and_rotate_with_the_active_node_first(fleet: Fleet, healthy: RaftCluster,
                                                      tmp_path: Path) -> None:
    enroll_and_rotate(fleet, tmp_path, active_first(healthy)[1])


@pytest.mark.xfail(strict=True, reason=(
    "bootkey_core/vault.py: OpenBao >= 2.5 standbys serve reads from their own raft copy "
    "(disable_standby_reads=false by default), so enroll's read-back right after its "
    "write sees the old entry; VaultSession must send the X-Vault-Index it got back with "
    "`X-Vault-Inconsistent: forward-active-node`"))
def test_enroll_and_rotate_with_a_standby_first(fleet: Fleet, healthy: RaftCluster,
                                                tmp_path: Path) -> None:
    enroll_and_rotate(fleet, tmp_path, standby_first(healthy))


def test_active_node_killed_during_unlock_check(fleet: Fleet, healthy: RaftCluster,
                                                tmp_path: Path) -> None:
    """The node bootkey is talking to dies after the first volume is verified; the other
    15 are verified through the node elected next, within the deadline."""
    active, addresses = active_first(healthy)
    cfg_file = fleet.config_file(tmp_path, addresses, "parallel = 1\n", deadline="30s")
    t0 = time.monotonic()
    proc = subprocess.Popen([*BOOTKEY, "--config", str(cfg_file), "unlock", "--all",
                             "--check", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if re.match(r"bootkey: volume vol\d+ verified", line):
            active.kill()
            break
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert not active.running, "the run ended before the kill: nothing was tested"
    assert proc.returncode == 0, "".join(seen) + err
    assert sorted(v["name"] for v in json.loads(out)["volumes"]
                  if v["result"] == "verified") == ALL
    assert elapsed < 30
    assert healthy.active(not_=active) is not active


def test_sealed_node_then_two_down_then_back(fleet: Fleet, healthy: RaftCluster,
                                             tmp_path: Path) -> None:
    sealed = healthy.standbys()[0]
    addresses = [sealed.address] + [n.address for n in healthy.nodes if n is not sealed]
    healthy.seal(sealed)
    cfg_file = fleet.config_file(tmp_path, addresses)
    res = bootkey(cfg_file, "unlock", "--all", "--check", "--json")
    assert (res.returncode, verified(res)) == (0, ALL), res.stderr

    # Two nodes down: the one left is unsealed but has no quorum. A clear failure, no hang.
    healthy.unseal(sealed)
    down = [n for n in healthy.nodes if n is not sealed]
    for n in down:
        n.kill()
    short = fleet.config_file(tmp_path, addresses, deadline="6s")
    t0 = time.monotonic()
    res = bootkey(short, "unlock", "--all", "--check", timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 69, res.stderr
    assert elapsed < 6 + 8, f"took {elapsed:.1f} s against a 6 s deadline"
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"bootkey: {VOLUMES} of {VOLUMES} volumes failed"
    assert "FAILED: Vault unreachable while trying to log in with AppRole" in res.stdout

    # A running agent waits and verifies every volume once the nodes return.
    notify = NotifyListener(tmp_path / "notify.sock")
    cfg_file.write_text(fleet.toml(addresses, deadline="120s"))
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m.startswith("STATUS=waiting for Vault"), timeout=30)
        for n in down:
            healthy.restart(n)
        notify.wait_for(lambda m: m == f"STATUS={VOLUMES}/{VOLUMES} volumes verified",
                        timeout=60)
    finally:
        rc, err = stop(proc)
        notify.close()
    assert rc == 0, err


# ---- the agent: token renewal and KES across a leader change --------------------------


def boot_role(fleet: Fleet) -> str:
    return f"bootkey-boot-{fleet.env.host_id}"


@pytest.fixture
def short_token_ttl(fleet: Fleet, healthy: RaftCluster) -> Iterator[str]:
    """The host's AppRole hands out 15 s periodic tokens (setup-vault makes them periodic,
    1 h), so a running agent renews every ~10 s: the 5 s left before expiry outlast an
    election (~4 s here)."""
    role = boot_role(fleet)
    path = f"auth/approle/role/{role}"
    before = healthy.root().read(path)["data"]["token_period"]
    healthy.root().write_data(path, data={"token_period": "15s"})
    try:
        yield role
    finally:
        healthy.root().write_data(path, data={"token_period": before})


def test_agent_renews_its_token_through_a_leader_change(
        fleet: Fleet, healthy: RaftCluster, short_token_ttl: str, tmp_path: Path) -> None:
    active, addresses = active_first(healthy)
    cfg_file = fleet.config_file(tmp_path, addresses)
    notify = NotifyListener(tmp_path / "notify.sock")
    started = int(time.time())
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == f"STATUS={VOLUMES}/{VOLUMES} volumes verified")
        accessor = agent_token(healthy.root(), short_token_ttl, started)["accessor"]
        active.kill()
        killed_at = time.time()
        healthy.active(not_=active)

        def renewed_after_kill() -> bool:
            tok = healthy.root().auth.token.lookup_accessor(accessor)["data"]
            return bool(tok.get("last_renewal_time", 0) > killed_at and tok["ttl"] > 0)

        renewed = True
        try:
            wait_for(renewed_after_kill, timeout=40, what="the agent to renew its token",
                     interval=0.5)
        except AssertionError:
            renewed = False
        assert proc.poll() is None
    finally:
        rc, err = stop(proc)
        notify.close()
    assert renewed, f"no renewal after the leader change; the agent said:\n{err}"
    assert not any("renewal failing" in m for m in notify.messages), err
    assert rc == 0, err


@pytest.fixture
def kes_policy(fleet: Fleet, healthy: RaftCluster) -> str:
    return grant_kes(healthy.root(), fleet.env.host_id)


def kes_agent(fleet: Fleet, tmp: Path, addresses: Sequence[str], prefix: str) -> KesAgent:
    return start_kes_agent(tmp, lambda kes: fleet.toml(addresses, kes), prefix, start_agent)


def stop_kes_agent(kes: KesAgent) -> None:
    kes.http.close()
    rc, err = stop(kes.proc)
    kes.notify.close()
    assert rc == 0, err


@pytest.mark.xfail(strict=True, reason=(
    "bootkey_core/vault.py (the session KES's keystore uses): OpenBao >= 2.5 standbys "
    "serve reads from their own raft copy, so `generate` right after `create` reads the new "
    "key through the standby before the write reached it and answers 404 'key does not "
    "exist'; the session must send the X-Vault-Index of its writes with "
    "`X-Vault-Inconsistent: forward-active-node`"))
def test_kes_through_a_standby(fleet: Fleet, healthy: RaftCluster, kes_policy: str,
                               tmp_path: Path) -> None:
    kes = kes_agent(fleet, tmp_path, standby_first(healthy), kes_policy)
    try:
        dek = kes.create_and_generate("minio-standby")
        assert kes.decrypts("minio-standby", dek)
    finally:
        stop_kes_agent(kes)


def test_kes_rides_through_a_leader_change(fleet: Fleet, healthy: RaftCluster,
                                           kes_policy: str, tmp_path: Path) -> None:
    """The node the agent talks to dies: the first KES call after the election succeeds,
    new keys (a Vault write) and old ones (cached) alike."""
    active, addresses = active_first(healthy)
    kes = kes_agent(fleet, tmp_path, addresses, kes_policy)
    try:
        before = kes.create_and_generate("minio-before")
        active.kill()
        healthy.active(not_=active)
        assert kes.call("/v1/key/create/minio-after", {}) == (200, "")  # the first call
        assert kes.decrypts("minio-before", before)
        # The session may have failed over to a standby, which can read the new key a
        # moment late (that bug is test_kes_through_a_standby's): allow it that moment.
        wait_for(lambda: kes.call("/v1/key/generate/minio-after", CONTEXT)[0] == 200,
                 timeout=5, what="generate with the new key", interval=0.05)
    finally:
        stop_kes_agent(kes)
