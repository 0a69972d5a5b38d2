"""Benchmark: a boot storm. N simulated hosts run bootkey's own `unlock --all --check`
code at once against one OpenBao, and the thundering herd after a Vault outage.

    .venv/bin/python -m bench.storm [--sizes 100,500] [--procs 2] [--outage 40]
                                    [--retry-initial 0.5] [--retry-max 30]

What runs, per host (distinct host_id, AppRole, secret_id and two sealed keys):
`VaultSession.from_config(cfg)`, `session.login()`, then `unlock.unlock_all(session,
volumes, check=True, ...)` — exactly what `bootkey unlock --all --check` calls after it has
read the local LUKS headers. What is left out is per host, not per Vault: reading headers
(the volumes are given as `unlock.Volume`s with their keyslots) and the keyslot test
(`luks.test_key` answers OK in the worker processes), and mlockall.

Vault is `bao server -dev` (in-memory storage, no TLS) behind a counting loopback proxy
(`CountingProxy`): it parses each HTTP/1.1 request on its way to bao, attributes it to a
host by the `X-Bench-Host` header the bench adds to each host's hvac sessions, and
timestamps its arrival. "Vault down" is the proxy resetting every connection at accept
(clients see a connection error, as with a stopped server) until it is switched back up.

Hosts are threads spread over `--procs` worker processes (spawned, so each has its own
GIL); all start at one CLOCK_MONOTONIC instant. The output reports the CPU seconds of
bao, the proxy and the workers, to show which side was the bottleneck.

Jitter: the product retries with tenacity's full-jitter `wait_random_exponential`. For
the comparison run the workers replace it with plain `wait_exponential` (same initial
value and cap): a bench parameter, not a product switch.

Prints Markdown for docs/benchmarks.md ("Boot storm") and, with --json, raw numbers.
Not part of the test suite (tests/test_bench_storm.py runs a small N).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hvac

from bootkey import config as cfgmod
from bootkey import keystore
from bootkey.vault import VaultSession
from bootkey_core.secret import SecretBuffer
from tests.support.vaultenv import provision

HOST_HEADER = "X-Bench-Host"
VOLUMES_PER_HOST = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")


# The counting proxy -------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic() when the request's head reached the proxy
    host: int  # -1 if the request carried no X-Bench-Host header
    method: str
    path: str


def parse_messages(buf: bytearray) -> list[tuple[str, str, dict[str, str]]]:
    """Remove every complete HTTP/1.1 message (head and body) from the front of `buf`;
    return the first two words of the start line (method and path of a request) and
    the lower-cased headers of each."""
    out: list[tuple[str, str, dict[str, str]]] = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            last = buf.find(b"\r\n0\r\n\r\n", end)
            if last < 0:
                return out
            size = last + 7 - (end + 4)
        else:
            size = int(headers.get("content-length") or 0)
        if len(buf) < end + 4 + size:
            return out
        del buf[:end + 4 + size]
        first, second, *_ = [*head[0].split(" "), ""]
        out.append((first, second, headers))


class CountingProxy:
    """Loopback HTTP/1.1 proxy in front of bao that records each request's arrival and
    can play "Vault down" (reset every connection) and back up again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.arrivals: list[Arrival] = []
        self.resets: list[float] = []  # connections reset while down
        self.service: list[float] = []  # seconds from a request's arrival to its answer
        self.up = True
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storm-proxy", daemon=True)
        self.native_id = 0

    def start(self) -> CountingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, backlog=4096))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/self/task/{self.native_id}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def set_up(self, up: bool) -> None:
        def flip() -> None:
            self.up = up
            if not up:
                for w in list(self._writers):
                    w.transport.abort()

        self._loop.call_soon_threadsafe(flip)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.resets.append(time.monotonic())
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_w}
        pending: deque[float] = deque()  # arrival times of requests not yet answered
        try:
            await asyncio.gather(self._requests(reader, up_w, pending),
                                 self._answers(up_r, writer, pending))
        finally:
            self._writers -= {writer, up_w}
            for w in (writer, up_w):
                w.transport.abort()

    async def _requests(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter,
                        pending: deque[float]) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                now = time.monotonic()
                up.write(data)
                buf += data
                for method, path, headers in parse_messages(buf):
                    host = int(headers.get(HOST_HEADER.lower(), "-1"))
                    self.arrivals.append(Arrival(now, host, method, path.split("?")[0]))
                    pending.append(now)
        with contextlib.suppress(OSError):
            up.write_eof()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       pending: deque[float]) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                now = time.monotonic()
                writer.write(data)
                buf += data
                for _answer in parse_messages(buf):
                    if pending:
                        self.service.append(now - pending.popleft())
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


