"""The steps enroll, rotate, unenroll and rewrap are made of, as data, and the declared
sequences they run in.

Invariant: at every instant the volume opens with a key Vault holds (or with the key the
operator already had), and Vault keeps every key a keyslot uses. The order of the
declared sequences is what keeps it: a Vault copy is written and read back before its
keyslot exists, a keyslot is proven (`TestSlotAlone`) before another is killed, and a
Vault key leaves only after its keyslot has gone (or once it is seen to open nothing).

Crash windows: each step's docstring says what remains if the process dies right after
it; docs/enroll.md tabulates them with what a re-run plans. What a step does lives in
`bootkey.enroll.execute`; which steps run is decided by `bootkey.enroll.plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ENROLL",
    "ENROLL_FORMAT",
    "RECOVER",
    "ROTATE",
    "UNENROLL",
    "Activate",
    "AddKeyslot",
    "AddRecoveryKey",
    "AfterStep",
    "BackupHeader",
    "DeleteEntry",
    "DestroyOldVersions",
    "DropKeys",
    "Format",
    "Generate",
    "ImportToken",
    "KillSlot",
    "Plan",
    "ProveRemaining",
    "RemoveBackup",
    "RemoveToken",
    "Rewrap",
    "Seal",
    "Step",
    "TestSlotAlone",
    "UnsealKey",
    "VaultReadBack",
    "VaultWrite",
]


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
# `rotate --unlock-key-file` when no Vault key opens the volume (exit 81): the operator's
# key authorises AddKeyslot; RemoveToken takes our tokens off the keyslot no Vault key
# opens (never killed) before the commit.
RECOVER: tuple[type[Step], ...] = (
    Generate, Seal, VaultWrite, VaultReadBack, BackupHeader, AddKeyslot, ImportToken,
    TestSlotAlone, RemoveToken, Activate, DropKeys, RemoveBackup,
)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    summary: str
    needs_unlock_key: bool = False  # it adds a keyslot, and no unlock key was given
    by_operator_key: bool = False  # its AddKeyslot is authorised by the operator's key

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


# Called after each step completes (the crash tests' launcher SIGKILLs the process there;
# the rollback tests raise there).
AfterStep = Callable[[Step], None]
