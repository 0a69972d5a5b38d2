"""cryptsetup wrapper: one function per verb, typed results, keys only on stdin.

Safe layer: `inspect`, `test_key`, `open_volume`, `add_key`, `import_token`, ...
Sharp tools: `kill_slot` (needs proof that another keyslot works), `format_volume`
(destroys whatever was on the device), `header_restore`.

cryptsetup's exit codes (cryptsetup(8)): 1 wrong parameters, 2 no permission (bad
passphrase), 3 out of memory, 4 wrong device, 5 device busy. Exit 1 covers both "not LUKS"
and "inactive keyslot", so callers inspect the header first and we read stderr to tell
the cases apart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from bootkey import _proc
from bootkey_core.errors import (
    CryptsetupFailed,
    DeviceBusy,
    DeviceNotFound,
    LastKeyslot,
    NoDeviceMapper,
    NoFreeKeyslot,
    NotLuks,
    WrongKey,
)
from bootkey_core.secret import SecretBuffer

# Machine keys are 64 random bytes: a slow KDF only slows boot (DESIGN §4). The same
# choice systemd-cryptenroll and clevis make.
FAST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
TIMEOUT = 120.0  # a default-argon2id keyslot can take ~20 s under emulation
LUKS_MAGIC = b"LUKS\xba\xbe"
MAPPER = Path("/dev/mapper")


class KeyTest(Enum):
    OK = "ok"
    WRONG_KEY = "wrong key"


class OpenResult(Enum):
    OPENED = "opened"
    ALREADY_OPEN = "already open"


@dataclass(frozen=True)
class Keyslot:
    id: int
    type: str
    kdf: str


@dataclass(frozen=True)
class Header:
    """What `luksDump --dump-json-metadata` says, typed."""

    device: str
    uuid: str
    keyslots: dict[int, Keyslot]
    tokens: dict[int, dict[str, Any]]
    raw: dict[str, Any] = field(repr=False)

    def tokens_of_type(self, kind: str) -> dict[int, dict[str, Any]]:
        return {i: t for i, t in self.tokens.items() if t.get("type") == kind}

    def token_keyslots(self, token_id: int) -> list[int]:
        return [int(s) for s in self.tokens[token_id].get("keyslots", [])]


@dataclass(frozen=True)
class SlotVerified:
    """Proof that a key opened `keyslot` alone. Only `verify_slot` makes one; `kill_slot`
    requires one for a different keyslot, so no code path can remove the last key."""

    device: str
    keyslot: int
    _token: object = field(repr=False, compare=False)


_PROOF = object()


def _cs(args: list[str], stdin: SecretBuffer | bytes | None = None,
        timeout: float = TIMEOUT) -> _proc.Completed:
    data: Any = stdin.view if isinstance(stdin, SecretBuffer) else stdin
    try:
        return _proc.run(["cryptsetup", *args], stdin=data, timeout=timeout)
    except FileNotFoundError:
        raise CryptsetupFailed(
            "cryptsetup: not installed — apt-get install cryptsetup-bin"
        ) from None
    except _proc.ProcTimeout as e:
        raise CryptsetupFailed(f"{e} — is the device hanging?") from None


def _fail(dev: str, verb: str, res: _proc.Completed) -> Exception:
    """Map a failed cryptsetup run to a bootkey error naming the device."""
    err = res.stderr.strip().splitlines()
    first = err[0] if err else f"exit {res.returncode}"
    low = res.stderr.lower()
    if "cannot initialize device-mapper" in low:
        return NoDeviceMapper(
            f"{dev}: cannot {verb}: device-mapper is not available (dm_mod/dm_crypt not "
            "loaded) — load the modules, or use --check to verify keys without opening"
        )
    if res.returncode == 2 or "no key available with this passphrase" in low:
        return WrongKey(f"{dev}: cannot {verb}: the key does not open any keyslot")
    if res.returncode == 4 or "does not exist or access denied" in low:
        return DeviceNotFound(f"{dev}: cannot {verb}: no such device or no access")
    if "is not a valid luks device" in low:
        return NotLuks(f"{dev}: cannot {verb}: not a LUKS device")
    if res.returncode == 5 or "in use" in low or "busy" in low:
        return DeviceBusy(f"{dev}: cannot {verb}: device is busy or in use ({first})")
    if "all key slots full" in low or "no free" in low or "no space for new keyslot" in low:
        return NoFreeKeyslot(f"{dev}: cannot {verb}: no free keyslot — remove an unused one "
                             "with `cryptsetup luksKillSlot`")
    return CryptsetupFailed(f"{dev}: cannot {verb}: cryptsetup: {first}")


def _check_exists(dev: str) -> None:
    try:
        st = os.stat(dev)
    except FileNotFoundError:
        raise DeviceNotFound(f"{dev}: no such device or file — check the volume's device") \
            from None
    except PermissionError:
        raise DeviceNotFound(f"{dev}: permission denied — run as root") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise DeviceNotFound(f"{dev}: not a block device or image file")


def probe_magic(dev: str) -> int | None:
    """LUKS version from the first bytes, without a subprocess; None if not LUKS."""
    try:
        with open(dev, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if len(head) < 8 or not head.startswith(LUKS_MAGIC):
        return None
    return int.from_bytes(head[6:8], "big")


# LUKS2 binary header: magic[6] version[2] hdr_size[8] seqid[8] label[48] csum_alg[32]
# salt[64] uuid[40] — the UUID sits at byte 168 (cryptsetup lib/luks2/luks2.h).
_UUID_AT, _UUID_LEN = 168, 40


def _header_uuid(dev: str) -> str | None:
    """The UUID from the primary binary header, sparing a cryptsetup run per device."""
    try:
        with open(dev, "rb") as f:
            head = f.read(_UUID_AT + _UUID_LEN)
    except OSError:
        return None
    raw = head[_UUID_AT:_UUID_AT + _UUID_LEN].split(b"\0", 1)[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if re.fullmatch(r"[0-9a-fA-F-]{36}", text) else None


def inspect(dev: str) -> Header:
    """Read the LUKS2 header. Raises NotLuks (with how to convert) for LUKS1."""
    _check_exists(dev)
    version = probe_magic(dev)
    if version is None:
        raise NotLuks(f"{dev}: not a LUKS volume — `bootkey enroll --format` makes one")
    if version == 1:
        raise NotLuks(
            f"{dev}: LUKS1 volume: bootkey needs LUKS2 (tokens) — convert it with "
            f"`cryptsetup convert --type luks2 {dev}` (back up the header first)"
        )
    res = _cs(["luksDump", "--dump-json-metadata", dev])
    if res.returncode != 0:
        raise _fail(dev, "read the LUKS header", res)
    meta = json.loads(res.stdout)
    uuid = _header_uuid(dev)
    if uuid is None:
        uid = _cs(["luksUUID", dev])
        if uid.returncode != 0:
            raise _fail(dev, "read the LUKS UUID", uid)
        uuid = uid.stdout.decode().strip()
    keyslots = {
        int(k): Keyslot(int(k), v.get("type", ""), (v.get("kdf") or {}).get("type", ""))
        for k, v in meta.get("keyslots", {}).items()
    }
    tokens = {int(k): v for k, v in meta.get("tokens", {}).items()}
    return Header(dev, uuid, keyslots, tokens, meta)


def test_key(dev: str, key: SecretBuffer | bytes, keyslot: int | None = None) -> KeyTest:
    """Does `key` open `keyslot` (or any keyslot)? Activates nothing; works without dm."""
    args = ["open", "--test-passphrase", "--key-file=-"]
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    res = _cs([*args, dev], stdin=key)
    if res.returncode == 0:
        return KeyTest.OK
    if res.returncode == 2:
        return KeyTest.WRONG_KEY
    if keyslot is not None and "no usable keyslot" in res.stderr.lower():
        return KeyTest.WRONG_KEY  # the keyslot is inactive: the key cannot open it
    raise _fail(dev, "test the key", res)


def verify_slot(dev: str, key: SecretBuffer, keyslot: int) -> SlotVerified:
    """Test `key` against `keyslot` alone; the proof `kill_slot` asks for."""
    if test_key(dev, key, keyslot) is not KeyTest.OK:
        raise WrongKey(f"{dev}: keyslot {keyslot} does not open with the key")
    return SlotVerified(dev, keyslot, _PROOF)


def is_active(name: str) -> bool:
    return (MAPPER / name).exists()


def open_volume(dev: str, name: str, key: SecretBuffer, *, readonly: bool = False,
                discard: bool = False) -> OpenResult:
    """Activate `dev` as /dev/mapper/<name>. Already active is success (idempotent)."""
    if is_active(name):
        return OpenResult.ALREADY_OPEN
    args = ["open", "--type", "luks2", "--key-file=-"]
    if readonly:
        args.append("--readonly")
    if discard:
        args.append("--allow-discards")
    res = _cs([*args, dev, name], stdin=key)
    if res.returncode == 0:
        return OpenResult.OPENED
    if is_active(name):  # lost a race with another opener: still success
        return OpenResult.ALREADY_OPEN
    raise _fail(dev, f"open as {name}", res)


def add_key(dev: str, existing: SecretBuffer, new: SecretBuffer,
            keyslot: int | None = None, *, pbkdf: tuple[str, ...] = FAST_PBKDF) -> int:
    """Add `new` in a new keyslot, authorised by `existing`. Returns the keyslot.

    Both keys go on stdin: `--keyfile-size` tells cryptsetup where the existing key ends
    and the final `-` reads the new one, so either may contain any byte (secboot AddKey).
    """
    before = set(inspect(dev).keyslots)
    # pbkdf=() keeps cryptsetup's benchmarked default (argon2id): for human passphrases.
    args = ["luksAddKey", "--batch-mode", *pbkdf, "--key-file=-",
            "--keyfile-size", str(len(existing)), "--new-keyfile-size", str(len(new))]
    if keyslot is not None:
        args += ["--new-key-slot", str(keyslot)]
    both = SecretBuffer(len(existing) + len(new))
    try:
        both.view[: len(existing)] = existing.view
        both.view[len(existing):] = new.view
        res = _cs([*args, dev, "-"], stdin=both)
    finally:
        both.close()
    if res.returncode != 0:
        raise _fail(dev, "add a keyslot", res)
    added = set(inspect(dev).keyslots) - before
    if len(added) != 1:
        raise CryptsetupFailed(f"{dev}: cannot add a keyslot: could not tell which was added")
    return added.pop()


def kill_slot(dev: str, keyslot: int, *, proof: SlotVerified) -> None:
    """WARNING: irreversibly destroys `keyslot`. `proof` must show another keyslot of the
    same device opens with a key we hold, so the volume keeps a working key."""
    if proof.device != dev or proof._token is not _PROOF:
        raise LastKeyslot(f"{dev}: refusing to remove keyslot {keyslot}: no proof another "
                          "keyslot works")
    if proof.keyslot == keyslot:
        raise LastKeyslot(f"{dev}: refusing to remove keyslot {keyslot}: it is the one "
                          "proven to work")
    hdr = inspect(dev)
    if proof.keyslot not in hdr.keyslots:
        raise LastKeyslot(f"{dev}: refusing to remove keyslot {keyslot}: keyslot "
                          f"{proof.keyslot} is gone")
    if keyslot not in hdr.keyslots:
        return  # already gone: idempotent
    res = _cs(["luksKillSlot", "--batch-mode", dev, str(keyslot)])
    if res.returncode != 0:
        raise _fail(dev, f"remove keyslot {keyslot}", res)


def format_volume(dev: str, key: SecretBuffer, *, uuid: str | None = None,
                  label: str | None = None, keyslot: int | None = None) -> None:
    """WARNING: destroys any data on `dev`. Makes a LUKS2 volume whose only key is `key`."""
    args = ["luksFormat", "--batch-mode", "--type", "luks2", *FAST_PBKDF, "--key-file=-"]
    if uuid:
        args += ["--uuid", uuid]
    if label:
        args += ["--label", label]
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    res = _cs([*args, dev], stdin=key)
    if res.returncode != 0:
        raise _fail(dev, "format", res)


def import_token(dev: str, token: dict[str, Any], token_id: int | None = None,
                 replace: bool = False) -> int:
    """Import a LUKS2 token (JSON, never a key). Returns the token id."""
    args = ["token", "import", "--json-file=-"]
    if token_id is not None:
        args += ["--token-id", str(token_id)]
    if replace:
        args.append("--token-replace")
    before = set(inspect(dev).tokens)
    res = _cs([*args, dev], stdin=json.dumps(token).encode())
    if res.returncode != 0:
        raise _fail(dev, "import a token", res)
    if token_id is not None:
        return token_id
    added = set(inspect(dev).tokens) - before
    if len(added) != 1:
        raise CryptsetupFailed(f"{dev}: cannot import a token: could not tell its id")
    return added.pop()


def remove_token(dev: str, token_id: int) -> None:
    res = _cs(["token", "remove", "--token-id", str(token_id), dev])
    if res.returncode != 0 and token_id in inspect(dev).tokens:
        raise _fail(dev, f"remove token {token_id}", res)


def header_backup(dev: str, path: Path) -> None:
    path.unlink(missing_ok=True)
    res = _cs(["luksHeaderBackup", dev, "--header-backup-file", str(path)])
    if res.returncode != 0:
        raise _fail(dev, "back up the header", res)


def header_restore(dev: str, path: Path) -> None:
    """WARNING: replaces the header (all keyslots and tokens) with the backup."""
    res = _cs(["luksHeaderRestore", "--batch-mode", dev, "--header-backup-file", str(path)])
    if res.returncode != 0:
        raise _fail(dev, "restore the header", res)


_SPEC = re.compile(r"^(UUID|LABEL|PARTUUID|PARTLABEL)=(.+)$")
_BY = {"UUID": "by-uuid", "LABEL": "by-label", "PARTUUID": "by-partuuid",
       "PARTLABEL": "by-partlabel"}


def resolve_device(spec: str) -> str:
    """A path, UUID=, LABEL=, PARTUUID= or PARTLABEL= → a device path that exists."""
    m = _SPEC.match(spec)
    if not m:
        return spec
    kind, value = m.groups()
    link = Path("/dev/disk") / _BY[kind] / value
    if link.exists():
        return str(link.resolve())
    if shutil.which("blkid"):
        res = _proc.run(["blkid", "-o", "device", "-t", f"{kind}={value}"], timeout=10.0)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.decode().split()[0]
    raise DeviceNotFound(f"{spec}: no such device (yet) — check the volume's device, or "
                         "wait for it to appear")
