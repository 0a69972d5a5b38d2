"""`bootkey agent` as systemd runs it: sd_notify over a real datagram socket, hardening,
waiting out an absent or sealed Vault, failing fast or at the deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootkey import config as cfgmod
from tests.support.bao import TlsBao, free_port
from tests.support.luksimg import enroll_direct, make_image
from tests.support.notify import NotifyListener
from tests.support.proxy import LateProxy
from tests.support.vaultenv import VaultEnv, provision


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(tmp_path / "notify.sock")
    yield n
    n.close()


def start_agent(cfg_file: Path, notify: NotifyListener, *extra: str,
                env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    e = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "bootkey.cli", "--config", str(cfg_file), "agent", "--check",
         *extra], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err


def two_volumes(env: VaultEnv, tmp: Path, address: str | None = None) -> Path:
    cfg = env.config()
    for n in ("data", "logs"):
        enroll_direct(cfg, env.enroll_token, make_image(tmp / f"{n}.img"), name=n)
    text = env.toml().replace("[unlock]\n", f'[unlock]\nsearch = ["{tmp}/*.img"]\n')
    if address:
        text = text.replace(f'address = ["{env.address}"]', f'address = ["{address}"]')
    p = tmp / "bootkey.toml"
    p.write_text(text)
    return p


def test_ready_status_watchdog_stopping_and_hardening(vault_env2: VaultEnv, tmp_path: Path,
                                                      notify: NotifyListener) -> None:
    cfg_file = two_volumes(vault_env2, tmp_path)
    proc = start_agent(cfg_file, notify, env={"WATCHDOG_USEC": "200000"})
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert notify.wait_for(lambda m: m.startswith("STATUS=2/2")) == \
            "STATUS=2/2 volumes verified"
        notify.wait_for(lambda m: m == "WATCHDOG=1")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        vmlck = int(next(ln.split()[1] for ln in status.splitlines()
                         if ln.startswith("VmLck:")))
        assert vmlck > 0
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert any(ln.startswith("Max core file size") and ln.split()[4:6] == ["0", "0"]
                   for ln in limits.splitlines())
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    notify.wait_for(lambda m: m == "STOPPING=1")
    # The agent reads PR_GET_DUMPABLE back from the kernel after setting it.
    assert "memory locked, core dumps off, not dumpable" in err


def test_vault_absent_at_start_then_appears(vault_env2: VaultEnv, tmp_path: Path,
                                            notify: NotifyListener) -> None:
    """Boot must not wait for Vault: READY=1 goes out after `ready_timeout` with a status
    that says what is missing; the agent keeps retrying and unlocks when Vault appears."""
    port = free_port()
    cfg_file = two_volumes(vault_env2, tmp_path, address=f"http://127.0.0.1:{port}")
    cfg_file.write_text(cfg_file.read_text().replace("[unlock]\n",
                                                     '[unlock]\nready_timeout = "1s"\n'))
    proc = start_agent(cfg_file, notify)
    proxy = LateProxy(port, ("127.0.0.1", int(vault_env2.address.rsplit(":", 1)[1])))
    try:
        notify.wait_for(lambda m: m == "READY=1")
        ready_status = notify.wait_for(lambda m: m.startswith("STATUS=waiting for Vault")
                                       and "boot goes on" in m)
        assert "volumes verified" not in " ".join(notify.messages)
        assert ready_status.startswith("STATUS=waiting for Vault: attempt ")
        assert proc.poll() is None
        proxy.start()
        notify.wait_for(lambda m: m == "STATUS=2/2 volumes verified")
        assert notify.messages.count("READY=1") == 1
    finally:
        rc, err = stop(proc)
        proxy.stop()
    assert rc == 0, err


def test_vault_sealed_then_unsealed(tmp_path: Path, notify: NotifyListener) -> None:
    bao = TlsBao(tmp_path / "bao").start()
    try:
        bao.initialize()
        bao.unseal()
        env = provision(bao.client(), tmp_path, ca_file=bao.ca_file)
        cfg_file = two_volumes(env, tmp_path)
        assert cfgmod.load(cfg_file).vault.ca_file == bao.ca_file
        bao.seal()
        proc = start_agent(cfg_file, notify)
        try:
            notify.wait_for(lambda m: m.startswith("STATUS=waiting for Vault: attempt 2"))
            bao.unseal()
            notify.wait_for(lambda m: m == "READY=1")
            assert "STATUS=2/2 volumes verified" in notify.messages
        finally:
            rc, err = stop(proc)
        assert rc == 0, err
    finally:
        bao.stop()


def test_unreachable_past_deadline_exits_clearly(vault_env2: VaultEnv, tmp_path: Path,
                                                 notify: NotifyListener) -> None:
    port = free_port()
    cfg_file = two_volumes(vault_env2, tmp_path, address=f"http://127.0.0.1:{port}")
    cfg_file.write_text(cfg_file.read_text().replace('deadline = "20s"', 'deadline = "2s"'))
    t0 = time.monotonic()
    proc = start_agent(cfg_file, notify)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 69, err
    assert time.monotonic() - t0 < 15
    last = err.strip().splitlines()[-1]
    assert last.startswith("bootkey: ") and "Vault unreachable" in last
    assert "READY=1" not in notify.messages


def test_wrong_secret_id_fails_fast(vault_env2: VaultEnv, tmp_path: Path,
                                    notify: NotifyListener) -> None:
    cfg_file = two_volumes(vault_env2, tmp_path)
    cfg_file.write_text(cfg_file.read_text().replace('deadline = "20s"', 'deadline = "5m"'))
    vault_env2.secret_id_file.write_text("not-a-valid-secret-id")
    t0 = time.monotonic()
    proc = start_agent(cfg_file, notify)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 80, err
    assert time.monotonic() - t0 < 10
    assert "cannot log in" in err and "secret_id" in err


def test_socket_mode_serves_verified_keys_to_systemd_clients(
        vault_env2: VaultEnv, tmp_path: Path, notify: NotifyListener) -> None:
    """mode = "socket": the agent opens nothing itself and answers systemd-cryptsetup's
    requests on the key socket with each volume's Vault key, verbatim."""
    from bootkey_core.secret import SecretBuffer
    from tests.test_keysocket import systemd_client

    cfg = vault_env2.config()
    key = os.urandom(64)
    enroll_direct(cfg, vault_env2.enroll_token, make_image(tmp_path / "data.img"),
                  name="data", key=SecretBuffer.from_bytes(bytearray(key)))
    sock = tmp_path / "run" / "cryptsetup.sock"
    cfg_file = tmp_path / "bootkey.toml"
    keys_dir = tmp_path / "cryptsetup-keys.d"
    keys_dir.mkdir()
    cfg_file.write_text(vault_env2.toml(f'[keysocket]\npath = "{sock}"\ntimeout = "10s"\n'
                                        f'keys_dir = "{keys_dir}"\n')
                        .replace("[unlock]\n", f'[unlock]\nmode = "socket"\n'
                                 f'search = ["{tmp_path}/*.img"]\n'))
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert systemd_client(sock, "data") == key
        assert systemd_client(sock, "nosuch") == b""
        # crypttab lines with keyfile `none` find the socket through the keys.d link
        assert (keys_dir / "data.key").resolve() == sock.resolve()
        assert systemd_client(keys_dir / "data.key", "data") == key
        assert "STATUS=serving keys to systemd-cryptsetup" in notify.messages
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert not sock.exists()
    assert not (keys_dir / "data.key").exists()


