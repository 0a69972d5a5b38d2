"""The one entry point that turns KES configuration into a running service's parts.

`build(section, session)` is shared by `bootkey kes serve` (standalone, KES YAML or
bootkey.toml) and the agent (embedded): both hand it the one Vault session
(bootkey_core.vault) that the keystore and the Vault-PKI certificate use; a KES YAML
`keystore.vault.endpoint` gets a session of its own, built here from the section mapped
onto the shared Vault schema.

    svc = kes.service.build(cfg.kes, session)
    svc.create_configured_keys()
    with svc.thread():
        ...                                  # serving on svc.host:svc.port
    svc.close()

Invariant: nothing here writes key material anywhere; the server's TLS private key is read
into memory (decrypted there if `tls.password` is set) and handed to OpenSSL.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bootkey_core import secret
from bootkey_core.errors import ConfigError
from bootkey_core.vault import VaultSession
from kes import config as kconf
from kes.api import Api
from kes.audit import HubHandler
from kes.keyring import CacheExpiry, KeyExists, Keyring, KeyStore
from kes.keyversion import KeyVersion
from kes.messages import Request, Response
from kes.server import ServerThread
from kes.tls_context import CertSource, TLSConfig
from kes.vault_pki import VaultPKI
from kes.vaultstore import VaultKeyStore, VaultStoreConfig

log = logging.getLogger("kes.error")


@dataclass
class Service:
    api: Api
    keyring: Keyring
    tls: TLSConfig
    host: str
    port: int
    workers: int
    config: kconf.KesConfig
    probe_interval: float = 10.0
    _started: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    harden_workers: bool = False  # `kes serve` sets it; it hardened the parent itself
    cert_source: CertSource | None = None  # re-issues the certificate (tls.vault_pki)
    _log_handler: logging.Handler | None = None
    _built_in: int = field(default_factory=os.getpid)

    def handler(self, req: Request) -> Coroutine[Any, Any, Response]:
        """The `kes.messages.Handler`: the API's own coroutine, with no wrapper around it."""
        # Threads do not survive fork: the keyring's probe thread starts in the process
        # that serves (each worker), on its first request.
        if not self._started:
            self.start()
        return self.api(req)

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            if os.getpid() != self._built_in:
                # A forked worker: memory locks are not inherited across fork, and pooled
                # Vault connections belong to the parent's copy. No key is in this process
                # yet (keys are fetched by requests, and this runs before the first one).
                if self.harden_workers:
                    secret.harden_process()
                after_fork = getattr(self.keyring.store, "after_fork", None)
                if after_fork is not None:
                    after_fork()
            self.keyring.start(self.probe_interval)

    def thread(self) -> ServerThread:
        """The server on its own event loop in a thread (the agent's way to run it):
        `with svc.thread() as st: …` — listening on `st.port` inside the block."""
        return ServerThread(self.handler, self.tls, self.host, self.port,
                            cert_source=self.cert_source)

    def reload(self, cfg: kconf.KesConfig) -> None:
        """Apply a re-read config (SIGHUP): admin, policies, cache expiry, log levels.
        Address, TLS and keystore changes need a restart; they are reported, not applied."""
        ignored = [name for name, old, new in (
            ("address", self.config.address, cfg.address),
            ("tls", self.config.tls, cfg.tls),
            ("keystore", self.config.keystore, cfg.keystore)) if old != new]
        self.api.policies = cfg.policy_set()
        e = cfg.cache.expiry
        self.keyring.set_expiry(CacheExpiry(any=e.any, unused=e.unused, offline=e.offline))
        _set_levels(cfg)
        self.config = cfg
        log.warning("kes: configuration reloaded%s", f"; restart to apply changes to "
                    f"{', '.join(ignored)}" if ignored else "")

    def create_configured_keys(self) -> None:
        """KES `keys:` section: create each missing key at startup (KES master aacc4fd)."""
        for spec in self.config.keys:
            kv = KeyVersion.generate(self.api.key_type, self.config.admin.identity)
            try:
                self.keyring.create(spec.name, kv)
                log.info("created key '%s' from the config", spec.name)
            except KeyExists:
                pass
            finally:
                kv.close()

    def close(self) -> None:
        self.keyring.stop()
        self.api.audit_hub.close()
        self.api.error_hub.close()
        if self._log_handler is not None:
            logging.getLogger("kes").removeHandler(self._log_handler)


