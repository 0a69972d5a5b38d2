"""`bootkey agent`: the long-running boot service. Wiring only; decisions live in
unlock.py, vault.py and the component modules.

Start order: harden memory → log in (retrying, STATUS says what it waits for) → unlock
every volume (mode "agent") → READY=1 → keep the token alive and serve components
(key socket, hotplug, KES) until SIGTERM → STOPPING=1, wipe, exit 0.

Every wait is bounded by `unlock.deadline`: past it the agent exits with a clear error
(systemd's Restart= brings it back) rather than hanging boot.
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
from typing import Protocol

from bootkey import luks, unlock
from bootkey.config import Config
from bootkey.journal import fields
from bootkey.keysocket import KeySocketServer
from bootkey.notify import Notifier, watchdog_interval
from bootkey.unlock import Volume, VolumeResult
from bootkey.vault import VaultSession, WaitInfo
from bootkey_core import secret
from bootkey_core.errors import BootkeyError, DeadlineExceeded
from bootkey_core.secret import SecretBuffer

log = logging.getLogger(__name__)


def keysocket_component(agent: Agent) -> Component | None:
    """The crypttab key socket: in socket mode, or whenever systemd hands us its fd."""
    from bootkey import keysocket

    fds = keysocket.systemd_fds()
    if agent.cfg.unlock.mode != "socket" and keysocket.pick_activated_fd(fds) is None:
        return None
    return _KeySocket(keysocket.KeySocketServer(agent.cfg.keysocket, agent.key_for,
                                                agent.is_managed, activated_fds=fds), agent)


@dataclass
class _KeySocket:
    """The key socket plus /run/cryptsetup-keys.d/<volume>.key links, so crypttab lines
    with keyfile `none` find it after their TPM2/FIDO2 tokens."""

    server: KeySocketServer
    agent: Agent

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

    return HotplugWatcher(agent.on_luks_device)


class KesComponent:
    """The embedded KES endpoint, on its own event loop thread, with master keys fetched
    through the agent's Vault session (same token, renewed by the agent)."""

    def __init__(self, agent: Agent) -> None:
        import kes.service

        session = agent._session()
        self.service = kes.service.build(agent.cfg.kes, vault_client_factory=session.raw_client,
                                         vault_relogin=session.login)
        # the service's own thread: it renews a Vault-PKI server certificate if configured
        self.thread = self.service.thread()

    def start(self) -> None:
        self.thread.__enter__()
        self.service.start()
        self.service.create_configured_keys()
        log.info("KES endpoint listening on %s:%d", self.service.host, self.thread.port)

    def stop(self) -> None:
        self.thread.__exit__(None, None, None)
        self.service.close()


def kes_component(agent: Agent) -> Component | None:
    if not agent.cfg.kes.enabled:
        return None
    return KesComponent(agent)


class Interrupted(Exception):
    """SIGTERM arrived while waiting."""


