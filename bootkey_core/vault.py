"""The one Vault (or OpenBao) session: AppRole login and re-login, token renewal,
fail-over across addresses, retries and error classification, on hvac.

Everything that talks to Vault goes through a `VaultSession`: unlock, the key socket,
hotplug and enrollment (bootkey), the KES keystore and the KES PKI certificate (kes).
The agent builds one and hands it to all of them; `bootkey kes serve` builds its own.

Error policy (DESIGN §6): connection errors, timeouts, 5xx, 429, sealed and uninitialised
are retried with the session's `Backoff` (exponential, full jitter), failing over across
addresses, until the caller's deadline (0: one pass over the addresses, for KES requests
that must answer now); 400/403/404 and an invalid secret_id fail at once with a message
naming the path and the fix; so does a TLS certificate that does not verify against
`ca_file` (ConfigError). hvac's exception text can echo request data, so messages
are built here from status and path only. A 403 caused by a dead token (expired, or past
its max TTL) logs in again once and repeats the call.

Read-your-writes: a read through this session sees this session's own writes. OpenBao
>= 2.5 standbys answer reads from their own raft copy (`disable_standby_reads = false`, the
default), which can lag the active node by a few ms, while writes are forwarded to the
active node — so a standby first in `[vault] address` could answer enroll's read-back
or KES's `generate` right after `create` with the entry as it was before (OpenBao 2.7
sends no `X-Vault-Index` to ask for a newer state). The session remembers, for
RYW_WINDOW (10 s), each path it wrote: the KV v2 version the write created, a keyed
digest of a KV v1 entry, or that it deleted it. A GET of such a path whose answer is
older (404, a lower version, other data, or still there after a delete) is read again,
5 ms apart doubling to 100 ms, for at most RYW_WAIT (1 s, logged at debug); then the
last answer stands, so it never hangs. Reads of paths it did not write (the boot path,
every KES cache miss of an older key) cost nothing extra; LISTs are not covered.
Another process's writes are not covered either: that is eventual consistency.

Access that lasts: the secret_id, once read from its source (a file, a systemd credential,
the config, or unwrapped from a response-wrapping token), is kept in a `SecretBuffer`, so
the session can log in again after the source is gone (wrapped file deleted after
unwrapping, `remove_secret_id_file = true`) — when the role lets a secret_id be reused.
After each login, on the first `access()`, the session reads the token's facts
(`auth/token/lookup-self`: ttl, period, renewable) and, where the policy allows, the
secret_id's (`auth/<mount>/role/<role>/secret-id/lookup`: uses left, expiry; "unknown"
when denied) — not during the login itself, so unlocking at boot costs no extra request.

`session.access()` returns these facts as an `AccessOutlook`. Its `warning` is set when
the loss of access is foreseeable — a token that is not periodic and a secret_id that
cannot log in again, or one that expires — and names the fix (`token_period` on the
role, a secret_id that can be reused or lives longer). The warning is logged when the
facts are read (the agent asks right after its first unlock round and after each
re-login) and again when the token nears its max TTL. STATUS, `bootkey status`, `doctor` and metrics
read `access()`; none of them should derive these facts again.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json as _json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions as hx
import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_before_delay

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
from bootkey_core.vault_config import VaultConnection

# The logger keeps its old name: bootkey.journal routes the "bootkey" tree to the journal,
# and operators filter on it.
log = logging.getLogger("bootkey.vault")
T = TypeVar("T")

# hvac raises these for answers worth waiting out: sealed (503), uninitialised (501),
# 5xx and rate limiting (429).
_RETRY_HVAC = (hx.VaultDown, hx.VaultNotInitialized, hx.InternalServerError,
               hx.BadGateway, hx.RateLimitExceeded, hx.UnexpectedError)
_RETRY_NET = (requests.ConnectionError, requests.Timeout)
# Vault's zero time: a secret_id without expiry.
_NEVER = "0001-01-01T00:00:00Z"

# Read-your-writes (module header): a write is remembered this long, a read of it is
# repeated for at most RYW_WAIT, and at most _RYW_MAX writes are remembered.
RYW_WINDOW = 10.0
RYW_WAIT = 1.0
_RYW_MAX = 4096
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class _Written:
    """What the session last wrote to one path, and when (monotonic)."""

    at: float
    version: int | None = None        # KV v2: the version the write created
    fingerprint: bytes | None = None  # KV v1: a keyed digest of the entry written
    deleted: bool = False


class VaultRejected(VaultBadAnswer):
    """Vault refused the request as malformed (400); `errors` is Vault's own list, which
    names the field it refused and holds no secret."""

    def __init__(self, message: str, errors: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.errors = errors


@dataclass(frozen=True)
class WaitInfo:
    """What the session is waiting for, for STATUS= lines and logs."""

    attempt: int
    next_in: float
    reason: str


WaitHook = Callable[[WaitInfo], None]


@dataclass(frozen=True)
class Backoff:
    """The one back-off policy: exponential with full jitter (attempt n waits a uniform
    random time in [0, min(cap, initial·2ⁿ⁻¹)]), so many hosts booting after one Vault
    outage do not come back in lock-step. The session's retries and the agent's unlock
    rounds both use it."""

    initial: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        high = min(self.cap, self.initial * 2.0 ** min(attempt - 1, 60))
        return random.uniform(0.0, high)  # noqa: S311 - jitter, not a secret

    def __call__(self, state: RetryCallState) -> float:
        return self.delay(state.attempt_number)


# Renew at two thirds of what is left (as Vault Agent does): a third of the TTL to ride
# out a Vault outage; never sooner than 50 ms (no busy loop), never later than an hour.
RENEW_FRACTION = 2 / 3


def renew_in(ttl_left: float) -> float:
    """Seconds until a token with `ttl_left` seconds to live should be renewed."""
    if ttl_left == float("inf"):
        return 3600.0
    return min(max(ttl_left * RENEW_FRACTION, 0.05), 3600.0)


@dataclass(frozen=True)
class AccessOutlook:
    """How long this session keeps its Vault access, from what Vault told it.

    `None` in a field means Vault did not say (e.g. the policy denies the secret_id
    lookup). `relogin_possible` is None when that cannot be known."""

    token_ttl: float | None          # seconds left when last looked (None: never expires)
    token_period: float | None       # periodic token: renews forever by this period
    token_renewable: bool
    secret_id_source: str            # file, file (removed after login), systemd credential, …
    secret_id_uses_left: int | None  # 0: unlimited; None: unknown
    secret_id_expires: dt.datetime | None  # None: never, or unknown (secret_id_known)
    secret_id_known: bool            # the secret_id lookup answered
    relogin_possible: bool | None
    access_until: dt.datetime | None  # access certainly ends then (None: not foreseen)
    warning: str | None              # the foreseeable loss and its fix

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for `bootkey status --json` and the control socket."""
        out: dict[str, Any] = dict(self.__dict__)
        for k in ("secret_id_expires", "access_until"):
            if out[k] is not None:
                out[k] = out[k].isoformat()
        return out