# Provisioning -------------------------------------------------------------------------


@dataclass
class HostSpec:
    """What one simulated host knows: its config and its volumes' headers."""

    index: int
    toml: str
    volumes: list[tuple[str, str, int]]  # (name, luks_uuid, keyslot)


def host_toml(address: str, host_id: str, role_id: str, secret_id_file: Path, *,
              retry_initial: float, retry_max: float, deadline: float) -> str:
    return (f'host_id = "{host_id}"\n[vault]\naddress = ["{address}"]\n'
            f'[vault.approle]\nrole_id = "{role_id}"\nsecret_id_file = "{secret_id_file}"\n'
            f'[unlock]\ndeadline = "{deadline}s"\nretry_initial = "{retry_initial}s"\n'
            f'retry_max = "{retry_max}s"\n')


def provision_hosts(root: hvac.Client, address: str, work: Path, n: int, *,
                    retry_initial: float, retry_max: float, deadline: float,
                    on_key: Callable[[bytes], None] = lambda _k: None,
                    parallel: int = 8) -> list[HostSpec]:
    """N hosts the way `bootkey enroll` leaves them in Vault: policies, AppRole,
    secret_id, and per volume a KV entry holding a transit-sealed 64-byte key. Goes
    to bao directly (not through the proxy). `on_key` sees each key (the test suite's
    secrets registry)."""
    work.mkdir(parents=True, exist_ok=True)
    provision(root, work / "first")  # engines and mounts once, before the hosts race

    def one(i: int) -> HostSpec:
        client = hvac.Client(url=root.url, token=root.token)
        # bootkey setup-vault's own plan and executor, as an operator would run it
        env = provision(client, work / f"host-{i}", host_id=os.urandom(16).hex())
        host_id = env.host_id
        text = host_toml(address, host_id, env.role_id, env.secret_id_file,
                         retry_initial=retry_initial, retry_max=retry_max, deadline=deadline)
        cfg = cfgmod.parse(text)
        enroll = VaultSession(cfg.vault, token=env.enroll_token, deadline=30)
        vols = []
        for v in range(VOLUMES_PER_HOST):
            luks_uuid = str(uuid_of(i, v))
            loc = keystore.location_for(cfg, host_id, luks_uuid)
            with SecretBuffer.random(keystore.KEY_BYTES) as key:
                on_key(bytes(key.view))
                sealed = keystore.seal(enroll, loc, key)
            slot = 1
            entry = keystore.Entry(host_id=host_id, luks_uuid=luks_uuid, name=f"vol{v}",
                                   keys=[keystore.SealedKey(keyslot=slot, sealed=sealed,
                                                            created_at=keystore.now())])
            enroll.kv_write(loc.kv_mount, loc.kv_version, loc.path, entry.to_kv(),
                            create_only=True)
            vols.append((f"vol{v}", luks_uuid, slot))
        return HostSpec(i, text, vols)

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(n)))


def uuid_of(host: int, volume: int) -> str:
    return f"{host:08x}-0000-4000-8000-{volume:012x}"


# The hosts (worker processes) ---------------------------------------------------------


@dataclass
class HostResult:
    index: int
    ok: bool
    started: float
    done: float
    error: str = ""


def _key_test_ok(dev: str, key: SecretBuffer | bytes, keyslot: int | None = None) -> Any:
    from bootkey import luks

    return luks.KeyTest.OK


def _no_jitter(self: Any, attempt: int) -> float:
    """`Backoff.delay` without its randomness: the top of the jitter window, every time."""
    return float(min(self.cap, self.initial * 2.0 ** min(attempt - 1, 60)))


