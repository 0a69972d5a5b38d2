"""Benchmark: bootkey's KES endpoint against the machine's ceiling (Debian nginx): a
MinIO-shaped Go client over HTTP/2, and ApacheBench over HTTP/1.1, both over mTLS.

    .venv/bin/python -m bench.kes                   # the full table (a few minutes)
    .venv/bin/python -m bench.kes --quick           # one short run per cell (smoke)
    .venv/bin/python -m bench.kes --long 600        # memory over a 10-minute run

What runs:
- The MinIO-shaped load (first table): bench/kesload/main.go, a Go program from the
  standard library configured like kms-go (ForceAttemptHTTP2, Go's default of 2 idle
  connections per host, an Ed25519 self-signed client certificate derived from a `kes:v1:`
  API key), C goroutines calling generate or decrypt back to back at C = 1, 16, 64: req/s,
  p50/p99, server CPU µs per call, TLS handshakes per 1,000 calls after a warm-up. Against
  bootkey (h2), bootkey offering only http/1.1 in ALPN (what MinIO got before h2), and
  nginx `listen ... ssl http2` with the static JSON (the ceiling).
- bootkey: `kes.service.build` (routing, policy, keyring cache in front of a real
  `bao server -dev` KV v2, metrics, audit) served by `kes.server.run` with 1 and 2
  SO_REUSEPORT workers. The load identity is not admin: every request goes through the
  policy. If `kes.service` cannot be imported, a trivial generate-like handler stands in
  and the output says so.
- nginx (Debian, `nginx-light`): `ssl_verify_client optional_no_ca` and `return 200` with a
  static JSON body of the size of a generate answer, 1 and 2 workers. The better of the two
  is the ceiling.
- ab: `ab -q [-k] -n N -c C -E client.pem -p body.json -T application/json -e pct.csv`,
  client cert self-signed ECDSA P-256 (ab uses Debian's OpenSSL). Keep-alive at c = 1, 16,
  64; new connections (no -k) at c = 1 and 16. Each cell is the median of `--repeat` runs
  after a warm-up. p50/p99 come from ab's percentile CSV. Server CPU per request is
  utime+stime of the whole server process tree over the run.

Prints Markdown for docs/benchmarks.md and writes the raw numbers as JSON. Not part of the
test suite (tests/kes/test_bench_kes.py only checks that --quick runs).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kes.apikey import APIKey
from kes.identity import of_certificate
from kes.messages import Handler, Request, Response
from tests.support.certs import Issued, make_ca, make_leaf

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
KEY = "bench-key"
# MinIO's context for an object, as it sends it in generate/decrypt bodies.
CONTEXT_B64 = base64.b64encode(b'{"MinIO":"bench/object"}').decode()
# The size of a generate answer: 32-byte plaintext and its ~150-byte ciphertext, base64.
STATIC_BODY = json.dumps({"plaintext": "A" * 44, "ciphertext": "B" * 200}, separators=(",", ":"))


# Process accounting -------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for k in kids:
            out += tree(int(k))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except FileNotFoundError:
            continue
    return total


# Certificates and files ---------------------------------------------------------------


@dataclass
class Files:
    work: Path
    ca: Issued
    server: Issued
    client: Issued  # the load identity (ab)
    admin: Issued
    apikey: Issued  # the load identity of the MinIO-shaped Go client: from a kes:v1: key

    @classmethod
    def create(cls, work: Path) -> Files:
        ca = make_ca("bench-ca")
        key = APIKey.generate()
        f = cls(work, ca, make_leaf(ca, "kes", ips=["127.0.0.1"], dns=["localhost"]),
                make_leaf(None, "minio", kind="ec", client=True),
                make_leaf(None, "admin", kind="ed25519", client=True),
                Issued(key.private_key, key.certificate()))
        for name, data in (("ca.pem", ca.cert_pem), ("server.crt", f.server.cert_pem),
                           ("server.key", f.server.key_pem),
                           ("client.pem", f.client.cert_pem + f.client.key_pem),
                           ("admin.crt", f.admin.cert_pem), ("admin.key", f.admin.key_pem),
                           ("apikey.crt", f.apikey.cert_pem), ("apikey.key", f.apikey.key_pem)):
            (work / name).write_bytes(data)
            os.chmod(work / name, 0o600)
        return f

    def path(self, name: str) -> Path:
        return self.work / name


# Servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {limit} s")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def nginx(files: Files, workers: int,
          http2: bool = False) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    prefix = files.work / f"nginx{workers}{'-h2' if http2 else ''}"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} ssl{" http2" if http2 else ""};
        ssl_certificate {files.path("server.crt")};
        ssl_certificate_key {files.path("server.key")};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client optional_no_ca;
        ssl_session_tickets on;
        location / {{
            default_type application/json;
            return 200 '{STATIC_BODY}';
        }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield proc, port
    finally:
        stop(proc)


SERVE = r"""
import asyncio, json, os, sys
cfg = json.load(open(sys.argv[1]))
import kes.server
from kes.server import run
if cfg["loop"] == "asyncio":
    kes.server.new_event_loop = asyncio.new_event_loop
