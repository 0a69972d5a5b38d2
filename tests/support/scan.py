"""Secrets scan: look for a key, in every encoding a careless program might print it,
in text and files; and the suite-wide registry of every key a test creates or unseals
(scanned for at the end of the run by tests/support/secrets_plugin.py)."""

from __future__ import annotations

import base64
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import ahocorasick

from bootkey_core.secret import SecretBuffer

# Files read whole for the scan; a larger file is reported as skipped, not read.
MAX_SCAN_BYTES = 64 << 20
LUKS_MAGIC = b"LUKS\xba\xbe"
# Test code: these trees of the repository (a file they open for writing is a test input).
_REPO = Path(__file__).resolve().parents[2]
_TEST_TREES = tuple(str(_REPO / d) + os.sep for d in ("tests", "bench"))
_PRODUCT_TREES = tuple(str(_REPO / d) + os.sep for d in ("bootkey", "bootkey_core", "kes"))


def encodings(key: bytes) -> dict[str, bytes]:
    return {
        "raw": key,
        "hex": key.hex().encode(),
        "HEX": key.hex().upper().encode(),
        "base64": base64.b64encode(key).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(key).rstrip(b"="),
        "repr": repr(key)[2:-1].encode(),
    }


def _probes(key: bytes) -> dict[str, bytes]:
    # a 64-byte key: even a 32-byte run of it is a leak
    return {kind: needle[: max(16, len(needle) // 2)] for kind, needle in encodings(key).items()}


def find_key(key: bytes, blobs: Iterable[tuple[str, bytes]]) -> list[str]:
    """Names of the blobs that contain the key in some encoding ("name: encoding")."""
    hits = []
    probes = _probes(key)
    for name, blob in blobs:
        for kind, probe in probes.items():
            if probe in blob:
                hits.append(f"{name}: {kind}")
    return hits


def files_under(root: Path, skip_suffixes: tuple[str, ...] = ()) -> Iterable[tuple[str, bytes]]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(skip_suffixes):
            yield str(p), p.read_bytes()


# The suite-wide registry --------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    """Where a registered secret was found; never the secret itself."""

    where: str  # a file path, or "<test node id> <captured section>"
    encoding: str
    what: str  # the label it was registered with

    def __str__(self) -> str:
        return f"{self.where}: {self.what} ({self.encoding})"


@dataclass
class SecretsRegistry:
    """Every key (or credential) a test creates or unseals, and the files test code
    itself wrote. Thread-safe: fixtures register from server threads too."""

    secrets: dict[bytes, str] = field(default_factory=dict)
    test_written: set[str] = field(default_factory=set)
    homes: set[str] = field(default_factory=set)  # files a secret is meant to live in
    # A host keeps its AppRole secret_id on its own disk (/etc/bootkey/secret-id): the
    # disks of a test VM may hold these credentials, and no other secret.
    credentials: set[bytes] = field(default_factory=set)
    machine_disks: set[str] = field(default_factory=set)
    watched_dirs: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, secret: bytes | bytearray | SecretBuffer, what: str, *,
                 home: Path | None = None, host_credential: bool = False) -> None:
        """Remember a secret to scan for at the end of the run. `what` names its origin
        (e.g. "enroll_direct data.img"); it is what a leak report prints. `home` is the
        file the test asked the product to write this secret to (a secret_id file
        `setup-vault` writes): that file may hold it, and nothing else.
        `host_credential`: a secret a host keeps on its own disk by design (a secret_id),
        so a test VM's disks (`machine_disk`) may hold it."""
        raw = bytes(secret.view) if isinstance(secret, SecretBuffer) else bytes(secret)
        if len(raw) < 8:
            raise ValueError(f"{what}: too short to scan for without false hits")
        with self._lock:
            self.secrets.setdefault(raw, what)
            if home is not None:
                self.homes.add(os.path.realpath(home))
            if host_credential:
                self.credentials.add(raw)

    def machine_disk(self, path: Path) -> None:
        """A test VM's disk image (its root overlay, its config disk): the guest's
        /etc/bootkey holds its secret_id there, as a real host's disk does. Any other
        registered secret found in it is still a leak."""
        with self._lock:
            self.machine_disks.add(os.path.realpath(path))

    def watch(self, directory: Path) -> None:
        """Scan this directory too (one the suite writes to outside its tmp dirs)."""
        with self._lock:
            self.watched_dirs.append(directory)

    def note_open(self, path: object, mode: object, flags: object) -> None:
        """sys.audit "open" hook: remember files that test code opens for writing."""
        if not isinstance(path, str | bytes | os.PathLike) or not _writes(mode, flags):
            return
        if _opened_by_test_code(sys._getframe(2)):
            with self._lock:
                self.test_written.add(os.path.realpath(os.fsdecode(path)))

    def is_test_input(self, path: str, blob: bytes) -> bool:
        """A file the test itself wrote, or a secret's registered home, holding one
        secret and nothing else: a key file handed to cryptsetup, a secret_id file.
        Anything else with a secret is a leak."""
        real = os.path.realpath(path)
        if real not in self.test_written and real not in self.homes:
            return False
        contents = {blob, blob.strip()}  # a raw key may begin or end with a space byte
        return any(needle in contents for raw in self.secrets
                   for needle in encodings(raw).values())

    def scan(self, blobs: Iterable[tuple[str, bytes]]) -> list[Leak]:
        with self._lock:
            probes = [(raw, what, kind, probe) for raw, what in self.secrets.items()
                      for kind, probe in _probes(raw).items()]
            credentials, disks = set(self.credentials), set(self.machine_disks)
        if not probes:
            return []
        # One Aho-Corasick pass per blob for all ~3,000 probes: a `probe in blob` each
        # read the suite's 1-2 GB of VM disks 3,000 times (about 6 minutes of a CI run).
        # Bytes map 1:1 onto latin-1 characters, the automaton's key type.
        automaton = ahocorasick.Automaton()
        for raw, what, kind, probe in probes:
            key = probe.decode("latin-1")
            found = automaton.get(key, [])
            automaton.add_word(key, [*found, (raw, what, kind)])
        automaton.make_automaton()
        # Disk images are mostly zeros: skip runs longer than any probe (no match can
        # span one), which the automaton would otherwise walk byte by byte.
        zeros = b"\0" * (1 + max(len(probe) for *_, probe in probes))
        leaks = []
        for where, blob in blobs:
            on_disk = os.path.realpath(where) in disks
            hits: dict[tuple[bytes, str], str] = {}
            for part in blob.split(zeros):
                for _end, found in automaton.iter(part.decode("latin-1")):
                    for raw, what, kind in found:
                        if not (on_disk and raw in credentials):
                            hits[raw, kind] = what
            leaks += [Leak(where, kind, what) for (_raw, kind), what in hits.items()]
        return leaks

    def scan_files(self, roots: Iterable[Path]) -> list[Leak]:
        return self.scan((p, b) for p, b in _scannable_files(roots)
                         if not self.is_test_input(p, b))


def _writes(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))


def _opened_by_test_code(frame: FrameType | None) -> bool:
    """The innermost frame from this repository decides: test code or product code."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PRODUCT_TREES):
            return False
        if name.startswith(_TEST_TREES) and not name.endswith(("scan.py", "secrets_plugin.py")):
            return True
        frame = frame.f_back
    return False


def _scannable_files(roots: Iterable[Path]) -> Iterator[tuple[str, bytes]]:
    """Every regular file under the roots except LUKS images: a volume holds its key
    only wrapped by a keyslot's KDF, and reading hundreds of 20 MiB images for nothing
    would double the scan's time."""
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    if os.path.getsize(p) > MAX_SCAN_BYTES:
                        continue
                    with open(p, "rb") as f:
                        if f.read(len(LUKS_MAGIC)) == LUKS_MAGIC:
                            continue
                        f.seek(0)
                        blob = f.read()
                except OSError:
                    continue  # removed meanwhile, or a socket/fifo's permissions
                yield p, blob


REGISTRY = SecretsRegistry()


def register_secret(secret: bytes | bytearray | SecretBuffer, what: str, *,
                    home: Path | None = None, host_credential: bool = False) -> None:
    """Register with the session's registry (for helpers that are not fixtures)."""
    REGISTRY.register(secret, what, home=home, host_credential=host_credential)
