"""`bootkey agent`: the long-running boot service. Wiring only; decisions live in
unlock.py, vault.py and the component modules.

Start order: harden memory → control socket, metrics → log in (retrying, STATUS says
what it waits for) → unlock every volume (mode "agent") → READY=1 → the main loop
(SIGHUP reloads) while the renewal thread keeps the token alive and the components
(key socket, hotplug, KES) serve, until SIGTERM → STOPPING=1, wipe, exit 0.

Every wait is bounded by `unlock.deadline`: past it the agent exits with a clear error
(systemd's Restart= brings it back) rather than hanging boot.

Watchdog: each loop (main, renewal, keysocket, hotplug, kes, control) beats into
`self.liveness` at least every `liveness.tick` seconds, or declares bounded work
(`busy_for`); the watchdog thread sends WATCHDOG=1 only while none is stale
(bootkey/liveness.py), so a wedged loop gets the agent restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from bootkey import luks, status, unlock
from bootkey.config import Config
from bootkey.control import ControlServer
from bootkey.journal import fields
from bootkey.keysocket import KeySocketServer
from bootkey.liveness import Liveness
from bootkey.metrics import AgentMetrics, MetricsServer
from bootkey.notify import Notifier, watchdog_interval
from bootkey.unlock import Volume, VolumeResult
from bootkey.vault import VaultSession, WaitInfo
from bootkey_core import secret
from bootkey_core.errors import BootkeyError, DeadlineExceeded
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)

# Without WatchdogSec= nobody reads the beats; loops still wake this often (cheap).
NO_WATCHDOG_LIMIT = 60.0
# Slack on top of a bounded piece of work before silence counts as a hang: thread
# scheduling and cleanup after the work's own deadline.
BUSY_SLACK = 30.0
# renew-self is retried for this long before the session falls back to a login
# (VaultSession.renew_or_relogin).
RENEW_DEADLINE = 30.0


def keysocket_component(agent: Agent) -> Component | None:
    """The crypttab key socket: in socket mode, or whenever systemd hands us its fd."""
    from bootkey import keysocket

    fds = keysocket.systemd_fds()
    if agent.cfg.unlock.mode != "socket" and keysocket.pick_activated_fd(fds) is None:
        return None
    server = keysocket.KeySocketServer(agent.cfg.keysocket, agent.key_for, agent.is_managed,
                                       activated_fds=fds, heartbeat=agent.beater("keysocket"),
                                       tick=agent.liveness.tick)
    return _KeySocket(server, agent)


@dataclass
class _KeySocket:
    """The key socket plus /run/cryptsetup-keys.d/<volume>.key links, so crypttab lines
    with keyfile `none` find it after their TPM2/FIDO2 tokens."""

    server: KeySocketServer
    agent: Agent
    kind = "keysocket"

    def start(self) -> None:
        self.server.start()
        names = sorted(self.agent.volumes())
        try:
            self.server.link_volumes(names, self.agent.cfg.keysocket.keys_dir)
        except OSError as e:  # /run/cryptsetup-keys.d not writable: the socket still works
            log.warning("key socket: cannot place /run/cryptsetup-keys.d links: %s",
                        e.strerror)

    def stop(self) -> None:
        self.server.stop()
        self.agent.liveness.forget("keysocket")

    def reload(self) -> None:
        """Links for exactly the volumes of the re-read config."""
        try:
            self.server.link_volumes(sorted(self.agent.volumes(refresh=True)),
                                     self.agent.cfg.keysocket.keys_dir)
        except OSError as e:
            log.warning("key socket: cannot place /run/cryptsetup-keys.d links: %s",
                        e.strerror)

    def facts(self) -> dict[str, Any]:
        return {"enabled": True, "path": str(self.server.listening_path),
                "activated": self.server.activated}


def _same_device(spec: str, devnode: str) -> bool:
    try:
        return os.path.realpath(luks.resolve_device(spec)) == os.path.realpath(devnode)
    except BootkeyError:
        return False


def hotplug_component(agent: Agent) -> Component | None:
    """Volumes that appear after boot are unlocked like the ones present at start."""
    if agent.cfg.unlock.mode != "agent":
        return None
    from bootkey.hotplug import HotplugWatcher

    return _Hotplug(HotplugWatcher(agent.on_luks_device, heartbeat=agent.beater("hotplug"),
                                   tick=agent.liveness.tick), agent)


@dataclass
class _Hotplug:
    watcher: Any  # bootkey.hotplug.HotplugWatcher, imported lazily (libudev)
    agent: Agent
    kind = "hotplug"

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.agent.liveness.forget("hotplug")

    def facts(self) -> dict[str, Any]:
        return {"enabled": True, "source": self.watcher.source}


class KesComponent:
    """The embedded KES endpoint, on its own event loop thread, with master keys fetched
    through the agent's Vault session (same token, renewed by the agent)."""

    kind = "kes"

    def __init__(self, agent: Agent) -> None:
        import kes.service

        self.agent = agent
        self.service = kes.service.build(agent.cfg.kes, agent._session())
        # the service's own thread: it renews a Vault-PKI server certificate if configured
        self.thread = self.service.thread()
        self._beat = agent.beater("kes")
        if agent.metrics is not None:
            agent.metrics.registry.register(self.service.api.metrics)

    def start(self) -> None:
        self.thread.__enter__()
        self.service.start()
        self.service.create_configured_keys()
        log.info("KES endpoint listening on %s:%d", self.service.host, self.thread.port)
        if self.thread.loop is not None:
            self.thread.loop.call_soon_threadsafe(self._tick)

    def _tick(self) -> None:
        """Runs on KES's event loop: a loop blocked by a handler stops beating."""
        self._beat()
        if self.thread.loop is not None:
            self.thread.loop.call_later(self.agent.liveness.tick, self._tick)

    def stop(self) -> None:
        self.agent.liveness.forget("kes")
        self.thread.__exit__(None, None, None)
        self.service.close()
        if self.agent.metrics is not None:
            self.agent.metrics.registry.unregister(self.service.api.metrics)

    def reload(self) -> None:
        """Policies, cache expiry, log levels; the service logs what needs a restart."""
        self.service.reload(self.agent.cfg.kes)

    def facts(self) -> dict[str, Any]:
        m = self.service.api.metrics
        return {"enabled": True, "listening": f"{self.service.host}:{self.thread.port}",
                "keys_cached": len(self.service.keyring.cached_names()),
                "requests": {k: m.count(k) for k in ("success", "error", "failure")}}


