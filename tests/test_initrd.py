"""bootkey.initrd and `bootkey initrd`: what the operator sets, what the dracut module
installs, and the initrd's key socket answering systemd-cryptsetup over a real socket.
The boot itself is proven in tests/vm/test_initrd.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bootkey import cli, config, initrd
from bootkey_core.secret import SecretBuffer
from tests.support.bao import free_port
from tests.support.luksimg import enroll_direct, make_image
from tests.support.scan import register_secret
from tests.support.vaultenv import VaultEnv
from tests.support.wait import wait_for
from tests.test_askpassword import agent_reply
from tests.test_keysocket import systemd_client

MODULE_DIR = Path(__file__).resolve().parent.parent / "packaging/dracut/90bootkey"


def test_root_setup_names_the_initrd_socket_and_keeps_the_prompt() -> None:
    s = initrd.root_setup("root", "5c1e0a52-8d1b-4f7e-9a7b-0c3f2a1d9e01")
    fields = s.crypttab.split()
    assert fields[:3] == ["root", "UUID=5c1e0a52-8d1b-4f7e-9a7b-0c3f2a1d9e01",
                          "/run/bootkey/initrd.sock"]
    opts = fields[3].split(",")
    assert "x-initrd.attach" in opts
    # the console prompt must stay the way in when Vault is away
    assert not any(o.startswith("headless") for o in opts)
    assert s.kernel_cmdline == "root=/dev/mapper/root rd.neednet=1 ip=dhcp"
    assert s.dracut_conf == 'add_dracutmodules+=" bootkey "\n'


def test_the_module_finds_the_socket_path_it_is_given() -> None:
    text = (MODULE_DIR / "module-setup.sh").read_text()
    assert str(initrd.SOCKET_PATH).replace(".", "\\.") in text
    assert f"ListenStream={initrd.SOCKET_PATH}" in (MODULE_DIR / "bootkey-initrd.socket"
                                                    ).read_text()
    subprocess.run(["bash", "-n", str(MODULE_DIR / "module-setup.sh")], check=True)


def test_secret_id_sealing_says_sealed_only_for_a_present_credential(tmp_path: Path) -> None:
    plain = config.parse('[vault.approle]\nrole_id = "r"\n')
    assert initrd.secret_id_sealing(plain).startswith("unsealed: /etc/bootkey/secret-id")
    cred = config.parse('[vault.approle]\nrole_id = "r"\nsecret_id_credential = "sid"\n')
    missing = initrd.secret_id_sealing(cred, directory=tmp_path)
    assert missing.startswith("unsealed:")
    assert f"systemd-creds encrypt --with-key=tpm2 --name=sid /etc/bootkey/secret-id " \
        f"{tmp_path / 'sid.cred'}" in missing
    (tmp_path / "sid.cred").write_bytes(b"sealed blob")
    assert initrd.secret_id_sealing(cred, directory=tmp_path).startswith("sealed:")


SYSTEMD_CREDS = shutil.which("systemd-creds")
needs_creds = pytest.mark.skipif(SYSTEMD_CREDS is None, reason="systemd-creds is not "
                                 "installed (scripts/setup.sh installs systemd)")


@needs_creds
def test_the_initrd_decrypts_its_sealed_secret_id_or_says_why_not(tmp_path: Path) -> None:
    # Sealed with this host's key here (the TPM2 case is proven in tests/vm/test_initrd.py):
    # the same `systemd-creds decrypt` the initrd runs.
    secret = os.urandom(18).hex().encode()
    register_secret(secret, "test secret_id credential")
    cred = tmp_path / "sid.cred"
    enc = subprocess.run(["systemd-creds", "encrypt", "--with-key=host", "--name=sid", "-",
                          str(cred)], input=secret, capture_output=True, check=False)
    assert enc.returncode == 0, enc.stderr
    assert initrd.decrypt_credential("sid", cred) == bytearray(secret)
    # a credential sealed under another name, and one that is not a credential at all
    with pytest.raises(initrd.CredentialError) as e:
        initrd.decrypt_credential("other", cred)
    assert str(e.value).startswith(f"{cred}: this machine's TPM2 cannot decrypt")
    assert "systemd-creds encrypt --with-key=tpm2 --name=other" in str(e.value)
    assert secret.decode() not in str(e.value)
    cred.write_bytes(b"not a credential")
    with pytest.raises(initrd.CredentialError):
        initrd.decrypt_credential("sid", cred)


def test_a_sealed_secret_id_is_read_by_decrypting_it_when_no_unit_loaded_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config.parse('[vault.approle]\nrole_id = "r"\nsecret_id_credential = "sid"\n')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert initrd._secret_id_reader(cfg) is not None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/x")  # LoadCredential*=
    assert initrd._secret_id_reader(cfg) is None
    plain = config.parse('[vault.approle]\nrole_id = "r"\nsecret_id_file = "/s"\n')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert initrd._secret_id_reader(plain) is None


def test_config_files_are_what_the_key_socket_reads(tmp_path: Path) -> None:
    cfg = config.parse('[vault]\nca_file = "/etc/bootkey/ca.pem"\n'
                       '[vault.approle]\nrole_id_file = "/etc/bootkey/role-id"\n')
    assert initrd.config_files(cfg, Path("/etc/bootkey/bootkey.toml")) == [
        Path("/etc/bootkey/bootkey.toml"), Path("/etc/bootkey/ca.pem"),
        Path("/etc/bootkey/role-id"), Path("/etc/bootkey/secret-id")]


def test_list_files_holds_the_unlock_path_and_not_the_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "bootkey.toml"
    sid = tmp_path / "secret-id"
    sid.write_text("s")
    cfg.write_text(f'[vault.approle]\nrole_id = "r"\nsecret_id_file = "{sid}"\n')
    # a fresh interpreter, as the dracut module runs it: only what unlocking imports
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from bootkey.initrd import main; "
         "sys.exit(main(sys.argv[1:]))", "--list-files", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.splitlines()
    names = {Path(f).name for f in files}
    for needed in ("keysocket.py", "vault.py", "unlock.py", "initrd.py", "idna.py"):
        assert needed in names, needed
    # imported inside functions: the activated socket (without it the initrd would bind
    # its own and leave systemd-cryptsetup on systemd's, unanswered) and the journal
    assert any(f.endswith("/systemd/daemon.py") for f in files)
    assert any(f.endswith("/systemd/journal.py") for f in files)
    assert str(cfg) in files and str(sid) in files
    # libraries of extension modules, which dracut would not resolve (ctypes → libffi)
    assert any(Path(f).name.startswith("libffi.so") for f in files)
    # the CLI, enrolment and the KES server stay out of the initrd; of kes, only the
    # [kes] section's model comes along (the config is validated whole)
    kes_config_only = ("/kes/__init__.py", "/kes/config.py", "/kes/policy.py")
    assert not any("/bootkey/commands/" in f or "/bootkey/enroll" in f
                   or ("/kes/" in f and f.endswith(".py") and not f.endswith(kes_config_only))
                   for f in files)
    assert not any("/kes/server" in f or "/kes/api" in f for f in files)


def test_initrd_command_prints_the_root_line_from_the_token(
    vault_env: VaultEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "root.img"
    make_image(img)
    uuid = subprocess.run(["cryptsetup", "luksUUID", str(img)], capture_output=True,
                          text=True, check=True).stdout.strip()
    cfg = tmp_path / "bootkey.toml"
    cfg.write_text(vault_env.toml(f'[[volume]]\nname = "root"\ndevice = "{img}"\n'))
    assert cli.main(["--config", str(cfg), "initrd"]) == 0
    out = capsys.readouterr().out
    assert f"root  UUID={uuid}  /run/bootkey/initrd.sock  luks,x-initrd.attach" in out
    assert "root=/dev/mapper/root rd.neednet=1 ip=dhcp" in out
    assert "# secret_id: unsealed:" in out
    assert cli.main(["--config", str(cfg), "initrd", "--name", "nope"]) == 64
    assert "no volume 'nope'" in capsys.readouterr().err


def _serve(cfg: config.Config, sock: Path,
           monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Thread, threading.Event]:
    monkeypatch.setattr(initrd, "SOCKET_PATH", sock)
    stop = threading.Event()
    t = threading.Thread(target=initrd.serve, args=(cfg, stop, sock.parent / "ask-password"))
    t.start()
    wait_for(sock.exists, timeout=10, what="the initrd key socket")
    return t, stop


def test_initrd_socket_gives_systemd_cryptsetup_the_root_key(
    vault_env2: VaultEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(64)
    img = make_image(tmp_path / "root.img")
    enroll_direct(vault_env2.config(), vault_env2.enroll_token, img, name="root",
                  key=SecretBuffer.from_bytes(bytearray(key)))
    cfg = config.parse(vault_env2.toml('[keysocket]\ntimeout = "5s"\n')
                       .replace("[unlock]\n", f'[unlock]\nsearch = ["{img}"]\n'))
    sock = tmp_path / "run" / "initrd.sock"
    t, stop = _serve(cfg, sock, monkeypatch)
    try:
        assert systemd_client(sock, "root") == key      # verbatim, NULs and all
        assert systemd_client(sock, "other") == b""     # not ours: systemd moves on
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()
    assert not sock.exists()   # nothing left in /run


def test_initrd_socket_declines_in_time_when_vault_is_away(
    vault_env2: VaultEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str]
) -> None:
    img = make_image(tmp_path / "root.img")
    enroll_direct(vault_env2.config(), vault_env2.enroll_token, img, name="root")
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = config.parse(vault_env2.toml('[keysocket]\ntimeout = "2s"\n')
                       .replace(f'address = ["{vault_env2.address}"]', f'address = ["{dead}"]')
                       .replace("[unlock]\n", f'[unlock]\nsearch = ["{img}"]\n'))
    sock = tmp_path / "run" / "initrd.sock"
    t, stop = _serve(cfg, sock, monkeypatch)
    try:
        t0 = time.monotonic()
        assert systemd_client(sock, "root", timeout=20) == b""   # the prompt comes next
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        t.join(timeout=10)
    err = capfd.readouterr().err
    assert "volume root: no key from Vault" in err and "type the passphrase" in err


def test_a_passphrase_typed_while_vault_is_away_is_sent_at_once(
    vault_env2: VaultEnv, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "root.img")
    enroll_direct(vault_env2.config(), vault_env2.enroll_token, img, name="root")
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = config.parse(vault_env2.toml()
                       .replace(f'address = ["{vault_env2.address}"]', f'address = ["{dead}"]')
                       .replace("[unlock]\n", f'[unlock]\nsearch = ["{img}"]\n'))
    ask_dir = tmp_path / "ask-password"
    keys = initrd.InitrdKeys(cfg, ask_dir=ask_dir)
    got: list[SecretBuffer | None] = []
    t = threading.Thread(target=lambda: got.append(keys.key_for("root", time.monotonic() + 60)))
    t0 = time.monotonic()
    t.start()
    wait_for(lambda: list(ask_dir.glob("ask.*")), timeout=10, what="the console prompt")
    agent_reply(ask_dir, b"+typed at the console")
    t.join(timeout=10)
    keys.close()
    assert got and got[0] is not None and bytes(got[0].view) == b"typed at the console"
    assert time.monotonic() - t0 < 30  # not held until the 60 s deadline
    assert list(ask_dir.iterdir()) == []


def test_a_prompt_vault_answer_needs_no_console_prompt(vault_env2: VaultEnv,
                                                    tmp_path: Path) -> None:
    key = os.urandom(64)
    img = make_image(tmp_path / "root.img")
    enroll_direct(vault_env2.config(), vault_env2.enroll_token, img, name="root",
                  key=SecretBuffer.from_bytes(bytearray(key)))
    cfg = config.parse(vault_env2.toml().replace("[unlock]\n",
                                                 f'[unlock]\nsearch = ["{img}"]\n'))
    ask_dir = tmp_path / "ask-password"
    keys = initrd.InitrdKeys(cfg, ask_dir=ask_dir)
    got = keys.key_for("root", time.monotonic() + 30)
    assert got is not None and bytes(got.view) == key
    assert not ask_dir.exists() or list(ask_dir.iterdir()) == []


def test_both_packages_ship_every_file_of_the_module() -> None:
    build = (MODULE_DIR.parent.parent / "build-deb.sh").read_text()
    spec = (MODULE_DIR.parent.parent / "bootkey.spec").read_text()
    assert "/usr/lib/dracut/modules.d/90bootkey" in build
    assert "/usr/lib/dracut/modules.d/90bootkey" in spec
    # the spec installs the two unit files with one glob
    spec = spec.replace("bootkey-initrd.s*", "bootkey-initrd.socket bootkey-initrd.service")
    for f in MODULE_DIR.iterdir():
        assert f.name in build, f.name
        assert f.name in spec, f.name


def test_parse_ldd() -> None:
    out = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
           "\tlibffi.so.8 => /lib/x86_64-linux-gnu/libffi.so.8 (0x00007fac)\n"
           "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fab)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x00007fad)\n"
           "\tlibmissing.so.1 => not found\n")
    assert initrd.parse_ldd(out) == ["/lib/x86_64-linux-gnu/libffi.so.8",
                                     "/lib/x86_64-linux-gnu/libc.so.6"]


@pytest.mark.skipif(Path("/usr/lib/bootkey").exists(), reason="bootkey is installed here")
def test_a_launcher_that_cannot_import_bootkey_declines_so_the_prompt_comes(
    tmp_path: Path
) -> None:
    """The initrd launcher with no bootkey to import (as on this host: /usr/lib/bootkey is
    absent) still answers systemd-cryptsetup, with zero bytes, instead of leaving it
    blocked on a socket nobody accepts on."""
    sock = tmp_path / "initrd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(4)
    fd = listener.fileno()
    # as systemd passes it: the listening socket as fd 3, LISTEN_PID naming the process
    proc = subprocess.Popen(
        ["bash", "-c", f'exec 3<&{fd}; export LISTEN_PID=$$ LISTEN_FDS=1; '
         'exec /usr/bin/python3 -IS "$0"', str(MODULE_DIR / "bootkey-initrd")],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, pass_fds=(fd,))
    try:
        assert systemd_client(sock, "root", timeout=20) == b""
        assert systemd_client(sock, "root", timeout=20) == b""
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        listener.close()
    assert "cannot start" in err and "the passphrase prompt takes over" in err



def test_module_stops_dracut_when_the_config_is_missing(tmp_path: Path) -> None:
    """dracut ignores install()'s status, so the module must end the build itself rather
    than write an initrd whose crypttab names a socket nobody serves."""
    script = (f'dfatal() {{ echo "FATAL: $*" >&2; }}\n'
              f'dracutsysrootdir={tmp_path} initdir={tmp_path}/initrd\n'
              f'. {MODULE_DIR}/module-setup.sh\ninstall\necho "install returned"\n')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 1
    assert "install returned" not in proc.stdout
    assert "FATAL: bootkey: /etc/bootkey/bootkey.toml is missing" in proc.stderr
