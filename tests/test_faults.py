"""The fault matrix (docs/reliability.md): each test puts one fault between bootkey's real
CLI or agent and a real OpenBao, and checks what bootkey does and what the operator sees.
Network faults go through `LateProxy`, server answers through `HttpFront`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from bootkey import keystore
from bootkey.vault import VaultSession
from bootkey_core.secret import SecretBuffer
from tests.support.bao import DevBao, TlsBao, free_port
from tests.support.certs import make_ca
from tests.support.kesagent import KesAgent, agent_token, grant_kes, start_kes_agent
from tests.support.luksimg import enroll_direct, make_image
from tests.support.notify import NotifyListener
from tests.support.proxy import HttpFront, LateProxy
from tests.support.vaultenv import VaultEnv, provision
from tests.support.wait import wait_for
from tests.test_agent import start_agent, stop

BOOTKEY = [sys.executable, "-m", "bootkey.cli"]
NAMES = ["data", "logs"]


def enroll_two(env: VaultEnv, tmp: Path) -> Path:
    """Two enrolled image volumes under tmp/images; returns that directory."""
    images = tmp / "images"
    images.mkdir()
    for n in NAMES:
        enroll_direct(env.config(), env.enroll_token, make_image(images / f"{n}.img"), name=n)
    return images


def config_file(env: VaultEnv, tmp: Path, images: Path, *addresses: str, extra: str = "",
                deadline: str = "20s") -> Path:
    text = env.toml(extra, deadline=deadline)
    if addresses:
        listed = ", ".join(f'"{a}"' for a in addresses)
        text = text.replace(f'address = ["{env.address}"]', f"address = [{listed}]")
    p = tmp / "bootkey.toml"
    p.write_text(text.replace("[unlock]\n", f'[unlock]\nsearch = ["{images}/*.img"]\n'))
    return p


def check_all(cfg_file: Path, timeout: float = 90) -> tuple[int, list[str], str, float]:
    """`bootkey unlock --all --check --json`: (exit code, verified names, what the operator
    reads — stderr and each failed volume's reason —, seconds)."""
    t0 = time.monotonic()
    res = subprocess.run([*BOOTKEY, "--config", str(cfg_file), "unlock", "--all", "--check",
                          "--json"], capture_output=True, text=True, timeout=timeout,
                         check=False)
    elapsed = time.monotonic() - t0
    try:
        vols = json.loads(res.stdout)["volumes"]
    except ValueError:
        vols = []
    reasons = "".join(f"{v['name']}: {v['reason']}\n" for v in vols if v.get("reason"))
    return (res.returncode, sorted(v["name"] for v in vols if v["result"] == "verified"),
            res.stderr + reasons, elapsed)


def bao_port(env: VaultEnv) -> int:
    return int(env.address.rsplit(":", 1)[1])


@pytest.fixture
def images(vault_env2: VaultEnv, tmp_path: Path) -> Path:
    return enroll_two(vault_env2, tmp_path)


# ---- slow and stalled connections ----------------------------------------------------


def proxy_to(env: VaultEnv, *, delay: float = 0.0, stalled: bool = False) -> LateProxy:
    proxy = LateProxy(free_port(), ("127.0.0.1", bao_port(env)), delay=delay).start()
    if stalled:
        proxy.stall()
    return proxy


def check_through(proxy: LateProxy, env: VaultEnv, tmp: Path, images: Path, *after: str,
                  deadline: str = "20s") -> tuple[int, list[str], str, float]:
    """`check_all` with the proxy first in `[vault] address` (then `after`); stops it."""
    try:
        return check_all(config_file(env, tmp, images, f"http://127.0.0.1:{proxy.port}",
                                     *after, deadline=deadline))
    finally:
        proxy.stop()


def test_slow_vault_is_waited_for(vault_env2: VaultEnv, images: Path, tmp_path: Path) -> None:
    """Every chunk 300 ms late, under `vault.timeout` (2 s): slower, nothing fails."""
    rc, ok, err, elapsed = check_through(proxy_to(vault_env2, delay=0.3), vault_env2,
                                         tmp_path, images)
    assert (rc, ok) == (0, NAMES), err
    assert elapsed > 0.6  # login plus at least one read went through the delay


def test_vault_slower_than_the_timeout_fails_at_the_deadline(
        vault_env2: VaultEnv, images: Path, tmp_path: Path) -> None:
    rc, ok, err, elapsed = check_through(proxy_to(vault_env2, delay=3.0), vault_env2,
                                         tmp_path, images, deadline="4s")
    assert (rc, ok) == (69, []), err
    assert "Vault timed out while trying to log in with AppRole" in err
    assert elapsed < 4 + 2 + 3  # deadline + one request timeout + start-up


def test_stalled_address_is_failed_over(vault_env2: VaultEnv, images: Path,
                                        tmp_path: Path) -> None:
    """A route that swallows packets (connection open, no answer) costs one
    `vault.timeout`, then the next address serves."""
    rc, ok, err, elapsed = check_through(proxy_to(vault_env2, stalled=True), vault_env2,
                                         tmp_path, images, vault_env2.address)
    assert (rc, ok) == (0, NAMES), err
    assert elapsed < 2 * 2 + 3  # at most a timeout or two on the stalled address


def test_stalled_only_address_fails_at_the_deadline(vault_env2: VaultEnv, images: Path,
                                                    tmp_path: Path) -> None:
    rc, ok, err, elapsed = check_through(proxy_to(vault_env2, stalled=True), vault_env2,
                                         tmp_path, images, deadline="4s")
    assert (rc, ok) == (69, []), err
    assert "Vault timed out" in err
    assert elapsed < 4 + 2 + 3


# ---- TLS -----------------------------------------------------------------------------


@pytest.fixture
def tls_env(tls_bao: TlsBao, tmp_path: Path) -> VaultEnv:
    tls_bao.initialize()
    tls_bao.unseal()
    return provision(tls_bao.client(), tmp_path / "env", ca_file=tls_bao.ca_file)


def test_tls_ca_mismatch(tls_env: VaultEnv, tmp_path: Path) -> None:
    """`vault.ca_file` is not the CA that signed Vault's certificate: no amount of
    waiting fixes that, so bootkey says so at once and names the setting."""
    images = enroll_two(tls_env, tmp_path)
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca("some other CA").cert_pem)
    cfg = config_file(tls_env, tmp_path, images, deadline="5s")
    cfg.write_text(cfg.read_text().replace(str(tls_env.ca_file), str(other)))
    rc, ok, err, elapsed = check_all(cfg)
    assert ok == []
    assert "certificate" in err and "ca_file" in err, err
    assert rc == 78 and elapsed < 4, (rc, elapsed, err)


