"""One server-side TLS session over memory BIOs, for the KES transport's hot path: the
per-connection half of TLS (the per-server context it runs on is kes/tls_context.py).

pyOpenSSL's `Connection.recv/send/bio_read/bio_write` allocate a fresh buffer per call
and report "nothing more" by raising `WantReadError`; a keep-alive request made four
such calls, and two of them raised. Measured on the project machine (bench.kes,
2026-11-22) that wrapper layer was half the transport's CPU per request. `Session`
calls the same OpenSSL functions through the same cffi binding directly, into one
scratch buffer per server, and returns `b""` where pyOpenSSL raises.

The sharp edge, kept in this module only: it reaches into pyOpenSSL's `Connection`
(`_ssl`, `_into_ssl`, `_from_ssl`) and its cffi `lib`. `check()` verifies at import
that they exist, so a pyOpenSSL release that renames them fails loudly at start, not
with a wrong answer. The handshake, the peer certificate and shutdown stay on
pyOpenSSL's public API: they run once per connection and their callbacks (verify,
ALPN) report errors through it.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

# SSL_read returns at most one record: 16 KiB of plaintext. Ciphertext leaves the BIO in
# pieces of this size, and a response larger than one piece takes another call.
RECORD = 16 * 1024
BIO_CHUNK = 64 * 1024

_SSL_read = _lib.SSL_read
_SSL_write = _lib.SSL_write
_SSL_get_error = _lib.SSL_get_error
_BIO_read = _lib.BIO_read
_BIO_write = _lib.BIO_write
_BIO_get_mem_data = _lib.BIO_get_mem_data  # with NULL: the bytes a memory BIO holds
_NULL = _ffi.NULL
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_buffer = _ffi.buffer


class Scratch:
    """The buffer OpenSSL reads into; one per event loop (cffi releases the GIL during
    each call, so two threads must never share one). Plaintext requests pass through it,
    so it lives as long as its server and is overwritten by the next read."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf: Any = _ffi.new("char[]", BIO_CHUNK)


class Session:
    """Server side of one TLS connection. Ciphertext in with `feed`, out with `take`;
    plaintext in with `write`, out with `read`. Every method but `read` and `write`
    mirrors pyOpenSSL; errors are pyOpenSSL's `SSL.Error` family."""

    __slots__ = ("_buf", "_in", "_out", "_ssl", "conn")

    def __init__(self, context: SSL.Context, scratch: Scratch) -> None:
        conn = self.conn = SSL.Connection(context, None)
        conn.set_accept_state()
        self._ssl = conn._ssl
        self._in = conn._into_ssl
        self._out = conn._from_ssl
        self._buf = scratch.buf

    def feed(self, ciphertext: bytes) -> None:
        # A memory BIO takes everything (it grows), so the count needs no check.
        _BIO_write(self._in, ciphertext, len(ciphertext))

    def handshake(self) -> bool:
        """Advance the handshake: True once it is complete, False while it needs more
        bytes from the peer. Raises `SSL.Error` if it failed (the alert is then queued
        for `take`)."""
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return False
        return True

    def read(self) -> bytes | None:
        """Up to one record of plaintext; `b""` if no complete record is buffered; None
        once the peer sent close_notify. Raises `SSL.Error` on a TLS error."""
        if not _BIO_get_mem_data(self._in, _NULL):
            # Nothing fed is left, so no record can complete: SSL_read would only report
            # WANT_READ. OpenSSL reads records exactly (read-ahead is off; pyOpenSSL's
            # binding cannot turn it on) and a RECORD-sized buffer takes a whole record's
            # plaintext, so nothing is left inside OpenSSL either.
            # Saves two OpenSSL calls on every request (the read after its record).
            return b""
        n = _SSL_read(self._ssl, self._buf, RECORD)
        if n > 0:
            plain: bytes = _buffer(self._buf, n)[:]
            return plain
        error = _SSL_get_error(self._ssl, n)
        if error == _WANT_READ:
            return b""
        if error == _ZERO_RETURN:
            return None
        self.conn._raise_ssl_error(self._ssl, n)  # raises the matching SSL.Error
        raise SSL.Error(f"SSL_read failed ({error})")  # pragma: no cover - defensive

    def write(self, plaintext: bytes) -> None:
        """Encrypt all of `plaintext` into the outgoing BIO (which never blocks)."""
        ssl, size = self._ssl, len(plaintext)
        if not size:
            return
        n = _SSL_write(ssl, plaintext, size)  # the whole of it, as a memory BIO grows
        view = None
        while n != size:
            if n <= 0:
                self.conn._raise_ssl_error(ssl, n)
                raise SSL.Error(f"SSL_write failed ({_SSL_get_error(ssl, n)})")
            view, size = (view or memoryview(plaintext))[n:], size - n
            n = _SSL_write(ssl, _ffi.from_buffer(view), size)

    def take(self) -> bytes:
        """All ciphertext queued for the peer (`b""` if none)."""
        n = _BIO_read(self._out, self._buf, BIO_CHUNK)
        if n <= 0:
            return b""
        first: bytes = _buffer(self._buf, n)[:]
        if n < BIO_CHUNK:
            return first  # a memory BIO hands out everything it has
        parts = [first]
        while n == BIO_CHUNK:
            n = _BIO_read(self._out, self._buf, BIO_CHUNK)
            if n > 0:
                parts.append(_buffer(self._buf, n)[:])
        return b"".join(parts)


def check() -> None:
    """Fail now if pyOpenSSL no longer has what `Session` relies on."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
    missing = [name for name in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error")
               if not hasattr(conn, name)]
    if missing:
        raise ImportError(f"kes.tls_session: pyOpenSSL's Connection lacks {', '.join(missing)}; "
                          "install a pyOpenSSL release this bootkey supports (see pyproject.toml)")


check()
