"""The agent's Prometheus metrics: one registry for bootkey's own families and KES's.

`[metrics] address` (loopback only, checked by the config) turns it on. Vault requests
are counted from the HTTP sessions' response hooks, so every caller of the agent's
session (unlock, key socket, hotplug, KES keystore, renewal) is counted once, by path
class, without touching the calls. A request that gets no HTTP answer at all
(connection refused, timeout) has no response to hook: it shows as a missing request
here and as a retry in the journal.

Invariant: counting never breaks or holds up a Vault call: the hook reads status, path
and elapsed time only (never a body, never a header: tokens travel in headers), and
swallows its own errors.

    m = AgentMetrics()
    m.watch_session(session)                        # Vault requests, token, access
    m.registry.register(kes_service.api.metrics)    # KES's families, same registry
    server = m.serve("127.0.0.1:9273")
    ...
    server.stop()
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bootkey.config import loopback_port
from bootkey.unlock import VolumeResult
from bootkey.vault import VaultSession

log = logging.getLogger(__name__)


def path_class(path: str) -> str:
    """A Vault request path → the class it is counted under (mount names are site
    configuration, so the class comes from the operation's own path segment).

    >>> path_class("/v1/auth/approle/login")
    'login'
    >>> path_class("/v1/transit/decrypt/bootkey")
    'transit'
    >>> path_class("/v1/secret/data/bootkey/host/5c1e")
    'kv'
    """
    p = path.split("?", 1)[0].removeprefix("/v1/")
    parts = p.split("/")
    if p.startswith("auth/token/renew"):
        return "renew"
    if p.startswith("auth/token/lookup"):
        return "token"
    if p.startswith("auth/") and parts[-1] == "login":
        return "login"
    if p.startswith("sys/wrapping/"):
        return "unwrap"
    if p.startswith("sys/"):
        return "sys"
    if len(parts) >= 2 and parts[1] in ("encrypt", "decrypt", "rewrap", "datakey"):
        return "transit"
    if len(parts) >= 2 and parts[1] in ("issue", "sign"):
        return "pki"
    return "kv"


@dataclass
class MetricsServer:
    address: str
    _shutdown: Callable[[], None]

    def stop(self) -> None:
        self._shutdown()


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.unlock_results = Counter(
            "bootkey_unlock_results", "Volumes handled, by volume and result",
            ["volume", "result"], registry=r)
        self.vault_requests = Counter(
            "bootkey_vault_requests", "Vault HTTP requests answered, by path class and "
            "status code", ["path_class", "code"], registry=r)
        self.vault_errors = Counter(
            "bootkey_vault_errors", "Vault answers with status >= 400, by path class",
            ["path_class", "code"], registry=r)
        self.vault_seconds = Histogram(
            "bootkey_vault_request_seconds", "Time until Vault's answer, by path class",
            ["path_class"], registry=r)
        self.logins = Counter("bootkey_vault_logins", "AppRole logins, by result",
                              ["result"], registry=r)
        self.renewals = Counter("bootkey_vault_renewals", "Token renewals, by result",
                                ["result"], registry=r)
        self.token_seconds_left = Gauge(
            "bootkey_vault_token_seconds_left", "Seconds until the Vault token expires "
            "(+Inf: no expiry; 0: not logged in)", registry=r)
        self.access_warning = Gauge(
            "bootkey_vault_access_warning", "1 while the agent foresees losing its Vault "
            "access (the journal and `bootkey status` name the fix), else 0", registry=r)
        self.access_seconds_left = Gauge(
            "bootkey_vault_access_seconds_left", "Seconds until Vault access certainly "
            "ends (the secret_id expires and the token is not periodic); +Inf: not foreseen",
            registry=r)

    def volume_result(self, r: VolumeResult) -> None:
        self.unlock_results.labels(r.name, r.outcome.value).inc()

    def on_response(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        """A `requests` response hook: never raises, never reads the body."""
        try:
            cls = path_class(resp.request.path_url or "")
            code = str(resp.status_code)
            self.vault_requests.labels(cls, code).inc()
            self.vault_seconds.labels(cls).observe(resp.elapsed.total_seconds())
            ok = "ok" if resp.status_code < 400 else "refused"
            if resp.status_code >= 400:
                self.vault_errors.labels(cls, code).inc()
            if cls == "login":
                self.logins.labels(ok).inc()
            elif cls == "renew":
                self.renewals.labels(ok).inc()
        except Exception:  # metrics must never break a Vault call
            log.debug("metrics: cannot count a Vault response", exc_info=True)

    def watch_session(self, session: VaultSession) -> None:
        for s in session.http_sessions():
            s.hooks["response"].append(self.on_response)
        self.token_seconds_left.set_function(session.token_ttl)

        def warning() -> float:
            o = session.access()
            return 1.0 if o is not None and o.warning else 0.0

        def access_left() -> float:
            o = session.access()
            if o is None or o.access_until is None:
                return float("inf")
            return (o.access_until - dt.datetime.now(dt.UTC)).total_seconds()

        self.access_warning.set_function(warning)
        self.access_seconds_left.set_function(access_left)

    def serve(self, address: str) -> MetricsServer | None:
        """Listen on `address`; None (and an error in the log) if it cannot: metrics are
        optional, and a taken port must not keep volumes from opening."""
        host, port = loopback_port(address)
        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.error("metrics.address: cannot listen on %s: %s — choose a free port; "
                      "the agent runs without metrics", address, e.strerror or e)
            return None
        log.info("metrics: serving Prometheus text on http://%s/metrics", address)

        def shutdown() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)

        return MetricsServer(address, shutdown)