if cfg.get("profile"):
    import cProfile, pstats, signal
    prof = cProfile.Profile()
    def dump(*_):
        prof.disable()
        pstats.Stats(prof, stream=open(cfg["profile"], "w")).sort_stats("tottime").print_stats(40)
        os._exit(0)
    signal.signal(signal.SIGUSR1, dump)
    prof.enable()
try:
    from kes import service
except Exception as exc:  # the API is not there: measure the transport alone
    service = None
    print("TRIVIAL", type(exc).__name__, exc, file=sys.stderr, flush=True)
if service is not None and not cfg["trivial"]:
    svc = service.build(cfg["section"], source="bench")
    handler, tls = svc.handler, svc.tls
else:
    from bench.kes import trivial_handler
    from kes.tls_context import TLSConfig
    handler = trivial_handler()
    tls = TLSConfig(open(cfg["cert"], "rb").read(), open(cfg["key"], "rb").read())
if not cfg["http2"]:
    from kes.tls_context import build_context
    tls = build_context(tls, http2=False)
run(handler, tls, "127.0.0.1", cfg["port"], workers=cfg["workers"])
"""


def trivial_handler() -> Handler:
    """A generate-like handler without the KES API (`--trivial`): the transport's cost."""
    aead = AESGCM(os.urandom(32))

    async def handler(request: Request) -> Response:
        context = base64.b64decode(json.loads(request.body or b"{}").get("context") or "")
        dek = os.urandom(32)
        ciphertext = aead.encrypt(os.urandom(12), dek, context)
        return Response(200, json.dumps({"plaintext": base64.b64encode(dek).decode(),
                                         "ciphertext": base64.b64encode(ciphertext).decode(),
                                         }).encode())

    return handler


@contextmanager
def bootkey_kes(files: Files, workers: int, vault: str, *, trivial: bool, loop: str = "uvloop",
                profile: str = "",
                http2: bool = True) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    ident = of_certificate(files.client.cert)
    section = {
        "address": f"127.0.0.1:{port}",
        "admin": {"identity": of_certificate(files.admin.cert)},
        "tls": {"cert": str(files.path("server.crt")), "key": str(files.path("server.key"))},
        "policy": {"minio": {"allow": ["/v1/key/generate/bench-*", "/v1/key/decrypt/bench-*",
                                       "/v1/status"],
                             "identities": [ident, of_certificate(files.apikey.cert)]}},
        "log": {"error": "on", "audit": "on"},
        "keystore": {"vault": {"endpoint": vault, "token": "root", "engine": "secret",
                               "version": "v2", "prefix": f"bench-{os.getpid()}-{port}"}},
    }
    cfg = files.work / f"serve-{port}.json"
    cfg.write_text(json.dumps({"section": section, "port": port, "workers": workers,
                               "trivial": trivial, "loop": loop, "profile": profile,
                               "http2": http2,
                               "cert": str(files.path("server.crt")),
                               "key": str(files.path("server.key"))}))
    root = Path(__file__).resolve().parents[1]
    with (files.work / "serve.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(cfg)], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(root)})
    try:
        wait_port(port, proc)
        yield proc, port
    finally:
        stop(proc)


# Requests -----------------------------------------------------------------------------


def https(files: Files, port: int, method: str, path: str, *, body: bytes = b"",
          admin: bool = False) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(files.path("ca.pem")))
    if admin:
        ctx.load_cert_chain(str(files.path("admin.crt")), str(files.path("admin.key")))
    else:
        ctx.load_cert_chain(str(files.path("client.pem")))
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def prepare_bodies(files: Files, port: int, trivial: bool) -> dict[str, Path]:
    """Create the key (as admin) and a ciphertext to decrypt; write ab's POST bodies."""
    context = CONTEXT_B64
    gen = json.dumps({"context": context}).encode()
    if not trivial:
        status, text = https(files, port, "POST", f"/v1/key/create/{KEY}", admin=True)
        if status != 200:
            raise RuntimeError(f"create {KEY}: {status} {text!r}")
    status, text = https(files, port, "POST", f"/v1/key/generate/{KEY}", body=gen)
    if status != 200:
        raise RuntimeError(f"generate: {status} {text!r}")
    ciphertext = json.loads(text)["ciphertext"]
    dec = json.dumps({"ciphertext": ciphertext, "context": context}).encode()
    if not trivial:
        status, text = https(files, port, "POST", f"/v1/key/decrypt/{KEY}", body=dec)
        if status != 200:
            raise RuntimeError(f"decrypt: {status} {text!r}")
    # Per server: servers run side by side, each with its own key.
    out = {"generate": files.path(f"generate-{port}.json"),
           "decrypt": files.path(f"decrypt-{port}.json")}
    out["generate"].write_bytes(gen)
    out["decrypt"].write_bytes(dec)
    return out


# ab -----------------------------------------------------------------------------------


@dataclass
class Cell:
    rps: float
    p50: float
    p99: float
    cpu_us: float  # server CPU per request (or per connection without -k)
    failed: int
    cores: float  # server CPU seconds / wall seconds


@dataclass
class Target:
    files: Files
    port: int
    pid: int  # the server's top process; CPU and memory count its whole tree


