"""KES's Vault keystore, through the one Vault session (bootkey_core.vault): the same
paths, fields and value encodings a real KES uses (shared/kes-api.md §8), so a Vault that
a KES wrote to works unchanged.

Invariant: one KV entry per key at `<engine>/<prefix>/<name>` (KV v2: `…/data/…`) whose
data has exactly one field, named like the key, holding the §8.1 string — optionally
wrapped by transit (`vault:vN:…`, any N: reading after a transit-key rotation works,
which KES cannot). Writes are create-only: an existence check, then for KV v2 `cas: 0` so
a racing writer loses instead of overwriting. Reads of KV v2 pin version 1, as KES does.
Errors never carry Vault's response text into client answers; they name the location.
The least-privilege policy is `policy_rules` (HCL by bootkey_core.vault_policy).
"""

from __future__ import annotations

import base64
import contextlib
import posixpath
from dataclasses import dataclass
from typing import Any

from bootkey_core.errors import VaultError, VaultNotFound, VaultUnavailable
from bootkey_core.vault import VaultSession
from bootkey_core.vault_policy import Rule, hcl
from kes.keyring import KeyExists, KeyNotFound, StoreError, StoreUnreachable

# KES answers now or fails (502): a store call makes one pass over Vault's addresses
# and never waits out an outage — the keyring's cache and offline mode do that.
CALL_DEADLINE = 0.0


@dataclass(frozen=True)
class VaultStoreConfig:
    engine: str = "kv"
    version: int = 1            # KES's default is KV v1
    prefix: str = ""
    transit_engine: str = "transit"
    transit_key: str = ""       # empty: no transit wrapping


def _join(*parts: str) -> str:
    # Go path.Join: empty parts dropped, slashes normalised.
    return posixpath.normpath("/".join(p.strip("/") for p in parts if p.strip("/"))).lstrip("/")


