"""Day-2 operation of a running `bootkey agent`: a watchdog that sees a wedged loop,
`bootkey status` over the control socket, SIGHUP reload, Prometheus metrics. Real
OpenBao, real sockets, the agent as a real process."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootkey import config as cfgmod
from bootkey_core.errors import ConfigError
from bootkey_core.secret import SecretBuffer
from tests.support.bao import DevBao, free_port
from tests.support.kesagent import kes_agent
from tests.support.luksimg import enroll_direct, make_image
from tests.support.notify import NotifyListener
from tests.support.vaultenv import VaultEnv
from tests.support.wait import wait_for
from tests.test_agent import start_agent, stop, two_volumes
from tests.test_vault_access import let_role_see_its_secret_ids


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(tmp_path / "notify.sock")
    yield n
    n.close()


def status(cfg_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootkey.cli", "--config", str(cfg_file),
                           "status", *extra], capture_output=True, text=True, timeout=60,
                          check=False)


def status_json(cfg_file: Path) -> dict[str, Any]:
    out = status(cfg_file, "--json")
    assert out.returncode == 0, out.stderr
    obj: dict[str, Any] = json.loads(out.stdout)
    return obj


def wedgeable_agent(cfg_file: Path, notify: NotifyListener) -> subprocess.Popen[str]:
    """The agent with WATCHDOG_USEC=1 s (a ping every 0.5 s while every loop beats), in
    a process where SIGUSR1/SIGUSR2 wedge a loop (tests/support/wedgeable_agent.py)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.wedgeable_agent", "--config", str(cfg_file),
         "agent", "--check"],
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pings_stop_when_wedged(proc: subprocess.Popen[str], notify: NotifyListener,
                           sig: signal.Signals, loop: str) -> None:
    """Healthy: pings keep coming. Wedged: they stop within two intervals for good,
    STATUS= names the loop, and the agent is left for systemd to end."""
    interval = 0.5
    ready_at = notify.times_of("READY=1")[0]
    wait_for(lambda: len([t for t in notify.times_of("WATCHDOG=1") if t > ready_at]) >= 6,
             timeout=30, what="six pings after READY=1")
    proc.send_signal(sig)
    wedged_at = time.monotonic()
    notify.wait_for(lambda m: m.startswith(f"STATUS=watchdog: no progress from {loop} "))

    def last_ping() -> float:
        return notify.times_of("WATCHDOG=1")[-1]

    # stopped for good: nothing for three intervals (a ping resets the wait)
    wait_for(lambda: time.monotonic() - last_ping() > 3 * interval, timeout=30,
             what="the pings to stop")
    assert last_ping() - wedged_at <= 2 * interval
    assert proc.poll() is None  # systemd, not the agent, ends it


def test_watchdog_pings_while_loops_progress_and_stops_when_main_wedges(
        vault_env2: VaultEnv, tmp_path: Path, notify: NotifyListener) -> None:
    cfg_file = two_volumes(vault_env2, tmp_path)
    proc = wedgeable_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        loops = status_json(cfg_file)["agent"]["watchdog"]["loops"]
        assert {"main", "renewal", "hotplug", "control"} <= set(loops)
        pings_stop_when_wedged(proc, notify, signal.SIGUSR1, "main")
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=20)
    assert "watchdog: no progress from main (silent" in err


def test_watchdog_stops_the_pings_when_the_kes_event_loop_wedges(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path, notify: NotifyListener) -> None:
    ka = kes_agent(vault_env2, bao, tmp_path)
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(ka.toml()))
    proc = wedgeable_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert "kes" in status_json(cfg_file)["agent"]["watchdog"]["loops"]
        pings_stop_when_wedged(proc, notify, signal.SIGUSR2, "kes")
        # the rest of the agent still answers: only the watchdog knows
        assert status_json(cfg_file)["agent"]["watchdog"]["stale"] == ["kes"]
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=20)
    assert "watchdog: no progress from kes (silent" in err