def ab_once(t: Target, path: str, body: Path, *, n: int, c: int, keep_alive: bool) -> Cell:
    files, port, server_pid = t.files, t.port, t.pid
    pct = files.path("pct.csv")
    cmd = ["ab", "-q", "-n", str(n), "-c", str(c), "-E", str(files.path("client.pem")),
           "-p", str(body), "-T", "application/json", "-e", str(pct), "-s", "30"]
    if keep_alive:
        cmd.insert(1, "-k")
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    out = subprocess.run([*cmd, f"https://127.0.0.1:{port}{path}"], capture_output=True,
                         text=True, check=True).stdout
    cpu1, t1 = cpu_seconds(server_pid), time.monotonic()
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    failed += int(non2xx.group(1)) if non2xx else 0
    if keep_alive:
        ka = int(re.search(r"Keep-Alive requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        failed += n - ka  # a keep-alive run that reconnects measures handshakes, not requests
    with pct.open() as fh:
        rows = {int(float(r[0])): float(r[1]) for r in list(csv.reader(fh))[1:]}
    return Cell(rps, rows[50], rows[99], (cpu1 - cpu0) / n * 1e6, failed,
                (cpu1 - cpu0) / (t1 - t0))


@dataclass
class Job:
    """One cell of the table: a target, a route and a load shape."""

    name: str
    op: str
    target: Target
    path: str
    body: Path

    def run(self, *, n: int, c: int, keep_alive: bool) -> Cell:
        return ab_once(self.target, self.path, self.body, n=n, c=c, keep_alive=keep_alive)


def interleaved(jobs: list[Job], *, n: int, c: int, keep_alive: bool,
                repeat: int) -> list[Cell]:
    """The median run of each job, the jobs taking turns run by run (bootkey, nginx,
    bootkey, …): the speed of this VM's vCPUs drifts by tens of percent within minutes,
    and turns make every drift hit the server and the ceiling alike."""
    for job in jobs:
        job.run(n=max(200, n // 10), c=c, keep_alive=keep_alive)  # warm-up
    runs: list[list[Cell]] = [[] for _ in jobs]
    for _ in range(repeat):
        for job, mine in zip(jobs, runs, strict=True):
            mine.append(job.run(n=n, c=c, keep_alive=keep_alive))
    out = []
    for mine in runs:
        mine.sort(key=lambda r: r.rps)
        out.append(mine[len(mine) // 2])
    return out


# The MinIO-shaped Go client ------------------------------------------------------------

GO_LOAD = Path(__file__).resolve().parent / "kesload" / "main.go"


def build_go_load(work: Path) -> Path:
    out = work / "kesload"
    # Standard library only: builds offline.
    subprocess.run(["go", "build", "-o", str(out), str(GO_LOAD)], check=True, timeout=600,
                   capture_output=True, env={**os.environ, "GO111MODULE": "off",
                                             "GOCACHE": str(work / "gocache")})
    return out


@dataclass
class GoCell:
    rps: float
    p50: float
    p99: float
    cpu_us: float  # server CPU per call
    handshakes_per_1k: float  # TLS handshakes (full or resumed) per 1,000 calls
    failed: int
    cores: float
    proto: str


def go_once(t: Target, binary: Path, path: str, body: Path, *, c: int, seconds: float,
            warmup: float) -> GoCell:
    """One run of the MinIO-shaped client; server CPU is counted over the measured interval
    only (the client says when it starts and ends)."""
    files = t.files
    cmd = [str(binary), "-url", f"https://127.0.0.1:{t.port}{path}",
           "-ca", str(files.path("ca.pem")), "-cert", str(files.path("apikey.crt")),
           "-key", str(files.path("apikey.key")), "-body", str(body), "-c", str(c),
           "-warmup", str(warmup), "-seconds", str(seconds)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "measuring":
            raise RuntimeError("kesload did not start measuring")
        cpu0, t0 = cpu_seconds(t.pid), time.monotonic()
        if proc.stdout.readline().strip() != "done":
            raise RuntimeError("kesload did not finish")
        cpu1, t1 = cpu_seconds(t.pid), time.monotonic()
        r = json.loads(proc.stdout.readline())
    if proc.returncode:
        raise RuntimeError(f"kesload exited with {proc.returncode}")
    calls = max(1, r["calls"])
    return GoCell(r["rps"], r["p50_ms"], r["p99_ms"], (cpu1 - cpu0) / calls * 1e6,
                  r["handshakes"] * 1000 / calls, r["errors"], (cpu1 - cpu0) / (t1 - t0),
                  r["proto"])


@dataclass
class GoJob:
    name: str
    op: str
    target: Target
    path: str
    body: Path

    def run(self, binary: Path, *, c: int, seconds: float, warmup: float) -> GoCell:
        return go_once(self.target, binary, self.path, self.body, c=c, seconds=seconds,
                       warmup=warmup)


def measure_go(jobs: list[GoJob], binary: Path, *, plan: Plan, results: Results) -> None:
    """Every job at every concurrency, jobs taking turns run by run (see `interleaved`)."""
    for c in plan.concurrency:
        runs: list[list[GoCell]] = [[] for _ in jobs]
        for _ in range(plan.repeat):
            for job, mine in zip(jobs, runs, strict=True):
                mine.append(job.run(binary, c=c, seconds=plan.go_seconds,
                                    warmup=plan.go_warmup))
        for job, mine in zip(jobs, runs, strict=True):
            mine.sort(key=lambda r: r.rps)
            cell = mine[len(mine) // 2]
            results.go_cells[f"{job.name}|{job.op}|{c}"] = asdict(cell)
            print(f"  {job.name:14} {job.op:8} go c={c:<3} {cell.rps:9.0f} req/s "
                  f"p50 {cell.p50:.2f} p99 {cell.p99:.2f} ms  {cell.cpu_us:6.1f} us/call "
                  f"{cell.handshakes_per_1k:6.1f} hs/1k  {cell.cores:.2f} cores  "
                  f"{cell.proto}  failed {cell.failed}", flush=True)


GO_ROWS = (("bootkey-1-h2", "bootkey, 1 worker, h2"),
           ("bootkey-1-h1", "bootkey, 1 worker, HTTP/1.1 only (before)"),
           ("bootkey-2-h2", "bootkey, 2 workers, h2"),
           ("nginx-1-h2", "nginx, 1 worker, h2"),
           ("nginx-2-h2", "nginx, 2 workers, h2"))


def markdown_go(results: Results, plan: Plan) -> str:
    cells = results.go_cells

    def ceiling(c: int) -> float:
        return max((cells[k]["rps"] for k in (f"nginx-1-h2|static|{c}", f"nginx-2-h2|static|{c}")
                    if k in cells), default=0.0)

    head = ["target", "route"] + [f"c={c}" for c in plan.concurrency]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in GO_ROWS:
        for op in ("generate", "decrypt", "static"):
            row = [cells.get(f"{name}|{op}|{c}") for c in plan.concurrency]
            if not any(row):
                continue
            out = [label, op if op != "static" else "static JSON"]
            for c, cell in zip(plan.concurrency, row, strict=True):
                if cell is None:
                    out.append("-")
                    continue
                pct = 100 * cell["rps"] / ceiling(c) if ceiling(c) else 0
                fail = f" · **{cell['failed']} failed**" if cell["failed"] else ""
                out.append(f"{cell['rps'] / 1000:.1f}k · {cell['p50']:.2f}/{cell['p99']:.2f} · "
                           f"{pct:.0f}% · {cell['cpu_us']:.0f} µs · "
                           f"{cell['handshakes_per_1k']:.1f} hs/1k{fail}")
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


@dataclass
class Plan:
    keep_alive_n: int
    new_conn_n: int
    repeat: int
    concurrency: tuple[int, ...] = (1, 16, 64)
    new_conn_concurrency: tuple[int, ...] = (1, 16)
    go_seconds: float = 5.0
    go_warmup: float = 1.0


@dataclass
class Results:
    trivial: bool = False
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    go_cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_process: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def measure(jobs: list[Job], *, plan: Plan, results: Results) -> None:
    """Every keep-alive cell for every job, then new connections for the first route of
    each target (connection setup does not depend on the route)."""
    shapes = [(c, True) for c in plan.concurrency]
    shapes += [(c, False) for c in plan.new_conn_concurrency]
    for c, keep_alive in shapes:
        todo = jobs
        if not keep_alive:
            firsts: dict[str, Job] = {}
            for job in jobs:
                firsts.setdefault(job.name, job)
            todo = list(firsts.values())
        n = plan.keep_alive_n if keep_alive else plan.new_conn_n
        cells = interleaved(todo, n=n, c=c, keep_alive=keep_alive, repeat=plan.repeat)
        for job, cell in zip(todo, cells, strict=True):
            kind = "ka" if keep_alive else "new"
            results.cells[f"{job.name}|{job.op}|{kind}|{c}"] = asdict(cell)
            what = f"keep-alive c={c:<3}" if keep_alive else f"new-conn   c={c:<3}"
            unit = "req/s " if keep_alive else "conn/s"
            per = "us/req " if keep_alive else "us/conn"
            print(f"  {job.name:14} {job.op:8} {what} {cell.rps:9.0f} {unit} "
                  f"p50 {cell.p50:.2f} p99 {cell.p99:.2f} ms  {cell.cpu_us:6.1f} {per} "
                  f"{cell.cores:.2f} cores  failed {cell.failed}", flush=True)


def long_run(t: Target, bodies: dict[str, Path], seconds: float, results: Results) -> None:
    """Keep-alive load at c=16, alternating generate and decrypt, sampling the server's RSS."""
    samples: list[tuple[float, int, float]] = []
    start = time.monotonic()
    total = 0
    i = 0
    while (now := time.monotonic()) - start < seconds:
        op = ("generate", "decrypt")[i % 2]
        cell = ab_once(t, f"/v1/key/{op}/{KEY}", bodies[op], n=20000, c=16, keep_alive=True)
        total += 20000
        i += 1
        samples.append((round(now - start, 1), rss_bytes(t.pid), cell.rps))
    rss = [s[1] for s in samples]
    results.memory["long"] = {
        "seconds": round(time.monotonic() - start), "requests": total,
        "rss_first_mib": rss[0] / 2**20, "rss_min_mib": min(rss) / 2**20,
        "rss_max_mib": max(rss) / 2**20, "rss_last_mib": rss[-1] / 2**20,
        "rps_median": statistics.median(s[2] for s in samples),
        "samples": [(t, round(r / 2**20, 2), round(x)) for t, r, x in samples],
    }
    print(f"  long run: {total} requests in {seconds:.0f} s, RSS first "
          f"{rss[0] / 2**20:.1f} MiB, min {min(rss) / 2**20:.1f}, max {max(rss) / 2**20:.1f}, "
          f"last {rss[-1] / 2**20:.1f} MiB", flush=True)


def versions() -> dict[str, str]:
    import httptools
    import OpenSSL

    # Which build matters as much as which version: Debian's (what the .deb runs) is PGO +
    # LTO; a pyenv build on PATH is not, and costs 15-20 % more per request.
    python = f"{sys.version.split()[0]} ({os.path.realpath(sys.executable)})"
    out = {"python": python, "pyOpenSSL": OpenSSL.__version__,
           "OpenSSL (pyOpenSSL)": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
           "httptools": httptools.__version__}
    try:
        import uvloop

        out["uvloop"] = getattr(uvloop, "__version__", "?")
    except ImportError:
        out["uvloop"] = "not installed (asyncio loop)"
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True,
                             check=False).stderr.strip()
    out["nginx"] = nginx_v.split("/")[-1]
    ab_v = subprocess.run(["ab", "-V"], capture_output=True, text=True,
                          check=False).stdout.split("\n")[0]
    out["ab"] = ab_v.split("Version ")[-1].split(" ")[0]
    out["cpus"] = str(os.cpu_count())
    return out


def markdown(results: Results, plan: Plan, workers: list[int]) -> str:
    cells = results.cells
    ceiling_names = [f"nginx-{w}" for w in workers]

    def ceiling(col: str) -> float:
        return max((cells[f"{n}|static|{col}"]["rps"] for n in ceiling_names
                    if f"{n}|static|{col}" in cells), default=0.0)

    cols = [f"ka|{c}" for c in plan.concurrency] + [f"new|{c}" for c in plan.new_conn_concurrency]
    head = ["target", "route"] + [("keep-alive" if k == "ka" else "new conn") + f" c={c}"
                                  for k, c in (col.split("|") for col in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for w in workers:
        for op in ("generate", "decrypt"):
            rows.append((f"bootkey-{w}", op, f"bootkey, {w} worker{'s' * (w > 1)}"))
    for w in workers:
        rows.append((f"nginx-{w}", "static", f"nginx, {w} worker{'s' * (w > 1)}"))
    for name, op, label in rows:
        out = [label, op if op != "static" else "static JSON"]
        for col in cols:
            cell = cells.get(f"{name}|{op}|{col}")
            if cell is None and col.startswith("new"):
                cell = cells.get(f"{name}|generate|{col}") if op == "decrypt" else None
                if cell is None:
                    out.append("-")
                    continue
                out.append("(as generate)")
                continue
            if cell is None:
                out.append("-")
                continue
            pct = 100 * cell["rps"] / ceiling(col) if ceiling(col) else 0
            unit = "µs/req" if col.startswith("ka") else "µs/conn"
            fail = f" · **{cell['failed']} failed**" if cell["failed"] else ""
            out.append(f"{cell['rps'] / 1000:.1f}k · {cell['p50']:.2f}/{cell['p99']:.2f} · "
                       f"{pct:.0f}% · {cell['cpu_us']:.0f} {unit}{fail}")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


INPROC = r"""
# Server CPU per request without sockets or a load generator: a pyOpenSSL client talks to
# one kes.server connection through memory, and only the thread CPU time spent inside
# data_received is counted (TLS, HTTP, handler). Insensitive to other load on the box.
import asyncio, base64, json, sys, tempfile, time
from pathlib import Path
from OpenSSL import SSL
from kes.messages import Response
from kes.apikey import APIKey
from kes.identity import of_certificate
from kes.keyring import MemKeyStore
from kes.keyversion import KeyVersion
from kes.serve_http1 import HTTP1Connection
from kes.server import Server
from kes.tls_context import TLSConfig
from tests.support.certs import make_ca, make_leaf

mode, n, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ca = make_ca("ca")
srv = make_leaf(ca, "kes", ips=["127.0.0.1"])
cli = make_leaf(None, "minio", kind="ec", client=True)
if mode == "transport":
    body = json.dumps({"plaintext": "A" * 44, "ciphertext": "B" * 200}).encode()
    async def handler(request):
        return Response(200, body)
else:
    from kes import service
    d = Path(tempfile.mkdtemp())
    (d / "c").write_bytes(srv.cert_pem)
    (d / "k").write_bytes(srv.key_pem)
    ident = of_certificate(cli.cert)
    svc = service.build({"address": "127.0.0.1:7373", "admin": {"identity": "0" * 64},
                         "tls": {"cert": str(d / "c"), "key": str(d / "k")},
                         "policy": {"minio": {"allow": ["/v1/key/*"], "identities": [ident]}}},
                        store=MemKeyStore())
    svc.keyring.create("k", KeyVersion.generate(svc.api.key_type, "bench"))
    handler = svc.handler

class Transport:
    def __init__(self): self.out, self.protocol = [], None
    def write(self, data): self.out.append(data)
    def set_protocol(self, protocol): self.protocol = protocol
    def is_closing(self): return False
    def get_extra_info(self, key, default=None):
        return ("127.0.0.1", 1) if key == "peername" else default
    def close(self): pass
    abort = pause_reading = resume_reading = close

async def main():
    server = Server(handler, TLSConfig(srv.cert_pem, srv.key_pem))
    server._loop = asyncio.get_running_loop()
    conn, t = HTTP1Connection(server), Transport()
    conn.connection_made(t)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.use_certificate(cli.cert)
    ctx.use_privatekey(cli.key)
    if proto == "h2":
        ctx.set_alpn_protos([b"h2"])
    c = SSL.Connection(ctx, None)
    c.set_connect_state()
    def server():
        return t.protocol or conn
    def to_client():
        if t.out:
            c.bio_write(b"".join(t.out))
            t.out.clear()
    while True:
        try:
            c.do_handshake()
            break
        except SSL.WantReadError:
            server().data_received(c.bio_read(65536))
            to_client()
    async def roundtrip(raw):
        if raw:
            c.send(raw)
        try:
            data = c.bio_read(65536)
        except SSL.WantReadError:
            data = b""
        t0 = time.thread_time()
        server().data_received(data)
        spent = time.thread_time() - t0
        got = b""
        for i in range(10000):
            to_client()
            try:
                while True:
                    got += c.recv(65536)
            except SSL.WantReadError:
                pass
            if got:
                return spent, got
            await asyncio.sleep(0 if i < 100 else 0.001)
        raise RuntimeError("no answer")
    def post(path, body):
        head = (f"POST {path} HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: 127.0.0.1\r\n"
                f"User-Agent: ApacheBench/2.3\r\nAccept: */*\r\nContent-length: {len(body)}\r\n"
                "Content-type: application/json\r\n\r\n")
        return head.encode() + body
    context = base64.b64encode(b'{"MinIO":"bench/object"}').decode()
    gen_body = json.dumps({"context": context}).encode()
    if proto == "h2":
        import h2.config, h2.connection, h2.events
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                   header_encoding=None))
        h2c.initiate_connection()
        streams = {}
        async def call(path, body):
            # What Go's client sends: HEADERS, then DATA without a length, then END_STREAM.
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(sid, [(b":method", b"POST"), (b":path", path.encode()),
                                   (b":scheme", b"https"), (b":authority", b"127.0.0.1:7373"),
                                   (b"content-type", b"application/json"),
                                   (b"accept-encoding", b"gzip"),
                                   (b"user-agent", b"Go-http-client/2.0")])
            h2c.send_data(sid, body)
            h2c.end_stream(sid)
            spent = 0.0
            streams[sid] = [0, b"", False]
            raw = h2c.data_to_send()
            while True:
                s, got = await roundtrip(raw)
                spent += s
                for ev in h2c.receive_data(got):
                    if isinstance(ev, h2.events.ResponseReceived):
                        streams[ev.stream_id][0] = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        streams[ev.stream_id][1] += ev.data
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        streams[ev.stream_id][2] = True
                raw = h2c.data_to_send()
                if streams[sid][2]:
                    status, body, _ = streams.pop(sid)
                    if raw:  # window updates: the server's work too
                        c.send(raw)
                        data = c.bio_read(65536)
                        t0 = time.thread_time()
                        server().data_received(data)
                        spent += time.thread_time() - t0
                    return spent, status, body
                if not raw:
                    raw = b""
        _, _, got = await call("/v1/key/generate/k", gen_body)
    else:
        async def call(path, body):
            spent, got = await roundtrip(post(path, body))
            return spent, int(got.split(b" ", 2)[1]), got.split(b"\r\n\r\n", 1)[1]
        _, _, got = await call("/v1/key/generate/k", gen_body)
    ciphertext = json.loads(got).get("ciphertext", "")
    dec_body = json.dumps({"ciphertext": ciphertext, "context": context}).encode()
    out = {}
    for name, path, body in (("generate", "/v1/key/generate/k", gen_body),
                             ("decrypt", "/v1/key/decrypt/k", dec_body)):
        best = float("inf")
        for _ in range(3):
            total = 0.0
            for _ in range(n):
                spent, status, _ = await call(path, body)
                total += spent
            assert status == 200, status
            best = min(best, total / n * 1e6)
        out[name] = round(best, 1)
    print(json.dumps(out))

asyncio.run(main())
"""


def in_process(n: int) -> dict[str, dict[str, float]]:
    """Server CPU per call in one process (no sockets, no load generator): the transport
    with a trivial handler, and the full KES endpoint, over HTTP/1.1 and over h2."""
    root = Path(__file__).resolve().parents[1]
    out: dict[str, dict[str, float]] = {}
    for proto in ("h1", "h2"):
        for mode in ("transport", "full"):
            text = subprocess.run([sys.executable, "-c", INPROC, mode, str(n), proto], cwd=root,
                                  env={**os.environ, "PYTHONPATH": str(root)}, check=True,
                                  capture_output=True, text=True).stdout
            key = mode if proto == "h1" else f"{mode} h2"
            out[key] = json.loads(text.strip().splitlines()[-1])
            print(f"  in-process server CPU, {key:12}: generate {out[key]['generate']} µs/req, "
                  f"decrypt {out[key]['decrypt']} µs/req", flush=True)
    out["h2 framing"] = h2_framing_cost(n)
    print(f"  h2 framing alone (kes.http2, no TLS): {out['h2 framing']['generate']} µs/req",
          flush=True)
    return out


def h2_framing_cost(n: int) -> dict[str, float]:
    """Server CPU per call of kes.http2 alone: the request Go's client sends (HEADERS, DATA,
    END_STREAM), the answer's HEADERS and DATA, and the client's WINDOW_UPDATE, without TLS
    and without a handler. The h2 library's share of an h2 call."""
    import h2.config
    import h2.connection
    import h2.events

    from kes import http2

    server = http2.Connection(identity="ab" * 32, peer_cert=None, remote="x:1")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                  header_encoding=None))
    client.initiate_connection()
    server.feed(client.data_to_send())
    client.receive_data(server.data_to_send())
    body = json.dumps({"context": CONTEXT_B64}).encode()
    answer = STATIC_BODY.encode()
    head = [(b":method", b"POST"), (b":path", f"/v1/key/generate/{KEY}".encode()),
            (b":scheme", b"https"), (b":authority", b"127.0.0.1:7373"),
            (b"content-type", b"application/json"), (b"accept-encoding", b"gzip"),
            (b"user-agent", b"Go-http-client/2.0")]
    best = float("inf")
    for _ in range(3):
        spent = 0.0
        for _ in range(n):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, head)
            client.send_data(sid, body)
            client.end_stream(sid)
            raw = client.data_to_send()
            t0 = time.thread_time()
            for event in server.feed(raw):
                if isinstance(event, http2.Dispatch):
                    server.respond(event.stream_id, 200, "application/json", answer,
                                   date=b"Fri, 04 Dec 2026 00:00:00 GMT")
            out = server.data_to_send()
            spent += time.thread_time() - t0
            for ev in client.receive_data(out):
                if isinstance(ev, h2.events.DataReceived):
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            raw = client.data_to_send()
            t0 = time.thread_time()
            server.feed(raw)
            server.data_to_send()
            spent += time.thread_time() - t0
        best = min(best, spent / n * 1e6)
    return {"generate": round(best, 1)}


def idle_memory(files: Files, port: int, pid: int, n: int) -> float:
    """RSS the server grows by per idle keep-alive TLS connection (kB), after one request
    on each, as MinIO's idle pool leaves them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 512)), hard))
    ctx = ssl.create_default_context(cafile=str(files.path("ca.pem")))
    ctx.load_cert_chain(str(files.path("client.pem")))
    held: list[ssl.SSLSocket] = []
    req = b"POST /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"

    def open_more(k: int) -> None:
        for _ in range(k):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                server_hostname="127.0.0.1")
            s.sendall(req)
            s.recv(65536)
            held.append(s)

    try:
        open_more(20)
        before = rss_bytes(pid)
        open_more(n)
        return (rss_bytes(pid) - before) / n / 1024
    finally:
        for s in held:
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny runs: checks that it all works")
    ap.add_argument("--requests", type=int, default=20000, help="keep-alive requests per run")
    ap.add_argument("--connections", type=int, default=2000, help="requests per new-conn run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--concurrency", default="1,16,64", help="keep-alive client counts")
    ap.add_argument("--new-concurrency", default="1,16",
                    help="client counts for new connections (empty: none)")
    ap.add_argument("--trivial", action="store_true", help="transport only, no KES API")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="event loop of the bootkey server (uvloop falls back to asyncio "
                         "when not installed)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="cProfile the (single-worker) server; write the top functions here")
    ap.add_argument("--long", type=float, default=0.0, metavar="SECONDS",
                    help="only the memory run: keep-alive load for this long")
    ap.add_argument("--json", type=Path, default=None, help="write raw results here")
    ap.add_argument("--go-seconds", type=float, default=5.0,
                    help="measured seconds per MinIO-shaped (Go, h2) run")
    ap.add_argument("--no-go", action="store_true", help="skip the MinIO-shaped Go load")
    ap.add_argument("--no-ab", action="store_true", help="skip the ab HTTP/1.1 table")
    a = ap.parse_args(argv)

    for tool in ("ab", "nginx"):
        if shutil.which(tool) is None and not (tool == "nginx" and a.no_nginx):
            print(f"bench.kes: {tool} not found — run scripts/setup.sh", file=sys.stderr)
            return 69
    plan = Plan(a.requests, a.connections, a.repeat,
                tuple(int(c) for c in a.concurrency.split(",") if c),
                tuple(int(c) for c in a.new_concurrency.split(",") if c))
    plan.go_seconds = a.go_seconds
    if a.quick:
        plan = Plan(300, 30, 1, (1, 16), (4,), go_seconds=0.5, go_warmup=0.3)
    go = not a.no_go and not a.long
    if go and shutil.which("go") is None:
        print("bench.kes: go not found — run scripts/setup.sh (or pass --no-go)", file=sys.stderr)
        return 69
    workers = [int(w) for w in a.workers.split(",")]
    results = Results(trivial=a.trivial, versions=versions())
    loop = a.loop if a.loop == "asyncio" or "not installed" not in results.versions["uvloop"] \
        else "asyncio (uvloop not installed)"
    results.versions["server loop"] = loop
    work = Path(tempfile.mkdtemp(prefix="bootkey-bench-kes-"))
    from tests.support.bao import DevBao

    bao = DevBao(work / "bao").start()
    try:
        files = Files.create(work)
        results.load.append(os.getloadavg()[0])
        if not a.long:
            results.in_process = in_process(1000 if a.quick else 10000)
        binary = build_go_load(work) if go else None
        with ExitStack() as stack:
            jobs: list[Job] = []
            go_jobs: list[GoJob] = []
            servers: list[tuple[int, subprocess.Popen[bytes], int]] = []
            for w in workers if not a.long else workers[:1]:
                proc, port = stack.enter_context(bootkey_kes(
                    files, w, bao.address, trivial=a.trivial, loop=a.loop,
                    profile=str(a.profile or "")))
                if "TRIVIAL" in (work / "serve.log").read_text(errors="replace"):
                    results.trivial = True
                bodies = prepare_bodies(files, port, results.trivial)
                print(f"bootkey KES, {w} worker(s), pid {proc.pid}, port {port}"
                      f"{' (TRIVIAL HANDLER)' if results.trivial else ''}", flush=True)
                target = Target(files, port, proc.pid)
                if a.long:
                    long_run(target, bodies, a.long, results)
                    continue
                servers.append((w, proc, port))
                results.memory[f"bootkey-{w}"] = {"rss_before_mib": rss_bytes(proc.pid) / 2**20}
                jobs += [Job(f"bootkey-{w}", op, target, f"/v1/key/{op}/{KEY}", bodies[op])
                         for op in ("generate", "decrypt")]
                go_jobs += [GoJob(f"bootkey-{w}-h2", op, target, f"/v1/key/{op}/{KEY}",
                                  bodies[op]) for op in ("generate", "decrypt")]
            if go:
                # The "before": the same server offering only HTTP/1.1 in ALPN.
                proc, port = stack.enter_context(bootkey_kes(
                    files, 1, bao.address, trivial=a.trivial, loop=a.loop, http2=False))
                bodies = prepare_bodies(files, port, results.trivial)
                print(f"bootkey KES HTTP/1.1 only, 1 worker, pid {proc.pid}, port {port}",
                      flush=True)
                target = Target(files, port, proc.pid)
                go_jobs += [GoJob("bootkey-1-h1", op, target, f"/v1/key/{op}/{KEY}",
                                  bodies[op]) for op in ("generate", "decrypt")]
            if not a.no_nginx and not a.long:
                # nginx ignores the body; it gets the same bytes as a generate request.
                nginx_body = files.path("nginx.json")
                nginx_body.write_text(json.dumps({"context": CONTEXT_B64}))
                for w in workers:
                    proc, port = stack.enter_context(nginx(files, w))
                    print(f"nginx, {w} worker(s), pid {proc.pid}, port {port}", flush=True)
                    jobs.append(Job(f"nginx-{w}", "static", Target(files, port, proc.pid),
                                    "/v1/key/generate/k", nginx_body))
                    if go:
                        proc, port = stack.enter_context(nginx(files, w, http2=True))
                        print(f"nginx h2, {w} worker(s), pid {proc.pid}, port {port}",
                              flush=True)
                        go_jobs.append(GoJob(f"nginx-{w}-h2", "static",
                                             Target(files, port, proc.pid),
                                             "/v1/key/generate/k", nginx_body))
            if go_jobs and binary is not None:
                measure_go(go_jobs, binary, plan=plan, results=results)
            if jobs and not a.no_ab:
                measure(jobs, plan=plan, results=results)
            for w, proc, port in servers:
                results.memory[f"bootkey-{w}"]["rss_after_mib"] = rss_bytes(proc.pid) / 2**20
                if w == 1:
                    kb = idle_memory(files, port, proc.pid, 100 if a.quick else 1000)
                    results.memory["idle_connection_kb"] = round(kb, 1)
                    print(f"  idle keep-alive connection: {kb:.1f} kB of server RSS", flush=True)
                if a.profile:
                    proc.send_signal(signal.SIGUSR1)
                    proc.wait(30)
        results.load.append(os.getloadavg()[0])
    finally:
        bao.stop()
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(asdict(results), indent=1))
    if not a.long:
        if results.go_cells:
            print()
            print(markdown_go(results, plan))
        print()
        print(markdown(results, plan, workers))
        print()
        for mode, v in results.in_process.items():
            print(f"in-process server CPU per request ({mode}): "
                  + ", ".join(f"{op} {us} µs" for op, us in v.items()))
        print()
        print("versions:", ", ".join(f"{k} {v}" for k, v in results.versions.items()))
        print(f"load average (1 min) before/after: {results.load}")
        for k, v in results.memory.items():
            print(f"memory {k}: {v}")
    failed = sum(c["failed"] for c in [*results.cells.values(), *results.go_cells.values()])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
