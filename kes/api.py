"""The KES API (shared/kes-api.md §1.2-§2): routing, authorization and one handler per
route, as a `kes.messages.Handler`. Sans-I/O with respect to the network: the transport hands
in a complete `Request` and sends back the `Response`.

Invariant: every answer a client sees is either 200 with KES's exact JSON, or a `KesError`
constant (exact status + text); any other exception is logged to the error log with the
request and answered with the route's fixed KES text — never Vault's or Python's words.
Processing order per request, as KES: method → prefix cut → body limit → authentication /
authorization → handler.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import json
import logging
import os
import platform
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from bootkey_core import __version__
from bootkey_core.secret import SecretBuffer
from kes import crypto, errors
from kes import policy as pol
from kes.audit import Audit, LogHub
from kes.crypto import KeyType, NotAuthentic
from kes.errors import KesError
from kes.keyring import KeyExists, KeyNotFound, Keyring, StoreError, StoreUnreachable
from kes.keyversion import KeyVersion, Timestamp
from kes.messages import MAX_BODY, Request, Response
from kes.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kes.metrics import Metrics, memory_usage, usable_cpus

log = logging.getLogger("kes.error")

# What /version reports: the KES release whose API this server implements.
KES_VERSION = "2025-03-12T09-35-18Z"
MAX_BULK = 1000  # legacy bulk decrypt: KES v0.19-2023 accepted at most 1000 ciphertexts
RESOLVED_CACHE = 4096  # request paths whose route lookup is remembered

_T = TypeVar("_T")
Auth = Literal["none", "identify", "policy"]
RouteHandler = Callable[["Api", Request, str], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str           # the declared method; a PUT route also accepts POST
    path: str             # exact path, or a prefix ending in "/"
    max_body: int
    timeout: float        # KES's per-route write deadline, seconds (0: none); for /v1/api
    auth: Auth
    handler: RouteHandler
    fail: KesError        # what the client gets if the handler fails unexpectedly
    metered: bool = True  # counted in kes_http_request_* (key/policy/identity routes)
    audited: bool = True

    @property
    def prefix(self) -> bool:
        return self.path.endswith("/")


def _ip(remote: str) -> str:
    """"10.0.0.5:41234" / "[::1]:41234" → the address alone, as KES's audit log has it."""
    if remote.startswith("["):
        return remote[1:].split("]", 1)[0]
    host, sep, port = remote.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else remote


# The calls KES itself audits (and logs at INFO); bootkey audits every key call.
_KES_AUDITED = frozenset({"/v1/key/create/", "/v1/key/import/", "/v1/key/delete/"})


def _audit_message(route: Route, resource: str, status: int) -> str:
    """KES's texts for the events it audits; a generic one for the rest."""
    if status == 200 and route.path in ("/v1/key/create/", "/v1/key/import/"):
        return f"secret key '{resource}' created"
    if status == 200 and route.path == "/v1/key/delete/":
        return f"secret key '{resource}' deleted"
    return f"{route.path.rstrip('/')} {status}"


_GO_ESCAPED = re.compile("[<>&\u2028\u2029]")


def go_json(obj: Any) -> bytes:
    """JSON as Go's encoder writes it: compact, HTML-escaped, trailing newline."""
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if _GO_ESCAPED.search(s):
        s = _GO_ESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", s)
    return (s + "\n").encode()


def ok_json(obj: Any) -> Response:
    return Response(200, go_json(obj))


def _b64_bytes(b: bytes | bytearray) -> bytes:
    return binascii.b2a_base64(b, newline=False)


# The per-object answers (generate/decrypt) built directly: base64 needs no JSON escaping,
# and json.dumps was a measurable share of these requests.
def ok_data_key(plaintext: bytes | bytearray, ciphertext: bytes) -> Response:
    return Response(200, b'{"plaintext":"%b","ciphertext":"%b"}\n'
                    % (_b64_bytes(plaintext), _b64_bytes(ciphertext)))


