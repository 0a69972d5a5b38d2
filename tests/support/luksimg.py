"""LUKS2 image files for tests, made with the real cryptsetup (PBKDF2, 1000 iterations),
and a direct bootkey-style enrollment through the library (seal → Vault → keyslot →
token) for tests that need an enrolled volume without going through `bootkey enroll`."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bootkey import config as cfgmod
from bootkey import keystore, luks
from bootkey.vault import VaultSession
from bootkey_core.secret import SecretBuffer
from tests.support.scan import register_secret

PASSPHRASE = b"correct horse battery staple"
HEADER_BYTES = 16 * 1024 * 1024  # LUKS2 default header area


def make_image(path: Path, *, size_mb: int = 20, passphrase: bytes = PASSPHRASE,
               luks_type: str = "luks2", label: str | None = None) -> str:
    path.write_bytes(b"")
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(path)], check=True)
    args = ["cryptsetup", "luksFormat", "--batch-mode", "--type", luks_type,
            "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-"]
    if luks_type == "luks1":
        args = ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1",
                "--iter-time", "1", "--key-file=-"]
    if label:
        args += ["--label", label]
    subprocess.run([*args, str(path)], input=passphrase, check=True)
    return str(path)


def header_digest(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEADER_BYTES)).hexdigest()


@dataclass
class Enrolled:
    device: str
    luks_uuid: str
    keyslot: int
    location: keystore.Location


def enroll_direct(cfg: cfgmod.Config, enroll_token: str, device: str, *,
                  name: str | None = None, passphrase: bytes = PASSPHRASE,
                  key: SecretBuffer | None = None) -> Enrolled:
    """Enroll `device` the bootkey way using the library and an operator token."""
    host = cfg.resolved_host_id()
    hdr = luks.inspect(device)
    loc = keystore.location_for(cfg, host, hdr.uuid)
    session = VaultSession(cfg.vault, token=enroll_token, deadline=10)
    with (key or SecretBuffer.random(keystore.KEY_BYTES)) as k, \
            SecretBuffer.from_bytes(bytearray(passphrase)) as existing:
        register_secret(k, f"enroll_direct key of {device}")
        sealed = keystore.seal(session, loc, k)
        slot = luks.add_key(device, existing, k)
        entry = keystore.Entry(host_id=host, luks_uuid=hdr.uuid, name=name, keys=[
            keystore.SealedKey(keyslot=slot, sealed=sealed, created_at=keystore.now())])
        session.kv_write(loc.kv_mount, loc.kv_version, loc.path, entry.to_kv(),
                         create_only=True)
        luks.import_token(device, keystore.BootkeyToken.for_location(loc, slot, name).to_json())
    return Enrolled(device, hdr.uuid, slot, loc)
