"""A Vault (or OpenBao) session for bootkey: AppRole login, fail-over, retries, renewal,
KV v1/v2 and transit — on hvac.

Error policy (DESIGN §6): connection errors, timeouts, 5xx, 429, sealed and uninitialised
are retried with exponential back-off and full jitter, failing over across addresses,
until the caller's deadline; 400/403/404 and an invalid secret id fail at once with a
message naming the path and the missing capability. hvac's exception text can echo
request data, so messages are built here from status and path only.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions as hx
import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_random_exponential,
)

from bootkey.config import Config, VaultConfig
from bootkey_core.errors import (
    ConfigError,
    VaultAuthFailed,
    VaultBadAnswer,
    VaultConflict,
    VaultDenied,
    VaultError,
    VaultNotFound,
    VaultUnavailable,
)
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)
T = TypeVar("T")

# hvac raises these for answers worth waiting out: sealed (503), uninitialised (501),
# 5xx and rate limiting (429).
_RETRY_HVAC = (hx.VaultDown, hx.VaultNotInitialized, hx.InternalServerError,
               hx.BadGateway, hx.RateLimitExceeded, hx.UnexpectedError)
_RETRY_NET = (requests.ConnectionError, requests.Timeout)


@dataclass(frozen=True)
class WaitInfo:
    """What the session is waiting for, for STATUS= lines and logs."""

    attempt: int
    next_in: float
    reason: str


WaitHook = Callable[[WaitInfo], None]


def _classify(e: Exception, what: str, path: str) -> VaultError:
    """Turn an hvac/requests exception into bootkey's error, message built from facts."""
    if isinstance(e, _RETRY_NET):
        kind = "timed out" if isinstance(e, requests.Timeout) else "unreachable"
        return VaultUnavailable(f"Vault {kind} while trying to {what} ({path})")
    if isinstance(e, hx.VaultDown):
        return VaultUnavailable(f"Vault is sealed or not initialised (503); cannot {what} ({path})")
    if isinstance(e, hx.VaultNotInitialized):
        return VaultUnavailable(f"Vault is not initialised; cannot {what} ({path})")
    if isinstance(e, hx.RateLimitExceeded):
        return VaultUnavailable(f"Vault rate-limited the request to {what} ({path})")
    if isinstance(e, _RETRY_HVAC):
        return VaultUnavailable(f"Vault failed to {what} ({path}): server error")
    if isinstance(e, hx.Forbidden):
        return VaultDenied(
            f"{path}: cannot {what}: permission denied (403) — the token's policy lacks this "
            "capability; apply the policy `bootkey policy` prints"
        )
    if isinstance(e, hx.InvalidPath):
        return VaultNotFound(f"{path}: cannot {what}: no such entry or mount (404)")
    if isinstance(e, hx.InvalidRequest | hx.Unauthorized | hx.ParamValidationError):
        detail = "; ".join(str(x) for x in (getattr(e, "errors", None) or []))[:200]
        return VaultBadAnswer(f"{path}: cannot {what}: Vault rejected the request ({detail})")
    return VaultError(f"{path}: cannot {what}: {type(e).__name__}")


