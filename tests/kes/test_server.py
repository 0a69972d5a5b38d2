"""The KES transport over real sockets, real TLS and real certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import importlib.util
import json
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from bootkey_core.errors import ConfigError
from kes.identity import of_certificate
from kes.messages import MAX_BODY, Request, Response
from kes.server import ServerThread
from kes.tls_context import TLSConfig, build_context
from tests.kes.server_util import (
    PROTOCOLS,
    Pki,
    Reader,
    Recorder,
    call,
    connect,
    log_stream,
    request,
    wait_for,
)
from tests.support.certs import make_ca, make_leaf


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


@pytest.fixture(params=LOOPS)
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    # The server uses uvloop when it is installed (optional), else asyncio's loop; both
    # must work: asyncio's transports pause writing at once, uvloop's at the end of an
    # iteration, which is what the throttling test catches.
    if request.param == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


@pytest.fixture
def server(pki: Pki, recorder: Recorder,
           loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Iterator[ServerThread]:
    with ServerThread(recorder, pki.tls(), loop_factory=loop_factory) as st:
        yield st


@pytest.fixture
def client_ctx(pki: Pki) -> ssl.SSLContext:
    return pki.client_context(make_leaf(None, "minio", kind="ed25519", client=True))


# Identity -----------------------------------------------------------------------------


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("kind", ["rsa", "ec", "ed25519"])
def test_identity_of_each_key_type_reaches_the_handler(
    pki: Pki, server: ServerThread, recorder: Recorder, *, kind: str, version: ssl.TLSVersion,
    proto: str,
) -> None:
    client = make_leaf(None, f"self-signed-{kind}", kind=kind, client=True)  # type: ignore[arg-type]
    ctx = pki.client_context(client, version=version)
    with connect(server.port, ctx) as s:
        names = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}
        assert s.version() == names[version]
    reply = call(proto, server.port, ctx, "POST", "/v1/key/generate/my-key",
                 body=b'{"context":""}')
    assert reply.status == 200
    assert reply.json()["identity"] == of_certificate(client.cert)
    seen = recorder.requests[0]
    assert seen.identity == of_certificate(client.cert)
    assert seen.peer_cert == client.cert
    assert seen.method == "POST" and seen.path == "/v1/key/generate/my-key"
    assert seen.body == b'{"context":""}'
    assert seen.remote.startswith("127.0.0.1:")
    assert seen.received_ns > 0


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_minio_style_api_key_cert_expired_long_ago_is_accepted_by_default(
    pki: Pki, server: ServerThread, recorder: Recorder, proto: str
) -> None:
    # MinIO's API-key certificate: self-signed Ed25519, 90 days from MinIO's start, no SAN.
    started = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    expired = make_leaf(None, "identity-as-cn", kind="ed25519", client=True, days=90,
                        not_before=started)
    assert call(proto, server.port, pki.client_context(expired), "GET", "/version").status == 200
    assert recorder.requests[0].identity == of_certificate(expired.cert)


def _handshake_refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True if the server refuses: at the handshake (TLS 1.2) or, under TLS 1.3, where the
    client's handshake finishes first, at the first read (alert or bare EOF)."""
    try:
        with connect(port, ctx) as s:
            s.sendall(request("GET", "/version"))
            return s.recv(1024) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_verify_client_rejects_self_signed_and_other_ca_but_accepts_its_ca(pki: Pki) -> None:
    trusted = make_ca("minio-clients")
    other = make_ca("someone-else")
    recorder = Recorder()
    tls = pki.tls(client_ca_pem=trusted.cert_pem, verify_client=True)
    started = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    expired = make_leaf(None, "api-key", kind="ed25519", client=True, days=90, not_before=started)
    foreign = make_leaf(other, "foreign", kind="ec", client=True)
    good = make_leaf(trusted, "minio", kind="ed25519", client=True)
    with ServerThread(recorder, tls) as st:
        assert _handshake_refused(st.port, pki.client_context(expired, "expired"))
        assert _handshake_refused(st.port, pki.client_context(foreign, "foreign"))
        with connect(st.port, pki.client_context(good, "good")) as s:
            s.sendall(request("GET", "/version"))
            assert Reader(s).response().status == 200
    assert [r.identity for r in recorder.requests] == [of_certificate(good.cert)]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_rejected(
    pki: Pki, server: ServerThread, recorder: Recorder, version: ssl.TLSVersion
) -> None:
    assert _handshake_refused(server.port, pki.client_context(None, version=version))
    assert recorder.requests == []


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
def test_tls_1_1_is_refused(pki: Pki, server: ServerThread, client_ctx: ssl.SSLContext) -> None:
    client = make_leaf(None, "old", kind="ec", client=True)
    ctx = pki.client_context(client, version=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        connect(server.port, ctx).close()


@pytest.mark.parametrize(("offered", "chosen"), [
    (["h2", "http/1.1"], "h2"),  # Go with ForceAttemptHTTP2, curl: as KES, h2
    (["http/1.1"], "http/1.1"),
    (["h2"], "h2"),
    (None, None),  # no ALPN at all: HTTP/1.1 (every other test here speaks it so)
])
def test_alpn_picks_h2_when_offered_else_http11(pki: Pki, server: ServerThread,
                                                 offered: list[str] | None,
                                                 chosen: str | None) -> None:
    client = make_leaf(None, "go", kind="ed25519", client=True)
    with connect(server.port, pki.client_context(client, alpn=offered)) as s:
        assert s.selected_alpn_protocol() == chosen


def test_http11_only_context_never_picks_h2(pki: Pki) -> None:
    client = make_leaf(None, "go", kind="ed25519", client=True)
    with ServerThread(Recorder(), build_context(pki.tls(), http2=False)) as st, \
            connect(st.port, pki.client_context(client, alpn=["h2", "http/1.1"])) as s:
        assert s.selected_alpn_protocol() == "http/1.1"


def test_session_resumption_keeps_the_identity(pki: Pki, server: ServerThread,
                                                recorder: Recorder) -> None:
    client = make_leaf(None, "resumer", kind="ed25519", client=True)
    ctx = pki.client_context(client)
    with connect(server.port, ctx) as s:
        s.sendall(request("GET", "/v1/status"))
        Reader(s).response()  # TLS 1.3 tickets arrive after the handshake; read past them
        session = s.session
    assert session is not None
    for _ in range(3):
        with connect(server.port, ctx, session=session) as s:
            assert s.session_reused
            s.sendall(request("GET", "/v1/status"))
            assert Reader(s).response().json()["identity"] == of_certificate(client.cert)
    assert {r.identity for r in recorder.requests} == {of_certificate(client.cert)}


def test_curl_with_client_certificate(pki: Pki, server: ServerThread, recorder: Recorder) -> None:
    client = make_leaf(None, "curl", kind="ed25519", client=True)
    cert, key = pki.write_client(client, "curl")
    out = subprocess.run(
        ["curl", "-sS", "--http1.1", "--fail-with-body", "--cacert", str(pki.ca_file),
         "--cert", str(cert), "--key", str(key), "-H", "Transfer-Encoding: chunked",
         "--data-binary", "@-",
         f"https://127.0.0.1:{server.port}/v1/key/decrypt/k"],
        input=b'{"ciphertext":"abc"}', capture_output=True, timeout=30, check=True,
    )
    assert json.loads(out.stdout)["identity"] == of_certificate(client.cert)
    assert recorder.requests[0].body == b'{"ciphertext":"abc"}'
    assert recorder.requests[0].headers["transfer-encoding"] == "chunked"


# HTTP framing -------------------------------------------------------------------------


def test_chunked_body_as_the_go_client_sends_it(
    server: ServerThread, client_ctx: ssl.SSLContext, recorder: Recorder
) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_ctx, timeout=10)
    pieces = [b'{"context":', b'"bWluaW8="', b"}"]
    conn.request("POST", "/v1/key/generate/k", body=iter(pieces), encode_chunked=True,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    conn.close()
    seen = recorder.requests[0]
    assert seen.body == b'{"context":"bWluaW8="}'
    assert "content-length" not in seen.headers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_flagged_and_cut_and_the_connection_stays_usable(
    server: ServerThread, client_ctx: ssl.SSLContext, recorder: Recorder, chunked: bool
) -> None:
    body = b"x" * (MAX_BODY + 1000)
    with connect(server.port, client_ctx) as s:
        if chunked:
            half = len(body) // 2
            s.sendall(b"POST /v1/key/import/k HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n" + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n"
                      % (half, body[:half], len(body) - half, body[half:]))
        else:
            s.sendall(request("POST", "/v1/key/import/k", body))
        reader = Reader(s)
        assert reader.response().status == 200
        s.sendall(request("POST", "/v1/key/import/k", b"small"))
        assert reader.response().status == 200
    big, small = recorder.requests
    assert big.body_too_large and len(big.body) == MAX_BODY
    assert not small.body_too_large and small.body == b"small"


def test_body_of_exactly_max_body_is_not_flagged(
    server: ServerThread, client_ctx: ssl.SSLContext, recorder: Recorder
) -> None:
    with connect(server.port, client_ctx) as s:
        s.sendall(request("POST", "/v1/key/import/k", b"y" * MAX_BODY))
        Reader(s).response()
    assert not recorder.requests[0].body_too_large
    assert len(recorder.requests[0].body) == MAX_BODY


@pytest.mark.parametrize(
    "raw",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
     b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"GET /%ff%fe HTTP/1.1\r\nHost: h\r\n\r\n"],
    ids=["request-line", "header", "length-and-chunked", "path-not-utf8"],
)
def test_malformed_request_gets_400_and_close(
    server: ServerThread, client_ctx: ssl.SSLContext, recorder: Recorder, raw: bytes
) -> None:
    with connect(server.port, client_ctx) as s:
        s.sendall(raw)
        reader = Reader(s)
        reply = reader.response()
        assert reply.status == 400
        assert reply.body == b"400 Bad Request"
        assert reply.headers["connection"] == "close"
        assert reader.at_eof()
    assert recorder.requests == []