def test_hotplugged_volume_is_unlocked(vault_env2: VaultEnv, tmp_path: Path,
                                       notify: NotifyListener) -> None:
    """A LUKS device that appears after READY (a loop device here: a real kernel uevent)
    and carries this host's token is unlocked without a restart."""
    cfg_file = two_volumes(vault_env2, tmp_path)
    later = tmp_path / "later"
    later.mkdir()
    enroll_direct(vault_env2.config(), vault_env2.enroll_token,
                  make_image(later / "hot.img"), name="hot")
    proc = start_agent(cfg_file, notify)
    loop = ""
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert "STATUS=2/2 volumes verified" in notify.messages
        loop = subprocess.run(["losetup", "-f", "--show", str(later / "hot.img")],
                              capture_output=True, text=True, check=True).stdout.strip()
        notify.wait_for(lambda m: m == "STATUS=3/3 volumes verified")
    finally:
        rc, err = stop(proc)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
    assert rc == 0, err
    assert f"hotplug: {loop} appeared, unlocking hot" in err


def test_vault_uninitialised_then_initialised(tmp_path: Path, notify: NotifyListener) -> None:
    """A brand-new Vault (501 uninitialised) is waited out like a sealed one. The agent
    reaches it through a proxy that is closed while the operator initialises it, so it
    never sees the half-provisioned state (which would rightly be a fatal 400)."""
    bao = TlsBao(tmp_path / "bao").start()
    port = free_port()
    proxy = LateProxy(port, ("127.0.0.1", bao.port))
    proxy.start()
    host_id = os.urandom(16).hex()
    role_id, secret_id = "bootkey-" + os.urandom(8).hex(), os.urandom(16).hex()
    sid = tmp_path / "secret-id"
    sid.write_text(secret_id)
    vols = tmp_path / "vols"
    vols.mkdir()
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(
        f'host_id = "{host_id}"\n[vault]\naddress = ["https://127.0.0.1:{port}"]\n'
        f'ca_file = "{bao.ca_file}"\ntimeout = "2s"\n[vault.approle]\n'
        f'role_id = "{role_id}"\nsecret_id_file = "{sid}"\n'
        f'[unlock]\ndeadline = "60s"\nretry_initial = "50ms"\nretry_max = "300ms"\n'
        f'search = ["{vols}/*.img"]\n')
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m.startswith("STATUS=waiting for Vault: attempt 2"))
        proxy.stop()
        bao.initialize()
        bao.unseal()
        env = provision(bao.client(), tmp_path / "env", host_id=host_id, ca_file=bao.ca_file)
        enroll_direct(env.config(), env.enroll_token, make_image(vols / "data.img"),
                      name="data")
        role = f"bootkey-boot-{host_id}"
        c = bao.client()
        c.write_data(f"auth/approle/role/{role}/role-id", data={"role_id": role_id})
        c.write_data(f"auth/approle/role/{role}/custom-secret-id",
                     data={"secret_id": secret_id})
        proxy = LateProxy(port, ("127.0.0.1", bao.port))
        proxy.start()
        notify.wait_for(lambda m: m == "READY=1")
        assert "STATUS=1/1 volumes verified" in notify.messages
    finally:
        rc, err = stop(proc)
        proxy.stop()
        bao.stop()
    assert rc == 0, err
    assert "waiting for Vault: attempt 1 failed (Vault is sealed or not initialised" in err
