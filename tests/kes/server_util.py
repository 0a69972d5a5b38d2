"""Helpers for the KES transport tests: certificates on disk for clients, a recording
handler, and a small HTTP/1.1 response reader that keeps its buffer across pipelined
responses (http.client's does not)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events

from kes.identity import of_certificate
from kes.messages import MAX_BODY, Request, Response
from kes.server import ServerThread
from kes.tls_context import TLSConfig
from tests.support.certs import Issued, make_ca, make_leaf
from tests.support.wait import wait_for

__all__ = ["wait_for"]  # the transport tests import it from here


@dataclass
class Pki:
    ca: Issued
    server: Issued
    tmp: Path

    @classmethod
    def create(cls, tmp: Path) -> Pki:
        ca = make_ca("kes-test-ca")
        server = make_leaf(ca, "kes-server", ips=["127.0.0.1"], dns=["localhost"])
        (tmp / "ca.pem").write_bytes(ca.cert_pem)
        return cls(ca, server, tmp)

    def tls(self, client_ca_pem: bytes | None = None, verify_client: bool = False) -> TLSConfig:
        return TLSConfig(self.server.cert_pem, self.server.key_pem, client_ca_pem, verify_client)

    @property
    def ca_file(self) -> Path:
        return self.tmp / "ca.pem"

    def write_client(self, client: Issued, name: str) -> tuple[Path, Path]:
        cert, key = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
        cert.write_bytes(client.cert_pem)
        key.write_bytes(client.key_pem)
        return cert, key

    def client_context(
        self,
        client: Issued | None,
        name: str = "client",
        *,
        version: ssl.TLSVersion | None = None,
        alpn: list[str] | None = None,
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client is not None:
            cert, key = self.write_client(client, name)
            ctx.load_cert_chain(str(cert), str(key))
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        return ctx


@dataclass
class Recorder:
    """Handler that records requests and answers with what it saw, as JSON."""

    requests: list[Request] = field(default_factory=list)
    respond: Callable[[Request], Response] | None = None

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        if self.respond is not None:
            return self.respond(request)
        await asyncio.sleep(0)  # exercise the suspended-handler path too
        body = {
            "identity": request.identity,
            "path": request.path,
            "method": request.method,
            "len": len(request.body),
            "too_large": request.body_too_large,
        }
        return Response(200, json.dumps(body).encode())


async def log_stream(ended: list[bool]) -> AsyncIterator[bytes]:
    """Three events, then blocked like a log stream with nothing to say; appends to
    `ended` when it is closed."""
    try:
        for i in range(3):
            yield b'{"event":%d}\n' % i
        await asyncio.Event().wait()
        yield b"never"
    finally:
        ended.append(True)


def connect(
    port: int, ctx: ssl.SSLContext, *, session: ssl.SSLSession | None = None,
    timeout: float = 10.0, ragged_eof_is_error: bool = True,
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(
        raw, server_hostname="127.0.0.1", session=session,
        suppress_ragged_eofs=not ragged_eof_is_error,
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class Reader:
    """Reads successive HTTP/1.1 responses from one socket."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise EOFError("connection closed")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise EOFError("connection closed")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> Reply:
        status_line = self._line()
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.lower()] = value.strip()
        if 100 <= status < 200:
            body = b""
        elif "content-length" in headers:
            body = self._exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b"".join(self.chunks())
        else:
            body = self.rest()
        return Reply(status, headers, body)

    def chunks(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            size = int(self._line(), 16)
            if size == 0:
                self._line()
                return out
            out.append(self._exactly(size))
            self._line()

    def next_chunk(self) -> bytes | None:
        size = int(self._line(), 16)
        if size == 0:
            self._line()
            return None
        data = self._exactly(size)
        self._line()
        return data

    def rest(self) -> bytes:
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out

    def at_eof(self) -> bool:
        """True once the server has closed (cleanly); waits for it."""
        return not self.buf and not self._more()


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# HTTP/2 ---------------------------------------------------------------------------------


@dataclass
class H2Stream:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the server reset it

    def reply(self) -> Reply:
        return Reply(self.status, self.headers, self.body)


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int


class H2Client:
    """An HTTP/2 client on the `h2` library over a stdlib TLS socket with ALPN `h2` and a
    client certificate: streams are sent and read independently, so tests can multiplex,
    reset and watch GOAWAY."""

    def __init__(self, port: int, ctx: ssl.SSLContext, *, timeout: float = 10.0) -> None:
        ctx.set_alpn_protocols(["h2"])
        self.sock = connect(port, ctx, timeout=timeout)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.streams: dict[int, H2Stream] = {}
        self.goaway: GoAway | None = None
        self._inbuf = b""
        self.remote_settings: dict[int, int] = {}
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send(self, method: str, path: str, body: bytes | None = b"", *,
             headers: tuple[tuple[str, str], ...] = (), end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "https"),
                  (":authority", "127.0.0.1"), *headers]
        self.streams[sid] = H2Stream()
        no_body = body is None or (not body and end)
        self.conn.send_headers(sid, fields, end_stream=no_body and end)
        if body:
            self.send_body(sid, body, end=end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, *, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            size = min(len(view), self.conn.max_outbound_frame_size,
                       self.conn.local_flow_control_window(sid))
            if size <= 0:
                self.flush()
                self.pump()
                continue
            self.conn.send_data(sid, view[:size].tobytes())
            view = view[size:]
        if end:
            self.conn.end_stream(sid)
        self.flush()

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def pump(self) -> bool:
        """Read once and handle what came; False at EOF."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.conn.receive_data(self._take_goaway(data)):
            if isinstance(ev, h2.events.ResponseReceived):
                s = self.streams[ev.stream_id]
                for name, value in ev.headers or ():
                    if name in (":status", b":status"):
                        s.status = int(value)
                    else:
                        s.headers[str(name)] = str(value)
            elif isinstance(ev, h2.events.DataReceived):
                self.streams[ev.stream_id].body += ev.data or b""
                self.conn.acknowledge_received_data(ev.flow_controlled_length or 0,
                                                    ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.streams[ev.stream_id].ended = True
            elif isinstance(ev, h2.events.StreamReset):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id].reset = int(ev.error_code or 0)
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                for code, change in ev.changed_settings.items():
                    self.remote_settings[int(code)] = change.new_value
        self.flush()
        return True

    def _take_goaway(self, data: bytes) -> bytes:
        """Pass whole frames on to h2 but keep GOAWAY for ourselves: h2 ends the connection
        at any GOAWAY, while a graceful one (NO_ERROR) still lets the streams up to its last
        stream id finish (RFC 9113 §6.8), as Go's client does."""
        buf = self._inbuf = self._inbuf + data
        out, pos = [], 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            end = pos + 9 + length
            if len(buf) < end:
                break
            if buf[pos + 3] == 0x7:  # GOAWAY
                payload = buf[pos + 9:end]
                self.goaway = GoAway(int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                                     int.from_bytes(payload[4:8], "big"))
            else:
                out.append(buf[pos:end])
            pos = end
        self._inbuf = buf[pos:]
        return b"".join(out)

    def wait(self, sid: int) -> H2Stream:
        s = self.streams[sid]
        while not (s.ended or s.reset is not None):
            if not self.pump():
                raise EOFError(f"connection closed before stream {sid} ended")
        return s

    def request(self, method: str, path: str, body: bytes = b"", *,
                headers: tuple[tuple[str, str], ...] = ()) -> Reply:
        return self.wait(self.send(method, path, body, headers=headers)).reply()

    def wait_goaway(self) -> GoAway:
        while self.goaway is None:
            if not self.pump():
                raise EOFError("connection closed without GOAWAY")
        return self.goaway

    def close(self) -> None:
        self.sock.close()


PROTOCOLS = ["http/1.1", "h2"]


def call(proto: str, port: int, ctx: ssl.SSLContext, method: str, path: str, *,
         body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """One request over a fresh connection speaking `proto` ("http/1.1" or "h2")."""
    if proto == "h2":
        client = H2Client(port, ctx)
        try:
            return client.request(method, path, body, headers=headers)
        finally:
            client.close()
    ctx.set_alpn_protocols(["http/1.1"])
    sock = connect(port, ctx)
    try:
        extra = "".join(f"{n}: {v}\r\n" for n, v in headers)
        sock.sendall(request(method, path, body, extra + "Connection: close\r\n"))
        return Reader(sock).response()
    finally:
        sock.close()


# The API over the wire ------------------------------------------------------------------


class WireApi:
    """A `kes.api.Api` behind a real `ServerThread`, called like the Api itself: each
    `await wire(request)` travels over TLS as HTTP/1.1 or HTTP/2 (`proto`) on a fresh
    connection, and the answer comes back as a `Response`. Test identities (hex strings
    that no certificate has) are played by one client certificate each, which the server
    side maps back, so the API sees the identity the test names; `None` is a certificate
    the server maps to "no identity". Attributes are the Api's (metrics, hubs, keyring)."""

    def __init__(self, api: Any, proto: str, pki: Pki, identities: list[str | None]) -> None:
        self._api = api
        self._proto = proto
        self._ctx: dict[str | None, ssl.SSLContext] = {}
        self._as: dict[str | None, str | None] = {}
        for i, ident in enumerate(identities):
            cert = make_leaf(None, f"id{i}", kind="ed25519", client=True)
            self._ctx[ident] = pki.client_context(cert, f"id{i}")
            self._as[of_certificate(cert.cert)] = ident
        self._thread = ServerThread(self._handler, pki.tls())

    def __enter__(self) -> WireApi:
        self._thread.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.__exit__(None, None, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    async def _handler(self, request: Request) -> Response:
        request.identity = self._as[request.identity]
        response: Response = await self._api(request)
        return response

    async def __call__(self, request: Request) -> Response:
        # The path goes out percent-encoded, as Go's client sends it (url.EscapedPath).
        body = request.body
        if request.body_too_large:
            body += b" " * (MAX_BODY + 1 - len(body))
        reply = await asyncio.to_thread(
            call, self._proto, self._thread.port, self._ctx[request.identity],
            request.method, quote(request.path, safe="/:@!$&'()*+,;=-._~"), body=body)
        transport = {"date", "content-length", "content-type", "connection"}
        headers = tuple((n.title(), v) for n, v in reply.headers.items() if n not in transport)
        return Response(reply.status, reply.body, reply.headers.get("content-type"), headers)