def ok_plaintext(plaintext: bytes | bytearray) -> Response:
    return Response(200, b'{"plaintext":"%b"}\n' % _b64_bytes(plaintext))


def ok_empty() -> Response:
    return Response(200, b"", content_type=None)


def error_response(e: KesError) -> Response:
    return Response(e.status, e.body())


# ---- request body parsing (Go encoding/json semantics where they matter)

_DECODER = json.JSONDecoder()


def _body(req: Request, limit: int) -> dict[str, Any]:
    """Decode a JSON object body. Over-long or malformed → `invalid request body`.

    Like Go's json.Decoder: only the first JSON value is read, field names match
    case-insensitively, unknown fields are ignored, an empty body means "no fields".
    """
    if req.body_too_large or len(req.body) > limit:
        raise errors.INVALID_BODY
    text = req.body.decode("utf-8", "replace").lstrip()
    if not text:
        return {}
    try:
        obj, _ = _DECODER.raw_decode(text)
    except ValueError:
        raise errors.INVALID_BODY from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise errors.INVALID_BODY
    return obj


def _field(obj: dict[str, Any], name: str) -> Any:
    if name in obj:
        return obj[name]
    for k, v in obj.items():
        if k.lower() == name:
            return v
    return None


def _b64_field(obj: dict[str, Any], name: str, err: KesError = errors.INVALID_BODY) -> bytes:
    """A Go []byte field: standard base64 with padding; absent or null = empty."""
    v = _field(obj, name)
    if v is None:
        return b""
    if not isinstance(v, str):
        raise err
    if "\n" in v or "\r" in v:
        v = v.replace("\r", "").replace("\n", "")
    try:
        # Go's StdEncoding: padding required, no stray characters, CR/LF ignored (above).
        return binascii.a2b_base64(v, strict_mode=True)
    except (binascii.Error, ValueError):
        raise err from None


def _b64(b: bytes | bytearray) -> str:
    return _b64_bytes(b).decode()


