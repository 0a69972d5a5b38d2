"""bench.storm at a small N: five hosts boot at once through bootkey's own unlock code
against the session's OpenBao, and again after a Vault outage. Every host unlocks, and
Vault sees no more than the issue's budget per host: 3 requests plus 1 per volume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.storm import VOLUMES_PER_HOST, CountingProxy, HostSpec, provision_hosts, run
from tests.support.bao import DevBao
from tests.support.scan import SecretsRegistry

N = 5
BUDGET = 3 + VOLUMES_PER_HOST


@pytest.fixture(scope="module")
def proxy(bao: DevBao) -> Iterator[CountingProxy]:
    p = CountingProxy(bao.port).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def hosts(bao: DevBao, proxy: CountingProxy, tmp_path_factory: pytest.TempPathFactory,
          secrets_registry: SecretsRegistry) -> list[HostSpec]:
    return provision_hosts(bao.client(), f"http://127.0.0.1:{proxy.port}",
                           tmp_path_factory.mktemp("storm"), N, retry_initial=0.05,
                           retry_max=0.2, deadline=30,
                           on_key=lambda k: secrets_registry.register(k, "storm host key"))


def test_every_host_unlocks_within_the_request_budget(
        bao: DevBao, proxy: CountingProxy, hosts: list[HostSpec]) -> None:
    r = run(hosts, proxy, procs=1, jitter=True, bao_pid=bao.proc.pid if bao.proc else None)
    assert (r.unlocked, r.errors) == (N, [])
    assert r.per_host_max <= BUDGET
    assert r.by_kind == {"login": N, "GET kv read": N * VOLUMES_PER_HOST,
                         "transit decrypt": N * VOLUMES_PER_HOST}


@pytest.mark.parametrize("jitter", [True, False], ids=["jitter", "no-jitter"])
def test_after_an_outage_every_host_unlocks_and_retries_cost_vault_nothing(
        proxy: CountingProxy, hosts: list[HostSpec], jitter: bool, tmp_path: Path) -> None:
    r = run(hosts, proxy, procs=1, jitter=jitter, outage=1.0)
    assert (r.unlocked, r.errors) == (N, [])
    assert r.resets >= N            # every host did try while Vault was down
    assert r.per_host_max <= BUDGET  # and Vault saw only the successful requests