def kes_component(agent: Agent) -> Component | None:
    if not agent.cfg.kes.enabled:
        return None
    return KesComponent(agent)


class Interrupted(Exception):
    """SIGTERM arrived while waiting."""


class Component(Protocol):
    """Started and stopped by the agent. Optional: `reload()` (SIGHUP, after the agent
    took the new config) and `facts() -> dict` (for `bootkey status`)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


ComponentFactory = Callable[["Agent"], Component | None]


@dataclass
class Agent:
    cfg: Config
    check: bool = False
    require_mlock: bool = False
    # SIGHUP calls this for the new config (the CLI re-reads the same file); None: no reload
    reload_config: Callable[[], Config] | None = None
    notifier: Notifier = field(default_factory=Notifier)
    liveness: Liveness = field(default_factory=lambda: Liveness(NO_WATCHDOG_LIMIT))
    metrics: AgentMetrics | None = None
    # started before the Vault login (they wait for it themselves) / after it
    early_components: list[ComponentFactory] = field(
        default_factory=lambda: [keysocket_component, hotplug_component])
    components: list[ComponentFactory] = field(default_factory=lambda: [kes_component])
    stop_event: threading.Event = field(default_factory=threading.Event)
    session: VaultSession | None = None
    results: dict[str, VolumeResult] = field(default_factory=dict)
    results_at: dict[str, float] = field(default_factory=dict)  # wall clock, for status
    logged_in: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    _initial_done: threading.Event = field(default_factory=threading.Event)
    _deferred: list[str] = field(default_factory=list)
    _volumes: dict[str, Volume] = field(default_factory=dict)
    _volumes_at: float = 0.0
    _volumes_lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _reload_requested: threading.Event = field(default_factory=threading.Event)
    _started: list[Component] = field(default_factory=list)
    _since: float = field(default_factory=time.time)
    _watchdog_every: float | None = None

    # ---- volumes and keys, for the components ------------------------------------

    def volumes(self, *, refresh: bool = False) -> dict[str, Volume]:
        """Managed volumes by name; re-resolved on request at most every 2 s (a key
        socket client or hotplug event may name a volume that just appeared)."""
        with self._volumes_lock:
            stale = refresh and time.monotonic() - self._volumes_at > 2.0
            if stale or not self._volumes_at:
                vols, _ = unlock.resolve_volumes(self.cfg)
                self._volumes = {v.name: v for v in vols}
                self._volumes_at = time.monotonic()
            return dict(self._volumes)

    def is_managed(self, name: str) -> bool:
        return name in self.volumes() or name in self.volumes(refresh=True)

    def key_for(self, volume: str, deadline: float) -> SecretBuffer | None:
        """The key socket's provider: waits (bounded) for the Vault login, then fetches,
        unseals and verifies the volume's key. None declines."""
        vol = self.volumes().get(volume) or self.volumes(refresh=True).get(volume)
        if vol is None:
            return None
        if not self.logged_in.wait(max(0.0, deadline - time.monotonic())):
            log.warning("key socket: Vault login not done in time for %s", volume)
            return None
        try:
            return unlock.key_for_volume(self._session(), vol, deadline)
        except BootkeyError as e:
            log.error("key socket: volume %s: %s", volume, e)
            return None

    def _session(self) -> VaultSession:
        if self.session is None:
            raise RuntimeError("agent: no Vault session before login")
        return self.session

    def on_luks_device(self, devnode: str, *, loop: str = "hotplug") -> None:
        """Hotplug: unlock `devnode` if it is ours (token for this host, or configured).
        Opening is idempotent, so duplicate udev events cost a header read. `loop` is
        the loop this runs on, busy (bounded by the unlock deadline) meanwhile."""
        with self._volumes_lock:
            if not self._initial_done.is_set():
                # the first unlock round is running: it handles what it resolved, and
                # the rest is looked at right after it (no racing duplicate opens)
                self._deferred.append(devnode)
                return
        self.beat(loop, busy_for=self.cfg.unlock.deadline)
        try:
            self._unlock_hotplugged(devnode)
        finally:
            self.beat(loop)

    def _unlock_hotplugged(self, devnode: str) -> None:
        try:
            hdr = luks.inspect(devnode)
        except BootkeyError:
            return
        host = self.cfg.resolved_host_id()
        configured = next((vc for vc in self.cfg.volume
                           if _same_device(vc.device, devnode)), None)
        vol = unlock.volume_from_header(hdr, self.cfg, host, configured)
        if vol is None:
            return
        prev = self.results.get(vol.name)
        if prev is not None and prev.ok:
            return
        log.info("hotplug: %s appeared, unlocking %s", devnode, vol.name,
                 extra=fields(volume=vol.name, luks_uuid=vol.luks_uuid, device=devnode))
        use = unlock.check_key if self.check else unlock.open_with_key
        self.record(unlock.unlock_one(self._session(), vol, use,
                                      time.monotonic() + self.cfg.unlock.deadline))
        with self._volumes_lock:
            self._volumes_at = 0.0  # re-resolve on next use
        self.notifier.status(self.summary())

    def _initial_round_done(self) -> None:
        with self._volumes_lock:
            self._initial_done.set()
            deferred, self._deferred = list(dict.fromkeys(self._deferred)), []
        for devnode in deferred:
            self.on_luks_device(devnode, loop="main")

    def _report_ready(self, status: str) -> None:
        with self._volumes_lock:
            if self.ready.is_set():
                self.notifier.status(status)
                return
            self.ready.set()
        self.notifier.ready(status)
        log.info("ready: %s", status)

    def _ready_at_the_latest(self, seconds: float) -> None:
        if self.stop_event.wait(seconds) or self.ready.is_set():
            return
        self._report_ready(f"{self.notifier.last_status or 'starting'} (boot goes on; "
                           "volumes open when Vault answers)")

    # ---- waiting that SIGTERM interrupts -----------------------------------------

    def _sleep(self, seconds: float) -> None:
        if self.stop_event.wait(seconds):
            raise Interrupted

    def _on_wait(self, w: WaitInfo) -> None:
        self.notifier.status(f"waiting for Vault: attempt {w.attempt}, next in "
                             f"{w.next_in:.0f} s")

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stop_event.set()
        self._wake.set()

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the main loop reloads, outside the signal handler.
        self._reload_requested.set()
        self._wake.set()

    # ---- liveness ----------------------------------------------------------------

    def beat(self, name: str, *, busy_for: float | None = None) -> None:
        """Loop `name` made progress; `busy_for`: it starts work bounded by that many
        seconds (plus BUSY_SLACK), during which it may be silent."""
        now = time.monotonic()
        self.liveness.beat(name, now=now,
                           busy_until=None if busy_for is None else now + busy_for + BUSY_SLACK)

    def beater(self, name: str) -> Callable[[], None]:
        return lambda: self.beat(name)

    def _watchdog(self, interval: float) -> None:
        withheld = False
        while not self.stop_event.wait(interval):
            stale = self.liveness.details(time.monotonic())
            if not stale:
                if withheld:
                    log.warning("watchdog: every loop is progressing again")
                    self.notifier.status(self.summary())
                    withheld = False
                self.notifier.watchdog()
                continue
            if not withheld:
                what = ", ".join(f"{s.name} (silent {s.silent_for:.0f} s)" for s in stale)
                log.error("watchdog: no progress from %s; WATCHDOG=1 withheld so systemd "
                          "restarts the agent", what)
                self.notifier.status(f"watchdog: no progress from {what}")
                withheld = True

    # ---- state, for status and metrics ---------------------------------------------

    def record(self, r: VolumeResult) -> None:
        self.results[r.name] = r
        self.results_at[r.name] = time.time()
        if self.metrics is not None:
            self.metrics.volume_result(r)

    def snapshot(self) -> dict[str, Any]:
        """What `bootkey status` shows (the control socket's `status` command)."""
        facts: dict[str, dict[str, Any]] = {}
        for comp in list(self._started):
            fn, kind = getattr(comp, "facts", None), getattr(comp, "kind", None)
            if fn is not None and kind is not None:
                facts[kind] = fn()
        now = time.monotonic()
        return {"status": {
            "agent": {"running": True, "pid": os.getpid(), "since": status.iso(self._since),
                      "mode": self.cfg.unlock.mode, "check": self.check,
                      "ready": self.ready.is_set(), "status": self.notifier.last_status,
                      "watchdog": {"interval": self._watchdog_every,
                                   "loops": self.liveness.loops(),
                                   "stale": self.liveness.stale(now)}},
            "volumes": [status.volume_entry(r, self.results_at.get(n))
                        for n, r in sorted(self.results.items())],
            "vault": status.vault_facts(self.session, self.cfg.vault),
            "keysocket": facts.get("keysocket", {"enabled": False}),
            "hotplug": facts.get("hotplug", {"enabled": False}),
            "kes": facts.get("kes", {"enabled": False}),
            "metrics": {"enabled": self.cfg.metrics.address is not None,
                        "address": self.cfg.metrics.address},
        }}

    # ---- SIGHUP --------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config and apply what can change while running: volumes (new ones
        are unlocked now), KES policies/cache/log levels, key links. The rest keeps its
        running value and the log names it."""
        if self.reload_config is None:
            log.warning("reload: this agent has no config file to re-read; ignored")
            return
        try:
            new = self.reload_config()
        except BootkeyError as e:
            log.error("reload: %s; keeping the running configuration", e)
            self.notifier.status(f"{self.summary()}; reload failed: the running "
                                 "configuration stays (see the journal)")
            return
        old = self.cfg
        fixed = restart_only_changes(old, new)
        self.cfg = new.model_copy(update={
            "host_id": old.host_id, "vault": old.vault, "keysocket": old.keysocket,
            "control": old.control, "metrics": old.metrics,
            "unlock": new.unlock.model_copy(update={"mode": old.unlock.mode})})
        with self._volumes_lock:
            self._volumes_at = 0.0
        log.warning("reload: configuration re-read%s", "; restart to apply changes to "
                    + ", ".join(fixed) if fixed else "")
        for comp in list(self._started):
            fn = getattr(comp, "reload", None)
            if fn is not None:
                try:
                    fn()
                except BootkeyError as e:
                    log.error("reload: %s: %s", type(comp).__name__, e)
        if self.cfg.unlock.mode == "agent" and self.logged_in.is_set():
            self._unlock_after_reload()

    def _unlock_after_reload(self) -> None:
        volumes, failed = unlock.resolve_volumes(self.cfg)
        names = {v.name for v in volumes} | {r.name for r in failed}
        for gone in sorted(set(self.results) - names):
            log.info("reload: volume %s is no longer configured (an open mapping stays "
                     "open)", gone, extra=fields(volume=gone))
            self.results.pop(gone, None)
            self.results_at.pop(gone, None)
        for r in failed:
            self.record(r)
        todo = [v for v in volumes if v.name not in self.results or not self.results[v.name].ok]
        if todo:
            self.beat("main", busy_for=self.cfg.unlock.deadline)
            for r in unlock.unlock_all(self._session(), todo, check=self.check,
                                       parallel=self.cfg.unlock.parallel,
                                       deadline_at=time.monotonic() + self.cfg.unlock.deadline):
                self.record(r)
        self.notifier.status(self.summary())

    # ---- phases ------------------------------------------------------------------

    def _unlock(self, volumes: list[Volume], deadline_at: float) -> None:
        """Unlock, retrying volumes whose failure may go away (Vault sealed, network)."""
        session = self._session()
        pending = volumes
        attempt = 0
        while pending:
            self.notifier.status(f"unlocking {len(pending)} volume(s)")
            for r in unlock.unlock_all(session, pending, check=self.check,
                                       parallel=self.cfg.unlock.parallel,
                                       deadline_at=deadline_at):
                self.record(r)
            pending = [v for v in pending if not self.results[v.name].ok
                       and self.results[v.name].error is not None
                       and self.results[v.name].error.retryable]  # type: ignore[union-attr]
            if not pending:
                return
            attempt += 1
            delay = session.backoff.delay(attempt)  # the session's policy: full jitter
            if time.monotonic() + delay > deadline_at:
                raise DeadlineExceeded(
                    f"unlock: gave up after {self.cfg.unlock.deadline:g} s: "
                    f"{', '.join(v.name for v in pending)} still waiting for Vault — "
                    "check that Vault is reachable and unsealed"
                )
            self.notifier.status(f"waiting for Vault to unlock {len(pending)} volume(s): "
                                 f"next try in {delay:.0f} s")
            self._sleep(delay)

    def summary(self) -> str:
        ok = sum(1 for r in self.results.values() if r.ok)
        verb = "verified" if self.check else "open"
        text = f"{ok}/{len(self.results)} volumes {verb}"
        failed = [r for r in self.results.values() if not r.ok]
        if failed:
            text += "; failed: " + ", ".join(r.name for r in failed)
        outlook = self.session.access() if self.session is not None else None
        if outlook is not None and outlook.warning:
            # the journal has the whole warning and its fix; STATUS= stays one short line
            text += "; WARNING: Vault access will end (see `bootkey status`)"
        return text

    def _renew_loop(self) -> None:
        """Renew when the session's renewal policy says (renew_due_in), beating while it
        waits."""
        session = self._session()

        def next_at() -> float:
            session.access()  # after a (re-)login: read the token's facts, warn if access ends
            return time.monotonic() + session.renew_due_in()

        due = next_at()
        while True:
            self.beat("renewal")
            left = due - time.monotonic()
            if left > 0:
                if self.stop_event.wait(min(left, self.liveness.tick)):
                    return
                continue
            # bounded: renew-self's deadline, then a login within unlock.deadline
            self.beat("renewal", busy_for=RENEW_DEADLINE + self.cfg.unlock.deadline)
            try:
                session.renew_or_relogin()
            except BootkeyError as e:
                log.error("Vault token: %s", e)
                self.notifier.status(f"{self.summary()}; Vault token renewal failing")
            due = next_at()

    def _main_loop(self) -> None:
        """After READY: beat, and reload on SIGHUP, until SIGTERM."""
        while not self.stop_event.is_set():
            self.beat("main")
            self._wake.clear()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
                continue
            self._wake.wait(self.liveness.tick)

    def _start_control(self) -> None:
        """The control socket is a convenience: without it the agent still boots."""
        control = ControlServer(self.cfg.control.path, {"status": self.snapshot},
                                heartbeat=self.beater("control"), tick=self.liveness.tick)
        try:
            control.start()
        except (BootkeyError, OSError) as e:
            log.warning("control socket: %s; `bootkey status` cannot reach this agent", e)
            return
        self._started.append(control)

    def _start(self, factories: list[ComponentFactory]) -> None:
        """Start each component; `_started` lists what must be stopped, even on failure."""
        for factory in factories:
            comp = factory(self)
            if comp is not None:
                comp.start()
                self._started.append(comp)

    # ---- entry -------------------------------------------------------------------

    def run(self) -> int:
        """Returns 0 after a clean SIGTERM; raises BootkeyError on a fatal start error."""
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._signal)
        signal.signal(signal.SIGHUP, self._sighup)
        hard = secret.harden_process(require_mlock=self.require_mlock)
        log.info("hardening: memory %s, core dumps off, %s",
                 "locked" if hard.mlocked else "NOT locked",
                 "DUMPABLE" if hard.dumpable else "not dumpable")
        if not hard.mlocked:
            self.notifier.status("warning: memory not locked")
        interval = watchdog_interval()
        if interval:
            # a loop silent for one ping interval stops the next ping: systemd (which
            # allows two intervals) restarts the agent within about two intervals
            self.liveness = Liveness(interval)
            self._watchdog_every = interval
        # start-up (login, first unlock round) is bounded by the deadline
        self.beat("main", busy_for=self.cfg.unlock.deadline)
        if interval:
            threading.Thread(target=self._watchdog, args=(interval,), daemon=True,
                             name="watchdog").start()
        threading.Thread(target=self._ready_at_the_latest, args=(self.cfg.unlock.ready_timeout,),
                         daemon=True, name="ready-timeout").start()
        metrics_server: MetricsServer | None = None
        try:
            deadline_at = time.monotonic() + self.cfg.unlock.deadline
            self.notifier.status("logging in to Vault")
            self.session = VaultSession.from_config(self.cfg, on_wait=self._on_wait,
                                                    sleep=self._sleep)
            if self.cfg.metrics.address is not None:
                self.metrics = AgentMetrics()
                self.metrics.watch_session(self.session)
                metrics_server = self.metrics.serve(self.cfg.metrics.address)
            self._start_control()
            self._start(self.early_components)
            self.session.login(deadline=self.cfg.unlock.deadline)
            self.logged_in.set()
            self._start(self.components)
            if self.cfg.unlock.mode == "agent":
                volumes, failed = unlock.resolve_volumes(self.cfg)
                for r in failed:
                    self.record(r)
                self._unlock(volumes, deadline_at)
                self._initial_round_done()
            # the token's facts, after the volumes: a foreseeable loss of access is said at
            # start, and unlocking paid no request for it
            self.session.access()
            self._report_ready(self.summary() if self.cfg.unlock.mode == "agent" else
                               "serving keys to systemd-cryptsetup")
            threading.Thread(target=self._renew_loop, daemon=True, name="renewal").start()
            self._main_loop()
        except Interrupted:
            pass
        finally:
            self.notifier.stopping()
            self.stop_event.set()
            for comp in reversed(self._started):
                try:
                    comp.stop()
                except Exception:
                    log.exception("stopping %s failed", type(comp).__name__)
            if metrics_server is not None:
                metrics_server.stop()
        return 0


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings a SIGHUP cannot apply (they shape sockets, the Vault login or the
    process itself): those that differ between `old` and `new`.

    >>> from bootkey.config import parse
    >>> restart_only_changes(parse(""), parse('[vault]\\naddress = "https://v:8200"'))
    ['vault']
    """
    out = [name for name in ("host_id", "vault", "keysocket", "control", "metrics")
           if getattr(old, name) != getattr(new, name)]
    if old.unlock.mode != new.unlock.mode:
        out.append("unlock.mode")
    if old.kes.enabled != new.kes.enabled:
        out.append("kes.enabled")
    return out
