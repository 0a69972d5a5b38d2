"""bench.storm at a small N: five hosts boot at once through bootkey's own unlock code
against the session's OpenBao, and again after a Vault outage. Every host unlocks, each
volume costs Vault one KV read and one transit decrypt, an outage adds no request at
Vault, and (the issue's budget) a host costs no more than 3 requests plus 1 per volume."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.storm import VOLUMES_PER_HOST, CountingProxy, HostSpec, RunResult, provision_hosts, run
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


@pytest.fixture(scope="module")
def storm(bao: DevBao, proxy: CountingProxy, hosts: list[HostSpec]) -> RunResult:
    return run(hosts, proxy, procs=1, jitter=True, bao_pid=bao.proc.pid if bao.proc else None)


def test_every_host_unlocks_with_one_read_and_one_decrypt_per_volume(storm: RunResult) -> None:
    assert (storm.unlocked, storm.errors) == (N, [])
    assert storm.by_kind["login"] == N
    assert storm.by_kind["GET kv read"] == storm.by_kind["transit decrypt"] == \
        N * VOLUMES_PER_HOST


def test_a_host_costs_vault_at_most_3_requests_plus_1_per_volume(storm: RunResult) -> None:
    # (a 5 s `vault.timeout` outlived by a slow Vault would resend a request: not at N = 5)
    assert storm.per_host_max <= BUDGET, storm.by_kind


@pytest.mark.parametrize("jitter", [True, False], ids=["jitter", "no-jitter"])
def test_after_an_outage_every_host_unlocks_and_retries_cost_vault_nothing(
        proxy: CountingProxy, hosts: list[HostSpec], storm: RunResult, jitter: bool) -> None:
    r = run(hosts, proxy, procs=1, jitter=jitter, outage=1.0)
    assert (r.unlocked, r.errors) == (N, [])
    assert r.resets >= N                  # every host did try while Vault was down
    assert r.by_kind == storm.by_kind     # and Vault saw only the requests of a calm boot