def test_status_of_a_running_agent_and_of_none(vault_env2: VaultEnv, tmp_path: Path,
                                               notify: NotifyListener) -> None:
    cfg_file = two_volumes(vault_env2, tmp_path)
    none = status(cfg_file, "--json")
    assert none.returncode == 3, none.stderr
    offline = json.loads(none.stdout)
    assert offline["agent"] == {"running": False, "mode": "agent"}
    assert [(v["name"], v["state"]) for v in offline["volumes"]] == \
        [("data", "closed"), ("logs", "closed")]
    assert offline["vault"]["secret_id_source"] == f"file {vault_env2.secret_id_file}"
    table = status(cfg_file)
    assert table.returncode == 3
    assert table.stdout.startswith("agent       not running")

    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "STATUS=2/2 volumes verified")
        snap = status_json(cfg_file)
        assert snap["agent"]["running"] is True and snap["agent"]["pid"] == proc.pid
        assert snap["agent"]["status"] == "2/2 volumes verified"
        assert [(v["name"], v["state"], v["result"]) for v in snap["volumes"]] == \
            [("data", "verified", "ok"), ("logs", "verified", "ok")]
        assert all(len(v["luks_uuid"]) == 36 and v["when"].endswith("Z")
                   for v in snap["volumes"])
        v = snap["vault"]
        assert v["logged_in"] is True and v["address"] == vault_env2.address
        # setup-vault's role: a periodic token, a secret_id kept for re-login
        assert 0 < v["token_ttl"] <= 3600 and v["token_period"] == 3600
        assert v["secret_id_source"] == "file" and v["warning"] is None
        assert "relogin_possible" in v and "access_until" in v
        assert snap["hotplug"] == {"enabled": True, "source": "kernel"} or \
            snap["hotplug"]["source"] == "udev"
        assert snap["keysocket"] == {"enabled": False}
        assert snap["kes"] == {"enabled": False}
        text = status(cfg_file)
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith(f"agent       running (pid {proc.pid}")
        assert "VOLUME  LUKS UUID" in text.stdout and "verified  ok" in text.stdout
        # nothing secret crosses the socket
        secret_id = Path(vault_env2.secret_id_file).read_text().strip()
        assert secret_id not in json.dumps(snap) and secret_id not in text.stdout
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert status(cfg_file).returncode == 3  # the socket went with the agent


