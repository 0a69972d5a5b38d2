"""The KES API handlers: exact statuses, bodies and texts, with constructed Requests and
over real sockets (HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from kes.api import Api
from kes.crypto import KeyType
from kes.keyring import Keyring, MemKeyStore, StoreError, StoreUnreachable
from kes.messages import MAX_BODY, Request
from kes.policy import Policy, PolicySet
from tests.kes.apitools import ADMIN, MINIO, OTHER, b64, call, err, js
from tests.kes.server_util import PROTOCOLS, Pki, WireApi

MINIO_POLICY = Policy("minio", allow=(
    "/v1/key/create/minio-*", "/v1/key/generate/minio-*", "/v1/key/decrypt/minio-*",
    "/v1/key/describe/minio-*", "/v1/key/list/*", "/v1/status", "/v1/api",
    "/v1/key/hmac/minio-*"), deny=("/v1/key/generate/minio-internal*",), identities=(MINIO,))


class FlakyStore(MemKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.down: type[Exception] | None = None

    def _check(self) -> None:
        if self.down is not None:
            raise self.down("vault: connection refused to 127.0.0.1:8200 (secret detail)")

    def get(self, name: str) -> bytes:
        self._check()
        return super().get(name)

    def create(self, name: str, value: bytes) -> None:
        self._check()
        super().create(name, value)

    def list(self, prefix: str) -> list[str]:
        self._check()
        return super().list(prefix)

    def delete(self, name: str) -> None:
        self._check()
        super().delete(name)

    def status(self) -> float:
        self._check()
        return 0.0042


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


@pytest.fixture(params=["direct", *PROTOCOLS])
def api(store: FlakyStore, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """The Api called directly with constructed Requests, and the same Api behind a real
    server over HTTP/1.1 and over HTTP/2: the API must not know which carried the call."""
    real = Api(Keyring(store), PolicySet.build(ADMIN, [MINIO_POLICY]), key_type=KeyType.AES256)
    if request.param == "direct":
        yield real
        return
    with WireApi(real, request.param, Pki.create(tmp_path), [ADMIN, MINIO, OTHER, None]) as w:
        yield cast(Api, w)


# Streams and cancellation reach into the Api's coroutines: the direct calls only.
direct_only = pytest.mark.parametrize("api", ["direct"], indirect=True)


MINIO_CTX = b'{"bucket":"bucket/object"}'


def test_minio_startup_sequence(api: Api) -> None:
    r = call(api, "GET", "/v1/key/describe/minio-default", identity=MINIO)
    assert err(r) == (404, "key does not exist")
    r = call(api, "POST", "/v1/key/generate/minio-default", {"context": "e30="}, identity=MINIO)
    assert err(r) == (404, "key does not exist")
    r = call(api, "POST", "/v1/key/create/minio-default", identity=MINIO)
    assert (r.status, r.body, r.content_type) == (200, b"", None)
    r = call(api, "POST", "/v1/key/create/minio-default", identity=MINIO)
    assert err(r) == (400, "key already exists")
    g = js(call(api, "POST", "/v1/key/generate/minio-default", {"context": b64(MINIO_CTX)},
                identity=MINIO))
    assert len(base64.b64decode(g["plaintext"])) == 32
    assert len(base64.b64decode(g["ciphertext"])) == 76
    d = js(call(api, "POST", "/v1/key/decrypt/minio-default",
                {"ciphertext": g["ciphertext"], "context": b64(MINIO_CTX)}, identity=MINIO))
    assert d == {"plaintext": g["plaintext"]}
    bad = call(api, "POST", "/v1/key/decrypt/minio-default",
               {"ciphertext": g["ciphertext"], "context": b64(b"{}")}, identity=MINIO)
    assert err(bad) == (400, "decryption failed: ciphertext is not authentic")
    desc = js(call(api, "GET", "/v1/key/describe/minio-default", identity=MINIO))
    assert desc["name"] == "minio-default" and desc["algorithm"] == "AES256"
    assert desc["created_by"] == MINIO and desc["created_at"].endswith("Z")
    assert list(desc) == ["name", "algorithm", "created_at", "created_by"]


def test_response_bytes_are_go_json(api: Api) -> None:
    call(api, "PUT", "/v1/key/create/k1")
    r = call(api, "GET", "/v1/key/list/")
    assert r.body == b'{"names":["k1"]}\n'
    e = call(api, "GET", "/v1/key/describe/nope")
    assert e.body == b'{"message":"key does not exist"\n}'
    assert e.content_type == "application/json"


def test_post_equals_put_and_405(api: Api) -> None:
    assert call(api, "PUT", "/v1/key/create/a").status == 200
    assert call(api, "POST", "/v1/key/create/b").status == 200
    r = call(api, "GET", "/v1/key/create/c")
    assert err(r) == (405, "received method 'GET' expected 'PUT'")
    assert ("Accept", "PUT") in r.headers
    r = call(api, "POST", "/v1/key/describe/a")
    assert err(r) == (405, "received method 'POST' expected 'GET'")


def test_unknown_path_is_servemux_404(api: Api) -> None:
    r = call(api, "GET", "/v1/nope")
    assert (r.status, r.body) == (404, b"404 page not found\n")
    assert r.content_type is not None and r.content_type.startswith("text/plain")


@pytest.mark.parametrize("path", ["/v1/key/list", "/v1/key/list/", "/v1/key/list/*"])
def test_key_list_with_and_without_slash(api: Api, path: str) -> None:
    for n in ("minio-a", "minio-b", "other"):
        call(api, "PUT", f"/v1/key/create/{n}")
    assert js(call(api, "GET", path, identity=MINIO)) == {"names": ["minio-a", "minio-b", "other"]}


def test_key_list_prefix_and_literal_star(api: Api) -> None:
    for n in ("minio-a", "minio-b", "other"):
        call(api, "PUT", f"/v1/key/create/{n}")
    assert js(call(api, "GET", "/v1/key/list/minio-"))["names"] == ["minio-a", "minio-b"]
    assert js(call(api, "GET", "/v1/key/list/minio*"))["names"] == []  # KES: `*` literal
    assert err(call(api, "GET", "/v1/key/list/a*b")) == (
        400, "listing pattern 'a*b' is empty, too long or is invalid")


@pytest.mark.parametrize("name", ["a/b", "-a", "a-", "_", "x" * 81, "a.b", "ä"])
def test_invalid_key_names(api: Api, name: str) -> None:
    for method, route in (("PUT", "create"), ("GET", "describe"), ("PUT", "generate"),
                          ("PUT", "decrypt"), ("DELETE", "delete"), ("PUT", "import")):
        r = call(api, method, f"/v1/key/{route}/{name}", {} if method == "PUT" else None)
        assert err(r) == (400, f"key name '{name}' is empty, too long or contains invalid "
                               "characters"), route


def test_empty_key_name(api: Api) -> None:
    r = call(api, "PUT", "/v1/key/create/")
    assert err(r) == (400, "key name '' is empty, too long or contains invalid characters")


def test_authorization(api: Api) -> None:
    call(api, "PUT", "/v1/key/create/minio-internal-x")
    assert err(call(api, "PUT", "/v1/key/generate/minio-internal-x", {}, identity=MINIO)) == (
        403, "not authorized: insufficient permissions")
    assert err(call(api, "DELETE", "/v1/key/delete/minio-x", identity=MINIO))[0] == 403
    assert err(call(api, "GET", "/v1/status", identity=OTHER)) == (
        403, "not authorized: insufficient permissions")
    assert err(call(api, "GET", "/v1/status", identity=None)) == (
        400, "tls: client certificate is required")
    # /version needs no identity at all
    v = js(call(api, "GET", "/version", identity=None))
    assert v["version"] == "2025-03-12T09-35-18Z" and v["commit"].startswith("bootkey-")


def test_method_checked_before_auth(api: Api) -> None:
    assert call(api, "GET", "/v1/key/create/x", identity=OTHER).status == 405


def test_bodies(api: Api) -> None:
    call(api, "PUT", "/v1/key/create/k")
    for raw in (b"{", b"[1]", b'{"context": 5}', b'{"context": "***"}', b'{"context":"AAA"}'):
        assert err(call(api, "PUT", "/v1/key/generate/k", raw=raw)) == (
            400, "invalid request body"), raw
    assert err(call(api, "PUT", "/v1/key/generate/k", raw=b"{}", too_large=True)) == (
        400, "invalid request body")
    big = b'{"context":"' + b"A" * MAX_BODY + b'"}'
    assert err(call(api, "PUT", "/v1/key/generate/k", raw=big)) == (400, "invalid request body")
    # empty body, null, unknown fields, case-insensitive names, trailing data: all accepted
    for raw in (b"", b"null", b'{"x":1}', b'{"Context":"e30="}', b'{"context":"e30="} junk'):
        assert call(api, "PUT", "/v1/key/generate/k", raw=raw).status == 200, raw


def test_encrypt_decrypt_and_bulk(api: Api) -> None:
    call(api, "PUT", "/v1/key/create/k")
    ct = js(call(api, "PUT", "/v1/key/encrypt/k", {"plaintext": b64(b"hello"),
                                                   "context": b64(b"c")}))["ciphertext"]
    pt = js(call(api, "PUT", "/v1/key/decrypt/k", {"ciphertext": ct, "context": b64(b"c")}))
    assert base64.b64decode(pt["plaintext"]) == b"hello"
    bulk = js(call(api, "POST", "/v1/key/bulk/decrypt/k",
                   [{"ciphertext": ct, "context": b64(b"c")}] * 3))
    assert bulk == [{"plaintext": b64(b"hello")}] * 3
    assert err(call(api, "POST", "/v1/key/bulk/decrypt/k",
                    [{"ciphertext": ct, "context": b64(b"c")}] * 1001)) == (
        400, "too many ciphertexts")
    assert err(call(api, "POST", "/v1/key/bulk/decrypt/k", [{"ciphertext": ct}])) == (
        400, "decryption failed: ciphertext is not authentic")


def test_decrypt_legacy_ciphertexts_through_api(api: Api, store: FlakyStore) -> None:
    # A key KES <= v0.19.1 stored ({"bytes":…}) and a JSON ciphertext it produced.
    store.create("old", b'{"bytes":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}')
    ct = (b'{"aead":"AES-256-GCM-HMAC-SHA-256","iv":"xLxIN3tSCkg2xMafuvwUwg==",'
          b'"nonce":"gu0mGwUkwcvMEoi5","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}')
    r = js(call(api, "PUT", "/v1/key/decrypt/old", {"ciphertext": b64(ct)}))
    assert r == {"plaintext": "AAAAAAAAAAAAAAAAAAAAAA=="}
    d = js(call(api, "GET", "/v1/key/describe/old"))
    assert d == {"name": "old", "algorithm": "AES256", "created_at": "0001-01-01T00:00:00Z"}
    assert err(call(api, "PUT", "/v1/key/hmac/old", {"message": b64(b"m")})) == (
        409, "key does not support HMAC")


def test_hmac_and_import(api: Api) -> None:
    key = bytes(range(32))
    r = call(api, "PUT", "/v1/key/import/imp", {"key": b64(key), "cipher": "ChaCha20"})
    assert r.status == 200
    assert js(call(api, "GET", "/v1/key/describe/imp"))["algorithm"] == "ChaCha20"
    ct = js(call(api, "PUT", "/v1/key/encrypt/imp", {"plaintext": b64(b"x")}))["ciphertext"]
    from kes import crypto
    assert crypto.decrypt(key, KeyType.CHACHA20, base64.b64decode(ct)) == b"x"
    h1 = js(call(api, "PUT", "/v1/key/hmac/imp", {"message": b64(b"root access key")}))
    h2 = js(call(api, "PUT", "/v1/key/hmac/imp", {"message": b64(b"root access key")}))
    assert h1 == h2 and len(base64.b64decode(h1["hmac"])) == 32
    # legacy body spelling
    assert call(api, "POST", "/v1/key/import/imp2",
                {"bytes": b64(key), "algorithm": "AES256-GCM_SHA256"}).status == 200
    assert err(call(api, "PUT", "/v1/key/import/imp3", {"key": b64(key), "cipher": "DES"})) == (
        406, "algorithm 'DES' is not supported")
    assert err(call(api, "PUT", "/v1/key/import/imp3", {"key": b64(b"short"),
                                                        "cipher": "AES256"})) == (
        406, "invalid key size for 'AES256'")
    assert err(call(api, "PUT", "/v1/key/import/imp3", raw=b"{")) == (
        400, "invalid import key request body")
    assert err(call(api, "PUT", "/v1/key/import/imp", {"key": b64(key), "cipher": "AES256"})) \
        == (400, "key already exists")


def test_delete(api: Api) -> None:
    call(api, "PUT", "/v1/key/create/k")
    assert call(api, "DELETE", "/v1/key/delete/k").status == 200
    assert err(call(api, "GET", "/v1/key/describe/k")) == (404, "key does not exist")
    assert err(call(api, "DELETE", "/v1/key/delete/k")) == (404, "key does not exist")


def test_status_and_ready(api: Api, store: FlakyStore) -> None:
    s = js(call(api, "GET", "/v1/status", identity=MINIO))
    assert list(s) == ["version", "os", "arch", "uptime", "num_cpu", "num_cpu_used",
                       "mem_heap_used", "mem_stack_used", "keystore_latency"]
    assert s["keystore_latency"] == 4 and isinstance(s["uptime"], int)
    assert call(api, "GET", "/v1/ready").status == 200
    store.down = StoreUnreachable
    s = js(call(api, "GET", "/v1/status"))
    assert s["keystore_unreachable"] is True
    assert "keystore_latency" not in s and "keystore_unavailable" not in s
    assert err(call(api, "GET", "/v1/ready")) == (504, "key store is not reachable")
    store.down = StoreError
    assert err(call(api, "GET", "/v1/ready")) == (502, "key store is unavailable")
    assert js(call(api, "GET", "/v1/status"))["keystore_unreachable"] is True


def test_vault_down_gives_fixed_502_texts_and_logs_cause(
        api: Api, store: FlakyStore, caplog: pytest.LogCaptureFixture) -> None:
    call(api, "PUT", "/v1/key/create/k")
    store.down = StoreError
    api.keyring.maintain()
    with caplog.at_level(logging.ERROR, logger="kes.error"):
        assert err(call(api, "PUT", "/v1/key/create/k2")) == (502, "failed to create key")
        assert err(call(api, "GET", "/v1/key/describe/k2")) == (502, "failed to read key")
        assert err(call(api, "DELETE", "/v1/key/delete/k")) == (502, "failed to delete key")
        r = call(api, "GET", "/v1/key/list/")
        assert err(r) == (502, "failed to list keys")
        assert r.body == b'{"message":"failed to list keys"\n}'  # nothing appended
    assert "connection refused" in caplog.text
    for resp_text in ("connection refused", "secret detail"):
        assert resp_text.encode() not in r.body
    store.down = None
    assert call(api, "GET", "/v1/key/describe/k").status == 200


def test_internal_error_gets_fixed_text(api: Api, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    call(api, "PUT", "/v1/key/create/k")
    from kes import crypto

    def boom(*a: Any, **kw: Any) -> bytes:
        raise RuntimeError("internal detail")
    monkeypatch.setattr(crypto, "encrypt", boom)
    with caplog.at_level(logging.ERROR, logger="kes.error"):
        r = call(api, "PUT", "/v1/key/generate/k", {})
    assert err(r) == (500, "failed to generate encryption key")
    assert b"internal detail" not in r.body and "internal detail" in caplog.text


def test_policy_and_identity_apis(api: Api) -> None:
    assert js(call(api, "GET", "/v1/policy/list/")) == {"names": ["minio"], "continue_at": ""}
    assert js(call(api, "GET", "/v1/policy/list/mi*"))["names"] == ["minio"]
    d = js(call(api, "GET", "/v1/policy/describe/minio"))
    assert d["name"] == "minio" and d["created_by"] == ADMIN
    rd = js(call(api, "GET", "/v1/policy/read/minio"))
    assert rd["allow"]["/v1/status"] == {} and "/v1/key/generate/minio-internal*" in rd["deny"]
    assert err(call(api, "GET", "/v1/policy/read/nope")) == (404, "policy does not exist")
    assert err(call(api, "GET", "/v1/policy/read/a.b")) == (
        400, "policy name 'a.b' is empty, too long or contains invalid characters")
    assert js(call(api, "GET", f"/v1/identity/describe/{MINIO}"))["policy"] == "minio"
    assert js(call(api, "GET", f"/v1/identity/describe/{ADMIN}"))["admin"] is True
    assert err(call(api, "GET", f"/v1/identity/describe/{OTHER}")) == (
        404, "identity does not exist")
    assert js(call(api, "GET", "/v1/identity/list/*"))["identities"] == sorted([ADMIN, MINIO])


def test_self_describe_works_for_non_admins(api: Api) -> None:
    me = js(call(api, "GET", "/v1/identity/self/describe", identity=MINIO))
    assert me["identity"] == MINIO and me["policy"] == "minio"
    assert "/v1/key/generate/minio-*" in me["allow"]
    adm = js(call(api, "GET", "/v1/identity/self/describe", identity=ADMIN))
    assert adm["admin"] is True
    assert err(call(api, "GET", "/v1/identity/self/describe", identity=OTHER)) == (
        404, "identity does not exist")


def test_api_route_list(api: Api) -> None:
    routes = js(call(api, "GET", "/v1/api"))
    gen = next(r for r in routes if r["path"] == "/v1/key/generate/")
    assert gen == {"method": "PUT", "path": "/v1/key/generate/", "max_body": 1000000,
                   "timeout": 15}
    assert {r["path"] for r in routes} >= {"/version", "/v1/status", "/v1/key/list/",
                                           "/v1/log/audit", "/v1/identity/self/describe"}


def test_metrics_names_and_counts(api: Api) -> None:
    call(api, "PUT", "/v1/key/create/k")
    call(api, "GET", "/v1/key/describe/nope")
    text = call(api, "GET", "/v1/metrics").body.decode()
    assert 'kes_http_request_success{code="200"} 1' in text
    assert 'kes_http_request_error{code="404"} 1' in text
    for name in ("kes_http_request_failure", "kes_http_request_active",
                 "kes_http_response_time_bucket", "kes_log_audit_events", "kes_system_up_time",
                 "kes_system_num_cpu", "kes_system_mem_heap_used"):
        assert name in text
    assert "_total" not in text and "_created" not in text


@direct_only
def test_audit_and_error_streams_deliver(api: Api, store: FlakyStore) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        audit = await api(Request("GET", "/v1/log/audit", {}, b"", ADMIN))
        error = await api(Request("GET", "/v1/log/error", {}, b"", ADMIN))
        assert audit.content_type == "application/x-ndjson" and audit.stream is not None
        assert error.stream is not None
        a_it, e_it = audit.stream.__aiter__(), error.stream.__aiter__()
        a_first = asyncio.ensure_future(a_it.__anext__())
        e_first = asyncio.ensure_future(e_it.__anext__())
        await asyncio.sleep(0)  # let both subscribe
        await api(Request("PUT", "/v1/key/create/minio-k", {}, b"", MINIO, remote="10.0.0.5"))
        await api(Request("PUT", "/v1/key/generate/minio-k", {}, b"{}", MINIO))
        store.down = StoreError
        api.keyring.maintain()
        await api(Request("PUT", "/v1/key/create/k2", {}, b"", ADMIN))
        audits = [json.loads(await a_first)]
        for _ in range(2):
            audits.append(json.loads(await asyncio.wait_for(a_it.__anext__(), 5)))
        errs = [json.loads(await asyncio.wait_for(e_first, 5))]
        # the streams are async generators; closing them ends their subscriptions
        await cast(AsyncGenerator[bytes, None], a_it).aclose()
        await cast(AsyncGenerator[bytes, None], e_it).aclose()
        return audits, errs

    from kes.audit import HubHandler
    handler = HubHandler(api.error_hub)
    logging.getLogger("kes.error").addHandler(handler)
    try:
        audits, errs = asyncio.run(scenario())
    finally:
        logging.getLogger("kes.error").removeHandler(handler)
    assert audits[0]["request"] == {"ip": "10.0.0.5", "path": "/v1/key/create/minio-k",
                                    "identity": MINIO}
    assert audits[0]["response"]["code"] == 200
    assert audits[1]["request"]["path"] == "/v1/key/generate/minio-k"  # generate is audited
    assert audits[1]["response"]["code"] == 200
    assert audits[2]["response"]["code"] == 502
    assert "cannot create key 'k2'" in errs[0]["message"]
    assert api.audit_hub.subscribers == 0


def test_name_is_checked_before_body(api: Api) -> None:
    r = call(api, "PUT", "/v1/key/generate/a.b", raw=b"{")
    assert err(r) == (400, "key name 'a.b' is empty, too long or contains invalid characters")


@direct_only
def test_cancelled_request_leaves_no_active_count(api: Api, store: FlakyStore) -> None:
    import threading
    gate = threading.Event()
    orig = store.get

    def slow(name: str) -> bytes:
        gate.wait(5)
        return orig(name)
    store.get = slow  # type: ignore[method-assign]
    call(api, "PUT", "/v1/key/create/k")

    async def scenario() -> None:
        task = asyncio.ensure_future(api(Request("PUT", "/v1/key/generate/k", {}, b"{}", ADMIN)))
        while api.metrics.active == 0:
            await asyncio.sleep(0)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(scenario())
    assert api.metrics.active == 0
