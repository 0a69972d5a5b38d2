"""Master keys: the narrow KeyStore protocol, an in-memory store, and the cache in front.

Invariant: a KeyStore stores opaque values (the §8.1 string) under names and is
*create-only* — `create` of an existing name raises `KeyExists`, never overwrites. The
`Keyring` parses values into `KeyVersion`s whose key bytes live only in locked memory
(`SecretBuffer`); evicting an entry drops the cache's reference and the buffer is wiped as
soon as no in-flight request still uses it (CPython refcounting; see SecretBuffer.__del__).

Cache semantics follow KES (shared/kes-api.md §9) with the *documented* defaults —
any = 5m, unused = 30s, offline = 0 (disabled) — not upstream's slip that turns an empty
cache section into any = 30s. Concurrent misses for one name make a single store read.
Create, delete and list always go to the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from kes import keyversion
from kes.keyversion import KeyVersion

DEFAULT_EXPIRY_ANY = 300.0
DEFAULT_EXPIRY_UNUSED = 30.0
DEFAULT_EXPIRY_OFFLINE = 0.0
PROBE_INTERVAL = 10.0   # KES probes the keystore every 10 s to detect "offline" (PR #412)
_Names = list[str]  # an alias: inside classes `list` is the method

LIST_LIMIT = 1024       # the Vault store returns at most 1024 names per call


class KeyringError(Exception):
    """Base of the store/keyring errors. Messages never contain key material."""


class KeyNotFound(KeyringError):
    pass


class KeyExists(KeyringError):
    pass


class StoreError(KeyringError):
    """The store failed (network, Vault error, malformed value): clients see a 502."""


class StoreUnreachable(StoreError):
    """Sealed, uninitialised, timed out, or marked offline by the cache's probe."""


class KeyStore(Protocol):
    """What a backend must do. Errors are part of the contract (see each method)."""

    def status(self) -> float:
        """Probe the store; return the latency in seconds. Raises StoreUnreachable when
        sealed/uninitialised/timed out, StoreError for anything else."""
        ...

    def create(self, name: str, value: bytes) -> None:
        """Store `value` under `name` only if absent. Raises KeyExists, StoreError."""
        ...

    def get(self, name: str) -> bytes:
        """Raises KeyNotFound, StoreError."""
        ...

    def delete(self, name: str) -> None:
        """Idempotent for the Vault store; may raise KeyNotFound elsewhere. StoreError."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every name starting with `prefix`, sorted. Raises StoreError."""
        ...


