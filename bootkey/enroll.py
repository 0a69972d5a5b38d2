"""Enroll, rotate, unenroll and rewrap: declared step sequences, planned from observed
state, run by a separate executor.

Invariant: at every instant the volume opens with a key Vault holds (or with the key the
operator already had), and Vault keeps every key a keyslot uses.

Shape (STYLE rules 3-5, 20):
- `observe()` reads the LUKS2 header and the Vault entry and tests which Vault key opens
  which keyslot; the result is a plain `View`.
- `plan_enroll/plan_rotate/plan_unenroll/plan_rewrap` are pure functions from a `View` to a
  `Plan` (a tuple of steps in the order of the declared sequences `ENROLL`, `ROTATE`,
  `UNENROLL`). A half-done state plans to the rest of the sequence, so a crashed run is
  resumed by observing and planning again; no journal file is needed.
- `execute()` runs the steps, calls `after_step` after each (the crash tests SIGKILL the
  process there) and, when a step fails before the commit point (`Activate`), restores the
  header from the backup taken before the first header change and withdraws the pending
  key it wrote to Vault.

Where the state lives: the Vault entry's keys carry `state` (pending → active → retiring
→ gone) and the keyslot they open; the header carries the keyslots and bootkey tokens.
docs/enroll.md walks through every crash point and what re-running does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bootkey import _proc, keystore, luks
from bootkey.config import Config
from bootkey.keystore import BootkeyToken, Entry, Location, SealedKey
from bootkey.vault import VaultSession
from bootkey_core.errors import (
    BootkeyError,
    CryptsetupFailed,
    DeviceBusy,
    DeviceNotFound,
    LastKeyslot,
    NoFreeKeyslot,
    NotBlank,
    UsageError,
    VaultBadAnswer,
    VaultConflict,
    VaultNotFound,
    WrongKey,
)
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

MAX_KEYSLOTS = 32  # LUKS2_KEYSLOTS_MAX in libcryptsetup
RUN_DIR = Path("/run/bootkey")  # tmpfs: a header backup (every keyslot) never persists
RECOVERY_TOKEN_TYPE = "bootkey-recovery"
# Recovery keys: Crockford base32 (no I, L, O, U: nothing to misread), 8 groups of 4 =
# 160 bits; added with cryptsetup's default (benchmarked argon2id) KDF because a human
# may type it and it must resist guessing on a stolen disk.
_RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RECOVERY_GROUPS = 8


# ---- steps -----------------------------------------------------------------------------
# Each step is data; `_RUNNERS` below holds what it does. The comment on each says what
# remains if the process dies right after it.


@dataclass(frozen=True)
class Step:
    @property
    def name(self) -> str:
        return type(self).__name__

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.__dict__.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Generate(Step):
    """64 random bytes into a SecretBuffer. After: nothing persistent."""

    keyslot: int


@dataclass(frozen=True)
class Seal(Step):
    """transit/encrypt with context <host_id>/<luks_uuid>. After: nothing persistent."""

    keyslot: int


@dataclass(frozen=True)
class VaultWrite(Step):
    """Write the sealed key as `pending` (create-only, or check-and-set into the existing
    entry). After: Vault holds a pending key whose keyslot does not exist yet; a re-run
    unseals it and adds the keyslot."""

    keyslot: int
    create: bool
    formatting: str | None = None


@dataclass(frozen=True)
class VaultReadBack(Step):
    """Read the entry back, compare the ciphertext, unseal it and compare the key.
    After: as VaultWrite."""

    keyslot: int


@dataclass(frozen=True)
class UnsealKey(Step):
    """Unseal a key Vault holds: role "new" = the key being enrolled (resume), "unlock" =
    the key authorising a new keyslot (rotate). After: nothing persistent."""

    keyslot: int
    role: str = "new"


@dataclass(frozen=True)
class BackupHeader(Step):
    """luksHeaderBackup into the root-only run directory. After: a backup file in
    /run/bootkey/backup (tmpfs), replaced or removed by the next run."""


@dataclass(frozen=True)
class AddKeyslot(Step):
    """luksAddKey (PBKDF2, 1000 iterations) of the new key at `keyslot`. After: keyslot
    and pending Vault key both exist; a re-run tests the key and carries on."""

    keyslot: int


@dataclass(frozen=True)
class Format(Step):
    """luksFormat a blank device with the new key at `keyslot` and the planned UUID.
    After: a LUKS2 volume whose only key is the pending Vault key."""

    keyslot: int
    luks_uuid: str


@dataclass(frozen=True)
class ImportToken(Step):
    """Import the bootkey LUKS2 token for `keyslot`. After: unlock can find the volume."""

    keyslot: int


@dataclass(frozen=True)
class TestSlotAlone(Step):
    """open --test-passphrase --key-slot N with the new key: the proof `kill_slot` needs.
    After: nothing persistent."""

    keyslot: int


@dataclass(frozen=True)
class ProveRemaining(Step):
    """Find which of `candidates` the operator's key opens: the proof that the volume
    keeps a working keyslot after unenroll. After: nothing persistent."""

    candidates: tuple[int, ...]


@dataclass(frozen=True)
class Activate(Step):
    """Commit point: in one check-and-set write the new key becomes `active` and the keys
    of `retire` become `retiring`. After: unlock uses the new key; a rotate re-run kills
    the retiring keyslots."""

    keyslot: int
    retire: tuple[int, ...] = ()


@dataclass(frozen=True)
class AddRecoveryKey(Step):
    """Add a human-typable recovery key (argon2id) and a `bootkey-recovery` token naming
    its keyslot. After: a keyslot whose key only this run's output shows; a re-run of
    `enroll --recovery-key` replaces it."""


@dataclass(frozen=True)
class KillSlot(Step):
    """WARNING: luksKillSlot, only with proof that another keyslot opens. After: the old
    keyslot is gone; its Vault copy stays until DropKeys."""

    keyslot: int


@dataclass(frozen=True)
class RemoveToken(Step):
    """Remove a bootkey token whose keyslots are gone. After: nothing refers to them."""

    token_id: int


@dataclass(frozen=True)
class DropKeys(Step):
    """Remove the keys of `keyslots` (all gone from the header) from the entry; delete
    the entry if none remains. After: Vault no longer lists them."""

    keyslots: tuple[int, ...]


@dataclass(frozen=True)
class DestroyOldVersions(Step):
    """KV v2: destroy every version but the current, so retired sealed keys are gone for
    good. After: only the current version holds data."""


@dataclass(frozen=True)
class DeleteEntry(Step):
    """WARNING: delete the Vault entry (all KV v2 versions): crypto-shred. Only planned
    once no keyslot uses any of its keys."""


@dataclass(frozen=True)
class Rewrap(Step):
    """Re-seal every key under the newest transit key version (check-and-set)."""


@dataclass(frozen=True)
class RemoveBackup(Step):
    """Remove this volume's header backup. After: done."""


