"""Loopback fronts that put network and server faults between bootkey and a real OpenBao.

`LateProxy` is a TCP forwarder that can be started late: it lets a test make Vault
"appear" on an address the agent has been retrying, without restarting (and losing) a dev
server. Its `delay` makes every forwarded chunk late (a slow Vault or a long link), and
`stall()` keeps connections open while forwarding nothing (a black-holed route, a hung
server). `HttpFront` is a tiny HTTP server that answers chosen paths with a chosen status
(429, 500, …) and forwards everything else, counting what it saw.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from dataclasses import dataclass

import requests


class LateProxy:
    def __init__(self, port: int, target: tuple[str, int], *, delay: float = 0.0) -> None:
        self.port = port
        self.target = target
        self.delay = delay  # seconds added before each forwarded chunk, both directions
        self._srv: socket.socket | None = None
        self._stop = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._conns: list[socket.socket] = []

    def start(self) -> LateProxy:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        srv.settimeout(0.2)
        self._srv = srv
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stall(self) -> None:
        """Keep accepting and holding connections, forward nothing (until `resume`)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        assert self._srv is not None
        while not self._stop.is_set():
            try:
                c, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()  # nothing behind us: the client sees a reset, as from a dead host
                continue
            self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                self._flowing.wait()
                if self._stop.is_set():
                    break
                if self.delay:
                    time.sleep(self.delay)  # the fault itself: a slow link
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop listening and cut every forwarded connection (keep-alive ones too)."""
        self._stop.set()
        self._flowing.set()
        if self._srv:
            self._srv.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@dataclass
class Rule:
    """Answer requests whose path starts with `prefix` with `status`, the first `times`
    of them (None: all)."""

    prefix: str
    status: int
    times: int | None = None
    hits: int = 0


_VAULT_ERROR = {429: b'{"errors":["request path \\"%s\\": rate limit quota exceeded"]}',
                500: b'{"errors":["internal error"]}'}
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class HttpFront:
    """An HTTP front for an `http://` OpenBao: rules first, else forward verbatim."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self._lock = threading.Lock()
        self._http = requests.Session()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Vault

            def _any(self) -> None:
                front._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _any

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, prefix: str, status: int, times: int | None = None) -> Rule:
        rule = Rule(prefix, status, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def count(self, prefix: str) -> int:
        return sum(1 for _, p, _ in self.seen if p.startswith(prefix))

    def _rule_for(self, path: str) -> Rule | None:
        with self._lock:
            for r in self.rules:
                if path.startswith(r.prefix) and (r.times is None or r.hits < r.times):
                    r.hits += 1
                    return r
        return None

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        path = h.path.split("?", 1)[0]
        rule = self._rule_for(path)
        if rule is not None:
            status, data = rule.status, _VAULT_ERROR.get(rule.status, b"{}")
            if b"%s" in data:
                data = data.replace(b"%s", path.encode())
            ctype = "application/json"
        else:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_HEADERS}
            r = self._http.request(h.command, self.upstream + h.path, data=body,
                                   headers=headers, timeout=30)
            status, data = r.status_code, r.content
            ctype = r.headers.get("Content-Type", "application/json")
        with self._lock:
            self.seen.append((h.command, path, status))
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def start(self) -> HttpFront:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()