def test_sighup_reloads_volumes_and_survives_a_broken_config(
        vault_env2: VaultEnv, tmp_path: Path, notify: NotifyListener) -> None:
    cfg_file = two_volumes(vault_env2, tmp_path)
    later = tmp_path / "later"
    later.mkdir()
    enroll_direct(vault_env2.config(), vault_env2.enroll_token, make_image(later / "new.img"),
                  name="new")
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "STATUS=2/2 volumes verified")
        good = cfg_file.read_text()
        cfg_file.write_text(good + "[unlock\n")  # broken TOML: the running config stays
        proc.send_signal(signal.SIGHUP)
        notify.wait_for(lambda m: m == "STATUS=2/2 volumes verified; reload failed: the "
                        "running configuration stays (see the journal)")
        # a new volume (applied now) and a Vault change (needs a restart: logged as such)
        cfg_file.write_text(good.replace('timeout = "2s"', 'timeout = "3s"')
                            + f'[[volume]]\nname = "added"\ndevice = "{later}/new.img"\n')
        proc.send_signal(signal.SIGHUP)
        notify.wait_for(lambda m: m == "STATUS=3/3 volumes verified")
        assert proc.poll() is None
        names = [(v["name"], v["state"]) for v in status_json(cfg_file)["volumes"]]
        assert names == [("added", "verified"), ("data", "verified"), ("logs", "verified")]
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert "reload: " in err and "not valid TOML" in err
    assert "keeping the running configuration" in err
    assert "reload: configuration re-read; restart to apply changes to vault" in err
    assert "volume added verified" in err


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_metrics_on_localhost(vault_env2: VaultEnv, bao: DevBao, tmp_path: Path,
                              notify: NotifyListener) -> None:
    """Unlock results, Vault requests by class, the login, renewals of a 3 s token (the
    renewal thread at work) and the token's seconds left, on 127.0.0.1."""
    role = f"bootkey-boot-{vault_env2.host_id}"
    bao.client().auth.approle.create_or_update_approle(role, token_policies=[role],
                                                       token_period="3s")
    cfg_file = two_volumes(vault_env2, tmp_path)
    port = free_port()
    cfg_file.write_text(cfg_file.read_text() + f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "STATUS=2/2 volumes verified")
        text = scrape(port)
        for vol in ("data", "logs"):
            assert sample(text, "bootkey_unlock_results_total", volume=vol,
                          result="verified") == 1
        assert sample(text, "bootkey_vault_logins_total", result="ok") == 1
        assert (sample(text, "bootkey_vault_requests_total", path_class="kv", code="200")
                or 0) >= 2
        assert (sample(text, "bootkey_vault_requests_total", path_class="transit",
                       code="200") or 0) >= 2
        assert sample(text, "bootkey_vault_request_seconds_count", path_class="transit")
        left = sample(text, "bootkey_vault_token_seconds_left")
        assert left is not None and 0 < left <= 3
        wait_for(lambda: (sample(scrape(port), "bootkey_vault_renewals_total", result="ok")
                          or 0) >= 2, timeout=30, interval=0.2, what="two renewals")
        assert status_json(cfg_file)["metrics"] == {"enabled": True,
                                                    "address": f"127.0.0.1:{port}"}
    finally:
        rc, err = stop(proc)
    assert rc == 0, err


@pytest.mark.parametrize("address", ["0.0.0.0:9273", "10.1.2.3:9273", "[::]:9273",
                                     "example.org:9273"])
def test_metrics_refuse_anything_but_localhost(address: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfgmod.parse(f'[metrics]\naddress = "{address}"\n', "bootkey.toml")
    assert "bootkey.toml: metrics.address: " in str(e.value)
    assert "is not a localhost address" in str(e.value)


@pytest.mark.parametrize("address", ["127.0.0.1:9273", "[::1]:9273", "localhost:9273"])
def test_metrics_accept_localhost(address: str) -> None:
    assert cfgmod.parse(f'[metrics]\naddress = "{address}"\n').metrics.address == address


def test_metrics_address_needs_a_port() -> None:
    with pytest.raises(ConfigError, match="is not host:port"):
        cfgmod.parse('[metrics]\naddress = "127.0.0.1"\n')


def test_kes_in_status_metrics_watchdog_and_sighup_policy(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path, notify: NotifyListener) -> None:
    """The embedded KES: its event loop beats for the watchdog, `status` shows it
    listening with its counters, `/metrics` carries KES's families next to bootkey's,
    and a policy removed from the config is enforced after SIGHUP."""
    ka = kes_agent(vault_env2, bao, tmp_path)
    mport = free_port()
    metrics = f'[metrics]\naddress = "127.0.0.1:{mport}"\n'
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(metrics + ka.toml()))
    proc = start_agent(cfg_file, notify, env={"WATCHDOG_USEC": "2000000"})
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert ka.curl("/v1/key/create/minio-k", "") == (200, "")
        snap = status_json(cfg_file)
        assert "kes" in snap["agent"]["watchdog"]["loops"]
        assert snap["kes"] == {"enabled": True, "listening": f"127.0.0.1:{ka.port}",
                               "keys_cached": snap["kes"]["keys_cached"],
                               "requests": {"success": 1, "error": 0, "failure": 0}}
        text = scrape(mport)
        assert sample(text, "kes_http_request_success", code="200") == 1
        assert sample(text, "bootkey_vault_logins_total", result="ok") == 1
        # pings go on while KES's loop beats (four intervals of 1 s)
        wait_for(lambda: len(notify.times_of("WATCHDOG=1")) >= 4, timeout=30,
                 what="four pings")
        cfg_file.write_text(vault_env2.toml(metrics + ka.toml(allow=("/v1/key/create/minio-*",))))
        proc.send_signal(signal.SIGHUP)

        def generate() -> int:
            return ka.curl("/v1/key/generate/minio-k",
                           json.dumps({"context": base64.b64encode(b"ctx").decode()}))[0]

        wait_for(lambda: generate() == 403, timeout=30, what="the narrower policy")
        assert proc.poll() is None
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert "kes: configuration reloaded" in err