# The declared sequences (fresh runs). Resumed runs are suffixes of these with
# `UnsealKey` in place of Generate/Seal/VaultWrite/VaultReadBack; tests and
# docs/enroll.md read them from here.
ENROLL: tuple[type[Step], ...] = (
    Generate, Seal, VaultWrite, VaultReadBack, BackupHeader, AddKeyslot, ImportToken,
    TestSlotAlone, Activate, RemoveBackup,
)
ENROLL_FORMAT: tuple[type[Step], ...] = (
    Generate, Seal, VaultWrite, VaultReadBack, Format, ImportToken, TestSlotAlone, Activate,
)
ROTATE: tuple[type[Step], ...] = (
    UnsealKey, Generate, Seal, VaultWrite, VaultReadBack, BackupHeader, AddKeyslot,
    ImportToken, TestSlotAlone, Activate, KillSlot, RemoveToken, DropKeys, RemoveBackup,
)
UNENROLL: tuple[type[Step], ...] = (
    ProveRemaining, BackupHeader, KillSlot, RemoveToken, RemoveBackup, DeleteEntry,
)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    summary: str
    needs_unlock_key: bool = False

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


# ---- observed state ------------------------------------------------------------------


@dataclass(frozen=True)
class KeyView:
    keyslot: int
    state: str
    in_header: bool
    opens: bool  # the Vault key opens this keyslot alone (False when not in the header)


@dataclass(frozen=True)
class View:
    """What the header and Vault show for one volume. Plain values: planners are pure."""

    device: str
    luks_uuid: str
    keyslots: frozenset[int]
    tokens: Mapping[int, frozenset[int]]  # this location's bootkey tokens: id → keyslots
    entry: Entry | None
    keys: tuple[KeyView, ...] = ()
    kv_version: int = 2
    recovery_tokens: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def by_state(self, state: str) -> list[KeyView]:
        return [k for k in self.keys if k.state == state]

    def working(self, state: str = "active") -> list[KeyView]:
        return [k for k in self.keys if k.state == state and k.opens]

    def tokens_for(self, keyslot: int) -> list[int]:
        return sorted(t for t, s in self.tokens.items() if keyslot in s)

    def orphan_tokens(self, keep: frozenset[int] = frozenset()) -> list[int]:
        """Tokens naming no keyslot that exists (or only keyslots about to go)."""
        live = self.keyslots - keep
        return sorted(t for t, s in self.tokens.items() if not s & live)


def observe(session: VaultSession, device: str, loc: Location,
            hdr: luks.Header | None = None) -> View:
    """Read header and entry; unseal each Vault key whose keyslot exists and test it
    against that keyslot alone."""
    hdr = hdr or luks.inspect(device)
    entry = keystore.read_entry(session, loc)
    tokens: dict[int, frozenset[int]] = {}
    for tid, raw in hdr.tokens_of_type(keystore.TOKEN_TYPE).items():
        try:
            tok = BootkeyToken.model_validate(raw)
        except ValidationError:
            continue
        if tok.host_id == loc.host_id and tok.kv_path == loc.path:
            tokens[tid] = frozenset(int(s) for s in tok.keyslots)
    recovery = {tid: frozenset(hdr.token_keyslots(tid))
                for tid in hdr.tokens_of_type(RECOVERY_TOKEN_TYPE)}
    keys: list[KeyView] = []
    for k in entry.keys if entry else []:
        present = k.keyslot in hdr.keyslots
        opens = False
        if present:
            with keystore.unseal(session, loc, k) as key:
                opens = luks.test_key(device, key, k.keyslot) is luks.KeyTest.OK
        keys.append(KeyView(k.keyslot, k.state, present, opens))
    return View(device, hdr.uuid, frozenset(hdr.keyslots), tokens, entry, tuple(keys),
                loc.kv_version, recovery)


# ---- planning (pure) -------------------------------------------------------------------


def free_keyslot(used: frozenset[int], want: int | None, device: str) -> int:
    if want is not None:
        if not 0 <= want < MAX_KEYSLOTS:
            raise UsageError(f"--keyslot {want}: LUKS2 keyslots are 0-{MAX_KEYSLOTS - 1}")
        if want in used:
            raise UsageError(f"{device}: keyslot {want} is in use — choose a free one or "
                             "omit --keyslot")
        return want
    for n in range(MAX_KEYSLOTS):
        if n not in used:
            return n
    raise NoFreeKeyslot(f"{device}: cannot enroll: all {MAX_KEYSLOTS} keyslots are in use — "
                        "remove an unused one with `cryptsetup luksKillSlot`")