class Api:
    """The KES API over a Keyring and a static PolicySet. Call it with a Request."""

    def __init__(self, keyring: Keyring, policies: pol.PolicySet, *,
                 metrics: Metrics | None = None, audit_hub: LogHub | None = None,
                 error_hub: LogHub | None = None, key_type: KeyType | None = None,
                 overrides: dict[str, tuple[bool | None, float | None]] | None = None) -> None:
        self.keyring = keyring
        self.policies = policies
        self.metrics = metrics or Metrics()
        self.audit_hub = audit_hub or LogHub(on_publish=self._count_audit)
        self.error_hub = error_hub or LogHub(on_publish=self._count_error)
        self.audit = Audit(self.audit_hub)
        self.key_type = key_type or crypto.preferred_key_type()
        self.started = Timestamp.now()
        self._started_mono = time.monotonic()
        self.routes = _apply_overrides(ROUTES, overrides or {})
        self._exact = {r.path: r for r in self.routes if not r.prefix}
        self._prefix = {r.path: r for r in self.routes if r.prefix}
        # MinIO asks about the same few paths (one key, a few routes) all day long.
        self._resolve = functools.lru_cache(maxsize=RESOLVED_CACHE)(self.route_for)

    def _count_audit(self) -> None:
        self.metrics.audit_events += 1

    def _count_error(self) -> None:
        self.metrics.error_events += 1

    # ---- dispatch

    def route_for(self, path: str) -> tuple[Route, str, str] | None:
        """(route, resource, path used for policy matching) or None.

        Prefix routes are looked up at each `/` of the path, longest match wins (a
        resource may itself contain `/`, which the name check then refuses)."""
        r = self._exact.get(path)
        if r is not None:
            return r, "", path
        found: Route | None = None
        i = path.find("/", 1)
        while i != -1:
            found = self._prefix.get(path[:i + 1], found)
            i = path.find("/", i + 1)
        if found is not None:
            return found, path[len(found.path):], path
        r = self._prefix.get(path + "/")
        if r is not None:
            # `/v1/key/list` (what the Go client sends for an empty prefix): KES
            # redirects to `/v1/key/list/`; serving it directly as that path keeps
            # policies like `/v1/key/list/*` working the same.
            return r, "", r.path
        return None

    async def __call__(self, req: Request) -> Response:
        found = self._resolve(req.path)
        if found is None:
            return Response(404, errors.NOT_FOUND_TEXT, content_type="text/plain; charset=utf-8")
        route, resource, auth_path = found
        method = req.method.upper()
        if method != route.method and not (route.method == "PUT" and method == "POST"):
            e = errors.method_not_allowed(method, route.method)
            return Response(e.status, e.body(), headers=(("Accept", route.method),))
        start = time.monotonic()
        if route.metered:
            self.metrics.request_started()
        try:
            if route.auth == "policy":
                if req.identity is None:
                    raise errors.NO_CLIENT_CERT
                if not self.policies.allowed(req.identity, auth_path):
                    raise errors.NOT_ALLOWED
            resp = await route.handler(self, req, resource)
        except KesError as e:
            resp = error_response(e)
            errors.forget_raise(e)
        except Exception:
            log.exception("%s %s: internal error (answered %d %s)", req.method, req.path,
                          route.fail.status, route.fail.message)
            resp = error_response(route.fail)
        except BaseException:
            # Cancelled (the client went away, or shutdown): no answer to count.
            if route.metered:
                self.metrics.request_aborted()
            raise
        elapsed = time.monotonic() - start
        if route.metered:
            self.metrics.request_done(resp.status, elapsed)
        if route.audited:
            kes_audited = resp.status == 200 and route.path in _KES_AUDITED
            if self.audit.wanted(kes_audited):
                self.audit.record(method=method, path=req.path, ip=_ip(req.remote),
                                  identity=req.identity or "", status=resp.status,
                                  millis=round(elapsed * 1000), kes_audited=kes_audited,
                                  message=_audit_message(route, resource, resp.status))
        return resp

    async def _io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.to_thread(fn, *args)

    async def _key(self, name: str, req: Request) -> KeyVersion:
        """The key `name` (already checked by the handler with _check_key_name), from
        the store. Handlers try `keyring.cached(name)` first: MinIO's per-object calls
        then need neither this coroutine nor a thread hop."""
        hit = self.keyring.cached(name)
        if hit is not None:
            return hit
        try:
            return await self._io(self.keyring.get, name)
        except KeyNotFound:
            raise errors.KEY_NOT_FOUND from None
        except StoreError as e:
            log.error("%s %s: cannot read key '%s': %s", req.method, req.path, name, e)
            raise errors.READ_FAILED from None

    def _uptime(self) -> int:
        return round(time.monotonic() - self._started_mono)


# ---- handlers: (api, request, resource) → Response


async def h_version(api: Api, req: Request, _: str) -> Response:
    return ok_json({"version": KES_VERSION, "commit": f"bootkey-{__version__}"})


async def h_ready(api: Api, req: Request, _: str) -> Response:
    try:
        await api._io(api.keyring.status)
    except StoreUnreachable:
        raise errors.NOT_READY from None
    except StoreError:
        raise errors.UNAVAILABLE from None
    return ok_empty()


_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


async def h_status(api: Api, req: Request, _: str) -> Response:
    heap, stack = memory_usage()
    out: dict[str, Any] = {
        "version": KES_VERSION, "os": "linux",
        "arch": _ARCH.get(platform.machine(), platform.machine()),
        "uptime": api._uptime(), "num_cpu": os.cpu_count() or 1, "num_cpu_used": usable_cpus(),
        "mem_heap_used": heap, "mem_stack_used": stack,
    }
    try:
        latency = await api._io(api.keyring.status)
        # Integer milliseconds, at least 1: kms-go decodes it into a Duration (a float
        # fails), and never `keystore_unavailable` — MinIO must see "offline" (§2.4).
        out["keystore_latency"] = max(1, round(latency * 1000))
    except Exception as e:
        log.error("GET /v1/status: key store unreachable: %s", e)
        out["keystore_unreachable"] = True
    return ok_json(out)


