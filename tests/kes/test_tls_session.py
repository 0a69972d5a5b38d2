"""kes.tls_session.Session against a pyOpenSSL client, through memory only: the byte
accounting the server relies on (whole responses out, one record per read, close_notify,
errors)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from kes.tls_context import TLSConfig, build_context
from kes.tls_session import BIO_CHUNK, Scratch, Session
from tests.support.certs import make_ca, make_leaf


def pair() -> tuple[Session, SSL.Connection]:
    ca = make_ca("ca")
    srv = make_leaf(ca, "kes", ips=["127.0.0.1"])
    cli = make_leaf(None, "minio", kind="ed25519", client=True)
    server = Session(build_context(TLSConfig(srv.cert_pem, srv.key_pem)), Scratch())
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.use_certificate(cli.cert)
    ctx.use_privatekey(cli.key)
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    done = False
    while not done:
        try:
            client.do_handshake()
            done = True
        except SSL.WantReadError:
            pass
        server.feed(client.bio_read(1 << 20))
        server.handshake()
        to_client(server, client)
    while not server.handshake():  # the client's Finished
        server.feed(client.bio_read(1 << 20))
    to_client(server, client)
    return server, client


def to_client(server: Session, client: SSL.Connection) -> None:
    out = server.take()
    if out:
        client.bio_write(out)


def client_reads(client: SSL.Connection) -> bytes:
    got = b""
    while True:
        try:
            got += client.recv(1 << 20)
        except SSL.WantReadError:
            return got


def test_records_in_one_read_each_then_nothing() -> None:
    server, client = pair()
    assert server.read() == b""  # nothing sent yet
    for part in (b"one", b"two", b"three"):
        client.send(part)  # three records, delivered in one chunk
    server.feed(client.bio_read(1 << 20))
    assert [server.read(), server.read(), server.read(), server.read()] == [
        b"one", b"two", b"three", b""]


def test_a_record_fed_in_pieces_comes_out_once_complete() -> None:
    # Byte by byte: OpenSSL takes each piece out of the BIO into its own record buffer,
    # so an empty BIO must not be read as "nothing can complete" too early, nor late.
    server, client = pair()
    client.send(b"split record")
    client.send(b"next")
    wire = client.bio_read(1 << 20)
    first = len(wire) - len(b"next") - 22  # TLS 1.3: 5-byte header, 1-byte type, 16-byte tag
    got = []
    for i in range(first):
        server.feed(wire[i:i + 1])
        got.append(server.read())
    assert got[:-1] == [b""] * (first - 1) and got[-1] == b"split record"
    assert server.read() == b""
    server.feed(wire[first:])
    assert [server.read(), server.read()] == [b"next", b""]


def test_a_response_larger_than_the_scratch_buffer_leaves_whole() -> None:
    server, client = pair()
    big = bytes(range(256)) * (3 * BIO_CHUNK // 256)  # ciphertext > 3 BIO_CHUNKs
    server.write(big)
    out = server.take()
    assert len(out) > 3 * BIO_CHUNK and server.take() == b""
    client.bio_write(out)
    assert client_reads(client) == big


def test_close_notify_reads_as_none() -> None:
    server, client = pair()
    client.shutdown()
    server.feed(client.bio_read(1 << 20))
    assert server.read() is None


def test_garbage_raises_ssl_error() -> None:
    server, _ = pair()
    server.feed(b"\x17\x03\x03\x00\x20" + bytes(32))  # an app record that fails to decrypt
    with pytest.raises(SSL.Error):
        server.read()