def _with_backup(header_steps: Sequence[Step]) -> list[Step]:
    return [BackupHeader(), *header_steps, RemoveBackup()] if header_steps else []


def _fresh_key(n: int, *, create: bool, formatting: str | None = None) -> list[Step]:
    return [Generate(n), Seal(n), VaultWrite(n, create, formatting), VaultReadBack(n)]


def _finish_pending(v: View, p: KeyView, *, have_unlock_key: bool,
                    retire: tuple[int, ...] = ()) -> tuple[list[Step], list[Step], bool]:
    """Steps that take a pending key to active: (key steps, header steps, needs key)."""
    n = p.keyslot
    key_steps: list[Step] = [UnsealKey(n)]
    header: list[Step] = []
    needs = False
    if not p.in_header:
        needs = True
        header.append(AddKeyslot(n))
    if not v.tokens_for(n):
        header.append(ImportToken(n))
    header += [TestSlotAlone(n), Activate(n, retire)]
    return key_steps, header, needs and not have_unlock_key


def _ours(v: View, k: KeyView) -> bool:
    """Keyslot `k.keyslot` is bootkey's to remove: its Vault key opens it, or one of our
    tokens still names it. The second covers a luksKillSlot cut short: cryptsetup wipes
    the keyslot's area first and rewrites the metadata after, and only that rewrite
    takes the keyslot out of its tokens — so a keyslot nothing opens that our token still
    names is one of ours half removed, never a slot someone else has added since."""
    return k.in_header and (k.opens or bool(v.tokens_for(k.keyslot)))


def _retire(v: View, retire: Sequence[KeyView]) -> list[Step]:
    """Kill the retiring keyslots that are still ours (`_ours`), remove tokens left
    naming no live keyslot, drop the keys from Vault, shred old versions."""
    going = frozenset(k.keyslot for k in retire)
    steps: list[Step] = [KillSlot(k.keyslot) for k in retire if _ours(v, k)]
    steps += [RemoveToken(t) for t in v.orphan_tokens(keep=going)]
    steps.append(DropKeys(tuple(sorted(going))))
    if v.kv_version == 2:
        steps.append(DestroyOldVersions())
    return steps


def plan_enroll(v: View, *, keyslot: int | None = None, have_unlock_key: bool = True,
                recovery_key: bool = False) -> Plan:
    """Enroll an existing LUKS2 volume, or finish an interrupted enroll."""
    if v.entry is None:
        n = free_keyslot(v.keyslots, keyslot, v.device)
        steps = [*_fresh_key(n, create=True),
                 *_with_backup([AddKeyslot(n), ImportToken(n), TestSlotAlone(n), Activate(n)])]
        if recovery_key:
            steps.insert(-1, AddRecoveryKey())
        return Plan(tuple(steps), f"enroll into keyslot {n}", not have_unlock_key)
    pending = v.by_state("pending")
    if v.working("active") and (pending or v.by_state("retiring")):
        return Plan((), f"already enrolled (keyslot {v.working('active')[0].keyslot}); a "
                        "rotate is in flight — finish it with `bootkey rotate`")
    if pending:
        p = pending[-1]
        if p.in_header and not p.opens:
            raise VaultConflict(
                f"{v.device}: cannot resume enroll: keyslot {p.keyslot} now holds another key"
                " — remove the stale entry with `bootkey unenroll --purge` and enroll again")
        keys, header, needs = _finish_pending(v, p, have_unlock_key=have_unlock_key)
        if recovery_key:
            header.append(AddRecoveryKey())
        return Plan(tuple(keys + _with_backup(header)),
                    f"resume enroll of keyslot {p.keyslot}", needs)
    working = v.working("active")
    if not working:
        raise VaultConflict(
            f"{v.device} (UUID {v.luks_uuid}): Vault already has an entry for this volume but "
            "none of its keys opens a keyslot — `bootkey unenroll --purge` it, then enroll")
    n = working[0].keyslot
    tidy: list[Step] = []
    if not v.tokens_for(n):
        tidy.append(ImportToken(n))
    tidy += [RemoveToken(t) for t in v.orphan_tokens()]
    if recovery_key:
        tidy = [UnsealKey(n), TestSlotAlone(n), *tidy, *_replace_recovery(v)]
    return Plan(tuple(_with_backup(tidy)),
                f"already enrolled (keyslot {n})" + (": tidying up" if tidy else ""))


def _replace_recovery(v: View) -> list[Step]:
    old = [KillSlot(s) for t in sorted(v.recovery_tokens) for s in sorted(v.recovery_tokens[t])
           if s in v.keyslots]
    return [*old, *[RemoveToken(t) for t in sorted(v.recovery_tokens)], AddRecoveryKey()]


def plan_format(device: str, *, luks_uuid: str, keyslot: int | None,
                resume: Entry | None, recovery_key: bool = False) -> Plan:
    """Make a blank device a LUKS2 volume whose first keyslot is the Vault key. `resume`
    is the pending entry an interrupted run left for this device."""
    if resume is not None:
        n = resume.keys[-1].keyslot
        steps: list[Step] = [UnsealKey(n), Format(n, luks_uuid)]
        summary = f"resume format into keyslot {n}"
    else:
        n = free_keyslot(frozenset(), keyslot, device)
        steps = [*_fresh_key(n, create=True, formatting=device), Format(n, luks_uuid)]
        summary = f"format with the Vault key in keyslot {n}"
    steps += [ImportToken(n), TestSlotAlone(n), Activate(n)]
    if recovery_key:
        steps.append(AddRecoveryKey())
    return Plan(tuple(steps), summary)


