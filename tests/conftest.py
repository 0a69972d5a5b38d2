"""Shared fixtures: real OpenBao servers (dev and sealed/TLS) and Vault provisioning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bao import DevBao, TlsBao
from tests.support.vaultenv import VaultEnv, provision

pytest_plugins = [
    "tests.support.ci_skips",  # a skip in CI fails unless allow-listed
    "tests.support.secrets_plugin",  # whole-suite secrets scan (#14.5)
]


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBao]:
    """One `bao server -dev` for the whole session; tests isolate by host_id."""
    server = DevBao(tmp_path_factory.mktemp("bao")).start()
    yield server
    server.stop()


@pytest.fixture
def tls_bao(tmp_path: Path) -> Iterator[TlsBao]:
    """A fresh non-dev TLS server with inmem storage, uninitialised."""
    server = TlsBao(tmp_path / "tlsbao").start()
    yield server
    server.stop()


@pytest.fixture(params=[2, 1], ids=["kv2", "kv1"])
def vault_env(request: pytest.FixtureRequest, bao: DevBao, tmp_path: Path) -> VaultEnv:
    return provision(bao.client(), tmp_path, kv_version=request.param)


@pytest.fixture
def vault_env2(bao: DevBao, tmp_path: Path) -> VaultEnv:
    """KV v2 only, for tests where the KV version does not matter."""
    return provision(bao.client(), tmp_path, kv_version=2)