def _parse_time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str) or not text or text.startswith(_NEVER[:10]):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


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
        errors = tuple(str(x) for x in (getattr(e, "errors", None) or []))
        return VaultRejected(f"{path}: cannot {what}: Vault rejected the request "
                             f"({'; '.join(errors)[:200]})", errors)
    return VaultError(f"{path}: cannot {what}: {type(e).__name__}")


class _Dead(Exception):
    """The token was refused (403) and looks dead: log in again and repeat."""


SecretIdReader = Callable[[], tuple[bytearray, str]]


class VaultSession:
    """One logged-in identity, shared by everything in the process (one login, not one
    per volume or per KES request). Thread-safe: requests may run concurrently."""

    def __init__(
        self,
        cfg: VaultConnection,
        *,
        deadline: float = 300.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        on_wait: WaitHook | None = None,
        token: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        read_secret_id: SecretIdReader | None = None,
    ) -> None:
        self.cfg = cfg
        # The caller reads the secret_id itself: the initrd decrypts its TPM2-sealed
        # credential (no $CREDENTIALS_DIRECTORY there). Returns (secret_id, source name).
        self._read_secret_id_hook = read_secret_id
        self.deadline = deadline
        self.backoff = Backoff(retry_initial, retry_max)
        self.on_wait = on_wait
        self.sleep = sleep  # the agent passes one that wakes up on SIGTERM
        self._lock = threading.Lock()
        self._login_lock = threading.Lock()
        static = token or (cfg.token.get_secret_value() if cfg.token else None)
        self._token: str | None = static
        self._static = token is None and static is not None  # the config's own token
        self._logs_in = False  # True once an AppRole login succeeded: re-login may help
        self._token_expires: float = float("inf") if static else 0.0
        self._creation_ttl = 0.0
        self._renewable = False
        self._generation = 0  # bumped at each login: concurrent 403s log in only once
        self._preferred = 0
        self._secret_id: SecretBuffer | None = None
        self._source = "static token" if static else "none yet"
        self._role_name: str | None = None
        self._outlook: AccessOutlook | None = None
        # Token and secret_id facts cost two Vault requests: looked up on first ask after
        # each login, not during it, so a booting host pays only for what unlocks its
        # volumes (docs/benchmarks.md, boot storm).
        self._facts_for: tuple[int, str | None] | None = None  # (login generation, role)
        self._facts_lock = threading.Lock()
        self._capped_warned = False
        self._ryw: dict[str, _Written] = {}  # path → this session's last write there
        self._ryw_lock = threading.Lock()
        self._ryw_salt = os.urandom(16)
        self.logins = 0    # successful logins (for tests and metrics)
        self.renewals = 0  # successful renewals
        self._verify: bool | str = str(cfg.ca_file) if cfg.ca_file else True
        self._cert = (str(cfg.client_cert), str(cfg.client_key)) \
            if cfg.client_cert and cfg.client_key else None
        self._clients = [
            hvac.Client(url=a, timeout=cfg.timeout, verify=self._verify, cert=self._cert)
            for a in cfg.address
        ]
        for c in self._clients:
            # hvac picks up $VAULT_TOKEN, ~/.vault-token and $VAULT_NAMESPACE, and its
            # adapter would override the per-request headers with them (see _headers).
            c.adapter.token = None
            c.adapter.namespace = None
            # keep-alive pool big enough for `unlock.parallel` concurrent requests
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)
            c.session.mount("http://", adapter)
            c.session.mount("https://", adapter)

    def after_fork(self) -> None:
        """In a forked child (a KES worker): drop pooled connections of the parent."""
        for c in self._clients:
            c.session.close()

    # ---- plumbing -------------------------------------------------------------

    def _headers(self, token: str | None, namespace: str | None) -> dict[str, str]:
        # Token and namespace go per request, never into the shared clients: concurrent
        # calls (a login next to a KES read) must not see each other's headers.
        h: dict[str, str] = {}
        if token:
            h["X-Vault-Token"] = token
        ns = self.cfg.namespace if namespace is None else namespace
        if ns and ns != "/":
            h["X-Vault-Namespace"] = ns
        return h

    def _send(self, client: hvac.Client, method: str, path: str, *,
              token: str | None, namespace: str | None = None,
              json: Any = None, params: dict[str, str] | None = None) -> Any:
        """One HTTP request; the parsed JSON answer, or None for an empty one."""
        kw: dict[str, Any] = {}
        if json is not None:
            kw["json"] = json
        if params is not None:
            kw["params"] = params
        res = client.adapter.request(method, f"/v1/{path}",
                                     headers=self._headers(token, namespace), **kw)
        if isinstance(res, requests.Response):
            if res.status_code == 204 or not res.content:
                return None
            return res.json()
        return res

    def _on_address(self, fn: Callable[[hvac.Client], T], what: str, path: str,
                    *, auth: bool) -> T:
        """One attempt: try each address, preferred first; fail over on retryable errors."""
        n = len(self._clients)
        last: VaultError | None = None
        untrusted: ConfigError | None = None
        for i in range(n):
            idx = (self._preferred + i) % n
            client = self._clients[idx]
            try:
                try:
                    result = fn(client)
                except requests.ConnectionError:
                    # Most often a pooled keep-alive connection Vault had just closed:
                    # one immediate try on a new connection (refused ones fail fast).
                    result = fn(client)
            except requests.exceptions.SSLError as e:
                if "CERTIFICATE_VERIFY_FAILED" not in str(e):
                    last = _classify(e, what, path)  # e.g. a handshake cut short: retry
                    continue
                # No amount of waiting makes the certificate verify: say so at once.
                untrusted = ConfigError(
                    f"vault.ca_file: cannot verify the TLS certificate of {client.url}: it "
                    f"is not signed by {self.cfg.ca_file or 'a CA the system trusts'} — set "
                    "vault.ca_file to the CA that issued Vault's certificate")
                continue
            except (*_RETRY_HVAC, *_RETRY_NET) as e:
                last = _classify(e, what, path)
                log.debug("%s: %s", client.url, last)
                continue
            except hx.Forbidden as e:
                if auth and self._token_is_dead(client):
                    raise _Dead from None
                raise _classify(e, what, path) from None
            except hx.VaultError as e:
                raise _classify(e, what, path) from None
            self._preferred = idx
            return result
        if untrusted is not None:
            raise untrusted
        if last is None:  # no addresses: config validation forbids it
            raise VaultUnavailable(f"no Vault address to {what}")
        raise last

    def _token_is_dead(self, client: hvac.Client) -> bool:
        """After a 403: is it the token (expired, revoked) rather than the policy? Only
        then can logging in again help."""
        if not self._can_login():
            return False
        if self.token_ttl() <= 0:
            return True
        try:
            self._send(client, "GET", "auth/token/lookup-self", token=self._token)
        except hx.Forbidden:
            return True
        except (hx.VaultError, *_RETRY_NET):
            return False
        return False

    def _retrying(self, fn: Callable[[hvac.Client], T], what: str, path: str,
                  deadline: float | None = None, *, auth: bool = True) -> T:
        limit = self.deadline if deadline is None else deadline

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            nxt = state.next_action.sleep if state.next_action else 0.0
            info = WaitInfo(state.attempt_number, nxt, str(exc))
            log.info("waiting for Vault: attempt %d failed (%s), next in %.1f s",
                     info.attempt, info.reason, info.next_in)
            if self.on_wait:
                self.on_wait(info)

        def attempt(relogin: bool) -> T:
            if limit <= 0:  # one pass (KES requests): no retry loop to build
                return self._on_address(fn, what, path, auth=relogin)
            retryer = Retrying(
                retry=retry_if_exception_type(VaultUnavailable),
                wait=self.backoff,
                stop=stop_before_delay(limit),
                before_sleep=before_sleep,
                sleep=self.sleep,
                reraise=True,
            )
            result: T = retryer(self._on_address, fn, what, path, auth=relogin)
            return result

        generation = self._generation
        try:
            return attempt(auth)
        except _Dead:
            pass
        with self._login_lock:
            if self._generation == generation:  # nobody else has logged in meanwhile
                log.info("Vault token is no longer valid; logging in again",
                         extra={"VAULT_PATH": path})
                self._login_locked(limit)
        return attempt(False)

    def request(self, method: str, path: str, *, what: str, json: Any = None,
                params: dict[str, str] | None = None, deadline: float | None = None,
                _relogin: bool = True) -> Any:
        """Any Vault API call with the session's token: the parsed answer (None if
        empty). `path` is the API path without /v1/. Raises VaultError subclasses.
        A GET of a path this session wrote moments ago sees that write (read-your-writes,
        module header)."""
        def call(c: hvac.Client) -> Any:
            return self._send(c, method, path, token=self._token, json=json, params=params)
        verb = method.upper()
        if verb == "GET":
            written = self._own_write(path)
            if written is not None:
                return self._read_own_write(call, what, path, written, deadline=deadline,
                                            relogin=_relogin,
                                            pinned=bool(params and "version" in params))
        res = self._retrying(call, what, path, deadline, auth=_relogin)
        if verb in _WRITES:
            self._remember(verb, path, json, res)
        return res

    # ---- read-your-writes ------------------------------------------------------------

    def _fingerprint(self, data: Any) -> bytes:
        # Keyed with a random per-session salt: what was written (maybe a KES key) is
        # never kept, only a digest nobody else can compute.
        text = _json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._ryw_salt, text, hashlib.sha256).digest()

    def _remember(self, verb: str, path: str, body: Any, res: Any) -> None:
        """Note a successful write: KV v2 (the answer names the new version), KV v1
        (an empty answer: the body is the entry) or a delete."""
        now = time.monotonic()
        notes: dict[str, _Written] = {}
        if verb == "DELETE":
            gone = _Written(now, deleted=True)
            notes[path] = gone
            if "/metadata/" in path:  # KV v2: every version of the entry is gone
                notes[path.replace("/metadata/", "/data/", 1)] = gone
        else:
            data = res.get("data") if isinstance(res, dict) else None
            version = data.get("version") if isinstance(data, dict) else None
            if isinstance(version, int) and not isinstance(version, bool) \
                    and "/data/" in path:
                notes[path] = _Written(now, version=version)
                notes[path.replace("/data/", "/metadata/", 1)] = _Written(now, version=version)
            elif res is None and isinstance(body, dict):
                notes[path] = _Written(now, fingerprint=self._fingerprint(body))
            else:
                return  # an answer, not an entry (transit, lookups): nothing to read back
        with self._ryw_lock:
            old = [p for p, w in self._ryw.items() if now - w.at > RYW_WINDOW]
            for p in old:
                del self._ryw[p]
            self._ryw.update(notes)
            while len(self._ryw) > _RYW_MAX:
                del self._ryw[next(iter(self._ryw))]  # the oldest (insertion order)

    def _own_write(self, path: str) -> _Written | None:
        if not self._ryw:  # the boot path: no writes, no lock
            return None
        with self._ryw_lock:
            w = self._ryw.get(path)
        if w is None or time.monotonic() - w.at > RYW_WINDOW:
            return None
        return w

    def _older(self, w: _Written, res: Any, missing: bool, pinned: bool) -> bool:
        """Is this answer older than the session's own write `w`?"""
        if missing or w.deleted:
            return missing != w.deleted
        data = res.get("data") if isinstance(res, dict) else None
        if not isinstance(data, dict):
            return True
        if w.version is not None:
            if pinned:  # `?version=N`: that version exists, as it should
                return False
            meta = data.get("metadata")
            seen = meta.get("version") if isinstance(meta, dict) else \
                data.get("current_version")
            return isinstance(seen, int) and seen < w.version
        return w.fingerprint is not None and self._fingerprint(data) != w.fingerprint

    def _read_own_write(self, call: Callable[[hvac.Client], Any], what: str, path: str,
                        w: _Written, *, deadline: float | None, relogin: bool,
                        pinned: bool) -> Any:
        """A read of a path written moments ago: a standby serving reads from its own
        raft copy (OpenBao >= 2.5) may not have the write yet. Read again, a few ms
        apart, until the answer is at least as new as the write, for at most
        RYW_WAIT; then the last answer stands."""
        give_up = time.monotonic() + RYW_WAIT
        pause = 0.005
        while True:
            missing: VaultNotFound | None = None
            res: Any = None
            try:
                res = self._retrying(call, what, path, deadline, auth=relogin)
            except VaultNotFound as e:
                missing = e
            if not self._older(w, res, missing is not None, pinned):
                return res
            if time.monotonic() + pause > give_up:
                log.info("%s: Vault still answers with an older state than this session "
                         "wrote %.1f s ago; using that answer", path,
                         time.monotonic() - w.at, extra={"VAULT_PATH": path})
                if missing is not None:
                    raise missing
                return res
            log.debug("%s: the answer predates this session's own write (a standby "
                      "behind the active node?); reading again in %.0f ms", path,
                      pause * 1000, extra={"VAULT_PATH": path})
            self.sleep(pause)
            pause = min(pause * 2, 0.1)

    def health(self) -> tuple[dict[str, Any], float]:
        """`sys/health` on the preferred address without token or namespace (Vault
        rejects namespaced health calls, KES #476), every state answered as 299 so the
        body is always parsed: (body, latency in seconds). One attempt."""
        c = self._clients[self._preferred]
        params = {"standbyok": "true", "perfstandbyok": "true", "sealedcode": "299",
                  "uninitcode": "299", "drsecondarycode": "299",
                  "performancestandbycode": "299", "standbycode": "299"}
        start = time.monotonic()
        try:
            resp = c.adapter.request("GET", "/v1/sys/health", params=params,
                                     raise_exception=False)
        except _RETRY_NET as e:
            raise _classify(e, "check health", "sys/health") from None
        latency = time.monotonic() - start
        if isinstance(resp, dict):
            return resp, latency
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise VaultBadAnswer(f"sys/health: answered HTTP {resp.status_code}")
        return body, latency

    # ---- authentication -------------------------------------------------------

    def _can_login(self) -> bool:
        """Whether this session logs in itself (AppRole) rather than holding a token it
        was given."""
        return self._logs_in

    def _read_secret_id(self) -> tuple[bytearray, str]:
        """The secret_id from its configured source, and the source's name."""
        ar = self.cfg.approle
        if self._read_secret_id_hook is not None:
            return self._read_secret_id_hook()
        if ar.secret_id is not None:
            return bytearray(ar.secret_id.get_secret_value().encode()), "config"
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if ar.secret_id_credential:
            if not cred_dir:
                raise ConfigError(
                    f"vault.approle.secret_id_credential: credential {ar.secret_id_credential!r}"
                    " needs $CREDENTIALS_DIRECTORY — run under systemd with LoadCredential*="
                )
            return _read_secret_file(Path(cred_dir) / ar.secret_id_credential), \
                "systemd credential"
        cred = Path(cred_dir) / "secret-id" if cred_dir else None
        # bootkey.service sets a blank `secret-id` credential (SetCredential=) as the
        # fallback for a host without secret-id.cred: blank means "use the next source".
        if cred is not None and cred.exists() and cred.read_bytes().strip():
            return _read_secret_file(cred), "systemd credential"
        if ar.wrapped_secret_id_file:
            return self._unwrap(ar.wrapped_secret_id_file), "wrapped token (unwrapped once)"
        if ar.secret_id_file:
            removed = " (removed after login)" if ar.remove_secret_id_file else ""
            return _read_secret_file(ar.secret_id_file), f"file{removed}"
        raise ConfigError("vault.approle: no secret_id source — set secret_id_file, "
                          "secret_id_credential or wrapped_secret_id_file")

    def _unwrap(self, path: Path) -> bytearray:
        """Unwrap a response-wrapping token once; the file is removed after success
        because a wrapping token works only once anyway."""
        wrap = _read_secret_file(path)
        token = wrap.decode().strip()

        def call(c: hvac.Client) -> Any:
            return self._send(c, "POST", "sys/wrapping/unwrap", token=token)

        try:
            res = self._retrying(call, "unwrap the secret_id", "sys/wrapping/unwrap",
                                 auth=False)
        except (VaultBadAnswer, VaultDenied):
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

    def _source_readable(self) -> bool:
        """Could the secret_id source give a (possibly new) secret_id now?"""
        ar = self.cfg.approle
        if self._read_secret_id_hook is not None:
            return True
        if ar.secret_id is not None or ar.secret_id_credential:
            return True
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / "secret-id").exists():
            return True
        files = [ar.wrapped_secret_id_file, ar.secret_id_file]
        return any(f is not None and f.exists() for f in files)

    def login(self, deadline: float | None = None) -> None:
        """AppRole login (retried while Vault is unavailable) with the held secret_id, or
        the one read from its source; a static token from the config is checked instead."""
        with self._login_lock:
            self._login_locked(deadline)

    def _login_locked(self, deadline: float | None) -> None:
        if self._static:
            self._facts_for = (self._generation, None)
            return
        role_id = self._role_id()
        if self._secret_id is not None:
            try:
                self._approle_login(role_id, self._secret_id, deadline)
                self._facts_for = (self._generation, self._role_name)
                return
            except VaultAuthFailed:
                if not self._source_readable():
                    raise
                log.info("the held secret_id was refused; reading it again from its source")
                self._secret_id.close()
                self._secret_id = None
        raw, source = self._read_secret_id()
        held = SecretBuffer.from_bytes(raw)  # wipes `raw`
        try:
            self._approle_login(role_id, held, deadline)
        except BaseException:
            held.close()
            raise
        self._secret_id, self._source = held, source
        self._logs_in = True
        self._remove_used_secret_id_file()
        self._facts_for = (self._generation, self._role_name)

    def _approle_login(self, role_id: str, secret_id: SecretBuffer,
                       deadline: float | None) -> None:
        ar = self.cfg.approle
        path = f"auth/{ar.mount}/login"

        def call(c: hvac.Client) -> Any:
            body = {"role_id": role_id, "secret_id": secret_id.view.tobytes().decode()}
            return self._send(c, "POST", path, token=None, namespace=ar.namespace, json=body)

        try:
            res = self._retrying(call, "log in with AppRole", path, deadline, auth=False)
        except (VaultBadAnswer, VaultNotFound, VaultDenied) as e:
            raise VaultAuthFailed(
                f"{path}: cannot log in: {_auth_reason(e)} — check role_id and issue a new "
                "secret_id (`bao write -f auth/approle/role/<role>/secret-id`)"
            ) from None
        auth = (res or {}).get("auth") or {}
        if not auth.get("client_token"):
            raise VaultBadAnswer(f"{path}: login answer has no client token")
        with self._lock:
            self._token = auth["client_token"]
            ttl = float(auth.get("lease_duration") or 0)
            self._token_expires = time.monotonic() + ttl if ttl else float("inf")
            self._creation_ttl = ttl
            self._renewable = bool(auth.get("renewable"))
            self._generation += 1
            self._capped_warned = False
            self.logins += 1
        self._role_name = ((auth.get("metadata") or {}).get("role_name")) or None
        log.info("logged in to Vault with AppRole", extra={"VAULT_PATH": path})

    def _remove_used_secret_id_file(self) -> None:
        # Only after a successful login: a failed boot must be able to try again. The
        # secret_id stays in memory for re-login.
        ar = self.cfg.approle
        if not (ar.remove_secret_id_file and ar.secret_id_file) or ar.secret_id_credential:
            return
        try:
            ar.secret_id_file.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove secret_id file %s: %s", ar.secret_id_file, e.strerror)

    # ---- what the access looks like ------------------------------------------------

    def _after_login(self, role: str | None, deadline: float | None) -> None:
        """Read the token's and the secret_id's facts; warn when access will end."""
        limit = min(self.deadline if deadline is None else deadline, 10.0)
        period: float | None = None
        ttl: float | None = None
        renewable = self._renewable
        try:
            look = self.request("GET", "auth/token/lookup-self", what="look up the token",
                                deadline=limit, _relogin=False)
            data = (look or {}).get("data") or {}
            period = float(data.get("period") or 0) or None
            ttl_raw = float(data.get("ttl") or 0)
            ttl = ttl_raw or None
            renewable = bool(data.get("renewable"))
            with self._lock:
                self._renewable = renewable
                self._creation_ttl = float(data.get("creation_ttl") or 0) or self._creation_ttl
                self._token_expires = time.monotonic() + ttl_raw if ttl_raw else float("inf")
        except VaultError as e:
            log.info("cannot look up the Vault token's own facts: %s", e)
        uses, expires, known = self._secret_id_facts(role, limit)
        self._outlook = outlook(
            token_ttl=ttl, token_period=period, token_renewable=renewable,
            source=self._source, logs_in=self._can_login(), secret_id_known=known,
            secret_id_uses_left=uses, secret_id_expires=expires)
        if self._outlook.warning:
            log.warning("Vault access: %s", self._outlook.warning)

    def _secret_id_facts(self, role: str | None, limit: float
                         ) -> tuple[int | None, dt.datetime | None, bool]:
        """(uses left, expiry, known). Uses left -1: the secret_id no longer exists."""
        if self._secret_id is None or role is None:
            return None, None, False
        sid = self._secret_id
        path = f"auth/{self.cfg.approle.mount}/role/{role}/secret-id/lookup"
        try:
            res = self.request("POST", path, what="look up the secret_id", deadline=limit,
                               json={"secret_id": sid.view.tobytes().decode()},
                               _relogin=False)
        except VaultError as e:
            # Usually denied: a host's policy need not grant it. Then it stays unknown.
            log.debug("secret_id facts unknown: %s", e)
            return None, None, False
        data = (res or {}).get("data") if isinstance(res, dict) else None
        if not data:
            return -1, None, True  # gone: it was single-use (or its uses are spent)
        return int(data.get("secret_id_num_uses") or 0), \
            _parse_time(data.get("expiration_time")), True

    def access(self) -> AccessOutlook | None:
        """What this session knows about keeping its Vault access (None before the
        first login); see the module header. The first ask after a login looks the facts
        up (two requests, at most 10 s) and logs the warning if there is one."""
        with self._facts_lock:
            due, self._facts_for = self._facts_for, None
            if due is not None:
                self._after_login(due[1], None)
        o = self._outlook
        if o is None:
            return None
        left = self.token_ttl()
        return replace(o, token_ttl=None if left == float("inf") else round(left, 1))

    # ---- renewal ------------------------------------------------------------------

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    def token_ttl(self) -> float:
        return max(0.0, self._token_expires - time.monotonic())

    def renew_due_in(self) -> float:
        """Seconds until `renew_or_relogin` should run next (the renewal policy)."""
        return renew_in(self.token_ttl())

    def renew_or_relogin(self) -> None:
        """Renew the token. When Vault refuses, or grants less than the token's TTL (it
        reached its max TTL), log in again while the secret_id allows, so the session
        never holds an expiring token it could have replaced."""
        granted: float | None = None
        if self._renewable:
            try:
                def call(c: hvac.Client) -> Any:
                    return self._send(c, "POST", "auth/token/renew-self", token=self._token,
                                      json={})
                res = self._retrying(call, "renew the token", "auth/token/renew-self", 30.0,
                                     auth=False)
                granted = float(((res or {}).get("auth") or {}).get("lease_duration") or 0)
                if granted > 0:
                    with self._lock:
                        self._token_expires = time.monotonic() + granted
                        self.renewals += 1
            except VaultError as e:
                log.info("token renewal refused (%s); logging in again", type(e).__name__)
                granted = None
        capped = granted is not None and 0 < granted < self._creation_ttl
        if granted is not None and granted > 0 and not capped:
            return
        if not self._can_login() or (capped and self._relogin_known_impossible()):
            if capped and not self._capped_warned:
                self._capped_warned = True
                log.warning("Vault access: the token expires in %.0f s (its max TTL) and "
                            "cannot be replaced — %s", self.token_ttl(), _FIX)
            if granted:
                return
        try:
            self.login()
        except VaultError:
            if capped:  # the old token still works until its max TTL
                log.warning("Vault token reaches its max TTL in %.0f s and logging in again "
                            "failed", self.token_ttl())
                return
            raise

    def _relogin_known_impossible(self) -> bool:
        o = self._outlook
        return o is not None and o.relogin_possible is False

    # ---- KV ---------------------------------------------------------------------

    @staticmethod
    def kv_api_path(mount: str, version: int, path: str) -> str:
        return f"{mount}/data/{path}" if version == 2 else f"{mount}/{path}"

    def kv_read(self, mount: str, version: int, path: str,
                deadline: float | None = None) -> dict[str, Any] | None:
        """The entry's data fields, or None if it does not exist (404)."""
        api = self.kv_api_path(mount, version, path)
        try:
            res = self.request("GET", api, what="read", deadline=deadline)
        except VaultNotFound:
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
            res = self.request("GET", api, what="read metadata")
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
            self.request("POST", api, what="write", json=data)
            return None
        body: dict[str, Any] = {"data": data}
        if create_only:
            body["options"] = {"cas": 0}
        elif cas is not None:
            body["options"] = {"cas": cas}
        try:
            res = self.request("POST", api, what="write", json=body)
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
        self.request("DELETE", api, what="delete")

    def kv_destroy_versions(self, mount: str, path: str, versions: list[int]) -> None:
        """KV v2: destroy these versions' data for good (crypto-shred retired keys)."""
        api = f"{mount}/destroy/{path}"
        self.request("POST", api, what="destroy old versions", json={"versions": versions})

    def kv_list(self, mount: str, version: int, path: str) -> list[str]:
        api = f"{mount}/metadata/{path}" if version == 2 else f"{mount}/{path}"
        try:
            res = self.request("LIST", api, what="list")
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
        res = self.request("POST", api, what="encrypt", json=body)
        ct = ((res or {}).get("data") or {}).get("ciphertext") if isinstance(res, dict) else None
        if not isinstance(ct, str) or not ct.startswith("vault:v"):
            raise VaultBadAnswer(f"{api}: answer has no ciphertext")
        return ct

    def transit_decrypt(self, mount: str, key: str, ciphertext: str, context: bytes,
                        deadline: float | None = None) -> SecretBuffer:
        api = f"{mount}/decrypt/{key}"
        body = {"ciphertext": ciphertext, "context": base64.b64encode(context).decode()}
        try:
            res = self.request("POST", api, what="decrypt", json=body, deadline=deadline)
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
        res = self.request("POST", api, what="rewrap", json=body)
        ct = ((res or {}).get("data") or {}).get("ciphertext") if isinstance(res, dict) else None
        if not isinstance(ct, str):
            raise VaultBadAnswer(f"{api}: answer has no ciphertext")
        return ct

    def http_sessions(self) -> list[requests.Session]:
        """Each address's HTTP session, for response hooks (the agent's metrics)."""
        return [c.session for c in self._clients]

    def raw_client(self) -> hvac.Client:
        """A new hvac client on the preferred address with the session's token (a sharp
        tool: no retries, no re-login; it shares the connection pool)."""
        c = self._clients[self._preferred]
        raw = hvac.Client(url=c.url, session=c.session, timeout=self.cfg.timeout,
                          verify=self._verify, cert=self._cert,
                          namespace=self.cfg.namespace or None)
        raw.token = self._token  # never $VAULT_TOKEN or ~/.vault-token
        return raw


