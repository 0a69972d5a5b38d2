"""HTTP/1.1 framing as plain values: bytes in, events out; response heads as bytes."""

from __future__ import annotations

import pytest

from kes.http1 import (
    BadRequest,
    Continue,
    Parsed,
    RequestParser,
    State,
    chunk,
    error_response,
    render_head,
)


def parser(**kw: int) -> RequestParser:
    return RequestParser(
        identity="ab" * 32, peer_cert=None, remote="127.0.0.1:5", clock=lambda: 42, **kw
    )


def test_one_request_with_everything_the_handler_needs() -> None:
    p = parser()
    [event] = p.feed(b"POST /v1/key/generate/k HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
    assert isinstance(event, Parsed)
    r = event.request
    assert (r.method, r.path, r.body, r.identity, r.remote, r.received_ns) == (
        "POST", "/v1/key/generate/k", b"{}", "ab" * 32, "127.0.0.1:5", 42)
    assert r.headers["x-a"] == "1, 2" and r.headers["host"] == "x"
    assert event.keep_alive and not event.http10
    assert p.state is State.IDLE


def test_byte_by_byte_gives_the_same_request_and_tracks_state() -> None:
    raw = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    p = parser()
    events = []
    states = []
    for i in range(len(raw)):
        events += p.feed(raw[i:i + 1])
        states.append(p.state)
    assert [e.request.body for e in events if isinstance(e, Parsed)] == [b"abc"]
    assert states[0] is State.HEADERS and State.BODY in states and states[-1] is State.IDLE


def test_pipelined_and_chunked() -> None:
    raw = (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
           b"GET /b HTTP/1.1\r\nConnection: close\r\n\r\n")
    a, b = parser().feed(raw)
    assert isinstance(a, Parsed) and isinstance(b, Parsed)
    assert a.request.body == b"abcde" and a.keep_alive
    assert b.request.path == "/b" and not b.keep_alive


@pytest.mark.parametrize(("head", "keep_alive", "http10"), [
    (b"GET / HTTP/1.0\r\n\r\n", False, True),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True, True),  # ab -k
    (b"GET / HTTP/1.1\r\n\r\n", True, False),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False, False),
])
def test_keep_alive_rules(head: bytes, keep_alive: bool, http10: bool) -> None:
    [event] = parser().feed(head)
    assert isinstance(event, Parsed)
    assert (event.keep_alive, event.http10) == (keep_alive, http10)


def test_body_over_the_limit_is_cut_and_flagged() -> None:
    p = parser(max_body=4)
    [event] = p.feed(b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabcdef")
    assert isinstance(event, Parsed)
    assert event.request.body == b"abcd" and event.request.body_too_large
    [event] = p.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
    assert isinstance(event, Parsed) and not event.request.body_too_large


@pytest.mark.parametrize(("target", "path"), [
    (b"/v1/key/list/a%2Ab?x=1", "/v1/key/list/a*b"),
    (b"/v1/status?", "/v1/status"),
    (b"/caf%C3%A9", "/caf\u00e9"),
    (b"http://host:7373/v1/x", "/v1/x"),
])
def test_path_is_decoded_without_query(target: bytes, path: str) -> None:
    [event] = parser().feed(b"GET " + target + b" HTTP/1.1\r\n\r\n")
    assert isinstance(event, Parsed) and event.request.path == path


@pytest.mark.parametrize("raw", [
    b"NOT HTTP\r\n\r\n",
    b"GET /%ff HTTP/1.1\r\n\r\n",
    b"GET * HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
])
def test_bad_requests_give_400_and_stop_the_parser(raw: bytes) -> None:
    p = parser()
    events = p.feed(raw)
    assert isinstance(events[-1], BadRequest) and events[-1].status == 400
    assert p.state is State.DEAD
    assert p.feed(b"GET / HTTP/1.1\r\n\r\n") == []


def test_oversized_head_gives_431() -> None:
    p = parser(max_header_bytes=100)
    [event] = p.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n")
    assert event == BadRequest(431, "request head exceeds limit")


def test_expect_continue_comes_before_the_request() -> None:
    p = parser()
    assert p.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n") == [
        Continue()]
    [event] = p.feed(b"x")
    assert isinstance(event, Parsed) and event.request.body == b"x"


def test_render_head_variants() -> None:
    date = b"Sun, 22 Nov 2026 06:00:00 GMT"
    head = render_head(200, content_type="application/json", length=2, keep_alive=True,
                       http10=False, date=date)
    assert head == (b"HTTP/1.1 200 OK\r\nDate: " + date + b"\r\nContent-Type: application/json"
                    b"\r\nContent-Length: 2\r\n\r\n")
    head = render_head(405, content_type=None, length=0, headers=[("Accept", "PUT")],
                       keep_alive=False, http10=False, date=date)
    assert b"HTTP/1.1 405 Method Not Allowed\r\n" in head and b"Accept: PUT\r\n" in head
    assert b"Connection: close\r\n" in head and b"Content-Type" not in head
    assert b"Connection: keep-alive" in render_head(200, content_type=None, length=0,
                                                     keep_alive=True, http10=True, date=date)
    streamed = render_head(200, content_type=None, length=None, keep_alive=True, http10=False,
                           date=date)
    assert b"Transfer-Encoding: chunked" in streamed
    assert b"Transfer-Encoding" not in render_head(200, content_type=None, length=None,
                                                   keep_alive=False, http10=True, date=date)
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert error_response(400, date).endswith(b"\r\n\r\n400 Bad Request")
