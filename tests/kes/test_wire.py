"""The whole KES endpoint over the wire: kes.service + kes.server, real mTLS, a real bao.
Every test runs over HTTP/1.1 and over HTTP/2 (ALPN h2), the two protocols KES serves.

Replays MinIO's call sequence (shared/kes-api.md §4.2) with RSA, ECDSA and Ed25519 client
certificates and with the certificate MinIO derives from a `kes:v1:` API key; uses curl as
an independent client; reads the audit and error log streams; stops and restarts Vault;
and scans everything logged and written for key material.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kes import config as kconf
from kes import keyversion, service
from kes.apikey import APIKey
from kes.identity import of_certificate
from kes.server import ServerThread
from tests.kes.server_util import PROTOCOLS, H2Client, Pki
from tests.support.bao import DevBao
from tests.support.certs import Issued, make_leaf
from tests.support.wait import wait_for

ADMIN_KIND = "ec"
MINIO_CTX = b'{"my-bucket":"my-bucket/my-object"}'


@dataclass
class Client:
    name: str
    ctx: ssl.SSLContext  # no ALPN: HTTP/1.1
    ctx_h2: ssl.SSLContext  # ALPN h2
    identity: str
    cert_file: Path
    key_file: Path


@dataclass
class Env:
    port: int
    pki: Pki
    bao: DevBao
    svc: service.Service
    clients: dict[str, Client]
    proto: str = "http/1.1"

    @property
    def tag(self) -> str:
        """For names that must differ between the two protocols' runs on one key store."""
        return "h2" if self.proto == "h2" else "h1"

    def call(self, who: str, method: str, path: str, body: bytes | None = None, *,
             chunked: bool = True) -> tuple[int, str, bytes]:
        if self.proto == "h2":
            return self._call_h2(who, method, path, body, chunked=chunked)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port,
                                           context=self.clients[who].ctx, timeout=20)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            if body is not None and chunked:
                # What the Go client does: no Content-Length, chunked transfer encoding.
                conn.request(method, path, body=iter([body[:7], body[7:]]), headers=headers,
                             encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.getheader("Content-Type") or "", r.read()
        finally:
            conn.close()

    def _call_h2(self, who: str, method: str, path: str, body: bytes | None, *,
                 chunked: bool) -> tuple[int, str, bytes]:
        client = H2Client(self.port, self.clients[who].ctx_h2, timeout=20)
        try:
            headers: tuple[tuple[str, str], ...] = ()
            if body is not None:
                headers = (("content-type", "application/json"),)
                if not chunked:
                    headers += (("content-length", str(len(body))),)
            if body:
                # What the Go client does over h2: DATA frames, no content-length.
                sid = client.send(method, path, body[:7], headers=headers, end=False)
                client.send_body(sid, body[7:])
            else:
                sid = client.send(method, path, None, headers=headers)
            reply = client.wait(sid).reply()
            return reply.status, reply.headers.get("content-type", ""), reply.body
        finally:
            client.close()

    def json(self, who: str, method: str, path: str, obj: Any = None) -> Any:
        status, ctype, body = self.call(who, method, path,
                                        None if obj is None else json.dumps(obj).encode())
        assert (status, ctype) == (200, "application/json"), (status, body)
        return json.loads(body)

    def stream(self, who: str, path: str) -> LineStream:
        return LineStream(self, who, path)


class LineStream:
    """A log route's NDJSON stream, read line by line over either protocol."""

    def __init__(self, env: Env, who: str, path: str) -> None:
        self._h1: http.client.HTTPSConnection | None = None
        self._h2: H2Client | None = None
        if env.proto == "h2":
            self._h2 = H2Client(env.port, env.clients[who].ctx_h2, timeout=20)
            self._sid = self._h2.send("GET", path, None)
            while not self._h2.streams[self._sid].status:
                assert self._h2.pump()
            stream = self._h2.streams[self._sid]
            self.status, self.content_type = stream.status, stream.headers["content-type"]
            self._buf = b""
        else:
            self._h1 = http.client.HTTPSConnection("127.0.0.1", env.port,
                                                   context=env.clients[who].ctx, timeout=20)
            self._h1.request("GET", path)
            self._resp = self._h1.getresponse()
            self.status = self._resp.status
            self.content_type = self._resp.getheader("Content-Type") or ""

    def readline(self) -> bytes:
        if self._h2 is None:
            return self._resp.readline()
        stream = self._h2.streams[self._sid]
        while b"\n" not in stream.body:
            assert self._h2.pump()
        line, stream.body = stream.body.split(b"\n", 1)
        return line + b"\n"

    def close(self) -> None:
        if self._h2 is not None:
            self._h2.close()
        if self._h1 is not None:
            self._h1.close()


def _client(pki: Pki, name: str, issued: Issued) -> Client:
    cert, key = pki.write_client(issued, name)
    return Client(name, pki.client_context(issued, name),
                  pki.client_context(issued, name, alpn=["h2"]),
                  of_certificate(issued.cert), cert, key)


@pytest.fixture(scope="module")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("kes-wire")
    bao = DevBao(tmp / "bao").start()
    pki = Pki.create(tmp)
    clients = {k: _client(pki, k, make_leaf(None, f"minio-{k}", kind=k, client=True))
               for k in ("rsa", "ec", "ed25519")}
    apikey = APIKey.generate()
    api_issued = Issued(apikey.private_key, apikey.certificate())
    clients["apikey"] = _client(pki, "apikey", api_issued)
    assert clients["apikey"].identity == apikey.identity
    clients["admin"] = _client(pki, "admin", make_leaf(None, "admin", client=True))
    clients["stranger"] = _client(pki, "stranger", make_leaf(None, "stranger", client=True))
    (tmp / "server.crt").write_bytes(pki.server.cert_pem)
    (tmp / "server.key").write_bytes(pki.server.key_pem)
    cfg = kconf.from_section({
        "enabled": True,
        "admin": {"identity": clients["admin"].identity},
        "tls": {"cert": str(tmp / "server.crt"), "key": str(tmp / "server.key")},
        "policy": {"minio": {
            "allow": ["/v1/key/create/minio-*", "/v1/key/generate/minio-*",
                      "/v1/key/decrypt/minio-*", "/v1/key/describe/minio-*", "/v1/key/list/*",
                      "/v1/status", "/v1/api", "/v1/metrics", "/v1/key/hmac/minio-*"],
            "deny": ["/v1/key/generate/minio-internal*"],
            "identities": [clients[k].identity for k in ("rsa", "ec", "ed25519", "apikey")]}},
        "cache": {"expiry": {"any": "5m", "unused": "5m", "offline": "1h"}},
        "keystore": {"vault": {"endpoint": bao.address, "token": "root", "engine": "secret",
                               "version": "v2", "prefix": "kes"}},
    })
    svc = service.build(cfg)
    svc.probe_interval = 0.2  # offline detection in tests: fast, still polled
    with ServerThread(svc.handler, svc.tls) as st:
        yield Env(st.port, pki, bao, svc, clients)
    svc.close()
    bao.stop()


@pytest.fixture(params=PROTOCOLS)
def env(base_env: Env, request: pytest.FixtureRequest) -> Env:
    """The endpoint, spoken to over HTTP/1.1 or HTTP/2 (ALPN h2), as KES serves both."""
    return dataclasses.replace(base_env, proto=request.param)


@pytest.mark.parametrize("who", ["rsa", "ec", "ed25519", "apikey"])
def test_minio_call_sequence(env: Env, who: str) -> None:
    key = f"minio-default-{who}-{env.tag}"
    # startup: keep-alive describe, generate → 404 → create
    assert env.call(who, "GET", f"/v1/key/describe/{key}")[0] == 404
    status, ctype, body = env.call(who, "POST", f"/v1/key/generate/{key}", b'{"context":"e30="}')
    assert (status, ctype, body) == (404, "application/json",
                                     b'{"message":"key does not exist"\n}')
    assert env.call(who, "POST", f"/v1/key/create/{key}")[:2] == (200, "")
    assert env.call(who, "POST", f"/v1/key/create/{key}")[2] == (
        b'{"message":"key already exists"\n}')
    # per-object: generate with MinIO's canonical context, decrypt
    g = env.json(who, "POST", f"/v1/key/generate/{key}",
                 {"context": base64.b64encode(MINIO_CTX).decode()})
    d = env.json(who, "POST", f"/v1/key/decrypt/{key}",
                 {"ciphertext": g["ciphertext"], "context": base64.b64encode(MINIO_CTX).decode()})
    assert d["plaintext"] == g["plaintext"] and len(base64.b64decode(g["plaintext"])) == 32
    # admin: key status = generate + decrypt with the admin context
    actx = base64.b64encode(b'{"MinIO admin API":"KMSKeyStatusHandler"}').decode()
    g2 = env.json(who, "POST", f"/v1/key/generate/{key}", {"context": actx})
    assert env.json(who, "POST", f"/v1/key/decrypt/{key}",
                    {"ciphertext": g2["ciphertext"], "context": actx}) == {
        "plaintext": g2["plaintext"]}
    desc = env.json(who, "GET", f"/v1/key/describe/{key}")
    assert desc["name"] == key and desc["created_by"] == env.clients[who].identity
    assert key in env.json(who, "GET", "/v1/key/list")["names"]  # no trailing slash
    st = env.json(who, "GET", "/v1/status")
    assert isinstance(st["keystore_latency"], int) and "keystore_unreachable" not in st
    assert env.json(who, "GET", "/version")["version"] == "2025-03-12T09-35-18Z"
    assert any(r["path"] == "/v1/key/generate/" for r in env.json(who, "GET", "/v1/api"))
    hm = env.json(who, "PUT", f"/v1/key/hmac/{key}",
                  {"message": base64.b64encode(b"root access key").decode()})
    assert len(base64.b64decode(hm["hmac"])) == 32


def test_key_is_stored_where_kes_stores_it(env: Env) -> None:
    env.call("admin", "POST", "/v1/key/create/layout-check")
    r = env.bao.client().secrets.kv.v2.read_secret_version(
        path="kes/layout-check", mount_point="secret", version=1, raise_on_deleted_version=True)
    kv = keyversion.parse(r["data"]["data"]["layout-check"])
    assert kv.created_by == env.clients["admin"].identity and kv.hmac_key is not None


def test_denied_and_unknown_identities_get_exact_403(env: Env) -> None:
    forbidden = (403, "application/json",
                 b'{"message":"not authorized: insufficient permissions"\n}')
    assert env.call("stranger", "GET", "/v1/status") == forbidden
    assert env.call("ec", "POST", "/v1/key/create/other-key") == forbidden
    assert env.call("ec", "POST", "/v1/key/generate/minio-internal-1", b"{}") == forbidden
    assert env.call("ec", "DELETE", "/v1/key/delete/minio-default-ec") == forbidden
    # /version needs no policy
    assert env.call("stranger", "GET", "/version")[0] == 200


def test_malformed_oversized_and_invalid_names(env: Env) -> None:
    env.call("admin", "POST", "/v1/key/create/minio-body")
    bad = (400, "application/json", b'{"message":"invalid request body"\n}')
    assert env.call("ec", "POST", "/v1/key/generate/minio-body", b'{"context":') == bad
    assert env.call("ec", "POST", "/v1/key/generate/minio-body", b'{"context":"%%"}') == bad
    big = b'{"context":"' + b"A" * 1_000_100 + b'"}'
    # Past the 1 MB limit (per stream over h2), with the same exact text over both.
    assert env.call("ec", "POST", "/v1/key/decrypt/minio-body", big) == bad
    assert env.call("ec", "POST", "/v1/key/generate/minio-body", big, chunked=False) == bad
    status, _, body = env.call("admin", "POST", "/v1/key/create/a%2Fb")
    assert (status, json.loads(body)["message"]) == (
        400, "key name 'a/b' is empty, too long or contains invalid characters")
    status, _, body = env.call("admin", "POST", "/v1/key/create/-x")
    assert status == 400
    assert env.call("admin", "GET", "/v1/nowhere")[:1] == (404,)
    status, _, body = env.call("admin", "GET", "/v1/key/create/x")
    assert (status, json.loads(body)["message"]) == (405, "received method 'GET' expected 'PUT'")


def test_curl_as_independent_client(env: Env) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed (scripts/setup.sh installs it)")
    c = env.clients["rsa"]
    env.call("admin", "POST", f"/v1/key/create/minio-curl-{env.tag}")
    version = "--http2" if env.proto == "h2" else "--http1.1"
    base = [curl, "-sS", version, "--cacert", str(env.pki.ca_file), "--cert", str(c.cert_file),
            "--key", str(c.key_file), "-w", "\n%{http_code}"]
    url = f"https://127.0.0.1:{env.port}"
    chunked = ["-H", "Transfer-Encoding: chunked"] if env.proto != "h2" else []
    out = subprocess.run([*base, "-X", "POST", *chunked,
                          "--data-binary", '{"context":"e30="}',
                          f"{url}/v1/key/generate/minio-curl-{env.tag}"],
                         capture_output=True, check=True, timeout=30).stdout.decode()
    body, code = out.rsplit("\n", 1)
    assert code == "200"
    g = json.loads(body)
    out = subprocess.run([*base, "-X", "PUT", "--data-binary",
                          json.dumps({"ciphertext": g["ciphertext"], "context": "e30="}),
                          f"{url}/v1/key/decrypt/minio-curl-{env.tag}"],
                         capture_output=True, check=True, timeout=30).stdout.decode()
    body, code = out.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["plaintext"] == g["plaintext"]
    out = subprocess.run([*base, "-w", "\n%{http_version}", f"{url}/v1/key/list"],
                         capture_output=True, check=True, timeout=30).stdout.decode()
    assert f"minio-curl-{env.tag}" in out
    assert out.rsplit("\n", 1)[1] == ("2" if env.proto == "h2" else "1.1")


def test_vault_down_then_back(env: Env) -> None:
    env.call("admin", "POST", f"/v1/key/create/minio-cached-{env.tag}")
    env.json("ec", "POST", f"/v1/key/generate/minio-cached-{env.tag}", {})  # now cached
    env.bao.stop()
    try:
        st = env.json("ec", "GET", "/v1/status")
        assert st.get("keystore_unreachable") is True and "keystore_latency" not in st
        status, _, body = env.call("admin", "GET", f"/v1/key/describe/minio-never-read-{env.tag}")
        assert (status, body) == (502, b'{"message":"failed to read key"\n}')
        status, _, body = env.call("admin", "POST", f"/v1/key/create/minio-while-down-{env.tag}")
        assert (status, body) == (502, b'{"message":"failed to create key"\n}')
        status, _, body = env.call("admin", "GET", "/v1/key/list/")
        assert (status, body) == (502, b'{"message":"failed to list keys"\n}')
        # offline mode: the cached key keeps serving MinIO
        assert env.call("ec", "POST", f"/v1/key/generate/minio-cached-{env.tag}", b"{}")[0] == 200
        # connection refused is "unavailable" (502) until the 10 s probe (here 0.2 s)
        # marks the store offline; then "not reachable" (504), as KES (§8.4).
        assert env.call("admin", "GET", "/v1/ready")[0] in (502, 504)
        wait_for(lambda: env.svc.keyring.offline, what="the probe to mark the store offline")
        assert env.call("admin", "GET", "/v1/ready")[2] == (
            b'{"message":"key store is not reachable"\n}')
    finally:
        env.bao.start()  # same port and token; dev storage starts empty
    wait_for(lambda: "keystore_latency" in env.json("ec", "GET", "/v1/status"), timeout=20,
             what="status to report the keystore again", interval=0.05)
    assert env.call("ec", "POST", f"/v1/key/create/minio-after-{env.tag}")[0] == 200
    assert env.call("admin", "GET", "/v1/ready")[:2] == (200, "")


def test_audit_log_stream_over_the_wire(env: Env) -> None:
    key = f"minio-audit-{env.tag}"
    env.call("admin", "POST", f"/v1/key/create/{key}")
    stream = env.stream("admin", "/v1/log/audit")
    try:
        assert (stream.status, stream.content_type) == (200, "application/x-ndjson")
        wait_for(lambda: env.svc.api.audit_hub.subscribers > 0, what="the audit subscriber")
        assert env.call("ec", "POST", f"/v1/key/generate/{key}", b"{}")[0] == 200
        line = json.loads(stream.readline())
        assert line["request"]["path"] == f"/v1/key/generate/{key}"
        assert line["request"]["identity"] == env.clients["ec"].identity
        assert line["response"]["code"] == 200
    finally:
        stream.close()
    wait_for(lambda: env.svc.api.audit_hub.subscribers == 0,
             what="the audit stream to end with its client")


def test_error_log_stream_over_the_wire(env: Env) -> None:
    stream = env.stream("admin", "/v1/log/error")
    try:
        assert (stream.status, stream.content_type) == (200, "application/x-ndjson")
        wait_for(lambda: env.svc.api.error_hub.subscribers > 0, what="the error subscriber")
        env.bao.stop()
        try:
            status, _, body = env.call("admin", "POST", f"/v1/key/create/minio-err-{env.tag}")
            assert (status, body) == (502, b'{"message":"failed to create key"\n}')
        finally:
            env.bao.start()
        # The store's probe (every 0.2 s here) may log its failure first.
        lines = [json.loads(stream.readline())]
        while f"cannot create key 'minio-err-{env.tag}'" not in lines[-1]["message"]:
            assert len(lines) < 50, lines
            lines.append(json.loads(stream.readline()))
        assert {tuple(line) for line in lines} == {("message",)}
        assert lines[-1]["message"].split(" ")[2] == "level=ERROR"
    finally:
        stream.close()
    wait_for(lambda: env.svc.api.error_hub.subscribers == 0,
             what="the error stream to end with its client")


def test_no_key_material_in_logs_or_files(env: Env, caplog: pytest.LogCaptureFixture,
                                          tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    env.call("admin", "POST", f"/v1/key/create/minio-scan-{env.tag}")
    deks = []
    for _ in range(5):
        g = env.json("ec", "POST", f"/v1/key/generate/minio-scan-{env.tag}",
                     {"context": base64.b64encode(MINIO_CTX).decode()})
        deks.append(base64.b64decode(g["plaintext"]))
    env.call("admin", "GET", "/v1/key/describe/none-such")
    env.call("ec", "POST", f"/v1/key/decrypt/minio-scan-{env.tag}", b'{"ciphertext":"AAAA"}')
    stored = env.bao.client().secrets.kv.v2.read_secret_version(
        path=f"kes/minio-scan-{env.tag}", mount_point="secret", version=1,
        raise_on_deleted_version=True)["data"]["data"][f"minio-scan-{env.tag}"]
    kv = keyversion.parse(stored)
    assert kv.hmac_key is not None
    secrets_ = [bytes(kv.key.view), bytes(kv.hmac_key.view), *deks]
    needles = [form for s in secrets_ for form in (s, base64.b64encode(s), s.hex().encode())]
    haystacks = [caplog.text.encode()]
    root = env.pki.tmp
    haystacks += [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    for h in haystacks:
        for n in needles:
            assert n not in h