class MemKeyStore:
    """In-memory reference store (KES --dev). Values are kept as given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}

    def status(self) -> float:
        return 0.0

    def create(self, name: str, value: bytes) -> None:
        with self._lock:
            if name in self._data:
                raise KeyExists(name)
            self._data[name] = bytes(value)

    def get(self, name: str) -> bytes:
        with self._lock:
            try:
                return self._data[name]
            except KeyError:
                raise KeyNotFound(name) from None

    def delete(self, name: str) -> None:
        with self._lock:
            if self._data.pop(name, None) is None:
                raise KeyNotFound(name)

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(n for n in self._data if n.startswith(prefix))


@dataclass
class _Entry:
    key: KeyVersion
    used: bool = True


@dataclass(frozen=True)
class CacheExpiry:
    any: float = DEFAULT_EXPIRY_ANY
    unused: float = DEFAULT_EXPIRY_UNUSED
    offline: float = DEFAULT_EXPIRY_OFFLINE


@dataclass
class Keyring:
    """The cache in front of a KeyStore. Thread-safe. Every method but `cached` may block
    on the store, so the async API calls them from worker threads; `cached` never does."""

    store: KeyStore
    expiry: CacheExpiry = field(default_factory=CacheExpiry)
    clock: Callable[[], float] = time.monotonic
    on_error: Callable[[str, BaseException], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, Future[KeyVersion]] = {}
        now = self.clock()
        self._last_any = self._last_unused = self._last_offline = now
        self._next_due = now  # maintain() computes the real one
        self._offline = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.store_reads = 0  # cache misses that reached the store (for tests and metrics)

    # ---- keys

    def cached(self, name: str) -> KeyVersion | None:
        """The cached key or None, without I/O: lets async callers skip a thread hop."""
        self.maintain()
        # No lock: a dict read is atomic, and racing an eviction at worst hands this one
        # request the key that was just dropped, which is still the right key.
        entry = self._cache.get(name)
        if entry is None:
            return None
        entry.used = True
        return entry.key

    def get(self, name: str) -> KeyVersion:
        """Cached key, or one store read shared by all concurrent callers for `name`."""
        self.maintain()
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None:
                entry.used = True
                return entry.key
            fut = self._inflight.get(name)
            leader = fut is None
            if fut is None:
                fut = Future()
                self._inflight[name] = fut
        if not leader:
            return fut.result()
        try:
            self.store_reads += 1
            raw = self.store.get(name)
            try:
                kv = keyversion.parse(raw)
            except keyversion.InvalidKeyVersion as e:
                raise StoreError(f"key '{name}': stored value is not a KES key: {e}") from None
        except BaseException as e:
            with self._lock:
                del self._inflight[name]
            fut.set_exception(e)
            raise
        with self._lock:
            self._cache[name] = _Entry(kv)
            del self._inflight[name]
        fut.set_result(kv)
        return kv

    def create(self, name: str, kv: KeyVersion) -> None:
        self.store.create(name, keyversion.encode(kv))

    def delete(self, name: str) -> None:
        self.store.delete(name)
        with self._lock:
            self._cache.pop(name, None)  # this node only, as KES does

    def list(self, prefix: str, limit: int = LIST_LIMIT) -> tuple[_Names, str]:
        """(names, continue_at): at most `limit` names; continue_at is the next name or ""."""
        names = self.store.list(prefix)
        if len(names) > limit:
            return names[:limit], names[limit]
        return names, ""

    def status(self) -> float:
        """Store latency in seconds. Raises StoreUnreachable while marked offline."""
        if self._offline:
            raise StoreUnreachable("key store is offline")
        return self.store.status()

    def set_expiry(self, expiry: CacheExpiry) -> None:
        with self._lock:
            self.expiry = expiry
            self._next_due = self.clock()  # re-plan at the next maintain()

    @property
    def offline(self) -> bool:
        return self._offline

    def cached_names(self) -> _Names:
        with self._lock:
            return sorted(self._cache)

    # ---- expiry and offline detection

    def maintain(self) -> None:
        """Apply the expiry rules for the current clock. Cheap; called on every get and
        by the background thread."""
        now = self.clock()
        if now < self._next_due and not self._offline:
            return  # nothing can expire yet: skip the lock on the hot path
        e = self.expiry
        with self._lock:
            if self._offline and e.offline > 0:
                # Offline mode: `any`/`unused` are suspended, the offline timer rules.
                if now - self._last_offline >= e.offline:
                    self._cache.clear()
                    self._last_offline = now
                self._last_any = self._last_unused = now
                return
            if e.any > 0 and now - self._last_any >= e.any:
                self._cache.clear()
                self._last_any = now
            if e.unused > 0 and now - self._last_unused >= e.unused / 2:
                # Two-phase sweep: evict what was not used since the previous sweep.
                for n in [n for n, ent in self._cache.items() if not ent.used]:
                    del self._cache[n]
                for ent in self._cache.values():
                    ent.used = False
                self._last_unused = now
            due = [self._last_any + e.any] if e.any > 0 else []
            if e.unused > 0:
                due.append(self._last_unused + e.unused / 2)
            self._next_due = min(due, default=float("inf"))

    def probe(self) -> bool:
        """One offline-detection probe (KES: every 10 s). Returns True if reachable."""
        try:
            self.store.status()
            ok = True
        except Exception as exc:
            ok = False
            if self.on_error is not None and not self._offline:
                self.on_error("key store probe failed", exc)
        with self._lock:
            if not ok and not self._offline:
                self._last_offline = self.clock()
            self._offline = not ok
        return ok

    def start(self, interval: float = PROBE_INTERVAL) -> Keyring:
        """Run probe + maintain in a daemon thread until `stop()`."""
        def loop() -> None:
            while not self._stop.wait(interval):
                self.probe()
                self.maintain()
        self._thread = threading.Thread(target=loop, name="kes-keyring", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            self._cache.clear()
