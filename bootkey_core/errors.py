"""The one exception tree of bootkey.

Every failure a user can cause is a `BootkeyError` subclass carrying its exit code and
whether retrying can help. Messages follow `<thing>: cannot <verb>: <cause> — <fix>` and
never contain key material. `cli.main` is the single place that turns them into an exit.

Exit codes: the BSD codes of systemd.exec(5) where one fits, and 80+ for bootkey's own
conditions so that scripts and `RestartPreventExitStatus=` can tell them apart.
"""

from __future__ import annotations

import os


class BootkeyError(Exception):
    """Base class. `exit_code` is the process exit status; `retryable` says whether the
    same call may succeed later without anybody changing anything."""

    exit_code: int = 1
    retryable: bool = False


class UsageError(BootkeyError):
    exit_code = os.EX_USAGE  # 64


class ConfigError(BootkeyError):
    exit_code = os.EX_CONFIG  # 78


class VaultError(BootkeyError):
    """Something about Vault went wrong."""

    exit_code = os.EX_UNAVAILABLE  # 69


class VaultUnavailable(VaultError):
    """Network error, timeout, 5xx, 429, sealed or uninitialised: worth retrying."""

    exit_code = os.EX_UNAVAILABLE  # 69
    retryable = True


class VaultDenied(VaultError):
    """403 on a path: the token's policy lacks a capability."""

    exit_code = os.EX_NOPERM  # 77


class VaultAuthFailed(VaultError):
    """AppRole login refused: wrong/expired secret_id or role_id, or a used wrapping token."""

    exit_code = 80


class VaultNotFound(VaultError):
    """404: the entry (a volume's sealed key, a KV mount) does not exist."""

    exit_code = 87


class VaultBadAnswer(VaultError):
    """Vault answered with something bootkey cannot use (malformed entry, wrong format)."""

    exit_code = os.EX_DATAERR  # 65


class VaultConflict(VaultError):
    """A create-only write found an entry already there."""

    exit_code = 88


class DeviceError(BootkeyError):
    exit_code = os.EX_IOERR  # 74


class DeviceNotFound(DeviceError):
    exit_code = os.EX_NOINPUT  # 66


class NotLuks(DeviceError):
    exit_code = 82


class WrongKey(DeviceError):
    exit_code = 81


class DeviceBusy(DeviceError):
    exit_code = 83


class NoDeviceMapper(DeviceError):
    exit_code = 84


class NoFreeKeyslot(DeviceError):
    exit_code = 85


class LastKeyslot(DeviceError):
    """Refused: the operation would leave the volume without a working key."""

    exit_code = 86


class NotBlank(DeviceError):
    """Refused to format: the device holds a filesystem, partition table or LUKS header."""

    exit_code = 89


class CryptsetupFailed(DeviceError):
    exit_code = os.EX_IOERR  # 74


class MemoryLockError(BootkeyError):
    exit_code = os.EX_OSERR  # 71


class DeadlineExceeded(BootkeyError):
    exit_code = os.EX_UNAVAILABLE  # 69
    retryable = True


class PartialFailure(BootkeyError):
    """Some of the requested volumes failed; each failure was reported on its own."""

    exit_code = 1