class VaultSession:
    """One logged-in identity, shared by all volumes of a run (one login, not one per
    volume). Thread-safe: requests may run concurrently from a pool."""

    def __init__(
        self,
        cfg: VaultConfig,
        *,
        deadline: float = 300.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_wait: WaitHook | None = None,
        token: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.deadline = deadline
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.on_wait = on_wait
        self.sleep = sleep  # the agent passes one that wakes up on SIGTERM
        self._lock = threading.Lock()
        self._token: str | None = token
        self._token_expires: float = float("inf") if token else 0.0
        self._renewable = False
        self._preferred = 0
        verify: bool | str = str(cfg.ca_file) if cfg.ca_file else True
        self._clients = [
            hvac.Client(url=a, timeout=cfg.timeout, verify=verify,
                        namespace=cfg.namespace or None)
            for a in cfg.address
        ]
        for c in self._clients:
            # keep-alive pool big enough for `unlock.parallel` concurrent requests
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)
            c.session.mount("http://", adapter)
            c.session.mount("https://", adapter)

    @classmethod
    def from_config(cls, cfg: Config, *, on_wait: WaitHook | None = None,
                    token: str | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> VaultSession:
        u = cfg.unlock
        return cls(cfg.vault, deadline=u.deadline, retry_initial=u.retry_initial,
                   retry_max=u.retry_max, on_wait=on_wait, token=token, sleep=sleep)

    # ---- plumbing -------------------------------------------------------------

    def _on_address(self, fn: Callable[[hvac.Client], T], what: str, path: str) -> T:
        """One attempt: try each address, preferred first; fail over on retryable errors."""
        n = len(self._clients)
        last: VaultError | None = None
        for i in range(n):
            idx = (self._preferred + i) % n
            client = self._clients[idx]
            client.token = self._token
            try:
                result = fn(client)
            except (*_RETRY_HVAC, *_RETRY_NET) as e:
                last = _classify(e, what, path)
                log.debug("%s: %s", client.url, last)
                continue
            except hx.VaultError as e:
                raise _classify(e, what, path) from None
            self._preferred = idx
            return result
        if last is None:  # no addresses: config validation forbids it
            raise VaultUnavailable(f"no Vault address to {what}")
        raise last

    def _retrying(self, fn: Callable[[hvac.Client], T], what: str, path: str,
                  deadline: float | None = None) -> T:
        limit = self.deadline if deadline is None else deadline

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            nxt = state.next_action.sleep if state.next_action else 0.0
            info = WaitInfo(state.attempt_number, nxt, str(exc))
            log.info("waiting for Vault: attempt %d failed (%s), next in %.1f s",
                     info.attempt, info.reason, info.next_in)
            if self.on_wait:
                self.on_wait(info)

        retryer = Retrying(
            retry=retry_if_exception_type(VaultUnavailable),
            wait=wait_random_exponential(multiplier=self.retry_initial, max=self.retry_max),
            stop=stop_before_delay(limit),
            before_sleep=before_sleep,
            sleep=self.sleep,
            reraise=True,
        )
        result: T = retryer(self._on_address, fn, what, path)
        return result

    # ---- authentication -------------------------------------------------------

    def _read_secret_id(self) -> bytearray:
        ar = self.cfg.approle
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if ar.secret_id_credential:
            if not cred_dir:
                raise ConfigError(
                    f"vault.approle.secret_id_credential: credential {ar.secret_id_credential!r}"
                    " needs $CREDENTIALS_DIRECTORY — run under systemd with LoadCredential*="
                )
            return _read_secret_file(Path(cred_dir) / ar.secret_id_credential)
        cred = Path(cred_dir) / "secret-id" if cred_dir else None
        # bootkey.service sets a blank `secret-id` credential (SetCredential=) as the
        # fallback for a host without secret-id.cred: blank means "use the next source".
        if cred is not None and cred.exists() and cred.read_bytes().strip():
            return _read_secret_file(cred)
        if ar.wrapped_secret_id_file:
            return self._unwrap(ar.wrapped_secret_id_file)
        if ar.secret_id_file:
            return _read_secret_file(ar.secret_id_file)
        raise ConfigError("vault.approle: no secret_id source — set secret_id_file, "
                          "secret_id_credential or wrapped_secret_id_file")

    def _unwrap(self, path: Path) -> bytearray:
        """Unwrap a response-wrapping token once; the file is removed after success
        because a wrapping token works only once anyway."""
        wrap = _read_secret_file(path)
        token = wrap.decode().strip()

        def call(c: hvac.Client) -> Any:
            c.token = token
            try:
                return c.sys.unwrap()
            finally:
                c.token = None

        try:
            res = self._retrying(call, "unwrap the secret_id", "sys/wrapping/unwrap")
        except VaultBadAnswer:
            raise VaultAuthFailed(
                f"{path}: cannot unwrap: the wrapping token is invalid, expired or already "
                "used — issue a new one with `bao write -wrap-ttl=... -f "
                "auth/approle/role/<role>/secret-id`"
            ) from None
        try:
            sid = bytearray(res["data"]["secret_id"].encode())
        except (KeyError, TypeError):
            raise VaultBadAnswer(f"{path}: unwrapped data has no secret_id") from None
        try:
            path.unlink()
        except OSError as e:
            log.warning("could not remove used wrapping token file %s: %s", path, e.strerror)
        return sid

    def _role_id(self) -> str:
        ar = self.cfg.approle
        if ar.role_id:
            return ar.role_id
        if ar.role_id_file:
            try:
                return ar.role_id_file.read_text().strip()
            except OSError as e:
                raise ConfigError(
                    f"vault.approle.role_id_file: cannot read {ar.role_id_file}: {e.strerror}"
                ) from None
        raise ConfigError("vault.approle: role_id is required — set role_id or role_id_file")

    def login(self, deadline: float | None = None) -> None:
        """AppRole login, retried while Vault is unavailable."""
        role_id = self._role_id()
        secret_id = self._read_secret_id()
        mount = self.cfg.approle.mount
        path = f"auth/{mount}/login"
        try:
            def call(c: hvac.Client) -> Any:
                c.token = None
                return c.auth.approle.login(role_id, secret_id.decode(), mount_point=mount,
                                            use_token=False)

            try:
                res = self._retrying(call, "log in with AppRole", path, deadline)
            except (VaultBadAnswer, VaultNotFound) as e:
                raise VaultAuthFailed(
                    f"{path}: cannot log in: {_auth_reason(e)} — check role_id and issue a new "
                    "secret_id (`bao write -f auth/approle/role/<role>/secret-id`)"
                ) from None
        finally:
            secret_id[:] = bytes(len(secret_id))
        self._remove_used_secret_id_file()
        auth = res.get("auth") or {}
        if not auth.get("client_token"):
            raise VaultBadAnswer(f"{path}: login answer has no client token")
        with self._lock:
            self._token = auth["client_token"]
            ttl = float(auth.get("lease_duration") or 0)
            self._token_expires = time.monotonic() + ttl if ttl else float("inf")
            self._renewable = bool(auth.get("renewable"))
        log.info("logged in to Vault with AppRole", extra={"VAULT_PATH": path})

    def _remove_used_secret_id_file(self) -> None:
        # Only after a successful login: a failed boot must be able to try again.
        ar = self.cfg.approle
        if not (ar.remove_secret_id_file and ar.secret_id_file) or ar.secret_id_credential:
            return
        try:
            ar.secret_id_file.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove secret_id file %s: %s", ar.secret_id_file, e.strerror)

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    def token_ttl(self) -> float:
        return max(0.0, self._token_expires - time.monotonic())

    def renew_or_relogin(self) -> None:
        """Renew the token; if Vault refuses (max TTL reached, revoked), log in again."""
        if self._renewable:
            try:
                res = self._retrying(lambda c: c.auth.token.renew_self(),
                                     "renew the token", "auth/token/renew-self", 30.0)
                ttl = float((res.get("auth") or {}).get("lease_duration") or 0)
                if ttl > 0:
                    self._token_expires = time.monotonic() + ttl
                    return
            except VaultError as e:
                log.info("token renewal refused (%s); logging in again", type(e).__name__)
        self.login()

    # ---- KV ---------------------------------------------------------------------

    @staticmethod
    def kv_api_path(mount: str, version: int, path: str) -> str:
        return f"{mount}/data/{path}" if version == 2 else f"{mount}/{path}"

    def kv_read(self, mount: str, version: int, path: str,
                deadline: float | None = None) -> dict[str, Any] | None:
        """The entry's data fields, or None if it does not exist (404)."""
        api = self.kv_api_path(mount, version, path)

        def call(c: hvac.Client) -> Any:
            return c.read(api)

        try:
            res = self._retrying(call, "read", api, deadline)
        except VaultNotFound:
            return None
        if res is None:
            return None
        data = res.get("data") if isinstance(res, dict) else None
        if version == 2:
            data = data.get("data") if isinstance(data, dict) else None
        if not isinstance(data, dict):
            return None  # KV v2 deleted version: data is null
        return data

    def kv_metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        api = f"{mount}/metadata/{path}"
        try:
            res = self._retrying(lambda c: c.read(api), "read metadata", api)
        except VaultNotFound:
            return None
        return res.get("data") if isinstance(res, dict) else None

    def kv_write(self, mount: str, version: int, path: str, data: dict[str, Any],
                 *, create_only: bool = False, cas: int | None = None) -> int | None:
        """Write an entry. `create_only` refuses to overwrite (KV v2 cas=0; on KV v1 a
        read first, which is racy but all v1 offers). Returns the KV v2 version."""
        api = self.kv_api_path(mount, version, path)
        if version == 1:
            if create_only and self.kv_read(mount, 1, path) is not None:
                raise VaultConflict(f"{api}: cannot create: an entry already exists")
            self._retrying(lambda c: c.write_data(api, data=data), "write", api)
            return None
        body: dict[str, Any] = {"data": data}
        if create_only:
            body["options"] = {"cas": 0}
        elif cas is not None:
            body["options"] = {"cas": cas}
        try:
            res = self._retrying(lambda c: c.write_data(api, data=body), "write", api)
        except VaultBadAnswer as e:
            if "check-and-set" in str(e):
                raise VaultConflict(f"{api}: cannot write: the entry changed or already "
                                    "exists (check-and-set)") from None
            raise
        version_no = (res or {}).get("data", {}).get("version") if isinstance(res, dict) else None
        return int(version_no) if version_no is not None else None

    def kv_delete(self, mount: str, version: int, path: str) -> None:
        """Delete an entry for good (KV v2: all versions and metadata)."""
        api = f"{mount}/metadata/{path}" if version == 2 else f"{mount}/{path}"
        self._retrying(lambda c: c.delete(api), "delete", api)

    def kv_destroy_versions(self, mount: str, path: str, versions: list[int]) -> None:
        """KV v2: destroy these versions' data for good (crypto-shred retired keys)."""
        api = f"{mount}/destroy/{path}"
        self._retrying(lambda c: c.write_data(api, data={"versions": versions}),
                       "destroy old versions", api)

    def kv_list(self, mount: str, version: int, path: str) -> list[str]:
        api = f"{mount}/metadata/{path}" if version == 2 else f"{mount}/{path}"
        try:
            res = self._retrying(lambda c: c.list(api), "list", api)
        except VaultNotFound:
            return []
        keys = ((res or {}).get("data") or {}).get("keys") if isinstance(res, dict) else None
        return [str(k) for k in keys or []]

    # ---- transit -------------------------------------------------------------------

    def transit_encrypt(self, mount: str, key: str, plaintext: SecretBuffer,
                        context: bytes) -> str:
        api = f"{mount}/encrypt/{key}"
        b64 = base64.b64encode(plaintext.view).decode()
        body = {"plaintext": b64, "context": base64.b64encode(context).decode()}
        res = self._retrying(lambda c: c.write_data(api, data=body), "encrypt", api)
        ct = ((res or {}).get("data") or {}).get("ciphertext") if isinstance(res, dict) else None
        if not isinstance(ct, str) or not ct.startswith("vault:v"):
            raise VaultBadAnswer(f"{api}: answer has no ciphertext")
        return ct

    def transit_decrypt(self, mount: str, key: str, ciphertext: str, context: bytes,
                        deadline: float | None = None) -> SecretBuffer:
        api = f"{mount}/decrypt/{key}"
        body = {"ciphertext": ciphertext, "context": base64.b64encode(context).decode()}
        try:
            res = self._retrying(lambda c: c.write_data(api, data=body), "decrypt", api,
                                 deadline)
        except VaultBadAnswer as e:
            if "authentication failed" in str(e) or "invalid ciphertext" in str(e):
                raise VaultBadAnswer(
                    f"{api}: cannot unseal: ciphertext is not authentic for this context — "
                    "the entry was sealed for another host/volume or altered"
                ) from None
            raise
        pt = ((res or {}).get("data") or {}).get("plaintext") if isinstance(res, dict) else None
        if not isinstance(pt, str):
            raise VaultBadAnswer(f"{api}: answer has no plaintext")
        try:
            raw = bytearray(base64.b64decode(pt, validate=True))
        except (binascii.Error, ValueError):
            raise VaultBadAnswer(f"{api}: plaintext is not base64") from None
        return SecretBuffer.from_bytes(raw)

    def transit_rewrap(self, mount: str, key: str, ciphertext: str, context: bytes) -> str:
        api = f"{mount}/rewrap/{key}"
        body = {"ciphertext": ciphertext, "context": base64.b64encode(context).decode()}
        res = self._retrying(lambda c: c.write_data(api, data=body), "rewrap", api)
        ct = ((res or {}).get("data") or {}).get("ciphertext") if isinstance(res, dict) else None
        if not isinstance(ct, str):
            raise VaultBadAnswer(f"{api}: answer has no ciphertext")
        return ct

    def http_sessions(self) -> list[requests.Session]:
        """Each address's HTTP session, for response hooks (the agent's metrics)."""
        return [c.session for c in self._clients]

    def raw_client(self) -> hvac.Client:
        """The preferred address's hvac client with the session token (sharp tool)."""
        c = self._clients[self._preferred]
        c.token = self._token
        return c


def _auth_reason(e: VaultError) -> str:
    text = str(e).lower()
    if "secret id" in text or "secret_id" in text:
        return "invalid or expired secret_id"
    if "role id" in text or "role_id" in text:
        return "invalid role_id"
    return "AppRole refused the credentials"


def _read_secret_file(path: Path) -> bytearray:
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read secret_id: no such file — write the secret_id "
                          "there (mode 0600) or set vault.approle.secret_id_file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read secret_id: {e.strerror}") from None
    while data and data[-1] in b"\n\r ":
        data.pop()
    if not data:
        raise ConfigError(f"{path}: secret_id file is empty")
    return data