def boot_host(spec: HostSpec, start_at: float) -> HostResult:
    """One host's `bootkey unlock --all --check` after the headers are read."""
    from bootkey import unlock

    cfg = cfgmod.parse(spec.toml)
    volumes = [unlock.Volume(name, f"/dev/bench/{spec.index}/{name}", luks_uuid,
                             keystore.location_for(cfg, cfg.resolved_host_id(), luks_uuid),
                             frozenset({slot}), source="token",
                             header_keyslots=frozenset({slot}))
               for name, luks_uuid, slot in spec.volumes]
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    t0 = time.monotonic()
    try:
        session = VaultSession.from_config(cfg)
        # attribution for the proxy; the config has one address, so one client
        session.raw_client().session.headers[HOST_HEADER] = str(spec.index)
        session.login()
        results = unlock.unlock_all(session, volumes, check=True,
                                    parallel=cfg.unlock.parallel,
                                    deadline_at=t0 + cfg.unlock.deadline)
    except Exception as e:  # a benchmark reports every failure
        return HostResult(spec.index, False, t0, time.monotonic(), f"{type(e).__name__}: {e}")
    bad = [r.reason or "" for r in results if not r.ok]
    return HostResult(spec.index, not bad and len(results) == len(volumes), t0,
                      time.monotonic(), "; ".join(bad))


def worker(specs: list[dict[str, Any]], jitter: bool,
           conn: multiprocessing.connection.Connection) -> None:
    """A worker process: its hosts as threads, all released at the instant the driver
    sends once every worker has said it is ready."""
    from bootkey import luks
    from bootkey_core import vault

    luks.test_key = _key_test_ok  # the keyslot test is per host, not Vault's load
    if not jitter:
        # the comparison run: same initial wait and cap, no randomness
        vault.Backoff.delay = _no_jitter  # type: ignore[method-assign]
    hosts = [HostSpec(**s) for s in specs]
    threading.stack_size(1 << 20)
    conn.send("ready")
    start_at: float = conn.recv()
    before = resource.getrusage(resource.RUSAGE_SELF)
    with ThreadPoolExecutor(len(hosts)) as pool:
        results = list(pool.map(lambda h: boot_host(h, start_at), hosts))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    conn.send(json.dumps({"results": [asdict(r) for r in results], "cpu": cpu}))
    conn.close()


# One run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    n: int
    jitter: bool
    outage: float
    unlocked: int
    requests: int
    per_host_max: int
    per_host_mean: float
    by_kind: dict[str, int]
    resets: int
    p50: float  # seconds to unlocked, from the storm's start (or Vault's return)
    p99: float
    mean_rate: float  # requests/s from the first arrival to the last
    peak_1s: float  # most arrivals in any 1 s window (after Vault's return, for a herd)
    peak_100ms: float  # ... in any 100 ms window, times 10
    vault_p50: float  # Vault's answer time seen at the proxy (after its return)
    vault_p99: float
    cpu: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)


def kind(a: Arrival) -> str:
    """What a request was for, without the per-host parts of its path."""
    for tail, name in (("/login", "login"), ("/lookup-self", "token lookup"),
                       ("/secret-id/lookup", "secret_id lookup")):
        if a.path.endswith(tail):
            return name
    if "/decrypt/" in a.path:
        return "transit decrypt"
    return f"{a.method} {'kv read' if '/data/' in a.path else a.path}"