async def h_metrics(api: Api, req: Request, _: str) -> Response:
    return Response(200, api.metrics.exposition(), content_type=METRICS_CONTENT_TYPE)


async def h_api(api: Api, req: Request, _: str) -> Response:
    return ok_json([{"method": r.method, "path": r.path, "max_body": r.max_body,
                     "timeout": int(r.timeout)} for r in api.routes])


async def h_key_create(api: Api, req: Request, name: str) -> Response:
    if not pol.valid_name(name):
        raise errors.invalid_key_name(name)
    try:
        kv = KeyVersion.generate(api.key_type, req.identity or "")
    except Exception:
        log.exception("%s %s: cannot generate key", req.method, req.path)
        raise errors.GENERATE_KEY_FAILED from None
    return await _store_new_key(api, req, name, kv)


async def _store_new_key(api: Api, req: Request, name: str, kv: KeyVersion) -> Response:
    try:
        await api._io(api.keyring.create, name, kv)
    except KeyExists:
        raise errors.KEY_EXISTS from None
    except StoreError as e:
        log.error("%s %s: cannot create key '%s': %s", req.method, req.path, name, e)
        raise errors.CREATE_FAILED from None
    finally:
        kv.close()
    return ok_empty()


async def h_key_import(api: Api, req: Request, name: str) -> Response:
    if not pol.valid_name(name):
        raise errors.invalid_key_name(name)
    try:
        body = _body(req, MAX_BODY)
    except KesError as e:
        errors.forget_raise(e)
        raise errors.INVALID_IMPORT_BODY from None
    # Current body {"key","cipher"}; kes-go v0.1 / KES <= v0.22 sent {"bytes","algorithm"}.
    field = "key" if _field(body, "key") is not None else "bytes"
    key = bytearray(_b64_field(body, field, errors.INVALID_IMPORT_BODY))
    cipher = _field(body, "cipher") if _field(body, "cipher") is not None \
        else _field(body, "algorithm")
    cipher = "" if cipher is None else cipher
    if not isinstance(cipher, str):
        raise errors.INVALID_IMPORT_BODY
    if cipher not in crypto.ALGORITHMS or len(key) != crypto.KEY_SIZE:
        key[:] = bytes(len(key))
        if cipher not in crypto.ALGORITHMS:
            raise errors.algorithm_not_supported(cipher)
        raise errors.invalid_key_size(cipher)
    kv = KeyVersion(SecretBuffer.from_bytes(key), crypto.ALGORITHMS[cipher],
                    SecretBuffer.random(crypto.KEY_SIZE), Timestamp.now(), req.identity or "")
    return await _store_new_key(api, req, name, kv)


async def h_key_describe(api: Api, req: Request, name: str) -> Response:
    _check_key_name(name)
    kv = api.keyring.cached(name)
    if kv is None:
        kv = await api._key(name, req)
    out: dict[str, Any] = {"name": name, "algorithm": kv.type.wire_name,
                           "created_at": kv.created_at.rfc3339()}
    if kv.created_by:
        out["created_by"] = kv.created_by
    return ok_json(out)


async def h_key_delete(api: Api, req: Request, name: str) -> Response:
    if not pol.valid_name(name):
        raise errors.invalid_key_name(name)
    try:
        await api._io(api.keyring.delete, name)
    except KeyNotFound:
        raise errors.KEY_NOT_FOUND from None
    except StoreError as e:
        log.error("%s %s: cannot delete key '%s': %s", req.method, req.path, name, e)
        raise errors.DELETE_FAILED from None
    return ok_empty()


