"""The KES transport over HTTP/2 (ALPN h2): real TLS sockets, the h2 library as client,
and curl. What HTTP/1.1 framing covers (pipelining, chunked, 100-continue) is in
test_server.py; the same API over both protocols is in test_wire.py and test_api_wire.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from kes import http2
from kes.identity import of_certificate
from kes.messages import MAX_BODY, Request, Response
from kes.serve_http2 import HTTP2Connection
from kes.server import ServerThread
from tests.kes.server_util import H2Client, Pki, Recorder, connect, log_stream, wait_for
from tests.support.certs import Issued, make_leaf


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


@pytest.fixture
def client() -> Issued:
    return make_leaf(None, "minio", kind="ed25519", client=True)


@pytest.fixture
def client_ctx(pki: Pki, client: Issued) -> ssl.SSLContext:
    return pki.client_context(client)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(pki: Pki, recorder: Recorder) -> Iterator[ServerThread]:
    with ServerThread(recorder, pki.tls()) as st:
        yield st


def _serve(handler: Callable[[Request], Response] | None = None) -> Recorder:
    return Recorder(respond=handler)


# Negotiation and settings ---------------------------------------------------------------


def test_settings_allow_100_streams_and_a_whole_body_per_window(
    server: ServerThread, client_ctx: ssl.SSLContext
) -> None:
    c = H2Client(server.port, client_ctx)
    c.request("GET", "/version")
    codes = h2.settings.SettingCodes
    assert c.remote_settings[codes.MAX_CONCURRENT_STREAMS] >= 100
    assert c.remote_settings[codes.INITIAL_WINDOW_SIZE] >= MAX_BODY
    c.close()


def test_each_stream_carries_the_connections_identity(
    server: ServerThread, client_ctx: ssl.SSLContext, client: Issued, recorder: Recorder
) -> None:
    c = H2Client(server.port, client_ctx)
    sids = [c.send("POST", f"/v1/key/generate/k{i}", b'{"n":%d}' % i) for i in range(120)]
    replies = [c.wait(sid).reply() for sid in sids]
    c.close()
    assert {r.status for r in replies} == {200}
    assert [r.json()["path"] for r in replies] == [f"/v1/key/generate/k{i}" for i in range(120)]
    assert {r.json()["identity"] for r in replies} == {of_certificate(client.cert)}
    assert {r.headers["content-type"] for r in replies} == {"application/json"}
    assert all(q.remote.startswith("127.0.0.1:") for q in recorder.requests)


def test_a_slow_call_does_not_hold_up_the_others(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            await release.wait()
        return Response(200, request.path.encode())

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        slow = c.send("GET", "/slow")
        fast = [c.send("GET", f"/fast{i}") for i in range(5)]
        assert [c.wait(sid).body for sid in fast] == [f"/fast{i}".encode() for i in range(5)]
        assert not c.streams[slow].ended
        assert st.loop is not None
        st.loop.call_soon_threadsafe(release.set)
        assert c.wait(slow).body == b"/slow"
        c.close()


def test_curl_http2_with_client_certificate(pki: Pki, server: ServerThread,
                                            client: Issued, recorder: Recorder) -> None:
    cert, key = pki.write_client(client, "curl")
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--fail-with-body", "--cacert", str(pki.ca_file),
         "--cert", str(cert), "--key", str(key), "--data-binary", "@-",
         "-w", "\n%{http_version}", f"https://127.0.0.1:{server.port}/v1/key/decrypt/k"],
        input=b'{"ciphertext":"abc"}', capture_output=True, timeout=30, check=True,
    )
    body, version = out.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert json.loads(body)["identity"] == of_certificate(client.cert)
    assert recorder.requests[0].body == b'{"ciphertext":"abc"}'


# Bodies and responses -------------------------------------------------------------------


def test_body_of_exactly_max_body_is_not_flagged(server: ServerThread,
                                                 client_ctx: ssl.SSLContext) -> None:
    c = H2Client(server.port, client_ctx)
    reply = c.request("POST", "/v1/key/import/k", b"x" * MAX_BODY)
    assert reply.json()["len"] == MAX_BODY and reply.json()["too_large"] is False
    c.close()


def test_oversized_body_is_cut_flagged_and_the_rest_refused(
    server: ServerThread, client_ctx: ssl.SSLContext
) -> None:
    c = H2Client(server.port, client_ctx)
    sid = c.send("POST", "/v1/key/import/k", b"y" * (MAX_BODY + 5000), end=False)
    s = c.wait(sid)
    assert s.status == 200
    assert json.loads(s.body) == {"identity": json.loads(s.body)["identity"],
                                  "path": "/v1/key/import/k", "method": "POST",
                                  "len": MAX_BODY, "too_large": True}
    while s.reset is None:  # answered early, the rest refused with RST_STREAM(NO_ERROR)
        assert c.pump()
    assert s.reset == h2.errors.ErrorCodes.NO_ERROR
    assert c.request("GET", "/after").status == 200  # the connection stays usable
    c.close()


def test_large_response_waits_for_the_clients_window(pki: Pki,
                                                     client_ctx: ssl.SSLContext) -> None:
    payload = bytes(range(256)) * (8 * 1024)  # 2 MiB: 32 times the client's initial window

    async def handler(request: Request) -> Response:
        return Response(200, payload, content_type="application/octet-stream")

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        replies = [c.wait(sid).reply() for sid in [c.send("GET", "/a"), c.send("GET", "/b")]]
        c.close()
    assert [r.body == payload for r in replies] == [True, True]
    assert replies[0].headers["content-length"] == str(len(payload))


def test_handler_error_is_a_500_and_other_streams_go_on(pki: Pki,
                                                       client_ctx: ssl.SSLContext) -> None:
    def respond(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return Response(200, b"{}")

    with ServerThread(_serve(respond), pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        boom = c.request("GET", "/boom")
        assert (boom.status, boom.body) == (500, b'{"message":"internal server error"}\n')
        assert c.request("GET", "/ok").status == 200
        c.close()


def test_response_headers_are_sent_lower_case(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    with ServerThread(_serve(lambda r: Response(405, b"{}", headers=(("Accept", "PUT"),))),
                      pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        reply = c.request("GET", "/v1/key/create/k")
        c.close()
    assert (reply.status, reply.headers["accept"]) == (405, "PUT")


# Streams: log routes, resets, backpressure ----------------------------------------------


def test_log_stream_sends_data_until_the_client_resets_it(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    ended: list[bool] = []

    async def handler(request: Request) -> Response:
        if request.path == "/v1/log/audit":
            return Response(200, stream=log_stream(ended))
        return Response(200, b"{}")

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        sid = c.send("GET", "/v1/log/audit")
        while c.streams[sid].body.count(b"\n") < 3:
            assert c.pump()
        assert c.streams[sid].body == b'{"event":0}\n{"event":1}\n{"event":2}\n'
        assert not c.streams[sid].ended
        c.reset(sid)
        wait_for(lambda: ended == [True], what="the stream to end after RST_STREAM")
        assert c.request("GET", "/other").status == 200  # only the stream ended
        c.close()
        wait_for(lambda: not st.server.connections, what="connection cleanup")


def test_finite_stream_ends_with_end_stream(pki: Pki, client_ctx: ssl.SSLContext) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for part in (b"a", b"", b"bc"):
            yield part

    async def handler(request: Request) -> Response:
        return Response(200, stream=gen())

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        reply = c.request("GET", "/v1/log/error")
        c.close()
    assert (reply.status, reply.body) == (200, b"abc")
    assert "content-length" not in reply.headers


def test_stream_that_never_suspends_is_held_back_by_the_clients_window(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    piece = b"s" * 64 * 1024
    produced: list[int] = []

    async def handler(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(1000):  # 64 MiB if nothing held it back
                produced.append(i)
                yield piece  # no await in between: nothing here ever suspends

        return Response(200, stream=gen(), content_type="application/octet-stream")

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        c.send("GET", "/v1/log/audit")
        # The client reads nothing: its 64 KiB window stops the server after one piece.
        wait_for(lambda: any(isinstance(conn, HTTP2Connection) and conn._h2.blocked
                             for conn in st.server.connections),
                 what="the stream to wait for the window")
        assert len(produced) <= 2
        c.close()


def test_client_reset_cancels_a_suspended_handler(pki: Pki,
                                                  client_ctx: ssl.SSLContext) -> None:
    cancelled: list[bool] = []

    async def handler(request: Request) -> Response:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return Response(200)

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        sid = c.send("GET", "/v1/key/generate/k")
        wait_for(lambda: any(conn.deadline is None for conn in st.server.connections),
                 what="the handler to run")
        c.reset(sid)
        wait_for(lambda: cancelled == [True], what="the handler to be cancelled")
        c.close()


def test_rapid_reset_flood_gets_goaway(server: ServerThread,
                                       client_ctx: ssl.SSLContext) -> None:
    """CVE-2023-44487: open and reset streams as fast as possible."""
    c = H2Client(server.port, client_ctx)
    for _ in range(http2.RESET_LIMIT * 3):
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(":method", "GET"), (":path", "/v1/key/list/"),
                                  (":scheme", "https"), (":authority", "127.0.0.1")])
        c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    with contextlib.suppress(OSError):  # the server may already have closed
        c.flush()
    goaway = c.wait_goaway()
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    while c.pump():
        pass  # and then the connection ends
    c.close()


def test_resets_within_the_limit_are_fine(server: ServerThread,
                                          client_ctx: ssl.SSLContext) -> None:
    c = H2Client(server.port, client_ctx)
    for _ in range(http2.RESET_LIMIT // 2):
        c.reset(c.send("GET", "/v1/key/list/", end=False))
    assert c.request("GET", "/v1/status").status == 200
    assert c.goaway is None
    c.close()


def test_protocol_error_gets_goaway(server: ServerThread, client_ctx: ssl.SSLContext) -> None:
    c = H2Client(server.port, client_ctx)
    c.request("GET", "/version")
    c.sock.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
    goaway = c.wait_goaway()
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    c.close()


# Lifecycle and timeouts -----------------------------------------------------------------


def test_shutdown_sends_goaway_and_answers_the_streams_in_flight(
    pki: Pki, client_ctx: ssl.SSLContext
) -> None:
    started = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        await asyncio.sleep(0.3)
        return Response(200, b'{"done":true}')

    st = ServerThread(handler, pki.tls(), shutdown_grace=5.0)
    with st:
        c = H2Client(st.port, client_ctx)
        sid = c.send("POST", "/v1/key/generate/k", b"{}")
        wait_for(started.is_set, what="the handler to start")
        st.__exit__(None, None, None)  # graceful: GOAWAY, then the answer, then close
    goaway = c.wait_goaway()
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == sid
    assert c.wait(sid).reply().body == b'{"done":true}'
    while c.pump():
        pass
    c.close()


def test_idle_connection_gets_goaway_after_the_idle_timeout(pki: Pki,
                                                            client_ctx: ssl.SSLContext) -> None:
    with ServerThread(Recorder(), pki.tls(), idle_timeout=0.3) as st:
        c = H2Client(st.port, client_ctx)
        c.request("GET", "/version")
        assert c.wait_goaway().error_code == h2.errors.ErrorCodes.NO_ERROR
        while c.pump():
            pass
        c.close()


def test_silent_client_is_cut_after_the_header_timeout(pki: Pki,
                                                       client_ctx: ssl.SSLContext) -> None:
    client_ctx.set_alpn_protocols(["h2"])
    with ServerThread(Recorder(), pki.tls(), header_timeout=0.3) as st, \
            connect(st.port, client_ctx) as s:
        assert s.selected_alpn_protocol() == "h2"
        s.settimeout(10)
        data = b""
        while chunk := s.recv(65536):  # our SETTINGS, then GOAWAY and the close
            data += chunk
        assert data  # the server spoke first (its SETTINGS) and then closed


def test_stalled_body_is_cut_after_the_body_timeout(pki: Pki,
                                                    client_ctx: ssl.SSLContext) -> None:
    with ServerThread(Recorder(), pki.tls(), body_timeout=0.3) as st:
        c = H2Client(st.port, client_ctx)
        c.send("POST", "/v1/key/import/k", b"partial", end=False)
        c.wait_goaway()
        while c.pump():
            pass
        c.close()


def test_body_dripped_in_does_not_outlast_the_body_timeout(pki: Pki,
                                                          client_ctx: ssl.SSLContext) -> None:
    with ServerThread(Recorder(), pki.tls(), body_timeout=0.5) as st:
        c = H2Client(st.port, client_ctx)
        sid = c.send("POST", "/v1/key/import/k", b"{", end=False)
        c.sock.settimeout(0.1)
        with contextlib.suppress(OSError):  # the server cuts us off while we drip
            for _ in range(100):  # a byte every 0.1 s for up to 10 s
                c.send_body(sid, b" ", end=False)
                with contextlib.suppress(TimeoutError):
                    c.pump()
                if c.goaway is not None or c.closed:
                    break
        assert c.goaway is not None or c.closed
        c.close()


def test_plain_socket_without_alpn_still_speaks_http11(server: ServerThread,
                                                       client_ctx: ssl.SSLContext) -> None:
    with connect(server.port, client_ctx) as s:
        assert s.selected_alpn_protocol() is None
        s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        s.settimeout(10)
        assert s.recv(100).startswith(b"HTTP/1.1 200")


def test_connection_count_drops_when_h2_clients_leave(server: ServerThread,
                                                      client_ctx: ssl.SSLContext) -> None:
    clients = [H2Client(server.port, client_ctx) for _ in range(3)]
    for c in clients:
        c.request("GET", "/version")
    assert len(server.server.connections) == 3
    for c in clients:
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    wait_for(lambda: not server.server.connections, what="connections to go")


# The framing alone (kes.http2, no sockets) ----------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def _pair(clock: _Clock) -> tuple[http2.Connection, h2.connection.H2Connection]:
    server = http2.Connection(identity="ab" * 32, peer_cert=None, remote="x:1", clock=clock)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.feed(client.data_to_send())
    client.receive_data(server.data_to_send())
    return server, client


def _open_and_reset(client: h2.connection.H2Connection) -> None:
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "GET"), (":path", "/v1/status"),
                              (":scheme", "https"), (":authority", "x")])
    client.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)


def test_resets_spread_over_time_stay_under_the_limit() -> None:
    clock = _Clock()
    server, client = _pair(clock)
    for _ in range(10):  # RESET_LIMIT * 0.8 per second, for ten seconds
        for _ in range(http2.RESET_LIMIT * 8 // 10):
            _open_and_reset(client)
        events = server.feed(client.data_to_send())
        assert {type(e) for e in events} == {http2.Cancel}
        clock.ns += 1_000_000_000
    assert not server.goaway_sent


def test_burst_of_resets_within_a_second_ends_the_connection() -> None:
    clock = _Clock()
    server, client = _pair(clock)
    for _ in range(http2.RESET_LIMIT + 1):
        _open_and_reset(client)
    with pytest.raises(http2.ConnectionError_, match="rapid reset"):
        server.feed(client.data_to_send())
    events = client.receive_data(server.data_to_send())
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def _get(client: h2.connection.H2Connection) -> int:
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "GET"), (":path", "/v1/status"),
                              (":scheme", "https"), (":authority", "x")], end_stream=True)
    return sid


def test_streams_opened_after_a_graceful_goaway_are_refused_earlier_ones_answered() -> None:
    server, client = _pair(_Clock())
    first = _get(client)
    [dispatch] = server.feed(client.data_to_send())
    assert isinstance(dispatch, http2.Dispatch) and dispatch.stream_id == first
    server.goaway()
    server.data_to_send()  # the GOAWAY, which this client has not read yet
    late = _get(client)
    assert server.feed(client.data_to_send()) == []
    server.respond(first, 200, "application/json", b"{}", date=b"now")
    events = client.receive_data(server.data_to_send())
    resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [
        (late, h2.errors.ErrorCodes.REFUSED_STREAM)]
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == first for e in events)


def test_client_opening_more_streams_than_allowed_is_cut(pki: Pki,
                                                         client_ctx: ssl.SSLContext) -> None:
    """The stream limit is what bounds the answers one client can leave unread: a client
    that opens more streams than SETTINGS allow gets GOAWAY(PROTOCOL_ERROR)."""
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        await release.wait()
        return Response(200, b"{}")

    with ServerThread(handler, pki.tls()) as st:
        c = H2Client(st.port, client_ctx)
        encoder = hpack.Encoder()
        block = encoder.encode([(":method", "GET"), (":path", "/v1/key/list/"),
                                (":scheme", "https"), (":authority", "127.0.0.1")])
        head = len(block).to_bytes(3, "big") + b"\x01\x05"  # HEADERS, END_STREAM|END_HEADERS
        # Frames h2's client state would refuse: one stream more than the limit.
        frames = [head + sid.to_bytes(4, "big") + block
                  for sid in range(1, 2 * (http2.MAX_CONCURRENT_STREAMS + 1), 2)]
        c.sock.sendall(b"".join(frames))
        assert c.wait_goaway().error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert st.loop is not None
        st.loop.call_soon_threadsafe(release.set)
        c.close()
