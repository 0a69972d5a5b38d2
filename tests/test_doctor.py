"""`bootkey doctor`: the verdicts on values, then the command against real OpenBao on a
healthy set-up and on deliberately broken ones (policy, CA, memlock, access that ends)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hvac

from bootkey import crypttab, doctor, initrd, policy
from bootkey import doctor_checks as dc
from bootkey.doctor_checks import Status
from tests.support.bao import DevBao, TlsBao
from tests.support.certs import make_ca
from tests.support.luksimg import enroll_direct, make_image
from tests.support.vaultenv import VaultEnv

# ---- verdicts on values ------------------------------------------------------------------


@dataclass(frozen=True)
class Vol:
    name: str
    device: str = "/dev/sdb"
    luks_uuid: str = "5c1e0a52-8d1b-4f7e-9a7b-0c3f2a1d9e01"


OPTS = crypttab.Options()


def test_tab_lines_as_bootkey_crypttab_prints_them_pass() -> None:
    vols = [Vol("data")]
    for mode in crypttab.Mode:
        text = crypttab.render(vols, mode, OPTS)
        checks = dc.tab_lines(vols, mode, text, text, OPTS)
        assert [c.status for c in checks] == [Status.PASS], checks


def test_tab_lines_name_what_is_missing_and_the_line_to_use() -> None:
    fstab = "/dev/mapper/data /mnt/data ext4 defaults,_netdev 0 2\n"
    [c] = dc.tab_lines([Vol("data")], crypttab.Mode.AGENT, "", fstab, OPTS)
    assert c.status is Status.FAIL and "lacks nofail" in c.detail
    assert crypttab.fstab_line(Vol("data"), crypttab.Mode.AGENT, OPTS) in c.fix

    fstab = ("/dev/mapper/data /mnt/data ext4 "
             "defaults,_netdev,nofail,x-systemd.requires=bootkey.service 0 2\n")
    [c] = dc.tab_lines([Vol("data")], crypttab.Mode.AGENT, "", fstab, OPTS)
    assert c.status is Status.WARN and "x-systemd.requires=bootkey.service" in c.detail

    ct = "data UUID=5c1e /etc/keys/data luks,nofail\n"
    [c] = dc.tab_lines([Vol("data")], crypttab.Mode.SOCKET, ct, "", OPTS)
    assert c.status is Status.FAIL
    assert "lacks _netdev" in c.detail and OPTS.socket_path in c.detail


def test_access_that_ends_fails_with_the_fix_and_periodic_access_passes() -> None:
    periodic = dc.TokenFacts(ttl=3600, period=3600, explicit_max_ttl=0, renewable=True)
    expiring = dc.TokenFacts(ttl=60, period=0, explicit_max_ttl=120, renewable=True)
    assert dc.token(periodic).status is Status.PASS
    assert dc.token(expiring).status is Status.WARN
    assert dc.relogin(expiring, None, "file x").status is Status.PASS
    gone = dc.relogin(expiring, "invalid secret_id", "file x")
    assert gone.status is Status.FAIL and "token_period" in gone.fix
    assert dc.relogin(periodic, "invalid secret_id", "file x").status is Status.WARN


def test_memlock_verdicts() -> None:
    assert dc.memlock(8192, None, None).status is Status.PASS
    bad = dc.memlock(64, "Cannot allocate memory", None)
    assert bad.status is Status.FAIL and "LimitMEMLOCK=infinity" in bad.fix
    # the shell cannot lock, but the unit the agent runs in can
    assert dc.memlock(64, "Cannot allocate memory", "infinity").status is Status.WARN
    assert dc.unit_memlock(True, "8M").status is Status.FAIL
    assert dc.unit_memlock(True, "infinity").status is Status.PASS


def test_unit_facts_read_limit_from_drop_ins_and_enablement_from_wants(tmp_path: Path) -> None:
    src = Path(__file__).parent.parent / "systemd" / "bootkey.service"
    lib = tmp_path / "lib/systemd/system"
    lib.mkdir(parents=True)
    shutil.copy(src, lib / "bootkey.service")
    where = doctor.Where(tmp_path)
    facts = doctor.unit_facts(where)
    assert facts == doctor.UnitFacts(True, "infinity", False, False)
    dropin = tmp_path / "etc/systemd/system/bootkey.service.d"
    dropin.mkdir(parents=True)
    (dropin / "mem.conf").write_text("[Service]\nLimitMEMLOCK=64K\n")
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "bootkey.service").symlink_to(lib / "bootkey.service")
    assert doctor.unit_facts(where) == doctor.UnitFacts(True, "64K", True, False)


def test_clock_skew_verdicts() -> None:
    assert dc.clock_skew(2.0).status is Status.PASS
    assert dc.clock_skew(-120.0).status is Status.WARN
    assert "behind" in dc.clock_skew(-120.0).detail
    assert dc.clock_skew(900.0).status is Status.FAIL


# ---- the command against real OpenBao ---------------------------------------------------------


Checks = dict[str, dict[str, str]]


def _doctor(cfg: Path, root: Path, prefix: Sequence[str] = ()) -> tuple[int, Checks]:
    res = subprocess.run([*prefix, sys.executable, "-m", "bootkey.cli", "--config", str(cfg),
                          "doctor", "--json", "--root", str(root)],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={k: v for k, v in os.environ.items()
                              if k != "CREDENTIALS_DIRECTORY"})
    assert res.returncode in (0, 90), res.stderr
    return res.returncode, {c["name"]: c for c in json.loads(res.stdout)}


def _dm_present() -> bool:
    return Path("/sys/class/misc/device-mapper").exists()


def _expected_rc(checks: Checks) -> int:
    return 90 if any(c["status"] == "fail" for c in checks.values()) else 0


def test_healthy_set_up_passes(vault_env2: VaultEnv, tmp_path: Path) -> None:
    vols = tmp_path / "vols"
    vols.mkdir()
    cfg_path = tmp_path / "bootkey.toml"
    cfg_path.write_text(vault_env2.toml(f'search = ["{vols}/*.img"]\n'))
    cfg = vault_env2.config(f'search = ["{vols}/*.img"]\n')
    enroll_direct(cfg, vault_env2.enroll_token, make_image(vols / "data.img"), name="data")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/fstab").write_text(crypttab.render(
        [Vol("data")], crypttab.Mode.AGENT, crypttab.Options()))
    lib = root / "lib/systemd/system"
    lib.mkdir(parents=True)
    shutil.copy(Path(__file__).parent.parent / "systemd" / "bootkey.service", lib)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "bootkey.service").symlink_to(lib / "bootkey.service")

    rc, checks = _doctor(cfg_path, root)

    for name in ("config", f"vault {vault_env2.address}", "clock", "approle login", "token",
                 "policy kv read data", "policy transit decrypt", "re-login",
                 "unit LimitMEMLOCK", "cryptsetup", "unit", "crypttab data"):
        assert checks[name]["status"] == "pass", checks[name]
    assert "periodic" in checks["token"]["detail"]
    # device-mapper is the kernel's: this machine may or may not have it
    dm = checks["device-mapper"]
    assert dm["status"] == ("pass" if _dm_present() else "fail"), dm
    fails = {n for n, c in checks.items() if c["status"] == "fail"}
    assert fails <= {"device-mapper", "memlock"}
    assert rc == _expected_rc(checks)
    # doctor revoked its tokens and left the secret_id where it was
    assert vault_env2.secret_id_file.exists()


def test_policy_without_transit_decrypt_names_path_and_capability(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path) -> None:
    vcfg = vault_env2.config().vault
    kv_only = policy.boot_policy(vcfg, vault_env2.host_id).split("path \"transit/")[0]
    bao.client().sys.create_or_update_policy(f"bootkey-boot-{vault_env2.host_id}", kv_only)
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text(vault_env2.toml())
    rc, checks = _doctor(cfg, tmp_path)
    c = checks["policy transit decrypt"]
    assert c["status"] == "fail"
    assert "transit/decrypt/bootkey" in c["detail"] and "`update`" in c["detail"]
    assert "bootkey policy" in c["fix"]
    assert rc == 90


def test_wrong_ca_names_the_ca_file(tls_bao: TlsBao, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca("not the bao CA").cert_pem)
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text(f'host_id = "h1"\n[vault]\naddress = "{tls_bao.address}"\n'
                   f'ca_file = "{other}"\n[vault.approle]\nrole_id = "x"\n')
    rc, checks = _doctor(cfg, tmp_path)
    c = checks[f"vault {tls_bao.address}"]
    assert c["status"] == "fail" and str(other) in c["detail"] and "ca_file" in c["fix"]
    assert rc == 90
    # with the right CA the same server is reachable (uninitialised: that is named too)
    cfg.write_text(cfg.read_text().replace(str(other), str(tls_bao.ca_file)))
    _, checks = _doctor(cfg, tmp_path)
    assert "not initialised" in checks[f"vault {tls_bao.address}"]["detail"]


def test_tiny_memlock_limit_names_limitmemlock(tmp_path: Path) -> None:
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text('host_id = "h1"\n[vault]\naddress = "http://127.0.0.1:9"\n')
    # the agent's unit has no CAP_IPC_LOCK (only LimitMEMLOCK lets it lock); root here has
    # it, so the child drops it as well as getting a 64 KiB limit
    tools = [shutil.which("prlimit"), shutil.which("setpriv")]
    assert all(tools), "util-linux (prlimit, setpriv) is missing: scripts/setup.sh installs it"
    prefix = [str(tools[0]), "--memlock=65536:65536", str(tools[1]),
              "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    rc, checks = _doctor(cfg, tmp_path, prefix)
    c = checks["memlock"]
    assert c["status"] == "fail" and "64 KiB" in c["detail"]
    assert "LimitMEMLOCK=infinity" in c["fix"]
    assert rc == 90


def test_single_use_secret_id_with_a_non_periodic_token_fails_with_the_fix(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path) -> None:
    c: hvac.Client = bao.client()
    role = f"bootkey-boot-{vault_env2.host_id}"
    c.auth.approle.create_or_update_approle(
        role, token_policies=[role], token_ttl="60s", token_max_ttl="120s",
        token_period=0, secret_id_num_uses=1)
    sid = c.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    vault_env2.secret_id_file.write_text(sid)
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text(vault_env2.toml())
    rc, checks = _doctor(cfg, tmp_path)
    assert checks["approle login"]["status"] == "pass"
    assert checks["token"]["status"] == "warn" and "not periodic" in checks["token"]["detail"]
    r = checks["re-login"]
    assert r["status"] == "fail" and "token_period" in r["fix"]
    assert "secret_id" in r["detail"]
    assert rc == 90


def test_missing_config_fails_naming_the_file_and_the_machine_is_still_checked(
        tmp_path: Path) -> None:
    rc, checks = _doctor(tmp_path / "nope.toml", tmp_path)
    assert checks["config"]["status"] == "fail"
    assert str(tmp_path / "nope.toml") in checks["config"]["detail"]
    assert {"memlock", "cryptsetup", "device-mapper", "unit"} <= set(checks)
    assert rc == 90


def test_a_wrapped_secret_id_is_looked_up_never_unwrapped(
        vault_env2: VaultEnv, bao: DevBao, tmp_path: Path) -> None:
    c: hvac.Client = bao.client()
    res = c.auth.approle.generate_secret_id(f"bootkey-boot-{vault_env2.host_id}", wrap_ttl="1h")
    wrapped = tmp_path / "secret-id.wrapped"
    wrapped.write_text(res["wrap_info"]["token"])
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text(vault_env2.toml().replace(
        "[vault.approle]\n", f'[vault.approle]\nwrapped_secret_id_file = "{wrapped}"\n'))
    _, checks = _doctor(cfg, tmp_path)
    login = checks["approle login"]
    assert login["status"] == "warn" and "not tried" in login["detail"]
    assert "secret-id" in login["detail"]  # the wrapping token's creation path
    # still there and still unwrappable: the agent's first start can use it
    assert wrapped.exists()
    unwrapped = hvac.Client(url=bao.address, token=wrapped.read_text()).sys.unwrap()
    assert unwrapped["data"]["secret_id"]


def test_a_dead_address_next_to_a_live_one_is_a_warning() -> None:
    live = dc.reachable("https://v1:8200", 200, None)
    dead = dc.reachable("https://v2:8200", None, "connection failed")
    assert [c.status for c in dc.failover([live, dead])] == [Status.PASS, Status.WARN]
    assert [c.status for c in dc.failover([dead])] == [Status.FAIL]


def test_access_that_ends_at_a_known_time_is_a_warning_naming_it() -> None:
    expiring = dc.TokenFacts(ttl=60, period=0, explicit_max_ttl=0, renewable=True)
    c = dc.relogin(expiring, None, "file x", "2026-12-05T03:00:00+00:00")
    assert c.status is Status.WARN and "2026-12-05T03:00:00" in c.detail
    assert "token_period" in c.fix
    periodic = dc.TokenFacts(ttl=5400, period=5400, explicit_max_ttl=0, renewable=True)
    assert "period 1h30m" in dc.token(periodic).detail
    assert dc.relogin(periodic, None, "file x", "2026-12-05T03:00:00+00:00").status \
        is Status.PASS


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    ca = tmp_path / "no-such-ca.pem"
    check, skew = doctor.probe_vault("https://127.0.0.1:9", ca, 1.0)
    assert check.status is Status.FAIL and str(ca) in check.detail and skew is None


def test_every_config_problem_is_listed(tmp_path: Path) -> None:
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text('host_id = "h1"\n[vault]\ntimeout = "soon"\n[unlock]\nparalel = 3\n')
    check, parsed = doctor.check_config(str(cfg))
    assert parsed is None and check.status is Status.FAIL
    assert "vault.timeout" in check.detail and "unlock.paralel" in check.detail


# ---- the root volume in the initrd ------------------------------------------------------


def test_initrd_volumes_are_checked_for_a_sealed_secret_id_not_for_netdev() -> None:
    assert str(initrd.SOCKET_PATH) == dc.INITRD_SOCKET
    line = initrd.root_setup("root", Vol("root").luks_uuid).crypttab
    tab = f"# {line}\n{line}\ndata UUID=x /run/bootkey/cryptsetup.sock luks,_netdev,nofail\n"
    assert dc.initrd_volumes(tab) == ["root"]
    # no _netdev/nofail on the root: that line is right for the initrd
    assert dc.tab_lines([Vol("root")], crypttab.Mode.AGENT, tab, "", OPTS) == []
    warn = dc.initrd_secret_id(["root"], "unsealed: /etc/bootkey/secret-id is readable …")
    assert warn is not None and warn.status is Status.WARN
    assert "root opened in the initrd" in warn.detail and "TPM2" in warn.fix
    ok = dc.initrd_secret_id(["root"], "sealed: systemd-creds credential /etc/bootkey/x.cred")
    assert ok is not None and ok.status is Status.PASS
    assert dc.initrd_secret_id([], "unsealed: …") is None


def test_doctor_warns_about_an_unsealed_secret_id_in_the_initrd(
    vault_env2: VaultEnv, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "bootkey.toml"
    cfg_path.write_text(vault_env2.toml())
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/crypttab").write_text(initrd.root_setup("root", Vol("root").luks_uuid).crypttab)
    _, checks = _doctor(cfg_path, root)
    c = checks["initrd secret_id"]
    assert c["status"] == "warn", c
    assert f"unsealed: {vault_env2.secret_id_file} is readable by anyone holding the disk" \
        in c["detail"]