async def h_key_list(api: Api, req: Request, pattern: str) -> Response:
    if not pol.valid_pattern(pattern):
        raise errors.invalid_pattern(pattern)
    try:
        names, cont = await api._io(api.keyring.list, pol.list_prefix(pattern, strip_star=False))
    except StoreError as e:
        # KES appends the listing to this error body (a bug); we send the error alone.
        log.error("%s %s: cannot list keys: %s", req.method, req.path, e)
        raise errors.LIST_FAILED from None
    out: dict[str, Any] = {"names": names}
    if cont:
        out["continue_at"] = cont
    return ok_json(out)


async def h_key_generate(api: Api, req: Request, name: str) -> Response:
    _check_key_name(name)  # KES validates the name before it reads the body
    body = _body(req, MAX_BODY)
    context = _b64_field(body, "context")
    kv = api.keyring.cached(name)
    if kv is None:
        kv = await api._key(name, req)
    try:
        dek, ct = crypto.new_data_key(kv.key.view, kv.type, context, keyed=kv.keyed_hmac())
    except Exception:
        log.exception("%s %s: cannot generate data key", req.method, req.path)
        raise errors.GENERATE_KEY_FAILED from None
    try:
        return ok_data_key(dek, ct)
    finally:
        dek[:] = bytes(len(dek))


async def h_key_encrypt(api: Api, req: Request, name: str) -> Response:
    _check_key_name(name)  # KES validates the name before it reads the body
    body = _body(req, MAX_BODY)
    plaintext = _b64_field(body, "plaintext")
    context = _b64_field(body, "context")
    kv = api.keyring.cached(name)
    if kv is None:
        kv = await api._key(name, req)
    try:
        ct = crypto.encrypt(kv.key.view, kv.type, plaintext, context,
                            keyed=kv.keyed_hmac())
    except Exception:
        log.exception("%s %s: cannot encrypt", req.method, req.path)
        raise errors.ENCRYPT_FAILED from None
    return ok_json({"ciphertext": _b64(ct)})


async def h_key_decrypt(api: Api, req: Request, name: str) -> Response:
    _check_key_name(name)  # KES validates the name before it reads the body
    body = _body(req, MAX_BODY)
    ciphertext = _b64_field(body, "ciphertext")
    context = _b64_field(body, "context")
    kv = api.keyring.cached(name)
    if kv is None:
        kv = await api._key(name, req)
    pt = _open(kv, ciphertext, context)
    try:
        return ok_plaintext(pt)
    finally:
        pt[:] = bytes(len(pt))


def _check_key_name(name: str) -> None:
    if not pol.valid_name(name):
        raise errors.invalid_key_name(name)


def _open(kv: KeyVersion, ciphertext: bytes, context: bytes) -> bytearray:
    try:
        return crypto.decrypt(kv.key.view, kv.type, ciphertext, context,
                              type_known=kv.type_known, keyed=kv.keyed_hmac())
    except NotAuthentic:
        raise errors.DECRYPT from None


async def h_key_bulk_decrypt(api: Api, req: Request, name: str) -> Response:
    """Legacy `/v1/key/bulk/decrypt/` (KES v0.19-2023): MinIO 2022-03..2023-08 used it."""
    _check_key_name(name)
    if req.body_too_large or len(req.body) > MAX_BODY:
        raise errors.INVALID_BODY
    try:
        items = json.loads(req.body or b"null")
    except ValueError:
        raise errors.INVALID_BODY from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise errors.INVALID_BODY
    if len(items) > MAX_BULK:
        raise errors.TOO_MANY_CIPHERTEXTS
    kv = api.keyring.cached(name)
    if kv is None:
        kv = await api._key(name, req)
    out = []
    for item in items:
        pt = _open(kv, _b64_field(item, "ciphertext"), _b64_field(item, "context"))
        out.append({"plaintext": _b64(pt)})
        pt[:] = bytes(len(pt))
    return ok_json(out)


