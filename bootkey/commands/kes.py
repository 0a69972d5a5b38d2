"""`bootkey kes …`: KES identities, API keys for MinIO, and a standalone KES server.

Argument parsing and output only; the work is in kes.apikey, kes.identity,
kes.certificates (self-signed identities, the leaf of a chain) and kes.service.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bootkey_core.errors import BootkeyError, ConfigError, UsageError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bootkey.config import Config as BootkeyConfig
    from kes.config import KesConfig
    from kes.service import Service
    from kes.tls_context import CertSource

HELP = """\
KES endpoint for MinIO (SSE-S3/SSE-KMS), with master keys in Vault.

examples:
  bootkey kes api-key new                       a key + identity for MINIO_KMS_KES_API_KEY
  bootkey kes identity of client.crt            the identity a policy needs for a cert
  bootkey kes identity new --key k.key --cert k.crt --ip 127.0.0.1
  bootkey kes serve --config /etc/bootkey/bootkey.toml
  bootkey kes serve --kes-config /etc/kes/config.yml   an existing KES config file
  bootkey kes vault-policy | bao policy write kes -    what the keystore needs in Vault
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("kes", help="MinIO KES endpoint: identities, API keys, server",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ks = p.add_subparsers(dest="kes_command", metavar="COMMAND", required=True)

    ident = ks.add_parser("identity", help="compute or create KES identities")
    isub = ident.add_subparsers(dest="identity_command", metavar="COMMAND", required=True)
    of = isub.add_parser("of", help="print the identity of a certificate (PEM)")
    of.add_argument("cert", type=Path, help="certificate file (PEM)")
    of.set_defaults(run=run_identity_of)
    new = isub.add_parser("new", help="create a private key and self-signed certificate")
    new.add_argument("--key", type=Path, required=True, help="where to write the private key")
    new.add_argument("--cert", type=Path, required=True, help="where to write the certificate")
    new.add_argument("--name", default="", help="subject CN (default: the identity)")
    new.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    new.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    new.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    new.add_argument("--force", action="store_true", help="overwrite existing files")
    new.set_defaults(run=run_identity_new)

    ak = ks.add_parser("api-key", help="KES API keys (kes:v1:…) for MinIO")
    asub = ak.add_subparsers(dest="api_key_command", metavar="COMMAND", required=True)
    ak_new = asub.add_parser("new", help="print a new API key and its identity")
    ak_new.set_defaults(run=run_api_key_new)
    ak_id = asub.add_parser("identity", help="print the identity of an API key read from stdin")
    ak_id.set_defaults(run=run_api_key_identity)

    vp = ks.add_parser("vault-policy", help="print the Vault policy KES's keystore needs (HCL)")
    vsrc = vp.add_mutually_exclusive_group()
    vsrc.add_argument("--config", dest="serve_config", type=Path, metavar="FILE",
                      help="bootkey.toml whose [kes] section to use (default: bootkey's)")
    vsrc.add_argument("--kes-config", type=Path, metavar="FILE", help="a KES config file")
    vp.set_defaults(run=run_vault_policy)

    serve = ks.add_parser("serve", help="run the KES server in the foreground")
    src = serve.add_mutually_exclusive_group()
    src.add_argument("--config", dest="serve_config", type=Path, metavar="FILE",
                     help="bootkey.toml whose [kes] section to serve (default: bootkey's)")
    src.add_argument("--kes-config", type=Path, metavar="FILE",
                     help="a KES server config file (YAML) instead of bootkey.toml's [kes]")
    src.add_argument("--dev", action="store_true",
                     help="development server (like `kes server --dev`): keys in memory only, "
                          "a generated server certificate and admin API key, no Vault")
    serve.add_argument("--addr", help="listen address host:port (overrides the config)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides the config)")
    serve.set_defaults(run=run_serve)


def run_identity_of(args: argparse.Namespace) -> int:
    from cryptography import x509

    from kes.certificates import leaf
    from kes.identity import of_certificate
    try:
        certs = x509.load_pem_x509_certificates(args.cert.read_bytes())
    except OSError as e:
        raise UsageError(f"{args.cert}: cannot read: {e.strerror}") from None
    except ValueError:
        raise UsageError(f"{args.cert}: not a PEM certificate — pass the client "
                         "certificate file") from None
    print(of_certificate(leaf(certs)))
    return 0


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UsageError(f"{path}: exists — remove it or pass --force") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot create: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def run_identity_new(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kes.apikey import APIKey
    from kes.identity import of_certificate
    key = Ed25519PrivateKey.generate()
    cert = _self_signed(key, args.name or APIKey(key).identity, args.ip, args.dns, args.days,
                        client=True)
    _write_new(args.key, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600, args.force)
    _write_new(args.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, args.force)
    print(of_certificate(cert))
    return 0


def run_api_key_new(args: argparse.Namespace) -> int:
    from kes.apikey import APIKey
    key = APIKey.generate()
    print(f"API key:  {key}")
    print(f"Identity: {key.identity}")
    print()
    print("MinIO:    export MINIO_KMS_KES_API_KEY=<the API key above>")
    print("Policy:   add the identity to a [kes.policy.<name>] identities list")
    return 0


def run_api_key_identity(args: argparse.Namespace) -> int:
    from kes.apikey import APIKey, InvalidAPIKey
    text = sys.stdin.readline()
    try:
        print(APIKey.parse(text).identity)
    except InvalidAPIKey as e:
        raise UsageError(f"stdin: {e} — pass a kes:v1:… key") from None
    return 0


def _load(args: argparse.Namespace) -> tuple[KesConfig, BootkeyConfig | None]:
    from bootkey import config as bconf
    from kes import config as kconf
    if args.kes_config:
        return kconf.load_yaml(args.kes_config), None
    bcfg = bconf.load(args.serve_config or args.config)
    return bcfg.kes, bcfg


def run_vault_policy(args: argparse.Namespace) -> int:
    from kes.service import store_config
    from kes.vaultstore import policy_hcl
    cfg, _ = _load(args)
    sys.stdout.write(policy_hcl(store_config(cfg)))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from bootkey_core import secret
    from kes import service
    from kes.config import host_port

    # Before any key exists: lock memory (warns if refused), no core dumps, no ptrace.
    secret.harden_process()

    if args.dev:
        return _serve_dev(args)
    cfg, bcfg = _load(args)
    session = None
    if bcfg is not None and (cfg.keystore.vault is None or not cfg.keystore.vault.endpoint):
        from bootkey.vault import VaultSession
        session = VaultSession.from_config(bcfg)
        session.login()
    updates: dict[str, object] = {}
    if args.addr:
        try:
            host_port(args.addr)
        except ValueError as e:
            raise UsageError(f"--addr: {e}") from None
        updates["address"] = args.addr
    if args.workers:
        updates["workers"] = args.workers
    if updates:
        cfg = cfg.model_copy(update=updates)
    svc = service.build(cfg, session)
    svc.harden_workers = True

    def reload(_signum: int, _frame: object) -> None:
        # KES re-reads its config on SIGHUP. Each process reloads itself: with --workers,
        # signal the process group (`kill -HUP -- -PID`).
        try:
            new, _ = _load(args)
            if updates:
                new = new.model_copy(update=updates)
            svc.reload(new)
        except BootkeyError as e:
            logging.getLogger("kes.error").error("kes: reload failed, keeping the running "
                                                 "configuration: %s", e)
    signal.signal(signal.SIGHUP, reload)
    svc.create_configured_keys()
    return _serve(svc, svc.workers, svc.cert_source)


def _serve_dev(args: argparse.Namespace) -> int:
    """KES's --dev: an in-memory keystore, a fresh admin API key, a self-signed server
    certificate for 127.0.0.1/localhost. Nothing is written to disk; keys die with it."""
    from cryptography.hazmat.primitives import serialization

    from kes import config as kconf
    from kes import service
    from kes.apikey import APIKey
    from kes.keyring import MemKeyStore
    from kes.tls_context import TLSConfig

    admin = APIKey.generate()
    server_key = APIKey.generate()  # an Ed25519 key pair is all a dev certificate needs
    cert = _self_signed(server_key.private_key, "localhost", ["127.0.0.1"], ["localhost"], 365,
                        client=False)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cfg = kconf.from_section({"enabled": True, "admin": {"identity": admin.identity},
                              "address": args.addr or "127.0.0.1:7373"}, "--dev")
    tls = TLSConfig(cert_pem=cert_pem, key_pem=server_key.private_key_pem())
    svc = service.build(cfg, store=MemKeyStore(), tls=tls)
    print("kes: development mode: keys live in memory only and are lost on exit",
          file=sys.stderr)
    print(f"  admin API key:  {admin}\n  admin identity: {admin.identity}", file=sys.stderr)
    print("  server certificate (give it to clients, e.g. MINIO_KMS_KES_CAPATH):",
          file=sys.stderr)
    print(cert_pem.decode(), file=sys.stderr, flush=True)
    return _serve(svc, 1, None)


def _self_signed(pk: Ed25519PrivateKey, cn: str, ips: list[str], dns: list[str], days: int,
                 *, client: bool) -> x509.Certificate:
    from kes.certificates import self_signed
    try:
        return self_signed(pk, cn, ips=ips, dns=dns, days=days, client=client)
    except ValueError as e:
        raise UsageError(f"--ip: {e}") from None


def _serve(svc: Service, workers: int, cert_source: CertSource | None) -> int:
    """Run the server until SIGTERM; a port in use is a config error, not a traceback."""
    from kes import server

    try:
        server.run(svc.handler, svc.tls, svc.host, svc.port, workers,
                   cert_source=cert_source,
                   ready=lambda port: print(f"kes: listening on {svc.host}:{port}",
                                            file=sys.stderr, flush=True))
    except OSError as e:
        raise ConfigError(f"kes: cannot listen on {svc.host}:{svc.port}: {e.strerror}") from None
    finally:
        svc.close()
    return 0