def test_huge_request_head_gets_431(server: ServerThread, client_ctx: ssl.SSLContext) -> None:
    with connect(server.port, client_ctx) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert Reader(s).response().status == 431


def test_pipelined_requests_are_answered_in_order(
    server: ServerThread, client_ctx: ssl.SSLContext
) -> None:
    paths = [f"/v1/key/describe/k{i}" for i in range(50)]
    with connect(server.port, client_ctx) as s:
        s.sendall(b"".join(request("GET", p) for p in paths))
        reader = Reader(s)
        assert [reader.response().json()["path"] for _ in paths] == paths


def test_connection_close_is_honoured_with_close_notify(
    server: ServerThread, client_ctx: ssl.SSLContext
) -> None:
    # ragged EOFs raise: a clean EOF (b"") proves the server sent close_notify first.
    with connect(server.port, client_ctx, ragged_eof_is_error=True) as s:
        s.sendall(request("GET", "/version", headers="Connection: close\r\n"))
        reader = Reader(s)
        reply = reader.response()
        assert reply.status == 200 and reply.headers["connection"] == "close"
        assert reader.at_eof()


def test_http10_keep_alive_as_ab_sends_it(
    server: ServerThread, client_ctx: ssl.SSLContext, recorder: Recorder
) -> None:
    with connect(server.port, client_ctx) as s:
        reader = Reader(s)
        for _ in range(3):
            s.sendall(b"GET /version HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            reply = reader.response()
            assert reply.status == 200
            assert reply.headers["connection"] == "keep-alive"
        s.sendall(b"GET /version HTTP/1.0\r\n\r\n")  # no keep-alive: answered, then closed
        assert reader.response().status == 200
        assert reader.at_eof()
    assert len(recorder.requests) == 4


def test_expect_100_continue(server: ServerThread, client_ctx: ssl.SSLContext,
                             recorder: Recorder) -> None:
    with connect(server.port, client_ctx) as s:
        s.sendall(b"POST /v1/key/import/k HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        reader = Reader(s)
        assert reader.response().status == 100
        s.sendall(b"body")
        assert reader.response().status == 200
    assert recorder.requests[0].body == b"body"


def test_query_is_dropped_and_path_percent_decoded(
    server: ServerThread, client_ctx: ssl.SSLContext, recorder: Recorder
) -> None:
    with connect(server.port, client_ctx) as s:
        s.sendall(request("GET", "/v1/key/list/my%2Akey?x=1"))
        Reader(s).response()
    assert recorder.requests[0].path == "/v1/key/list/my*key"


def test_handler_error_is_a_500_and_the_connection_survives(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    async def broken(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("bug")
        return Response(200, b"{}")

    with ServerThread(broken, pki.tls()) as st, connect(st.port, client_ctx) as s:
        reader = Reader(s)
        s.sendall(request("GET", "/boom"))
        reply = reader.response()
        assert reply.status == 500 and reply.headers["content-type"] == "application/json"
        s.sendall(request("GET", "/ok"))
        assert reader.response().status == 200


def test_response_headers_and_empty_body(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    async def handler(request: Request) -> Response:
        return Response(405, b'{"message":"x"}', headers=(("Accept", "POST"),))

    async def empty(request: Request) -> Response:
        return Response(200, b"", content_type=None)

    with ServerThread(handler, pki.tls()) as st, connect(st.port, client_ctx) as s:
        s.sendall(request("GET", "/v1/key/create/k"))
        reply = Reader(s).response()
        assert reply.status == 405 and reply.headers["accept"] == "POST"
    with ServerThread(empty, pki.tls()) as st, connect(st.port, client_ctx) as s:
        s.sendall(request("POST", "/v1/key/create/k"))
        reply = Reader(s).response()
        assert reply.status == 200 and reply.headers["content-length"] == "0"
        assert "content-type" not in reply.headers


# Streaming and backpressure -----------------------------------------------------------


def test_streaming_response_ends_when_the_client_disconnects(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    ended: list[bool] = []

    async def handler(request: Request) -> Response:
        return Response(200, stream=log_stream(ended))

    with ServerThread(handler, pki.tls()) as st:
        with connect(st.port, client_ctx) as s:
            s.sendall(request("GET", "/v1/log/audit"))
            reader = Reader(s)
            head = reader._line()
            assert head.startswith(b"HTTP/1.1 200")
            while reader._line():
                pass
            assert [reader.next_chunk() for _ in range(3)] == [
                b'{"event":0}\n', b'{"event":1}\n', b'{"event":2}\n']
        wait_for(lambda: ended == [True], what="stream to end after the client left")
        wait_for(lambda: not st.server.connections, what="connection cleanup")


def test_finite_stream_is_chunked_and_connection_reused(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    async def handler(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for part in (b"a", b"", b"bc"):
                yield part

        return Response(200, stream=gen() if request.path == "/s" else None, body=b"{}")

    with ServerThread(handler, pki.tls()) as st, connect(st.port, client_ctx) as s:
        reader = Reader(s)
        s.sendall(request("GET", "/s"))
        reply = reader.response()
        assert reply.headers["transfer-encoding"] == "chunked" and reply.body == b"abc"
        s.sendall(request("GET", "/x"))
        assert reader.response().body == b"{}"


def test_stream_that_never_suspends_is_held_back_by_a_slow_client(
    pki: Pki, client_ctx: ssl.SSLContext, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    piece = b"s" * 256 * 1024
    count = 200  # 50 MiB if the server buffered the whole stream
    buffered: list[int] = []
    holder: list[ServerThread] = []

    async def handler(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(count):
                conns = list(holder[0].server.connections)
                if conns and conns[0]._transport is not None:
                    buffered.append(conns[0]._transport.get_write_buffer_size())
                yield piece  # no await in between: nothing here ever suspends

        return Response(200, stream=gen(), content_type="application/octet-stream")

    with (
        ServerThread(handler, pki.tls(), loop_factory=loop_factory) as st,
        connect(st.port, client_ctx) as s,
    ):
        holder.append(st)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(request("GET", "/v1/log/audit"))
        # Read nothing until the server either waits for the client to drain or has
        # produced the whole stream (which it must not: that is 50 MiB in its buffers).
        wait_for(lambda: len(buffered) == count or any(
            getattr(c, "_drain", None) is not None for c in st.server.connections),
            what="stream to stall")
        reply = Reader(s).response()
    assert len(reply.body) == count * len(piece)
    assert len(buffered) == count
    assert max(buffered) < 8 * 1024 * 1024, max(buffered)


def test_large_response_arrives_intact(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: many TLS records, transport buffering

    async def handler(request: Request) -> Response:
        return Response(200, payload, content_type="application/octet-stream")

    with ServerThread(handler, pki.tls()) as st, connect(st.port, client_ctx) as s:
        reader = Reader(s)
        s.sendall(request("GET", "/a") + request("GET", "/b"))
        assert reader.response().body == payload
        assert reader.response().body == payload


def test_client_that_pipelines_without_reading_is_throttled(
    pki: Pki, client_ctx: ssl.SSLContext, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    payload = b"z" * 256 * 1024
    calls: list[int] = []

    async def handler(request: Request) -> Response:
        calls.append(1)
        return Response(200, payload)

    total = 400  # 100 MiB of answers if the server kept going
    with (
        ServerThread(handler, pki.tls(), loop_factory=loop_factory) as st,
        connect(st.port, client_ctx) as s,
    ):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(None)
        s.setblocking(False)
        batch = b"".join(request("GET", f"/{i}") for i in range(total))
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(batch) and time.monotonic() < deadline:
            try:
                sent += s.send(batch[sent:sent + 16384])
            except (ssl.SSLWantWriteError, BlockingIOError):
                if len(calls) > 0:
                    break
        # The server must stop answering once its writes back up: wait until the count
        # stops moving, then check that it stopped far short of `total`.
        last = -1
        while last != len(calls):
            last = len(calls)
            t = time.monotonic() + 0.3
            while time.monotonic() < t and last == len(calls):
                time.sleep(0.01)
        assert len(calls) < total // 2
        s.setblocking(True)
        s.settimeout(10)


# Timeouts -----------------------------------------------------------------------------


def _closed_within(s: ssl.SSLSocket, low: float, high: float) -> float:
    start = time.monotonic()
    s.settimeout(high + 2)
    try:
        while s.recv(1024):
            pass
    except (ssl.SSLError, ConnectionResetError):
        pass
    elapsed = time.monotonic() - start
    assert low <= elapsed <= high, elapsed
    return elapsed


def test_header_timeout_fires(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    with (
        ServerThread(Recorder(), pki.tls(), header_timeout=0.3) as st,
        connect(st.port, client_ctx) as s,
    ):
        s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        _closed_within(s, 0.25, 2.0)


def test_idle_timeout_fires_after_a_request(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    with (
        ServerThread(Recorder(), pki.tls(), idle_timeout=0.4) as st,
        connect(st.port, client_ctx) as s,
    ):
        s.sendall(request("GET", "/version"))
        reader = Reader(s)
        assert reader.response().status == 200
        start = time.monotonic()
        assert reader.at_eof()  # a clean close_notify, not a reset
        assert 0.3 <= time.monotonic() - start <= 2.0


def test_body_timeout_fires(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    with (
        ServerThread(Recorder(), pki.tls(), body_timeout=0.3) as st,
        connect(st.port, client_ctx) as s,
    ):
        s.sendall(b"POST /v1/key/import/k HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        _closed_within(s, 0.25, 2.0)


def test_handshake_timeout_fires(pki: Pki) -> None:
    with ServerThread(Recorder(), pki.tls(), handshake_timeout=0.3) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=5)
        start = time.monotonic()
        with raw:
            assert raw.recv(1) == b""  # the server hung up on a client that never said hello
        assert 0.25 <= time.monotonic() - start <= 2.0
        wait_for(lambda: not st.server.connections, what="connection cleanup")


def test_slow_but_steady_keep_alive_client_is_not_cut(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    # The idle timer restarts after every response: 5 requests spaced by half the idle
    # timeout must all succeed on one connection.
    # (Margins wide enough for a loaded 2-core CI machine: gaps of 0.4 s, timeout 1.2 s.)
    with (
        ServerThread(Recorder(), pki.tls(), idle_timeout=1.2) as st,
        connect(st.port, client_ctx) as s,
    ):
        reader = Reader(s)
        for _ in range(5):
            s.sendall(request("GET", "/version"))
            assert reader.response().status == 200
            t = time.monotonic() + 0.4
            while time.monotonic() < t:
                time.sleep(0.02)


# Lifecycle and configuration ----------------------------------------------------------


def test_stop_closes_idle_connections_cleanly(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    st = ServerThread(Recorder(), pki.tls())
    with st, connect(st.port, client_ctx) as s:
        s.sendall(request("GET", "/version"))
        reader = Reader(s)
        reader.response()
        st.__exit__(None, None, None)
        assert reader.at_eof()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", st.port), timeout=2)


def test_bad_tls_config_is_a_config_error(pki: Pki) -> None:
    other = make_leaf(pki.ca, "other", ips=["127.0.0.1"])
    no_san = make_leaf(pki.ca, "nosan")
    with pytest.raises(ConfigError, match="does not match"):
        ServerThread(Recorder(), TLSConfig(pki.server.cert_pem, other.key_pem))
    with pytest.raises(ConfigError, match="subject alternative name"):
        ServerThread(Recorder(), TLSConfig(no_san.cert_pem, no_san.key_pem))
    with pytest.raises(ConfigError, match="private key: cannot load") as err:
        ServerThread(Recorder(), TLSConfig(pki.server.cert_pem, b"-----BEGIN PRIVATE KEY-----x"))
    assert "BEGIN" not in str(err.value)
    with pytest.raises(ConfigError, match="no CA"):
        ServerThread(Recorder(), pki.tls(verify_client=True))


def test_tls_config_repr_hides_the_key(pki: Pki) -> None:
    assert b"PRIVATE" in pki.server.key_pem
    assert "PRIVATE" not in repr(pki.tls())


def test_shared_context_is_accepted(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    from kes.tls_context import build_context

    ctx = build_context(pki.tls())
    assert isinstance(ctx, SSL.Context)
    with ServerThread(Recorder(), ctx) as st, connect(st.port, client_ctx) as s:
        s.sendall(request("GET", "/version"))
        assert Reader(s).response().status == 200


def test_handlers_may_use_asyncio_timeout_after_their_first_suspension(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    # The documented limit of eager handlers on Python 3.11: Task-bound helpers only after
    # the first real suspension. wait_for works from the start.
    async def handler(request: Request) -> Response:
        await asyncio.wait_for(asyncio.sleep(0), 1.0)
        await asyncio.sleep(0)
        async with asyncio.timeout(1.0):
            await asyncio.sleep(0)
        return Response(200, b"{}")

    with ServerThread(handler, pki.tls()) as st, connect(st.port, client_ctx) as s:
        reader = Reader(s)
        for _ in range(3):
            s.sendall(request("GET", "/x"))
            assert reader.response().status == 200


def test_request_then_half_close_still_gets_its_answer(
    server: ServerThread, client_ctx: ssl.SSLContext
) -> None:
    # Some clients send the request and shut down their write side (TCP FIN, no
    # close_notify); the answer must still arrive, then the server closes.
    with connect(server.port, client_ctx, ragged_eof_is_error=False) as s:
        s.sendall(request("GET", "/version"))
        socket.socket.shutdown(s, socket.SHUT_WR)  # ssl.SSLSocket.shutdown drops TLS
        reader = Reader(s)
        assert reader.response().status == 200
        assert reader.at_eof()