def plan_rotate(v: View) -> Plan:
    """A new key into a new keyslot, tested, then the old keyslot killed and its Vault
    copy retired — or the rest of an interrupted rotate."""
    if v.entry is None:
        raise VaultNotFound(f"{v.device} (UUID {v.luks_uuid}): not enrolled — "
                            f"`bootkey enroll {v.device}` first")
    active = v.working("active")
    pending = v.by_state("pending")
    retiring = v.by_state("retiring")
    if pending:
        if not active:
            raise UsageError(f"{v.device}: an enroll is in flight — finish it with "
                             "`bootkey enroll`")
        p = pending[-1]
        if p.in_header and not p.opens:
            # The keyslot was taken by another key since: the pending key never got in.
            # Withdraw it and rotate afresh.
            rest = View(v.device, v.luks_uuid, v.keyslots, v.tokens, v.entry,
                        tuple(k for k in v.keys if k is not p), v.kv_version)
            fresh = plan_rotate(rest)
            return Plan((DropKeys((p.keyslot,)), *fresh.steps),
                        f"withdraw the stale pending key of keyslot {p.keyslot}, then "
                        + fresh.summary)
        a = active[0].keyslot
        old = tuple(k.keyslot for k in v.by_state("active"))
        keys, header, _ = _finish_pending(v, p, have_unlock_key=True, retire=old)
        if not p.in_header:
            keys.insert(0, UnsealKey(a, "unlock"))
        going = [k for k in v.keys if k.state in ("active", "retiring")]
        return Plan(tuple(keys + _with_backup(header + _retire(v, going))),
                    f"resume rotate to keyslot {p.keyslot}")
    if retiring:
        if not active:
            raise LastKeyslot(f"{v.device}: no active Vault key opens its keyslot — refusing "
                              "to retire the old one; re-enroll the volume")
        b = active[0].keyslot
        return Plan(tuple([UnsealKey(b), TestSlotAlone(b), *_with_backup(_retire(v, retiring))]),
                    f"finish rotate: retire keyslot(s) {sorted(k.keyslot for k in retiring)}")
    if not active:
        raise WrongKey(f"{v.device} (UUID {v.luks_uuid}): no Vault key opens its keyslot — "
                       "cannot rotate; re-enroll with `bootkey enroll --unlock-key-file`")
    a = active[0].keyslot
    n = free_keyslot(v.keyslots, None, v.device)
    olds = [k for k in v.keys if k.state == "active"]
    steps: list[Step] = [AddKeyslot(n), ImportToken(n), TestSlotAlone(n),
                         Activate(n, tuple(k.keyslot for k in olds))]
    return Plan(tuple([UnsealKey(a, "unlock"), *_fresh_key(n, create=False),
                       *_with_backup(steps + _retire(v, olds))]),
                f"rotate keyslot {a} → {n}")


def plan_unenroll(v: View, *, purge: bool, have_unlock_key: bool) -> Plan:
    """Remove bootkey's keyslots and tokens (and with `purge` the Vault entry), never the
    last keyslot: the operator's key must open one that stays."""
    ours = frozenset(k.keyslot for k in v.keys if _ours(v, k))
    if not ours and not v.tokens and (v.entry is None or not purge):
        # The state unenroll asks for already holds (e.g. a finished or crashed-after-the-
        # last-step run): success, like `rm -f`.
        return Plan((), "not enrolled — nothing to do")
    others = v.keyslots - ours
    steps: list[Step] = []
    if ours:
        if not others:
            raise LastKeyslot(
                f"{v.device}: refusing to unenroll: bootkey's keyslot(s) {sorted(ours)} are "
                "the only ones — add a passphrase first (`cryptsetup luksAddKey`)")
        if not have_unlock_key:
            raise UsageError(
                f"{v.device}: unenroll needs the key of a keyslot that stays, to prove the "
                "volume still opens — pass it with --unlock-key-file FILE (or - for stdin)")
        steps.append(ProveRemaining(tuple(sorted(others))))
    header: list[Step] = [KillSlot(s) for s in sorted(ours)]
    header += [RemoveToken(t) for t in v.orphan_tokens(keep=ours)]
    steps += _with_backup(header)
    if purge and v.entry is not None:
        steps.append(DeleteEntry())
    return Plan(tuple(steps), f"unenroll keyslot(s) {sorted(ours)}"
                + (" and purge the Vault entry" if purge else ""))


def plan_rewrap(v: View) -> Plan:
    if v.entry is None:
        raise VaultNotFound(f"{v.device} (UUID {v.luks_uuid}): not enrolled — nothing to "
                            "rewrap")
    return Plan((Rewrap(),), "rewrap the sealed keys under the newest transit key version")


# ---- root-only run directory: header backups and device locks ------------------------


def _private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700; refuse a directory others can read or that is not ours:
    a header backup holds every keyslot."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as e:
        raise UsageError(f"{path}: cannot create bootkey's run directory: {e.strerror} — run "
                         "as root, or set BOOTKEY_RUN_DIR to a root-only directory") from None
    if st.st_uid != os.geteuid():
        raise UsageError(f"{path}: cannot keep header backups there: owned by uid "
                         f"{st.st_uid}, not us — remove it or set BOOTKEY_RUN_DIR")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class RunDir:
    root: Path = RUN_DIR

    @classmethod
    def from_env(cls) -> RunDir:
        return cls(Path(os.environ.get("BOOTKEY_RUN_DIR") or RUN_DIR))

    @property
    def backups(self) -> Path:
        return self.root / "backup"

    def backup_path(self, luks_uuid: str) -> Path:
        return _private_dir(self.backups) / f"{luks_uuid}.luksheader"

    @contextlib.contextmanager
    def lock(self, device: str) -> Iterator[None]:
        """One enroll/rotate/unenroll per device at a time (flock; freed by the kernel
        if we die). `enroll --format` also opens a block device O_EXCL, as mkfs does
        (check_block_device_free), to refuse one that is mounted or mapped."""
        try:
            st = os.stat(device)
        except OSError as e:
            raise DeviceNotFound(f"{device}: cannot lock: {e.strerror} — check the device")\
                from None
        ident = f"{st.st_rdev:x}" if stat.S_ISBLK(st.st_mode) else f"{st.st_dev:x}-{st.st_ino:x}"
        path = _private_dir(self.root / "lock") / f"{ident}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeviceBusy(f"{device}: busy: another bootkey enroll/rotate/unenroll is "
                                 "working on it — wait for it to finish") from None
            yield
        finally:
            os.close(fd)