def build(section: dict[str, Any] | kconf.KesConfig,
          session: VaultSession | None = None, *,
          store: KeyStore | None = None, tls: TLSConfig | None = None,
          source: str = "bootkey.toml [kes]") -> Service:
    """KES config (a `[kes]` dict or a parsed KesConfig) → Service. Raises ConfigError.

    Vault: `keystore.vault.endpoint` set → a session of its own, logged in here (AppRole
    or token from the section); empty → `session` (the agent's, or `kes serve`'s from
    bootkey.toml). `store` replaces the keystore entirely (tests, `--dev`), `tls` the
    `tls` section (`--dev`: a certificate generated in memory).
    """
    cfg = section if isinstance(section, kconf.KesConfig) else kconf.from_section(section, source)
    pki = cfg.tls.vault_pki if tls is None else None
    cert_source: CertSource | None = None
    if store is None or pki is not None:
        session = _vault_session(cfg, session)
        if store is None:
            store = VaultKeyStore(session, store_config(cfg))
        if pki is not None:
            cert_source = _pki(cfg.tls, pki, session)
            tls = cert_source.issue()
    e = cfg.cache.expiry
    keyring = Keyring(store, CacheExpiry(any=e.any, unused=e.unused, offline=e.offline),
                      on_error=lambda msg, exc: log.error("%s: %s", msg, exc))
    overrides: dict[str, tuple[bool | None, float | None]] = {
        path: (r.skip_auth, r.timeout) for path, r in cfg.api.items()}
    api = Api(keyring, cfg.policy_set(), overrides=overrides)
    hub_handler = HubHandler(api.error_hub)
    logging.getLogger("kes").addHandler(hub_handler)
    _set_levels(cfg)
    host, port = cfg.host_port()
    ping = cfg.keystore.vault.status.ping if cfg.keystore.vault else 10.0
    return Service(api=api, keyring=keyring, tls=tls or _tls(cfg), host=host, port=port,
                   workers=cfg.workers, config=cfg, probe_interval=ping or 10.0,
                   cert_source=cert_source, _log_handler=hub_handler)


def _set_levels(cfg: kconf.KesConfig) -> None:
    for name, value in (("kes.error", cfg.log.error), ("kes.audit", cfg.log.audit)):
        level = kconf.log_level(value)
        lg = logging.getLogger(name)
        lg.disabled = level is None
        if level is not None:
            lg.setLevel(level)


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise ConfigError(f"kes: {what}: required — set it to a PEM file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"kes: {what}: cannot read {path}: {e.strerror}") from None


def _client_ca(t: kconf.TLSSection) -> tuple[bytes | None, bool]:
    """(client CA PEM, verify client certificates) from tls.ca / tls.auth."""
    ca: bytes | None = None
    if t.ca is not None:
        ca = b"".join(_read(p, "tls.ca") for p in sorted(t.ca.iterdir())
                      if p.suffix in (".pem", ".crt")) if t.ca.is_dir() else _read(t.ca, "tls.ca")
    verify = t.auth == "on"
    if verify and not ca:
        raise ConfigError("kes: tls.auth is on but tls.ca is not set — set tls.ca to the "
                          "client CA, or tls.auth to off")
    return ca, verify


def _pki(t: kconf.TLSSection, p: kconf.VaultPKISection, session: VaultSession) -> VaultPKI:
    ca, verify = _client_ca(t)
    return VaultPKI(session=session, role=p.role, common_name=p.common_name, mount=p.mount,
                    ip_sans=tuple(p.ip_sans), alt_names=tuple(p.alt_names), ttl=p.ttl,
                    client_ca_pem=ca, verify_client=verify)


def _tls(cfg: kconf.KesConfig) -> TLSConfig:
    t = cfg.tls
    cert = _read(t.cert, "tls.cert")
    key = _read(t.key, "tls.key")
    if t.password:
        try:
            pk = serialization.load_pem_private_key(key, t.password.encode())
        except (ValueError, TypeError):
            raise ConfigError("kes: tls.key: cannot decrypt the private key — check "
                              "tls.password") from None
        key = pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    ca, verify = _client_ca(t)
    return TLSConfig(cert_pem=cert, key_pem=key, client_ca_pem=ca, verify_client=verify)


def store_config(cfg: kconf.KesConfig) -> VaultStoreConfig:
    """Where in Vault the keys of this KES config live (KES defaults: kv, v1, no prefix)."""
    v = cfg.keystore.vault or kconf.VaultSection()
    return VaultStoreConfig(
        engine=v.engine or "kv", version=v.kv_version, prefix=v.prefix,
        transit_engine=(v.transit.engine if v.transit else "") or "transit",
        transit_key=v.transit.key if v.transit else "")


def _vault_session(cfg: kconf.KesConfig, session: VaultSession | None) -> VaultSession:
    """The Vault session for keys (and PKI): the section's own endpoint, else the
    caller's."""
    v = cfg.keystore.vault
    if v is None:
        if session is None:
            raise ConfigError("kes: keystore.vault: required — configure the Vault keystore")
        return session
    conn = v.connection()
    if conn is None:
        if session is None:
            raise ConfigError("kes: keystore.vault.endpoint: required when KES runs on its "
                              "own — set it, or run KES inside `bootkey agent`")
        return session
    if v.approle is None and not v.token:
        raise ConfigError("kes: keystore.vault: set approle id/secret (or token)")
    own = VaultSession(conn)
    # One pass over the address: a Vault that is down or refuses the credentials is a
    # start error (exit 69, systemd restarts; exit 80, no restart loop), as in KES.
    own.login(deadline=0.0)
    return own