class VaultKeyStore:
    """A KeyStore on Vault/OpenBao KV v1 or v2, through the one Vault session (the
    agent's, or the one `kes serve` built): login, re-login on an expired token,
    fail-over and error classification are the session's. The session is used only
    on cache misses and writes; cached keys never reach it.
    """

    def __init__(self, session: VaultSession, cfg: VaultStoreConfig) -> None:
        if cfg.version not in (1, 2):
            raise ValueError("vault kv version must be v1 or v2")
        self.session = session
        self.cfg = cfg
        self._sealed = False

    def after_fork(self) -> None:
        """In a forked worker: drop pooled connections inherited from the parent."""
        self.session.after_fork()

    # ---- paths (§8.2/§8.3), API paths without /v1/

    def _entry(self, name: str) -> str:
        c = self.cfg
        if c.version == 2:
            return _join(c.engine, "data", c.prefix, name)
        return _join(c.engine, c.prefix, name)

    def _metadata(self, name: str) -> str:
        return _join(self.cfg.engine, "metadata", self.cfg.prefix, name)

    def _list_path(self) -> str:
        c = self.cfg
        if c.version == 2:
            return _join(c.engine, "metadata", c.prefix) + "/"
        return _join(c.engine, c.prefix) + "/"

    # ---- calls

    def _call(self, method: str, path: str, what: str, **kw: Any) -> Any:
        """The session's answer; VaultNotFound passes through for the caller to judge.
        Errors name the location only: Vault's text is for the error log, never for the
        client, which gets KES's fixed answer."""
        if self._sealed:
            raise StoreUnreachable("vault: key store is sealed")
        try:
            return self.session.request(method, path, what=what, deadline=CALL_DEADLINE, **kw)
        except VaultNotFound:
            raise
        except VaultUnavailable as e:
            raise StoreUnreachable(f"vault: {e}") from None
        except VaultError as e:
            raise StoreError(f"vault: {e}") from None

    def _read_data(self, body: Any) -> dict[str, Any] | None:
        data = (body or {}).get("data") if isinstance(body, dict) else None
        if self.cfg.version == 2:
            data = (data or {}).get("data") if isinstance(data, dict) else None
        return data if isinstance(data, dict) else None

    # ---- KeyStore

    def status(self) -> float:
        try:
            body, latency = self.session.health()
        except VaultUnavailable as e:
            raise StoreUnreachable(f"vault: health check failed: {e}") from None
        except VaultError as e:
            raise StoreError(f"vault: health check failed: {e}") from None
        self._sealed = bool(body.get("sealed"))
        if not body.get("initialized", False):
            raise StoreUnreachable("vault: not initialized")
        if self._sealed:
            raise StoreUnreachable("vault: key store is sealed")
        return latency

    def create(self, name: str, value: bytes) -> None:
        path = self._entry(name)
        try:
            data = self._read_data(self._call("GET", path, "read"))
        except VaultNotFound:
            data = None
        if data is not None and name in data:
            raise KeyExists(name)
        stored = value.decode()
        if self.cfg.transit_key:
            stored = self._transit_encrypt(value)
        body: dict[str, Any] = {name: stored}
        if self.cfg.version == 2:
            body = {"options": {"cas": 0}, "data": body}
        try:
            self._call("PUT", path, "create", json=body)
        except VaultNotFound:
            raise StoreError(f"vault: {path}: cannot create: no such mount (404)") from None
        except StoreError as e:
            if self.cfg.version == 2 and "check-and-set" in str(e):
                raise KeyExists(name) from None  # a racing writer created it meanwhile
            raise

    def get(self, name: str) -> bytes:
        path = self._entry(name)
        params = {"version": "1"} if self.cfg.version == 2 else None
        try:
            body = self._call("GET", path, "read", params=params)
        except VaultNotFound:
            raise KeyNotFound(name) from None
        data = self._read_data(body)
        if data is None:
            raise KeyNotFound(name)  # KV v2: version 1 deleted/destroyed
        value = data.get(name)
        if not isinstance(value, str):
            raise StoreError(f"vault: entry {path} has no string field '{name}'")
        if value.startswith("vault:v"):
            return self._transit_decrypt(value, path)
        return value.encode()

    def delete(self, name: str) -> None:
        path = self._metadata(name) if self.cfg.version == 2 else self._entry(name)
        with contextlib.suppress(VaultNotFound):  # already gone: deleting is idempotent
            self._call("DELETE", path, "delete")

    def list(self, prefix: str) -> list[str]:
        try:
            body = self._call("LIST", self._list_path(), "list")
        except VaultNotFound:
            return []
        keys = ((body or {}).get("data") or {}).get("keys") or []
        # Sub-directories (ending '/') are not keys a client could address.
        return sorted(k for k in keys
                      if isinstance(k, str) and not k.endswith("/") and k.startswith(prefix))

    def policy_hcl(self) -> str:
        return policy_hcl(self.cfg)

    # ---- transit (§8.3)

    def _transit(self, op: str, body: dict[str, str], field: str) -> str:
        path = _join(self.cfg.transit_engine, op, self.cfg.transit_key)
        try:
            res = self._call("POST", path, f"{op} with", json=body)
        except VaultNotFound:
            raise StoreError(f"vault: {path}: no such transit key (404)") from None
        out = ((res or {}).get("data") or {}).get(field)
        if not isinstance(out, str):
            raise StoreError(f"vault: {path}: invalid vault response")
        return out

    def _transit_encrypt(self, value: bytes) -> str:
        ct = self._transit("encrypt", {"plaintext": base64.b64encode(value).decode()},
                           "ciphertext")
        if not ct.startswith("vault:v"):
            raise StoreError("vault: transit encrypt: invalid vault response")
        return ct

    def _transit_decrypt(self, ciphertext: str, entry: str) -> bytes:
        if not self.cfg.transit_key:
            raise StoreError(f"vault: entry {entry} is transit-wrapped but no transit key is "
                             "configured — set keystore.vault.transit.key")
        pt = self._transit("decrypt", {"ciphertext": ciphertext}, "plaintext")
        try:
            return base64.b64decode(pt, validate=True)
        except ValueError:
            raise StoreError("vault: transit decrypt: invalid vault response") from None


def policy_rules(c: VaultStoreConfig) -> list[Rule]:
    """The least-privilege Vault rules a store with this config needs."""
    if c.version == 2:
        meta = _join(c.engine, "metadata", c.prefix)
        rules = [Rule(_join(c.engine, "data", c.prefix, "*"), ("create", "read")),
                 Rule(meta + "/*", ("delete",)), Rule(meta + "/", ("list", "read"))]
    else:
        entries = _join(c.engine, c.prefix)
        rules = [Rule(entries + "/*", ("create", "read", "delete")),
                 Rule(entries + "/", ("list", "read"))]
    if c.transit_key:
        rules += [Rule(_join(c.transit_engine, op, c.transit_key), ("update",))
                  for op in ("encrypt", "decrypt")]
    return rules


def policy_hcl(c: VaultStoreConfig) -> str:
    """`policy_rules` as HCL, written by the one policy writer."""
    return hcl(policy_rules(c), "the Vault policy bootkey's KES keystore needs")