_FIX = ("set token_period on the AppRole role (periodic tokens renew forever), or issue a "
        "secret_id that can be used again (secret_id_num_uses=0) with a longer secret_id_ttl")


def outlook(*, token_ttl: float | None, token_period: float | None, token_renewable: bool,
            source: str, logs_in: bool, secret_id_known: bool,
            secret_id_uses_left: int | None, secret_id_expires: dt.datetime | None,
            ) -> AccessOutlook:
    """The access outlook from the facts Vault gave (pure: tests feed it values)."""
    gone = secret_id_known and secret_id_uses_left == -1
    relogin: bool | None
    if not logs_in:
        relogin = False
    elif secret_id_known:
        relogin = not gone
    else:
        relogin = None
    warning: str | None = None
    until: dt.datetime | None = None
    if token_period is None:
        if relogin is False:
            why = "it was given a token, not an AppRole secret_id" if not logs_in else \
                "the secret_id was single-use (or its uses are spent)"
            warning = (f"access ends when the token reaches its max TTL: the token is not "
                       f"periodic and nothing can log in again ({why}) — {_FIX}")
        elif secret_id_expires is not None:
            until = secret_id_expires
            warning = (f"logging in again stops working at {secret_id_expires.isoformat()}, "
                       f"when the secret_id expires, and the token is not periodic — {_FIX}")
    return AccessOutlook(
        token_ttl=token_ttl, token_period=token_period, token_renewable=token_renewable,
        secret_id_source=source,
        secret_id_uses_left=None if gone else secret_id_uses_left,
        secret_id_expires=secret_id_expires, secret_id_known=secret_id_known,
        relogin_possible=relogin, access_until=until, warning=warning)


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