def test_a_foreseen_loss_of_vault_access_is_in_status_line_status_and_metrics(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path, notify: NotifyListener) -> None:
    """Single-use secret_id, token not periodic: the agent can see it will lose Vault at
    the token's max TTL, and says so on STATUS=, in `bootkey status` and as a metric."""
    root = bao.client()
    let_role_see_its_secret_ids(root, vault_env2, token_period="0", token_ttl="1h",
                                token_max_ttl="2h", secret_id_num_uses=1)
    cfg_file = two_volumes(vault_env2, tmp_path)
    vault_env2.secret_id_file.write_text(root.auth.approle.generate_secret_id(
        f"bootkey-boot-{vault_env2.host_id}")["data"]["secret_id"])
    port = free_port()
    cfg_file.write_text(cfg_file.read_text() + f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "STATUS=2/2 volumes verified; WARNING: Vault access "
                        "will end (see `bootkey status`)")
        v = status_json(cfg_file)["vault"]
        assert v["relogin_possible"] is False and v["token_period"] is None
        assert "token_period" in v["warning"]
        assert f"            WARNING: {v['warning']}" in status(cfg_file).stdout.splitlines()
        assert sample(scrape(port), "bootkey_vault_access_warning") == 1
    finally:
        rc, err = stop(proc)
    assert rc == 0, err


def test_sighup_in_socket_mode_serves_a_new_volume_and_links_it(
        vault_env2: VaultEnv, tmp_path: Path, notify: NotifyListener) -> None:
    """mode = "socket": a volume added to `[[volume]]` gets its
    /run/cryptsetup-keys.d link and its key on the socket after SIGHUP, no restart."""
    from tests.test_keysocket import systemd_client

    cfg = vault_env2.config()
    enroll_direct(cfg, vault_env2.enroll_token, make_image(tmp_path / "data.img"), name="data")
    later = tmp_path / "later"
    later.mkdir()
    key = os.urandom(64)
    enroll_direct(cfg, vault_env2.enroll_token, make_image(later / "new.img"), name="new",
                  key=SecretBuffer.from_bytes(bytearray(key)))
    sock = tmp_path / "run" / "cryptsetup.sock"
    keys_dir = tmp_path / "cryptsetup-keys.d"
    keys_dir.mkdir()
    cfg_file = tmp_path / "bootkey.toml"
    text = vault_env2.toml(f'[keysocket]\npath = "{sock}"\ntimeout = "10s"\n'
                           f'keys_dir = "{keys_dir}"\n').replace(
        "[unlock]\n", f'[unlock]\nmode = "socket"\nsearch = ["{tmp_path}/*.img"]\n')
    cfg_file.write_text(text)
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert sorted(p.name for p in keys_dir.iterdir()) == ["data.key"]
        assert systemd_client(sock, "added") == b""  # not managed yet: declined
        cfg_file.write_text(text + f'[[volume]]\nname = "added"\ndevice = "{later}/new.img"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for((keys_dir / "added.key").is_symlink, what="the new key link")
        assert systemd_client(keys_dir / "added.key", "added") == key
        assert proc.poll() is None
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