# ---- credentials and policy ------------------------------------------------------------


def test_secret_id_expired(vault_env2: VaultEnv, bao: DevBao, images: Path,
                           tmp_path: Path) -> None:
    root = bao.client()
    role = f"bootkey-boot-{vault_env2.host_id}"
    res = root.write_data(f"auth/approle/role/{role}/secret-id", data={"ttl": "1s"})
    sid = res["data"]["secret_id"]
    vault_env2.secret_id_file.write_text(sid)

    def expired() -> bool:
        try:
            hvac.Client(url=bao.address).auth.approle.login(vault_env2.role_id, sid)
        except hvac.exceptions.VaultError:
            return True
        return False

    wait_for(expired, timeout=10, what="the secret_id to expire", interval=0.2)
    rc, ok, err, elapsed = check_all(config_file(vault_env2, tmp_path, images,
                                                 deadline="60s"))
    assert (rc, ok) == (80, []), err
    assert "cannot log in: invalid or expired secret_id" in err
    assert elapsed < 10  # refused at once, not retried until the deadline


# ---- transit key rotation ----------------------------------------------------------------


def test_transit_key_rotated_old_ciphertexts_open_and_rewrap(
        vault_env2: VaultEnv, bao: DevBao, images: Path, tmp_path: Path) -> None:
    root = bao.client()
    cfg_file = config_file(vault_env2, tmp_path, images)
    root.secrets.transit.rotate_key("bootkey")
    assert check_all(cfg_file)[:2] == (0, NAMES)  # sealed under the old version: still opens
    latest = root.secrets.transit.read_key("bootkey")["data"]["latest_version"]
    env = {"VAULT_TOKEN": vault_env2.enroll_token, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for name in NAMES:
        res = subprocess.run([*BOOTKEY, "--config", str(cfg_file), "rotate", name, "--rewrap"],
                             capture_output=True, text=True, timeout=60, check=False, env=env)
        assert res.returncode == 0, res.stderr
    session = VaultSession(vault_env2.config().vault, token=vault_env2.enroll_token)
    cfg = vault_env2.config()
    for img in sorted(images.glob("*.img")):
        from bootkey import luks

        loc = keystore.location_for(cfg, vault_env2.host_id, luks.inspect(str(img)).uuid)
        entry = keystore.read_entry(session, loc)
        assert entry is not None
        assert {k.sealed.split(":")[1] for k in entry.keys} == {f"v{latest}"}
    # Old key versions retired for decryption: everything still opens.
    root.write_data("transit/keys/bootkey/config", data={"min_decryption_version": latest})
    try:
        assert check_all(cfg_file)[:2] == (0, NAMES)
    finally:
        root.write_data("transit/keys/bootkey/config", data={"min_decryption_version": 1})


# ---- Vault answering 429 and 500 ---------------------------------------------------------


@pytest.fixture
def front(bao: DevBao) -> Iterator[HttpFront]:
    f = HttpFront(bao.address).start()
    yield f
    f.stop()


DECRYPT = "/v1/transit/decrypt/"


def test_vault_rate_limits_then_serves(vault_env2: VaultEnv, images: Path, tmp_path: Path,
                                       front: HttpFront) -> None:
    """429 is waited out with back-off (no request storm), then every volume verifies."""
    rule = front.answer(DECRYPT, 429, times=4)
    rc, ok, err, _ = check_all(config_file(vault_env2, tmp_path, images, front.address))
    assert (rc, ok) == (0, NAMES), err
    assert rule.hits == 4
    assert front.count(DECRYPT) == 4 + len(NAMES)
    assert "rate-limited" in err  # each wait is logged with its cause


def test_vault_500_until_the_deadline(vault_env2: VaultEnv, images: Path, tmp_path: Path,
                                      front: HttpFront) -> None:
    front.answer(DECRYPT, 500)
    rc, ok, err, elapsed = check_all(config_file(vault_env2, tmp_path, images,
                                                 front.address, deadline="3s"))
    assert (rc, ok) == (69, []), err
    assert "Vault failed to decrypt (transit/decrypt/bootkey): server error" in err
    assert elapsed < 3 + 2 + 3
    # back-off, not a busy loop: a handful of tries per volume in 3 s
    assert len(NAMES) <= front.count(DECRYPT) <= 30 * len(NAMES)


# ---- the KV entry, the token and the policy go away ----------------------------------------


def test_kv_entry_deleted(vault_env2: VaultEnv, images: Path, tmp_path: Path) -> None:
    """The other volume still verifies; the lost one names its Vault path and the fix."""
    cfg = vault_env2.config()
    session = VaultSession(cfg.vault, token=vault_env2.enroll_token)
    from bootkey import luks

    uuid = luks.inspect(str(images / "logs.img")).uuid
    loc = keystore.location_for(cfg, vault_env2.host_id, uuid)
    session.kv_delete(loc.kv_mount, loc.kv_version, loc.path)
    cfg_file = config_file(vault_env2, tmp_path, images)
    rc, ok, err, _ = check_all(cfg_file)
    assert (rc, ok) == (1, ["data"]), err
    assert f"logs: volume logs (UUID {uuid}): no key in Vault at {loc.display}" in err
    res = subprocess.run([*BOOTKEY, "--config", str(cfg_file), "unlock", "logs", "--check"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 87, res.stderr
    assert "bootkey enroll" in res.stderr.strip().splitlines()[-1]


def kes_agent_on(env: VaultEnv, tmp: Path, prefix: str, extra: str = "") -> KesAgent:
    return start_kes_agent(tmp, env.toml, prefix, start_agent, extra)


def stop_agent(agent: KesAgent) -> None:
    agent.http.close()
    rc, err = stop(agent.proc)
    agent.notify.close()
    assert rc == 0, err


def test_token_revoked_kes_logs_in_again(vault_env2: VaultEnv, bao: DevBao,
                                         tmp_path: Path) -> None:
    root = bao.client()
    prefix = grant_kes(root, vault_env2.host_id)
    started = int(time.time())
    kes = kes_agent_on(vault_env2, tmp_path, prefix)
    try:
        token = agent_token(root, f"bootkey-boot-{vault_env2.host_id}", started)
        root.auth.token.revoke_accessor(token["accessor"])
        dek = kes.create_and_generate("minio-after-revoke")  # a Vault write and a read
        assert kes.decrypts("minio-after-revoke", dek)
    finally:
        stop_agent(kes)


def test_token_revoked_key_socket_logs_in_again(vault_env2: VaultEnv, bao: DevBao,
                                                tmp_path: Path) -> None:
    from tests.test_keysocket import systemd_client

    cfg = vault_env2.config()
    key = os.urandom(64)
    enroll_direct(cfg, vault_env2.enroll_token, make_image(tmp_path / "data.img"),
                  name="data", key=SecretBuffer.from_bytes(bytearray(key)))
    sock = tmp_path / "run" / "cryptsetup.sock"
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    cfg_file = tmp_path / "bootkey.toml"
    cfg_file.write_text(vault_env2.toml(f'[keysocket]\npath = "{sock}"\ntimeout = "10s"\n'
                                        f'keys_dir = "{keys_dir}"\n')
                        .replace("[unlock]\n", '[unlock]\nmode = "socket"\n'
                                 f'search = ["{tmp_path}/*.img"]\n'))
    notify = NotifyListener(tmp_path / "notify.sock")
    started = int(time.time())
    proc = start_agent(cfg_file, notify)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        root = bao.client()
        token = agent_token(root, f"bootkey-boot-{vault_env2.host_id}", started)
        root.auth.token.revoke_accessor(token["accessor"])
        assert systemd_client(sock, "data") == key
    finally:
        rc, err = stop(proc)
        notify.close()
    assert rc == 0, err


def test_policy_revoked_while_kes_serves(vault_env2: VaultEnv, bao: DevBao,
                                         front: HttpFront, tmp_path: Path) -> None:
    """KES keeps serving the keys it holds until the cache expires (`cache.expiry.any`);
    then the key's next read is refused by Vault and KES answers exactly its 502. The
    agent reaches Vault through `front`, which only counts the keystore's reads."""
    root = bao.client()
    prefix = grant_kes(root, vault_env2.host_id)
    entry = f"/v1/secret/data/{prefix}/minio-k"
    env = VaultEnv(**{**vault_env2.__dict__, "address": front.address})
    kes = kes_agent_on(env, tmp_path, prefix,
                       '[kes.cache.expiry]\nany = "3s"\nunused = "0s"\noffline = "0s"\n')
    try:
        dek = kes.create_and_generate("minio-k")
        reads = front.count(entry)
        # Align with the cache: the moment KES reads the key again, it emptied its cache
        # and the next emptying is 3 s away.
        wait_for(lambda: kes.decrypts("minio-k", dek) and front.count(entry) > reads,
                 timeout=20, what="KES to refresh its cache", interval=0.05)
        reads = front.count(entry)
        root.sys.delete_policy(prefix)
        assert kes.decrypts("minio-k", dek)  # served from the cache ...
        assert front.count(entry) == reads  # ... without asking Vault
        wait_for(lambda: kes.decrypt("minio-k", dek)[0] != 200, timeout=20,
                 what="the cache to expire", interval=0.2)
        code, body = kes.decrypt("minio-k", dek)
        assert (code, json.loads(body)) == (502, {"message": "failed to read key"})
        assert ("GET", entry, 403) in front.seen
        assert kes.call("/v1/key/create/minio-new", {}) == \
            (502, '{"message":"failed to create key"\n}')  # KES's bytes
    finally:
        stop_agent(kes)