class Component(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


ComponentFactory = Callable[["Agent"], Component | None]


@dataclass
class Agent:
    cfg: Config
    check: bool = False
    require_mlock: bool = False
    notifier: Notifier = field(default_factory=Notifier)
    # started before the Vault login (they wait for it themselves) / after it
    early_components: list[ComponentFactory] = field(
        default_factory=lambda: [keysocket_component, hotplug_component])
    components: list[ComponentFactory] = field(default_factory=lambda: [kes_component])
    stop_event: threading.Event = field(default_factory=threading.Event)
    session: VaultSession | None = None
    results: dict[str, VolumeResult] = field(default_factory=dict)
    logged_in: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    _initial_done: threading.Event = field(default_factory=threading.Event)
    _deferred: list[str] = field(default_factory=list)
    _volumes: dict[str, Volume] = field(default_factory=dict)
    _volumes_at: float = 0.0
    _volumes_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def on_luks_device(self, devnode: str) -> None:
        """Hotplug: unlock `devnode` if it is ours (token for this host, or configured).
        Opening is idempotent, so duplicate udev events cost a header read."""
        with self._volumes_lock:
            if not self._initial_done.is_set():
                # the first unlock round is running: it handles what it resolved, and
                # the rest is looked at right after it (no racing duplicate opens)
                self._deferred.append(devnode)
                return
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
        r = unlock.unlock_one(self._session(), vol, use,
                              time.monotonic() + self.cfg.unlock.deadline)
        self.results[vol.name] = r
        with self._volumes_lock:
            self._volumes_at = 0.0  # re-resolve on next use
        self.notifier.status(self.summary())

    def _initial_round_done(self) -> None:
        with self._volumes_lock:
            self._initial_done.set()
            deferred, self._deferred = list(dict.fromkeys(self._deferred)), []
        for devnode in deferred:
            self.on_luks_device(devnode)

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

    # ---- phases ------------------------------------------------------------------

    def _unlock(self, volumes: list[Volume], deadline_at: float) -> None:
        """Unlock, retrying volumes whose failure may go away (Vault sealed, network)."""
        session = self._session()
        pending = volumes
        delay = self.cfg.unlock.retry_initial
        while pending:
            self.notifier.status(f"unlocking {len(pending)} volume(s)")
            for r in unlock.unlock_all(session, pending, check=self.check,
                                       parallel=self.cfg.unlock.parallel,
                                       deadline_at=deadline_at):
                self.results[r.name] = r
            pending = [v for v in pending if not self.results[v.name].ok
                       and self.results[v.name].error is not None
                       and self.results[v.name].error.retryable]  # type: ignore[union-attr]
            if not pending:
                return
            if time.monotonic() + delay > deadline_at:
                raise DeadlineExceeded(
                    f"unlock: gave up after {self.cfg.unlock.deadline:g} s: "
                    f"{', '.join(v.name for v in pending)} still waiting for Vault — "
                    "check that Vault is reachable and unsealed"
                )
            self.notifier.status(f"waiting for Vault to unlock {len(pending)} volume(s): "
                                 f"next try in {delay:.0f} s")
            self._sleep(delay)
            delay = min(delay * 2, self.cfg.unlock.retry_max)

    def summary(self) -> str:
        ok = sum(1 for r in self.results.values() if r.ok)
        verb = "verified" if self.check else "open"
        text = f"{ok}/{len(self.results)} volumes {verb}"
        failed = [r for r in self.results.values() if not r.ok]
        if failed:
            text += "; failed: " + ", ".join(r.name for r in failed)
        return text

    def _renew_loop(self) -> None:
        session = self._session()
        while not self.stop_event.is_set():
            ttl = session.token_ttl()
            wait = min(max(ttl * 2 / 3, 1.0), 3600.0) if ttl != float("inf") else 3600.0
            if self.stop_event.wait(wait):
                return
            try:
                session.renew_or_relogin()
            except BootkeyError as e:
                log.error("Vault token: %s", e)
                self.notifier.status(f"{self.summary()}; Vault token renewal failing")

    def _watchdog(self, interval: float) -> None:
        while not self.stop_event.wait(interval):
            self.notifier.watchdog()

    def _start(self, factories: list[ComponentFactory], started: list[Component]) -> None:
        """Start each component; `started` lists what must be stopped, even on failure."""
        for factory in factories:
            comp = factory(self)
            if comp is not None:
                comp.start()
                started.append(comp)

    # ---- entry -------------------------------------------------------------------

    def run(self) -> int:
        """Returns 0 after a clean SIGTERM; raises BootkeyError on a fatal start error."""
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._signal)
        hard = secret.harden_process(require_mlock=self.require_mlock)
        log.info("hardening: memory %s, core dumps off, %s",
                 "locked" if hard.mlocked else "NOT locked",
                 "DUMPABLE" if hard.dumpable else "not dumpable")
        if not hard.mlocked:
            self.notifier.status("warning: memory not locked")
        interval = watchdog_interval()
        if interval:
            threading.Thread(target=self._watchdog, args=(interval,), daemon=True,
                             name="watchdog").start()
        threading.Thread(target=self._ready_at_the_latest, args=(self.cfg.unlock.ready_timeout,),
                         daemon=True, name="ready-timeout").start()
        started: list[Component] = []
        try:
            deadline_at = time.monotonic() + self.cfg.unlock.deadline
            self.notifier.status("logging in to Vault")
            self.session = VaultSession.from_config(self.cfg, on_wait=self._on_wait,
                                                    sleep=self._sleep)
            self._start(self.early_components, started)
            self.session.login(deadline=self.cfg.unlock.deadline)
            self.logged_in.set()
            self._start(self.components, started)
            if self.cfg.unlock.mode == "agent":
                volumes, failed = unlock.resolve_volumes(self.cfg)
                for r in failed:
                    self.results[r.name] = r
                self._unlock(volumes, deadline_at)
                self._initial_round_done()
            status = self.summary() if self.cfg.unlock.mode == "agent" else \
                "serving keys to systemd-cryptsetup"
            self._report_ready(status)
            self._renew_loop()
        except Interrupted:
            pass
        finally:
            self.notifier.stopping()
            for comp in reversed(started):
                try:
                    comp.stop()
                except Exception:
                    log.exception("stopping %s failed", type(comp).__name__)
        return 0