def check_block_device_free(device: str) -> None:
    """For --format: a block device that is mounted or mapped is in use."""
    if not stat.S_ISBLK(os.stat(device).st_mode):
        return
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"{device}: busy: mounted, mapped or held open — unmount or "
                             "close it first") from None
        raise
    os.close(fd)


def blank_check(device: str) -> None:
    """Refuse to format over a LUKS header, filesystem or partition table (blkid -p)."""
    version = luks.probe_magic(device)
    if version is not None:
        raise NotBlank(f"{device}: holds a LUKS{version} header — refusing to format; "
                       "enroll it without --format, or add --force to destroy it")
    found = ""
    if shutil.which("blkid"):
        res = _proc.run(["blkid", "-p", "-o", "export", device], timeout=30.0)
        if res.returncode == 0:
            fields = dict(line.split("=", 1) for line in
                          res.stdout.decode(errors="replace").splitlines() if "=" in line)
            if "PTTYPE" in fields:
                found = f"a {fields['PTTYPE']} partition table"
            elif "TYPE" in fields:
                found = f"a {fields['TYPE']} signature"
    else:  # no blkid: anything but zeros in the first MiB counts as data
        with open(device, "rb") as f:
            if f.read(1 << 20).strip(b"\0"):
                found = "data"
    if found:
        raise NotBlank(f"{device}: holds {found} — refusing to format; add --force to "
                       "destroy it")


# ---- execution ---------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the steps share while a plan executes. Keys are wiped by close()."""

    device: str
    loc: Location
    session: VaultSession
    rundir: RunDir
    name: str | None = None
    unlock_key: SecretBuffer | None = None  # operator's key, or an unsealed active key
    new_key: SecretBuffer | None = None
    sealed: str | None = None
    proof: luks.SlotVerified | None = None
    recovery_key: SecretBuffer | None = None
    recovery_keyslot: int | None = None
    backup: Path | None = None
    restorable: bool = False  # before the commit point: a failure restores the header
    withdraw: tuple[int, bool] | None = None  # (keyslot, entry created) written this run
    log: list[str] = field(default_factory=list)

    def close(self) -> None:
        for buf in (self.unlock_key, self.new_key, self.recovery_key):
            if buf is not None:
                buf.close()

    # Vault helpers ------------------------------------------------------------------

    def read(self) -> tuple[Entry | None, int | None]:
        """The entry and (KV v2) its current version, for check-and-set writes."""
        version: int | None = None
        if self.loc.kv_version == 2:
            meta = self.session.kv_metadata(self.loc.kv_mount, self.loc.path)
            if meta:
                version = int(meta.get("current_version") or 0)
        return keystore.read_entry(self.session, self.loc), version

    def write(self, entry: Entry, version: int | None) -> None:
        loc = self.loc
        self.session.kv_write(loc.kv_mount, loc.kv_version, loc.path, entry.to_kv(),
                              cas=version if loc.kv_version == 2 else None)

    def require(self, what: str, buf: SecretBuffer | None) -> SecretBuffer:
        if buf is None:
            raise UsageError(f"{self.device}: internal: step needs the {what}")
        return buf


AfterStep = Callable[[Step], None]


def _with_keys(entry: Entry, keys: list[SealedKey], **changes: Any) -> Entry:
    return entry.model_copy(update={"keys": keys, **changes})


def _generate(r: Run, s: Generate) -> None:
    r.new_key = SecretBuffer.random(keystore.KEY_BYTES)


def _seal(r: Run, s: Seal) -> None:
    r.sealed = keystore.seal(r.session, r.loc, r.require("new key", r.new_key))


def _vault_write(r: Run, s: VaultWrite) -> None:
    if r.sealed is None:
        raise UsageError("internal: VaultWrite before Seal")
    key = SealedKey(keyslot=s.keyslot, sealed=r.sealed, created_at=keystore.now(),
                    state="pending")
    loc = r.loc
    if s.create:
        entry = Entry(host_id=loc.host_id, luks_uuid=loc.luks_uuid, name=r.name, keys=[key],
                      formatting=s.formatting)
        r.session.kv_write(loc.kv_mount, loc.kv_version, loc.path, entry.to_kv(),
                           create_only=True)
        r.withdraw = (s.keyslot, True)
        return
    cur, version = r.read()
    if cur is None:
        raise VaultNotFound(f"{loc.display}: the entry vanished during the rotate — re-run")
    if cur.key_for_slot(s.keyslot) is not None:
        raise VaultConflict(f"{loc.display}: already holds a key for keyslot {s.keyslot} — "
                            "re-run to resume")
    r.write(_with_keys(cur, [*cur.keys, key]), version)
    r.withdraw = (s.keyslot, False)


