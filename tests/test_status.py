"""`bootkey status`'s pieces on values: the table an operator reads, the secret_id
source it names, Vault path classes for metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bootkey import status
from bootkey.config import AppRoleConfig
from bootkey.metrics import path_class
from bootkey.unlock import Outcome, VolumeResult
from bootkey_core.duration import parse_duration

RUNNING: dict[str, Any] = {
    "agent": {"running": True, "pid": 812, "since": "2026-12-04T06:02:11Z", "mode": "agent",
              "ready": True, "status": "1/2 volumes open; failed: logs",
              "watchdog": {"interval": 60.0, "loops": ["control", "main", "renewal"],
                           "stale": []}},
    "volumes": [
        status.volume_entry(VolumeResult("data", "/dev/sdb", Outcome.OPENED, "5c1e"),
                            1796364133.0),
        status.volume_entry(VolumeResult("logs", "/dev/sdc", Outcome.FAILED, "9f3b",
                                         reason="no key in Vault"), None),
    ],
    "vault": {"logged_in": True, "address": "https://v1:8200", "token_ttl": 2820,
              "token_expires": "2026-12-04T07:02:12Z", "token_period": 3600,
              "token_renewable": True, "relogin_possible": True, "access_until": None,
              "warning": None, "secret_id_source": "systemd credential"},
    "keysocket": {"enabled": False},
    "hotplug": {"enabled": True, "source": "udev"},
    "kes": {"enabled": True, "listening": "127.0.0.1:7373", "keys_cached": 1,
            "requests": {"success": 3410, "error": 2, "failure": 0}},
    "metrics": {"enabled": False, "address": None},
}


def test_the_table_of_a_running_agent() -> None:
    assert status.render(RUNNING).splitlines() == [
        "agent       running (pid 812, since 2026-12-04T06:02:11Z), mode agent, ready, "
        "watchdog ok (3 loops)",
        "            1/2 volumes open; failed: logs",
        "",
        "VOLUME  LUKS UUID  DEVICE    STATE   RESULT           WHEN",
        "data    5c1e       /dev/sdb  opened  ok               2026-12-04T06:02:13Z",
        "logs    9f3b       /dev/sdc  failed  no key in Vault  -",
        "",
        "vault       https://v1:8200, token ttl 47m (until 2026-12-04T07:02:12Z), "
        "periodic (1h)",
        "            secret_id: systemd credential; re-login possible",
        "key socket  off",
        "hotplug     watching block devices (udev events)",
        "kes         listening on 127.0.0.1:7373, 1 keys cached, requests 3410 ok / "
        "2 client error / 0 server error",
        "metrics     off",
    ]


def test_a_withheld_watchdog_is_the_first_thing_said() -> None:
    snap = {**RUNNING, "agent": {**RUNNING["agent"], "watchdog": {
        "interval": 60.0, "loops": ["kes", "main"], "stale": ["kes"]}}}
    assert "WATCHDOG WITHHELD: kes not progressing" in status.render(snap).splitlines()[0]


def test_no_agent() -> None:
    text = status.render({"agent": {"running": False, "mode": "agent"}, "volumes": [],
                          "vault": {"logged_in": False, "addresses": ["https://v1:8200"],
                                    "secret_id_source": "file /etc/bootkey/secret-id"}})
    assert text.splitlines() == [
        "agent       not running — `systemctl start bootkey` (below: what the config and "
        "LUKS headers say)",
        "volumes     none configured or enrolled",
        "vault       not logged in (https://v1:8200); secret_id: file /etc/bootkey/secret-id",
    ]


def test_a_foreseen_loss_of_access_is_spelled_out() -> None:
    warning = ("access ends when the token reaches its max TTL: the token is not periodic "
               "and nothing can log in again (the secret_id was single-use) — set "
               "token_period on the role")
    snap = {**RUNNING, "vault": {**RUNNING["vault"], "token_period": None,
                                 "token_ttl": 90, "relogin_possible": False,
                                 "secret_id_source": "wrapped token (unwrapped once)",
                                 "warning": warning}}
    lines = status.render(snap).splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("vault"))
    assert lines[at:at + 3] == [
        "vault       https://v1:8200, token ttl 1m30s (until 2026-12-04T07:02:12Z), renewable",
        "            secret_id: wrapped token (unwrapped once); re-login NOT possible",
        f"            WARNING: {warning}",
    ]


@pytest.mark.parametrize(("kw", "expected"), [
    ({"secret_id_credential": "bk"}, "systemd credential bk"),
    ({"wrapped_secret_id_file": "/w"}, "wrapped token /w (unwrapped once)"),
    ({"secret_id_file": "/s", "remove_secret_id_file": True}, "file /s (removed after login)"),
    ({"secret_id_file": "/s"}, "file /s"),
])
def test_secret_id_source_from_the_config(kw: dict[str, object], expected: str) -> None:
    assert status.secret_id_source(AppRoleConfig.model_validate(kw), None) == expected


def test_secret_id_from_the_unit_credential(tmp_path: Path) -> None:
    ar = AppRoleConfig.model_validate({"secret_id_file": str(tmp_path / "sid")})
    (tmp_path / "secret-id").write_text(" ")  # the unit's blank fallback: not a source
    assert status.secret_id_source(ar, str(tmp_path)) == f"file {tmp_path / 'sid'}"
    (tmp_path / "secret-id").write_text("x")
    assert status.secret_id_source(ar, str(tmp_path)) == "systemd credential secret-id"


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (59, "59s"), (125, "2m5s"), (2820, "47m"), (7260, "2h1m"),
    (200000, "55h33m20s"), (float("inf"), "never")])
def test_duration(seconds: float | None, text: str) -> None:
    assert status.duration(seconds) == text
    if seconds is not None and seconds != float("inf"):
        assert parse_duration(text) == seconds  # what status prints, the config reads


@pytest.mark.parametrize(("path", "cls"), [
    ("/v1/auth/approle/login", "login"), ("/v1/auth/token/renew-self", "renew"),
    ("/v1/auth/token/lookup-self", "token"), ("/v1/sys/wrapping/unwrap", "unwrap"),
    ("/v1/sys/health?standbyok=true", "sys"), ("/v1/transit/decrypt/bootkey", "transit"),
    ("/v1/transit/encrypt/bootkey", "transit"), ("/v1/pki/issue/kes", "pki"),
    ("/v1/secret/data/bootkey/h/u", "kv"), ("/v1/kv1/bootkey/h/u", "kv")])
def test_vault_path_classes(path: str, cls: str) -> None:
    assert path_class(path) == cls


def test_a_taken_metrics_port_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from bootkey.metrics import AgentMetrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level("ERROR", logger="bootkey.metrics"):
            assert AgentMetrics().serve(f"127.0.0.1:{port}") is None
    assert f"metrics.address: cannot listen on 127.0.0.1:{port}: Address already in use" \
        in caplog.text
