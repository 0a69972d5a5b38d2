"""The KES server's TLS settings and the pyOpenSSL context built from them: what is
configured once per server (certificate, client-certificate mode, session tickets, ALPN
`h2`/`http/1.1`). One connection's TLS session over that context is kes/tls_session.py.

Why pyOpenSSL and not the stdlib `ssl`: KES's default client-auth mode is Go's
`RequireAnyClientCert` — a client certificate must be presented (and its key proven by
CertificateVerify) but is *not* chain-verified, because MinIO's API-key certificates are
self-signed Ed25519 certificates that expire 90 days after MinIO starts. The stdlib has
no verify callback, so it can only refuse such certificates (shared/KES-TLS-STACKS.md).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from bootkey_core.errors import ConfigError

if TYPE_CHECKING:
    from OpenSSL.SSL import _NoOverlappingProtocols

ALPN_HTTP11 = b"http/1.1"
ALPN_H2 = b"h2"
# Any constant works; without one every resumption attempt ends in a fatal
# "internal error" alert instead of a full handshake (KES-TLS-STACKS.md pitfall 2).
SESSION_ID_CONTEXT = b"bootkey-kes"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Server certificate (PEM, leaf first, then intermediates), its private key (PEM,
    held only in memory: it is handed to OpenSSL directly, never written to a file), and
    the client-certificate mode. `verify_client=False` is KES's default `tls.auth: off`;
    `verify_client=True` (`tls.auth: on`) needs `client_ca_pem`."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    client_ca_pem: bytes | None = None
    verify_client: bool = False


def _accept_any(
    _conn: SSL.Connection, _cert: crypto.X509, _errno: int, _depth: int, _ok: int
) -> bool:
    # The certificate's signature over the handshake (CertificateVerify) is still checked
    # by OpenSSL; only the chain/validity verdict is overridden, like Go's RequireAnyClientCert.
    return True


def _select_alpn(
    _conn: SSL.Connection, offered: list[bytes]
) -> bytes | _NoOverlappingProtocols:
    # As KES (Go net/http): h2 when offered (Go clients with ForceAttemptHTTP2, curl,
    # MinIO), else http/1.1. A client without ALPN never gets here and speaks HTTP/1.1.
    if ALPN_H2 in offered:
        return ALPN_H2
    return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _select_alpn_http11(
    _conn: SSL.Connection, offered: list[bytes]
) -> bytes | _NoOverlappingProtocols:
    return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ConfigError(f"KES TLS {what}: cannot load: {exc} — give PEM certificates") from None
    if not certs:
        raise ConfigError(f"KES TLS {what}: cannot load: no certificate — give PEM certificates")
    return certs


def _has_san(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return True


def build_context(tls: TLSConfig, *, http2: bool = True) -> SSL.Context:
    """Build the server context. Build it once, before forking workers: the session-ticket
    keys live in the context, and workers with separate contexts lose about half of all
    resumptions (KES-TLS-STACKS.md pitfall 3). `http2=False` offers only http/1.1 in
    ALPN (for comparisons; KES itself always offers both)."""
    chain = _load_certs(tls.cert_pem, "certificate")
    if not _has_san(chain[0]):
        # Same refusal as KES: Go clients ignore the CN and need a DNS or IP SAN.
        raise ConfigError(
            "KES TLS certificate: cannot use: it has no DNS or IP subject alternative name"
            " — issue it with a SAN such as 127.0.0.1 or localhost"
        )
    try:
        key = serialization.load_pem_private_key(tls.key_pem, password=None)
    except (ValueError, TypeError):
        # The loader's own message may quote the input; never echo key material.
        raise ConfigError(
            "KES TLS private key: cannot load: not an unencrypted PEM private key"
            " — give the key as PEM without a passphrase"
        ) from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise ConfigError(
            "KES TLS private key: cannot use: unsupported key type — use RSA, ECDSA or Ed25519"
        )

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)  # KES: MinVersion tls.VersionTLS12
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    try:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error:
        raise ConfigError(
            "KES TLS private key: cannot use: it does not match the certificate"
            " — give the key the certificate was issued for"
        ) from None
    ctx.set_session_id(SESSION_ID_CONTEXT)
    # Idle keep-alive connections give their 16 KiB record buffers back: 50 -> 33 kB of
    # RSS per idle connection, with no measurable CPU cost per request.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_alpn_select_callback(_select_alpn if http2 else _select_alpn_http11)
    # Session tickets stay on: MinIO's KES client keeps an LRU session cache, and Go does
    # not resume TLS 1.2 by session id (pitfall 4).

    verify = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    if tls.verify_client:
        if not tls.client_ca_pem:
            raise ConfigError(
                "KES TLS: cannot verify client certificates: no CA given"
                " — set tls.ca or turn tls.auth off"
            )
        store = ctx.get_cert_store()
        assert store is not None  # noqa: S101 - a fresh context always has a store
        cas = _load_certs(tls.client_ca_pem, "client CA")
        for ca in cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
            ctx.add_client_ca(ca)  # named in the CertificateRequest
        ctx.set_verify(verify)
    else:
        ctx.set_verify(verify, _accept_any)
    return ctx


# The server certificate from Vault's PKI engine ------------------------------------------

# Renew when two thirds of the lifetime have passed (as cert-manager and Vault Agent do),
# leaving a third of it to ride out a Vault outage.
RENEW_FRACTION = 2 / 3


def renewal_delay(
    cert_pem: bytes,
    now: dt.datetime,
    *,
    received: dt.datetime | None = None,
    fraction: float = RENEW_FRACTION,
) -> float:
    """Seconds from `now` until the certificate should be replaced (0 if overdue). The
    lifetime counts from when we `received` it if that is later than notBefore: Vault
    backdates notBefore by 30 s, which would make short-lived certificates look overdue
    the moment they are issued."""
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if received is not None and received > start:
        start = received
    due = start + (end - start) * fraction
    return max(0.0, (due - now).total_seconds())


class CertSource(Protocol):
    """Something that can issue the server's certificate again (kes.vault_pki.VaultPKI)."""

    def issue(self) -> TLSConfig: ...