def _vault_read_back(r: Run, s: VaultReadBack) -> None:
    entry = keystore.read_entry(r.session, r.loc)
    got = entry.key_for_slot(s.keyslot) if entry else None
    if got is None or got.sealed != r.sealed:
        raise VaultBadAnswer(f"{r.loc.display}: read back does not match what was written — "
                             "is another writer using this path?")
    with keystore.unseal(r.session, r.loc, got) as back:
        if not back.equals(r.require("new key", r.new_key)):
            raise VaultBadAnswer(f"{r.loc.display}: the stored key does not unseal to the "
                                 "generated key")


def _unseal_key(r: Run, s: UnsealKey) -> None:
    entry = keystore.read_entry(r.session, r.loc)
    got = entry.key_for_slot(s.keyslot) if entry else None
    if got is None:
        raise VaultNotFound(f"{r.loc.display}: no key for keyslot {s.keyslot} — re-run")
    buf = keystore.unseal(r.session, r.loc, got)
    if s.role == "unlock":
        if r.unlock_key is not None:
            r.unlock_key.close()
        r.unlock_key = buf
    else:
        if r.new_key is not None:
            r.new_key.close()
        r.new_key = buf
        r.sealed = got.sealed


def _backup_header(r: Run, s: BackupHeader) -> None:
    path = r.rundir.backup_path(r.loc.luks_uuid)
    luks.header_backup(r.device, path)
    os.chmod(path, 0o600)
    r.backup = path
    r.restorable = True


def _add_keyslot(r: Run, s: AddKeyslot) -> None:
    got = luks.add_key(r.device, r.require("unlock key", r.unlock_key),
                       r.require("new key", r.new_key), keyslot=s.keyslot)
    if got != s.keyslot:
        raise CryptsetupFailed(f"{r.device}: new key went to keyslot {got}, not "
                                    f"{s.keyslot}")


def _format(r: Run, s: Format) -> None:
    luks.format_volume(r.device, r.require("new key", r.new_key), uuid=s.luks_uuid,
                       keyslot=s.keyslot)


def _import_token(r: Run, s: ImportToken) -> None:
    tok = BootkeyToken.for_location(r.loc, s.keyslot, r.name)
    luks.import_token(r.device, tok.to_json())


def _test_slot_alone(r: Run, s: TestSlotAlone) -> None:
    try:
        r.proof = luks.verify_slot(r.device, r.require("new key", r.new_key), s.keyslot)
    except WrongKey:
        raise WrongKey(f"{r.device}: the new key does not open keyslot {s.keyslot} alone — "
                       "nothing was removed") from None


def _prove_remaining(r: Run, s: ProveRemaining) -> None:
    key = r.require("unlock key", r.unlock_key)
    for n in s.candidates:
        if luks.test_key(r.device, key, n) is luks.KeyTest.OK:
            r.proof = luks.verify_slot(r.device, key, n)
            return
    raise WrongKey(f"{r.device}: the --unlock-key-file key opens none of the keyslots that "
                   f"would remain ({', '.join(map(str, s.candidates))}) — nothing changed; "
                   "give the key of a keyslot that stays")


def _activate(r: Run, s: Activate) -> None:
    cur, version = r.read()
    if cur is None or cur.key_for_slot(s.keyslot) is None:
        raise VaultNotFound(f"{r.loc.display}: the pending key vanished — re-run")
    state = {s.keyslot: "active", **{n: "retiring" for n in s.retire}}
    keys = [k.model_copy(update={"state": state[k.keyslot]}) if k.keyslot in state else k
            for k in cur.keys]
    r.write(_with_keys(cur, keys, formatting=None), version)
    r.restorable = False  # committed: from here on a re-run finishes, nothing rolls back
    r.withdraw = None


def _recovery_text() -> SecretBuffer:
    chars = [secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_GROUPS * 4)]
    text = "-".join("".join(chars[i:i + 4]) for i in range(0, len(chars), 4))
    buf = SecretBuffer.from_bytes(bytearray(text.encode()))
    del text, chars
    return buf


def _add_recovery_key(r: Run, s: AddRecoveryKey) -> None:
    rec = _recovery_text()
    # pbkdf=(): cryptsetup's benchmarked argon2id, the strong KDF a typed key needs
    n = luks.add_key(r.device, r.require("new key", r.new_key), rec, pbkdf=())
    luks.import_token(r.device, {"type": RECOVERY_TOKEN_TYPE, "keyslots": [str(n)]})
    r.recovery_key, r.recovery_keyslot = rec, n


def _kill_slot(r: Run, s: KillSlot) -> None:
    if r.proof is None:
        raise LastKeyslot(f"{r.device}: refusing to remove keyslot {s.keyslot}: no keyslot "
                          "was proven to work")
    luks.kill_slot(r.device, s.keyslot, proof=r.proof)


def _remove_token(r: Run, s: RemoveToken) -> None:
    luks.remove_token(r.device, s.token_id)


def _drop_keys(r: Run, s: DropKeys) -> None:
    cur, version = r.read()
    r.restorable = False  # the backup names keyslots whose keys are leaving Vault
    if cur is None:
        return
    keys = [k for k in cur.keys if k.keyslot not in s.keyslots]
    if keys == cur.keys:
        return
    if not keys:
        r.session.kv_delete(r.loc.kv_mount, r.loc.kv_version, r.loc.path)
        return
    r.write(_with_keys(cur, keys), version)


def _destroy_old_versions(r: Run, s: DestroyOldVersions) -> None:
    meta = r.session.kv_metadata(r.loc.kv_mount, r.loc.path)
    if not meta:
        return
    current = int(meta.get("current_version") or 0)
    old = sorted(int(v) for v, m in (meta.get("versions") or {}).items()
                 if int(v) < current and not (m or {}).get("destroyed"))
    if old:
        r.session.kv_destroy_versions(r.loc.kv_mount, r.loc.path, old)


