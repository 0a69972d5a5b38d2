"""KES's Vault keystore on hvac: the same paths, fields and value encodings a real KES
uses (shared/kes-api.md §8), so a Vault that a KES wrote to works unchanged.

Invariant: one KV entry per key at `<engine>/<prefix>/<name>` (KV v2: `…/data/…`) whose
data has exactly one field, named like the key, holding the §8.1 string — optionally
wrapped by transit (`vault:vN:…`, any N: reading after a transit-key rotation works,
which KES cannot). Writes are create-only: an existence check, then for KV v2 `cas: 0` so
a racing writer loses instead of overwriting. Reads of KV v2 pin version 1, as KES does.
Errors never carry Vault's response text into client answers; they name the location.
"""

from __future__ import annotations

import base64
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hvac
import hvac.adapters
import requests

from bootkey_core.vault_policy import Rule, hcl
from kes.keyring import KeyExists, KeyNotFound, StoreError, StoreUnreachable

_HEALTH_PARAMS = {  # report every state as 299 so the body is always parsed (KES does)
    "standbyok": "true", "perfstandbyok": "true", "sealedcode": "299",
    "uninitcode": "299", "drsecondarycode": "299", "performancestandbycode": "299",
    "standbycode": "299",
}


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
    """A KeyStore on Vault/OpenBao KV v1 or v2.

    `client` returns an authenticated hvac.Client (the agent passes its VaultSession's
    client; standalone `kes serve` a client it logged in itself). `relogin`, if given, is
    called once when Vault answers 403 — an expired token — and the call is retried.
    """

    def __init__(self, client: Callable[[], hvac.Client], cfg: VaultStoreConfig,
                 relogin: Callable[[], None] | None = None) -> None:
        if cfg.version not in (1, 2):
            raise ValueError("vault kv version must be v1 or v2")
        self._client = client
        self.cfg = cfg
        self._relogin = relogin
        self._sealed = False

    def after_fork(self) -> None:
        """In a forked worker: drop pooled connections inherited from the parent."""
        self._client().adapter.session.close()

    # ---- paths (§8.2/§8.3)

    def _entry(self, name: str) -> str:
        c = self.cfg
        if c.version == 2:
            return "/v1/" + _join(c.engine, "data", c.prefix, name)
        return "/v1/" + _join(c.engine, c.prefix, name)

    def _metadata(self, name: str) -> str:
        return "/v1/" + _join(self.cfg.engine, "metadata", self.cfg.prefix, name)

    def _list_path(self) -> str:
        c = self.cfg
        if c.version == 2:
            return "/v1/" + _join(c.engine, "metadata", c.prefix) + "/"
        return "/v1/" + _join(c.engine, c.prefix) + "/"

    # ---- HTTP

    def _call(self, method: str, url: str, what: str, **kw: Any) -> requests.Response:
        if self._sealed:
            raise StoreUnreachable("vault: key store is sealed")
        for attempt in (0, 1):
            client = self._client()
            try:
                resp: requests.Response = hvac.adapters.RawAdapter.request(
                    client.adapter, method, url, raise_exception=False, **kw)
            except requests.Timeout as e:
                raise StoreUnreachable(f"vault: cannot {what} {url}: timeout") from e
            except requests.RequestException as e:
                raise StoreError(
                    f"vault: cannot {what} {url}: {type(e).__name__}") from e
            if resp.status_code == 403 and attempt == 0 and self._relogin is not None:
                try:
                    self._relogin()
                except Exception as e:
                    raise StoreError(f"vault: cannot {what} {url}: token expired and login "
                                     f"failed: {e}") from None
                continue
            if resp.status_code == 503:
                raise StoreUnreachable(f"vault: cannot {what} {url}: Vault is sealed or standby")
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _fail(resp: requests.Response, what: str, url: str) -> StoreError:
        # Vault's "errors" list is a diagnosis for the error log, never for the client.
        try:
            errs = "; ".join(resp.json().get("errors") or [])
        except ValueError:
            errs = ""
        return StoreError(f"vault: cannot {what} {url}: HTTP {resp.status_code}"
                          + (f": {errs}" if errs else ""))

    def _read_data(self, resp: requests.Response) -> dict[str, Any] | None:
        body = resp.json()
        data = (body or {}).get("data")
        if self.cfg.version == 2:
            data = (data or {}).get("data")
        return data if isinstance(data, dict) else None

    # ---- KeyStore

    def status(self) -> float:
        client = self._client()
        a = client.adapter
        # Without the namespace header: Vault rejects namespaced health calls (KES #476).
        start = time.monotonic()
        try:
            resp = a.session.get(a.base_uri.rstrip("/") + "/v1/sys/health",
                                 params=_HEALTH_PARAMS, **a._kwargs)
        except requests.Timeout as e:
            raise StoreUnreachable("vault: health check timed out") from e
        except requests.RequestException as e:
            raise StoreError(f"vault: health check failed: {type(e).__name__}") from e
        latency = time.monotonic() - start
        try:
            body = resp.json()
        except ValueError:
            raise StoreError(f"vault: health check answered HTTP {resp.status_code}") from None
        self._sealed = bool(body.get("sealed"))
        if not body.get("initialized", False):
            raise StoreUnreachable("vault: not initialized")
        if self._sealed:
            raise StoreUnreachable("vault: key store is sealed")
        return latency

    def create(self, name: str, value: bytes) -> None:
        url = self._entry(name)
        resp = self._call("GET", url, "read")
        if resp.status_code == 200:
            data = self._read_data(resp)
            if data is not None and name in data:
                raise KeyExists(name)
        elif resp.status_code != 404:
            raise self._fail(resp, "read", url)
        stored = value.decode()
        if self.cfg.transit_key:
            stored = self._transit_encrypt(value)
        body: dict[str, Any] = {name: stored}
        if self.cfg.version == 2:
            body = {"options": {"cas": 0}, "data": body}
        resp = self._call("PUT", url, "create", json=body)
        if resp.status_code in (200, 204):
            return
        if self.cfg.version == 2 and resp.status_code == 400 and "check-and-set" in resp.text:
            raise KeyExists(name)  # a racing writer created it between check and put
        raise self._fail(resp, "create", url)

    def get(self, name: str) -> bytes:
        url = self._entry(name)
        params = {"version": "1"} if self.cfg.version == 2 else None
        resp = self._call("GET", url, "read", params=params)
        if resp.status_code == 404:
            raise KeyNotFound(name)
        if resp.status_code != 200:
            raise self._fail(resp, "read", url)
        data = self._read_data(resp)
        if data is None:
            raise KeyNotFound(name)  # KV v2: version 1 deleted/destroyed
        value = data.get(name)
        if not isinstance(value, str):
            raise StoreError(f"vault: entry {url} has no string field '{name}'")
        if value.startswith("vault:v"):
            return self._transit_decrypt(value, url)
        return value.encode()

    def delete(self, name: str) -> None:
        url = self._metadata(name) if self.cfg.version == 2 else self._entry(name)
        resp = self._call("DELETE", url, "delete")
        if resp.status_code not in (200, 204, 404):
            raise self._fail(resp, "delete", url)

    def list(self, prefix: str) -> list[str]:
        url = self._list_path()
        resp = self._call("GET", url, "list", params={"list": "true"})
        if resp.status_code == 404:
            return []
        if resp.status_code != 200:
            raise self._fail(resp, "list", url)
        keys = ((resp.json() or {}).get("data") or {}).get("keys") or []
        # Sub-directories (ending '/') are not keys a client could address.
        return sorted(k for k in keys
                      if isinstance(k, str) and not k.endswith("/") and k.startswith(prefix))

    def policy_hcl(self) -> str:
        return policy_hcl(self.cfg)

    # ---- transit (§8.3)

    def _transit_encrypt(self, value: bytes) -> str:
        url = "/v1/" + _join(self.cfg.transit_engine, "encrypt", self.cfg.transit_key)
        resp = self._call("POST", url, "encrypt with",
                          json={"plaintext": base64.b64encode(value).decode()})
        if resp.status_code != 200:
            raise self._fail(resp, "encrypt with", url)
        ct = ((resp.json() or {}).get("data") or {}).get("ciphertext")
        if not isinstance(ct, str) or not ct.startswith("vault:v"):
            raise StoreError(f"vault: {url}: invalid vault response")
        return ct

    def _transit_decrypt(self, ciphertext: str, entry: str) -> bytes:
        if not self.cfg.transit_key:
            raise StoreError(f"vault: entry {entry} is transit-wrapped but no transit key is "
                             "configured — set keystore.vault.transit.key")
        url = "/v1/" + _join(self.cfg.transit_engine, "decrypt", self.cfg.transit_key)
        resp = self._call("POST", url, "decrypt with", json={"ciphertext": ciphertext})
        if resp.status_code != 200:
            raise self._fail(resp, "decrypt with", url)
        pt = ((resp.json() or {}).get("data") or {}).get("plaintext")
        if not isinstance(pt, str):
            raise StoreError(f"vault: {url}: invalid vault response")
        try:
            return base64.b64decode(pt, validate=True)
        except ValueError:
            raise StoreError(f"vault: {url}: invalid vault response") from None


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
