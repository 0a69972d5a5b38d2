"""The KES transport against Go's TLS and HTTP stack, set up like MinIO's KES client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kes.identity import of_certificate
from kes.server import ServerThread
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


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_minio_style_go_client(goclient: Path, tmp_path: Path, version: str) -> None:
    pki = Pki.create(tmp_path)
    # A MinIO API-key certificate: self-signed Ed25519.
    client = make_leaf(None, "api-key", kind="ed25519", client=True)
    cert, key = pki.write_client(client, "minio")
    recorder = Recorder()
    body = '{"context":"eyJNaW5JTyI6ImJ1Y2tldC9vYmplY3QifQ=="}'
    with ServerThread(recorder, pki.tls()) as st:
        out = subprocess.run(
            [str(goclient), f"https://127.0.0.1:{st.port}/v1/key/generate/minio-key",
             str(pki.ca_file), str(cert), str(key), version, "5", body],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in results] == [200] * 5
    assert {r["alpn"] for r in results} == {"http/1.1"}  # Go offered h2 first
    assert {r["proto"] for r in results} == {"HTTP/1.1"}
    assert {r["version"] for r in results} == {version}
    # MinIO's session cache: every connection after the first resumes, identity intact.
    assert [r["resumed"] for r in results] == [False, True, True, True, True]
    identity = of_certificate(client.cert)
    assert {json.loads(r["body"])["identity"] for r in results} == {identity}
    for request in recorder.requests:
        assert request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in request.headers
        assert request.body == body.encode()