def _delete_entry(r: Run, s: DeleteEntry) -> None:
    r.restorable = False
    r.session.kv_delete(r.loc.kv_mount, r.loc.kv_version, r.loc.path)


def _rewrap(r: Run, s: Rewrap) -> None:
    cur, version = r.read()
    if cur is None:
        raise VaultNotFound(f"{r.loc.display}: not enrolled")
    keys = [k.model_copy(update={"sealed": r.session.transit_rewrap(
        r.loc.transit_mount, r.loc.transit_key, k.sealed, r.loc.context)}) for k in cur.keys]
    r.write(_with_keys(cur, keys), version)


def _remove_backup(r: Run, s: RemoveBackup) -> None:
    r.rundir.backup_path(r.loc.luks_uuid).unlink(missing_ok=True)
    r.backup = None
    r.restorable = False


_RUNNERS: dict[type[Step], Callable[[Run, Any], None]] = {
    Generate: _generate, Seal: _seal, VaultWrite: _vault_write,
    VaultReadBack: _vault_read_back, UnsealKey: _unseal_key, BackupHeader: _backup_header,
    AddKeyslot: _add_keyslot, Format: _format, ImportToken: _import_token,
    TestSlotAlone: _test_slot_alone, ProveRemaining: _prove_remaining, Activate: _activate,
    AddRecoveryKey: _add_recovery_key, KillSlot: _kill_slot, RemoveToken: _remove_token,
    DropKeys: _drop_keys, DestroyOldVersions: _destroy_old_versions,
    DeleteEntry: _delete_entry, Rewrap: _rewrap, RemoveBackup: _remove_backup,
}


def execute(plan: Plan, run: Run, after_step: AfterStep | None = None) -> None:
    """Run the steps in order; each verifies its own result before the next starts.
    On a failure before the commit point, roll back (header restore, withdraw the
    pending Vault key) and re-raise."""
    try:
        for step in plan.steps:
            log.debug("%s: %s", run.device, step)
            _RUNNERS[type(step)](run, step)
            run.log.append(str(step))
            if after_step is not None:
                after_step(step)
    except BaseException as e:
        _rollback(run, e)
        raise


def _rollback(run: Run, cause: BaseException) -> None:
    """Undo what this run did before its commit point. Never raises: the original error
    is what the operator needs; rollback trouble is logged and the state stays
    resumable (re-running plans from what is there)."""
    try:
        if run.restorable and run.backup is not None and run.backup.exists():
            luks.header_restore(run.device, run.backup)
            run.log.append("rollback: header restored")
            run.backup.unlink(missing_ok=True)
        if run.withdraw is not None:
            keyslot, created = run.withdraw
            present = keyslot in luks.inspect(run.device).keyslots \
                if luks.probe_magic(run.device) == 2 else False
            if not present:
                cur, version = run.read()
                if cur is not None:
                    keys = [k for k in cur.keys
                            if not (k.keyslot == keyslot and k.state == "pending")]
                    if not keys and created:
                        run.session.kv_delete(run.loc.kv_mount, run.loc.kv_version,
                                              run.loc.path)
                    elif keys != cur.keys:
                        run.write(_with_keys(cur, keys), version)
                run.log.append(f"rollback: withdrew pending key of keyslot {keyslot}")
    except (BootkeyError, OSError) as e:
        log.error("%s: rollback after %s incomplete: %s — re-run the command to resume",
                  run.device, type(cause).__name__, e)


# ---- whole operations (what the CLI calls) ---------------------------------------------


@dataclass
class Outcome:
    device: str
    luks_uuid: str
    vault_path: str
    summary: str
    steps: list[str]
    keyslots: list[int] = field(default_factory=list)
    recovery_key: SecretBuffer | None = None
    recovery_keyslot: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "luks_uuid": self.luks_uuid,
                "vault_path": self.vault_path, "summary": self.summary,
                "steps": self.steps, "keyslots": self.keyslots}


def _outcome(run: Run, plan: Plan, session: VaultSession) -> Outcome:
    entry = keystore.read_entry(session, run.loc)
    slots = sorted(k.keyslot for k in entry.keys) if entry else []
    out = Outcome(run.device, run.loc.luks_uuid, run.loc.display, plan.summary,
                  list(run.log), slots, run.recovery_key, run.recovery_keyslot)
    run.recovery_key = None  # handed over: the caller shows it once, then closes it
    return out


def location_of(cfg: Config, host_id: str, hdr: luks.Header) -> Location:
    """The Vault location a volume's bootkey token names, else the configured one."""
    for raw in hdr.tokens_of_type(keystore.TOKEN_TYPE).values():
        try:
            tok = BootkeyToken.model_validate(raw)
        except ValidationError:
            continue
        if tok.host_id == host_id:
            return tok.location(hdr.uuid)
    return keystore.location_for(cfg, host_id, hdr.uuid)


def _find_formatting(session: VaultSession, cfg: Config, host_id: str,
                     device: str) -> tuple[str, Entry] | None:
    """An interrupted `enroll --format` of this device: a pending entry naming it."""
    base = keystore.location_for(cfg, host_id, "x")
    prefix = base.path.rsplit("/", 1)[0]
    for name in session.kv_list(base.kv_mount, base.kv_version, prefix):
        luks_uuid = name.rstrip("/")
        loc = keystore.location_for(cfg, host_id, luks_uuid)
        try:
            entry = keystore.read_entry(session, loc)
        except VaultBadAnswer:
            continue
        if entry and entry.formatting == device and all(k.state == "pending"
                                                        for k in entry.keys):
            return luks_uuid, entry
    return None