def peak(times: list[float], window: float) -> float:
    """Most events in any `window`-second interval, as events/s."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run(specs: list[HostSpec], proxy: CountingProxy, *, procs: int, jitter: bool,
        outage: float = 0.0, bao_pid: int | None = None) -> RunResult:
    """Boot every host at once; with `outage` > 0 Vault is down from the start and comes
    back `outage` seconds later."""
    proxy.arrivals.clear()
    proxy.resets.clear()
    proxy.service.clear()
    proxy.set_up(outage <= 0)
    ctx = multiprocessing.get_context("spawn")
    chunks = [specs[i::procs] for i in range(procs) if specs[i::procs]]
    pipes, children = [], []
    cpu0 = {"bao": proc_cpu(bao_pid) if bao_pid else 0.0, "proxy": proxy.cpu_seconds()}
    for chunk in chunks:
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=worker, args=([asdict(s) for s in chunk], jitter, theirs))
        p.start()
        theirs.close()
        pipes.append(mine)
        children.append(p)
    for c in pipes:
        if c.recv() != "ready":
            raise RuntimeError("a worker process failed to start")
    # every host thread is created inside this margin
    start_at = time.monotonic() + 0.5
    for c in pipes:
        c.send(start_at)
    back_at = start_at
    if outage > 0:
        time.sleep(max(0.0, start_at + outage - time.monotonic()))
        back_at = time.monotonic()
        proxy.set_up(True)
    payloads = [json.loads(r.recv()) for r in pipes]
    for p in children:
        p.join(30)
    wall = time.monotonic() - start_at
    results = [HostResult(**h) for pl in payloads for h in pl["results"]]
    arrivals = sorted(proxy.arrivals, key=lambda a: a.at)
    per_host = Counter(a.host for a in arrivals)
    times = [a.at for a in arrivals]
    after = [t for t in times if t >= back_at]
    done = [h.done - back_at for h in results if h.ok]
    cpu = {"bao": (proc_cpu(bao_pid) - cpu0["bao"]) if bao_pid else float("nan"),
           "proxy": proxy.cpu_seconds() - cpu0["proxy"],
           "hosts": sum(pl["cpu"] for pl in payloads)}
    return RunResult(
        n=len(specs), jitter=jitter, outage=outage,
        unlocked=sum(1 for h in results if h.ok), requests=len(arrivals),
        per_host_max=max(per_host[s.index] for s in specs),
        per_host_mean=sum(per_host[s.index] for s in specs) / len(specs),
        by_kind=dict(Counter(kind(a) for a in arrivals)), resets=len(proxy.resets),
        p50=percentile(done, 50) if done else float("nan"),
        p99=percentile(done, 99) if done else float("nan"),
        mean_rate=len(times) / max(1e-3, times[-1] - times[0]) if times else 0.0,
        peak_1s=peak(after, 1.0), peak_100ms=peak(after, 0.1),
        vault_p50=percentile(proxy.service, 50) if proxy.service else float("nan"),
        vault_p99=percentile(proxy.service, 99) if proxy.service else float("nan"),
        cpu=cpu, wall=wall, errors=sorted({h.error for h in results if not h.ok})[:5])


# Main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def vault(work: Path) -> Iterator[tuple[Any, CountingProxy]]:
    from tests.support.bao import DevBao

    bao = DevBao(work / "bao").start()
    proxy = CountingProxy(bao.port).start()
    try:
        yield bao, proxy
    finally:
        proxy.stop()
        bao.stop()


def table(rows: list[RunResult]) -> str:
    out = ["| hosts | Vault | jitter | unlocked | requests/host (max · mean) | "
           "p50 / p99 to unlocked | Vault answer p50 / p99 | mean rate | "
           "peak 1 s · 100 ms | CPU s: bao · hosts · proxy |",
           "|---:|---|---|---:|---|---|---|---:|---|---|"]
    for r in rows:
        vault_col = "up" if r.outage <= 0 else f"down {r.outage:g} s, then up"
        since = "" if r.outage <= 0 else " after return"
        out.append(
            f"| {r.n} | {vault_col} | {'full' if r.jitter else 'none'} | {r.unlocked}/{r.n} | "
            f"{r.per_host_max} · {r.per_host_mean:.2f} | {r.p50:.2f} s / {r.p99:.2f} s{since} "
            f"| {r.vault_p50 * 1e3:.1f} / {r.vault_p99 * 1e3:.1f} ms "
            f"| {r.mean_rate:.0f}/s | {r.peak_1s:.0f}/s · {r.peak_100ms:.0f}/s | "
            f"{r.cpu['bao']:.1f} · {r.cpu['hosts']:.1f} · {r.cpu['proxy']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,500")
    ap.add_argument("--procs", type=int, default=2, help="worker processes for the hosts")
    ap.add_argument("--outage", type=float, default=40.0,
                    help="seconds Vault is down in the herd runs (0: no herd runs)")
    ap.add_argument("--retry-initial", type=float, default=0.5)
    ap.add_argument("--retry-max", type=float, default=30.0)
    ap.add_argument("--deadline", type=float, default=300.0)
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bootkey-storm-"))
    rows: list[RunResult] = []
    try:
        with vault(work) as (bao, proxy):
            for n in (int(s) for s in a.sizes.split(",")):
                # hosts log in again on every run (their secret_ids have no use limit)
                specs = provision_hosts(bao.client(), f"http://127.0.0.1:{proxy.port}",
                                        work / f"n{n}", n, retry_initial=a.retry_initial,
                                        retry_max=a.retry_max, deadline=a.deadline)
                runs = [(True, 0.0)] + ([(True, a.outage), (False, a.outage)]
                                        if a.outage > 0 else [])
                for jitter, outage in runs:
                    r = run(specs, proxy, procs=a.procs, jitter=jitter, outage=outage,
                            bao_pid=bao.proc.pid)
                    rows.append(r)
                    print(json.dumps(asdict(r)), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
