"""The KES transport against Go's TLS and HTTP stack, set up like MinIO's KES client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kes.identity import of_certificate
from kes.server import ServerThread
from kes.tls_context import build_context
from tests.kes.server_util import Pki, Recorder
from tests.support.certs import make_leaf

GO_SOURCE = Path(__file__).parent / "goclient" / "main.go"

pytestmark = pytest.mark.skipif(shutil.which("go") is None,
                                reason="go (Debian golang-go) comes from scripts/setup.sh")


@pytest.fixture(scope="module")
def goclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("go") / "goclient"
    # Standard library only: builds offline, in a second or two once Go's cache is warm.
    subprocess.run(["go", "build", "-o", str(out), str(GO_SOURCE)], check=True,
                   env={**os.environ, "GO111MODULE": "off"}, timeout=300, capture_output=True)
    return out


BODY = '{"context":"eyJNaW5JTyI6ImJ1Y2tldC9vYmplY3QifQ=="}'


@dataclass
class Minio:
    """Server PKI plus a MinIO API-key client certificate (self-signed Ed25519) on disk."""

    pki: Pki
    cert: Path
    key: Path
    identity: str


@pytest.fixture
def minio(tmp_path: Path) -> Minio:
    pki = Pki.create(tmp_path)
    client = make_leaf(None, "api-key", kind="ed25519", client=True)
    cert, key = pki.write_client(client, "minio")
    return Minio(pki, cert, key, of_certificate(client.cert))


def _run(goclient: Path, minio: Minio, port: int, *, version: str, n: int,
         mode: str) -> tuple[list[dict[str, Any]], int]:
    out = subprocess.run(
        [str(goclient), f"https://127.0.0.1:{port}/v1/key/generate/minio-key",
         str(minio.pki.ca_file), str(minio.cert), str(minio.key), version, str(n), BODY, mode],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    return lines[:-1], int(lines[-1]["dials"])


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_minio_style_go_client_new_connections_resume(goclient: Path, minio: Minio,
                                                      version: str) -> None:
    recorder = Recorder()
    with ServerThread(recorder, minio.pki.tls()) as st:
        results, dials = _run(goclient, minio, st.port, version=version, n=5, mode="new")
    assert dials == 5
    assert [r["status"] for r in results] == [200] * 5
    assert {r["alpn"] for r in results} == {"h2"}  # Go offered h2 first, as KES we take it
    assert {r["proto"] for r in results} == {"HTTP/2.0"}
    assert {r["version"] for r in results} == {version}
    # MinIO's session cache: every connection after the first resumes, identity intact.
    assert [r["resumed"] for r in results] == [False, True, True, True, True]
    assert {json.loads(r["body"])["identity"] for r in results} == {minio.identity}
    for request in recorder.requests:
        # HTTP/2: DATA frames without a content-length, as kms-go sends its bodies.
        assert "content-length" not in request.headers
        assert "transfer-encoding" not in request.headers
        assert request.body == BODY.encode()


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_minio_style_go_client_multiplexes_on_one_connection(goclient: Path, minio: Minio,
                                                             version: str) -> None:
    """What MinIO does with its one kms-go client: 40 concurrent calls, one connection."""
    recorder = Recorder()  # suspends once per call, so calls overlap on the server too
    with ServerThread(recorder, minio.pki.tls()) as st:
        results, dials = _run(goclient, minio, st.port, version=version, n=40, mode="shared")
    assert dials == 1
    assert [r["status"] for r in results] == [200] * 40
    assert {r["proto"] for r in results} == {"HTTP/2.0"}
    assert [r["reused"] for r in results][1:] == [True] * 39
    assert {json.loads(r["body"])["identity"] for r in results} == {minio.identity}
    assert len(recorder.requests) == 40


def test_go_client_speaks_http11_to_a_server_without_h2(goclient: Path, minio: Minio) -> None:
    recorder = Recorder()
    with ServerThread(recorder, build_context(minio.pki.tls(), http2=False)) as st:
        results, _ = _run(goclient, minio, st.port, version="1.3", n=3, mode="new")
    assert {(r["status"], r["alpn"], r["proto"]) for r in results} == {(200, "http/1.1",
                                                                          "HTTP/1.1")}
    for request in recorder.requests:
        assert request.headers.get("transfer-encoding") == "chunked"
        assert request.body == BODY.encode()