def enroll(cfg: Config, session: VaultSession, host_id: str, device: str, *,
           name: str | None = None, unlock_key: SecretBuffer | None = None,
           keyslot: int | None = None, format_device: bool = False, force: bool = False,
           recovery_key: bool = False, dry_run: bool = False, rundir: RunDir | None = None,
           after_step: AfterStep | None = None) -> Outcome:
    """`bootkey enroll`: see plan_enroll / plan_format."""
    rundir = rundir or RunDir.from_env()
    with rundir.lock(device):
        version = luks.probe_magic(device)
        hdr = luks.inspect(device) if version == 2 else None
        resume_fmt: tuple[str, Entry] | None = None
        if format_device:
            if hdr is not None:
                loc = location_of(cfg, host_id, hdr)
                entry = keystore.read_entry(session, loc)
                # Ours already (an interrupted or finished `enroll --format`, or enrolled
                # before): finish or report instead of formatting — unless --force asks
                # to destroy a volume that was not in the middle of our format.
                formatting_ours = entry is not None and (entry.formatting == device
                                                         or not force)
                if not formatting_ours and not force:
                    blank_check(device)  # raises NotBlank naming the LUKS header
                if not formatting_ours:
                    hdr = None  # --force: format over it
            else:
                check_block_device_free(device)
                if not force:
                    blank_check(device)
                resume_fmt = _find_formatting(session, cfg, host_id, device)
        if hdr is None and format_device:
            luks_uuid = resume_fmt[0] if resume_fmt else str(uuidlib.uuid4())
            loc = keystore.location_for(cfg, host_id, luks_uuid)
            plan = plan_format(device, luks_uuid=luks_uuid, keyslot=keyslot,
                               resume=resume_fmt[1] if resume_fmt else None,
                               recovery_key=recovery_key)
        else:
            hdr = hdr or luks.inspect(device)  # raises NotLuks (with LUKS1 conversion hint)
            loc = location_of(cfg, host_id, hdr)
            view = observe(session, device, loc, hdr)
            plan = plan_enroll(view, keyslot=keyslot, have_unlock_key=unlock_key is not None,
                               recovery_key=recovery_key)
            if plan.needs_unlock_key:
                raise UsageError(f"{device}: enroll needs an existing passphrase or keyfile "
                                 "of this volume — pass --unlock-key-file FILE (or - for "
                                 "stdin)")
            if unlock_key is not None and any(isinstance(s, AddKeyslot) for s in plan.steps) \
                    and luks.test_key(device, unlock_key) is not luks.KeyTest.OK:
                raise WrongKey(f"{device}: cannot enroll: the unlock key opens no keyslot — "
                               "nothing changed; check --unlock-key-file (read byte-exact: "
                               "a trailing newline counts)")
        plan = _and_stale_backup(plan, rundir, loc.luks_uuid)
        run = Run(device, loc, session, rundir, name=name, unlock_key=unlock_key)
        if dry_run:
            return Outcome(device, loc.luks_uuid, loc.display, plan.summary + " (dry run)",
                           [str(s) for s in plan.steps])
        try:
            execute(plan, run, after_step)
            return _outcome(run, plan, session)
        finally:
            run.unlock_key = None  # the caller's buffer: the caller closes it
            run.close()


def _and_stale_backup(plan: Plan, rundir: RunDir, luks_uuid: str) -> Plan:
    """An interrupted run may have left its header backup; once this run has brought
    the volume to a finished state the backup is obsolete (and holds every keyslot)."""
    if any(isinstance(s, RemoveBackup) for s in plan.steps) or \
            not (rundir.backups / f"{luks_uuid}.luksheader").exists():
        return plan
    return Plan((*plan.steps, RemoveBackup()), plan.summary, plan.needs_unlock_key)


def _view_for(cfg: Config, session: VaultSession, host_id: str,
              device: str) -> tuple[View, Location]:
    hdr = luks.inspect(device)
    loc = location_of(cfg, host_id, hdr)
    return observe(session, device, loc, hdr), loc


def rotate(cfg: Config, session: VaultSession, host_id: str, device: str, *,
           rewrap: bool = False, dry_run: bool = False, rundir: RunDir | None = None,
           after_step: AfterStep | None = None) -> Outcome:
    rundir = rundir or RunDir.from_env()
    with rundir.lock(device):
        view, loc = _view_for(cfg, session, host_id, device)
        plan = plan_rewrap(view) if rewrap else plan_rotate(view)
        plan = _and_stale_backup(plan, rundir, loc.luks_uuid)
        if dry_run:
            return Outcome(device, loc.luks_uuid, loc.display, plan.summary + " (dry run)",
                           [str(s) for s in plan.steps])
        # the token is rewritten for the new keyslot: carry the volume's name over
        name = view.entry.name if view.entry else None
        run = Run(device, loc, session, rundir, name=name)
        try:
            execute(plan, run, after_step)
            return _outcome(run, plan, session)
        finally:
            run.close()


def unenroll(cfg: Config, session: VaultSession, host_id: str, device: str, *,
             purge: bool = False, unlock_key: SecretBuffer | None = None,
             dry_run: bool = False, rundir: RunDir | None = None,
             after_step: AfterStep | None = None) -> Outcome:
    rundir = rundir or RunDir.from_env()
    with rundir.lock(device):
        view, loc = _view_for(cfg, session, host_id, device)
        plan = plan_unenroll(view, purge=purge, have_unlock_key=unlock_key is not None)
        plan = _and_stale_backup(plan, rundir, loc.luks_uuid)
        if dry_run:
            return Outcome(device, loc.luks_uuid, loc.display, plan.summary + " (dry run)",
                           [str(s) for s in plan.steps])
        run = Run(device, loc, session, rundir, unlock_key=unlock_key)
        try:
            execute(plan, run, after_step)
            return _outcome(run, plan, session)
        finally:
            run.unlock_key = None
            run.close()