async def h_key_hmac(api: Api, req: Request, name: str) -> Response:
    _check_key_name(name)  # KES validates the name before it reads the body
    body = _body(req, MAX_BODY)
    message = _b64_field(body, "message")
    kv = api.keyring.cached(name)
    if kv is None:
        kv = await api._key(name, req)
    if kv.hmac_key is None:
        raise errors.NO_HMAC
    return ok_json({"hmac": _b64(crypto.hmac_sha256(kv.hmac_key.view, message))})


def _policy(api: Api, name: str) -> pol.Policy:
    if not pol.valid_name(name):
        raise errors.invalid_policy_name(name)
    p = api.policies.policies.get(name)
    if p is None:
        raise errors.POLICY_NOT_FOUND
    return p


async def h_policy_describe(api: Api, req: Request, name: str) -> Response:
    _policy(api, name)
    return ok_json({"name": name, "created_at": api.started.rfc3339(),
                    "created_by": api.policies.admin})


def _rules(patterns: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {p: {} for p in patterns}


async def h_policy_read(api: Api, req: Request, name: str) -> Response:
    p = _policy(api, name)
    out: dict[str, Any] = {"name": name}
    if p.allow:
        out["allow"] = _rules(p.allow)
    if p.deny:
        out["deny"] = _rules(p.deny)
    out["created_at"] = api.started.rfc3339()
    out["created_by"] = api.policies.admin
    return ok_json(out)


async def h_policy_list(api: Api, req: Request, pattern: str) -> Response:
    if not pol.valid_pattern(pattern):
        raise errors.invalid_pattern(pattern)
    prefix = pol.list_prefix(pattern, strip_star=True)
    return ok_json({"names": sorted(n for n in api.policies.policies if n.startswith(prefix)),
                    "continue_at": ""})


async def h_identity_describe(api: Api, req: Request, ident: str) -> Response:
    if not pol.valid_name(ident):
        raise errors.invalid_identity(ident)
    if api.policies.is_admin(ident):
        return ok_json({"admin": True, "created_at": api.started.rfc3339()})
    p = api.policies.policy_of(ident)
    if p is None:
        raise errors.IDENTITY_NOT_FOUND
    return ok_json({"policy": p.name, "created_at": api.started.rfc3339(),
                    "created_by": api.policies.admin})


async def h_identity_list(api: Api, req: Request, pattern: str) -> Response:
    if not pol.valid_pattern(pattern):
        raise errors.invalid_pattern(pattern)
    prefix = pol.list_prefix(pattern, strip_star=True)
    ids = set(api.policies.identities())
    if api.policies.is_admin(api.policies.admin):
        ids.add(api.policies.admin)
    return ok_json({"identities": sorted(i for i in ids if i.startswith(prefix)),
                    "continue_at": ""})


async def h_identity_self(api: Api, req: Request, _: str) -> Response:
    """Works for every identity, unlike current KES (always 404 for non-admins, §2.17).
    The non-admin shape is what kms-go v0.3.1 decodes: `policy` as a name plus flat
    `allow`/`deny` maps."""
    ident = req.identity
    if ident is None:
        raise errors.NO_CLIENT_CERT
    if api.policies.is_admin(ident):
        return ok_json({"identity": ident, "admin": True, "created_at": api.started.rfc3339()})
    p = api.policies.policy_of(ident)
    if p is None:
        raise errors.IDENTITY_NOT_FOUND
    out: dict[str, Any] = {"identity": ident, "created_at": api.started.rfc3339(),
                           "created_by": api.policies.admin, "policy": p.name}
    if p.allow:
        out["allow"] = _rules(p.allow)
    if p.deny:
        out["deny"] = _rules(p.deny)
    return ok_json(out)


def _log_stream(which: str) -> RouteHandler:
    async def handler(api: Api, req: Request, _: str) -> Response:
        hub = api.audit_hub if which == "audit" else api.error_hub
        return Response(200, b"", content_type="application/x-ndjson", stream=hub.stream())
    return handler


_S = 15.0
ROUTES: tuple[Route, ...] = (
    Route("GET", "/version", 0, 10.0, "none", h_version, errors.VERSION_FAILED,
          metered=False, audited=False),
    Route("GET", "/v1/ready", 0, _S, "policy", h_ready, errors.UNAVAILABLE,
          metered=False, audited=False),
    Route("GET", "/v1/status", 0, _S, "policy", h_status, errors.VERSION_FAILED,
          metered=False, audited=False),
    Route("GET", "/v1/metrics", 0, _S, "policy", h_metrics, KesError(500, "internal error"),
          metered=False, audited=False),
    Route("GET", "/v1/api", 0, 10.0, "policy", h_api, KesError(500, "internal error"),
          metered=False, audited=False),
    Route("PUT", "/v1/key/create/", 0, _S, "policy", h_key_create, errors.CREATE_FAILED_500),
    Route("PUT", "/v1/key/import/", MAX_BODY, _S, "policy", h_key_import,
          errors.CREATE_FAILED_500),
    Route("GET", "/v1/key/describe/", 0, _S, "policy", h_key_describe, errors.READ_FAILED),
    Route("DELETE", "/v1/key/delete/", 0, _S, "policy", h_key_delete, errors.DELETE_FAILED),
    Route("GET", "/v1/key/list/", 0, _S, "policy", h_key_list, errors.LIST_FAILED),
    Route("PUT", "/v1/key/generate/", MAX_BODY, _S, "policy", h_key_generate,
          errors.GENERATE_KEY_FAILED),
    Route("PUT", "/v1/key/encrypt/", MAX_BODY, _S, "policy", h_key_encrypt,
          errors.ENCRYPT_FAILED),
    Route("PUT", "/v1/key/decrypt/", MAX_BODY, _S, "policy", h_key_decrypt,
          errors.DECRYPT_FAILED),
    Route("POST", "/v1/key/bulk/decrypt/", MAX_BODY, _S, "policy", h_key_bulk_decrypt,
          errors.DECRYPT_FAILED),
    Route("PUT", "/v1/key/hmac/", MAX_BODY, _S, "policy", h_key_hmac,
          KesError(500, "failed to compute HMAC")),
    Route("GET", "/v1/policy/describe/", 0, _S, "policy", h_policy_describe,
          KesError(500, "failed to read policy")),
    Route("GET", "/v1/policy/read/", 0, _S, "policy", h_policy_read,
          KesError(500, "failed to read policy")),
    Route("GET", "/v1/policy/list/", 0, _S, "policy", h_policy_list,
          KesError(500, "failed to list policies")),
    Route("GET", "/v1/identity/describe/", 0, _S, "policy", h_identity_describe,
          KesError(500, "failed to read identity")),
    Route("GET", "/v1/identity/list/", 0, _S, "policy", h_identity_list,
          KesError(500, "failed to list identities")),
    Route("GET", "/v1/identity/self/describe", 0, _S, "identify", h_identity_self,
          KesError(500, "failed to read identity")),
    Route("GET", "/v1/log/error", 0, 0.0, "policy", _log_stream("error"),
          KesError(500, "internal error"), metered=False, audited=False),
    Route("GET", "/v1/log/audit", 0, 0.0, "policy", _log_stream("audit"),
          KesError(500, "internal error"), metered=False, audited=False),
)


def _apply_overrides(routes: tuple[Route, ...],
                     overrides: dict[str, tuple[bool | None, float | None]]) -> tuple[Route, ...]:
    """KES `api:` config: per-path skip_auth / timeout; unknown paths are ignored."""
    out = []
    for r in routes:
        skip, timeout = overrides.get(r.path, (None, None))
        auth: Auth = r.auth
        if skip and r.auth == "policy":
            auth = "identify"
        out.append(Route(r.method, r.path, r.max_body,
                         r.timeout if timeout is None else timeout, auth, r.handler, r.fail,
                         r.metered, r.audited))
    return tuple(out)
