"""Probe: would the KES transport be cheaper on uvloop's C-level TLS (the stdlib `ssl`
module) than on `kes.tls_session`'s memory BIOs driven from Python?

    .venv/bin/python -m bench.kes_stdlib_tls            # about 2 minutes
    .venv/bin/python -m bench.kes_stdlib_tls --quick    # smoke

KES-TLS-STACKS.md measured stdlib TLS on uvloop at 18 µs per request against 25 µs for
its memory-BIO prototype, but ruled it out: `ssl` has no verify callback, so it cannot
accept MinIO's self-signed (and later expired) API-key certificates. This probe removes
that obstacle the sharp way (`SSL_CTX_set_verify` with an accept-all callback through
ctypes, on the `SSL_CTX` behind the `SSLContext` object) to find out whether the speed
would be worth carrying such a hack, now that bootkey's own transport is tuned.

Both servers run the same code above TLS: `kes.http1`'s parser and `render_head`, and
the trivial generate-like handler of `bench.kes --trivial` (no policy, keyring, metrics
or audit), with 2 SO_REUSEPORT workers and the context built before forking. nginx with 1
and 2 workers gives the ceiling. Keep-alive and new connections at c = 16, the servers
taking turns run by run (see bench.kes). Before measuring, the stdlib server is checked
to serve a self-signed Ed25519 client certificate and to refuse a client without one, so
the figures are for a server that would meet the requirement.

Not adopted either way without a decision: it reaches into CPython's object layout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.kes import (
    CONTEXT_B64,
    Files,
    Job,
    Target,
    free_port,
    interleaved,
    nginx,
    stop,
    wait_port,
)
from bench.kes import bootkey_kes as bootkey_transport
from tests.support.certs import Issued, make_leaf

SERVE_STDLIB = r"""
import asyncio, ctypes, os, signal, socket, ssl, sys, _ssl
import uvloop
from cryptography import x509
from kes import http1
from kes.identity import of_certificate
from bench.kes import trivial_handler

cert, key, port, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
ctx.verify_mode = ssl.CERT_REQUIRED  # VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT
# The hack under test: accept any certificate the client proves it holds the key of.
# PySSLContext starts with PyObject_HEAD (16 bytes), then the SSL_CTX pointer; dlsym on
# _ssl's handle finds the libssl it is linked against.
VERIFY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
accept_any = VERIFY(lambda ok, store: 1)
libssl = ctypes.CDLL(_ssl.__file__)
libssl.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, VERIFY]
libssl.SSL_CTX_set_verify(ctypes.c_void_p.from_address(id(ctx) + 16).value, 1 | 2, accept_any)
handler = trivial_handler()

class Connection(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if der is None:
            transport.abort()
            return
        peer = x509.load_der_x509_certificate(der)
        self.parser = http1.RequestParser(identity=of_certificate(peer), peer_cert=peer,
                                          remote="", max_body=1 << 20)

    def data_received(self, data):
        out = []
        for event in self.parser.feed(data):
            if type(event) is not http1.Parsed:
                self.transport.abort()
                return
            coro = handler(event.request)
            try:
                coro.send(None)
            except StopIteration as done:
                body = done.value.body
            out.append(http1.render_head(200, content_type="application/json", length=len(body),
                                         keep_alive=event.keep_alive, http10=event.http10,
                                         date=b"Sun, 22 Nov 2026 12:00:00 GMT") + body)
            if not event.keep_alive:
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))

def serve(sock):
    loop = uvloop.new_event_loop()
    async def main():
        await loop.create_server(Connection, sock=sock, ssl=ctx, backlog=1024,
                                 ssl_handshake_timeout=5)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
    loop.run_until_complete(main())

socks = []
for _ in range(workers):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    socks.append(s)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait below
kids = []
for s in socks:
    pid = os.fork()
    if pid == 0:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        serve(s)
        os._exit(0)
    kids.append(pid)
signal.sigwait({signal.SIGTERM})
for pid in kids:
    os.kill(pid, signal.SIGTERM)
"""


@contextmanager
def stdlib_server(files: Files, workers: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_STDLIB, str(files.path("server.crt")),
         str(files.path("server.key")), str(port), str(workers)],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    try:
        wait_port(port, proc)
        yield proc, port
    finally:
        stop(proc)


def _post(files: Files, port: int, client: Issued | None) -> int:
    ctx = ssl.create_default_context(cafile=str(files.path("ca.pem")))
    if client is not None:
        pem = files.path("probe-client.pem")
        pem.write_bytes(client.cert_pem + client.key_pem)
        ctx.load_cert_chain(str(pem))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/v1/key/generate/k", body=json.dumps({"context": CONTEXT_B64}))
        return conn.getresponse().status
    finally:
        conn.close()


def check_requirement(files: Files, port: int) -> None:
    """The stdlib server must accept a self-signed Ed25519 client and refuse none."""
    ed25519 = make_leaf(None, "minio-api-key", kind="ed25519", client=True)
    status = _post(files, port, ed25519)
    if status != 200:
        raise SystemExit(f"stdlib server answered {status} to a self-signed Ed25519 client")
    try:
        status = _post(files, port, None)
    except (ssl.SSLError, OSError):
        return  # TLS 1.3: the refusal arrives as an alert on the first read
    raise SystemExit(f"stdlib server answered {status} to a client without a certificate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny runs: checks that it all works")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    n_ka, n_new, repeat = (300, 30, 1) if a.quick else (40000, 2000, a.repeat)
    for tool in ("ab", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench.kes_stdlib_tls: {tool} not found — run scripts/setup.sh",
                  file=sys.stderr)
            return 69
    with tempfile.TemporaryDirectory(prefix="bootkey-bench-tls-") as tmp, ExitStack() as stack:
        files = Files.create(Path(tmp))
        body = files.path("generate.json")
        body.write_text(json.dumps({"context": CONTEXT_B64}))
        servers = (("kes.tls_session", bootkey_transport(files, 2, "", trivial=True)),
                   ("stdlib ssl", stdlib_server(files, 2)),
                   ("nginx-1", nginx(files, 1)), ("nginx-2", nginx(files, 2)))
        jobs = []
        for name, server in servers:
            proc, port = stack.enter_context(server)
            if name == "stdlib ssl":
                check_requirement(files, port)
            jobs.append(Job(name, "generate", Target(files, port, proc.pid),
                            "/v1/key/generate/k", body))
        ka = interleaved(jobs, n=n_ka, c=16, keep_alive=True, repeat=repeat)
        new = interleaved(jobs, n=n_new, c=16, keep_alive=False, repeat=repeat)
    top_ka = max(c.rps for j, c in zip(jobs, ka, strict=True) if j.name.startswith("nginx"))
    top_new = max(c.rps for j, c in zip(jobs, new, strict=True) if j.name.startswith("nginx"))
    print("| TLS under the same HTTP layer and handler (2 workers) | keep-alive c=16 "
          "| new conn c=16 |")
    print("|---|---|---|")
    for job, k, c in zip(jobs, ka, new, strict=True):
        print(f"| {job.name} | {k.rps / 1000:.1f}k · p99 {k.p99:.2f} ms · "
              f"{k.rps / top_ka:.0%} · {k.cpu_us:.0f} µs/req "
              f"| {c.rps:.0f} · {c.rps / top_new:.0%} · {c.cpu_us:.0f} µs/conn |")
    failed = sum(c.failed for c in (*ka, *new))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
