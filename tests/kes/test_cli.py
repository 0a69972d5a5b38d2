"""`bootkey kes …` as a user runs it: identities, API keys, and `kes serve` with a KES
YAML file against a real bao, stopped with SIGTERM."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from bootkey.cli import main
from kes.apikey import APIKey
from kes.identity import of_certificate
from tests.kes.server_util import Pki
from tests.support.bao import DevBao, free_port
from tests.support.certs import make_leaf
from tests.support.wait import wait_for


def test_identity_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    leaf = make_leaf(None, "x", client=True)
    (tmp_path / "c.pem").write_bytes(leaf.cert_pem)
    assert main(["kes", "identity", "of", str(tmp_path / "c.pem")]) == 0
    assert capsys.readouterr().out.strip() == of_certificate(leaf.cert)


def test_identity_of_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.pem").write_text("nope")
    assert main(["kes", "identity", "of", str(tmp_path / "c.pem")]) == os.EX_USAGE
    assert "not a PEM certificate" in capsys.readouterr().err


def test_identity_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k, c = tmp_path / "k.key", tmp_path / "k.crt"
    assert main(["kes", "identity", "new", "--key", str(k), "--cert", str(c),
                 "--ip", "127.0.0.1", "--dns", "localhost"]) == 0
    ident = capsys.readouterr().out.strip()
    cert = x509.load_pem_x509_certificate(c.read_bytes())
    assert of_certificate(cert) == ident
    assert (k.stat().st_mode & 0o777) == 0o600
    # refuses to overwrite
    assert main(["kes", "identity", "new", "--key", str(k), "--cert", str(c)]) == os.EX_USAGE
    assert "exists" in capsys.readouterr().err


def test_api_key_new_and_identity(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["kes", "api-key", "new"]) == 0
    out = capsys.readouterr().out
    key = out.split("API key:", 1)[1].split()[0]
    ident = out.split("Identity:", 1)[1].split()[0]
    assert key.startswith("kes:v1:") and APIKey.parse(key).identity == ident
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO(key + "\n"))
    assert main(["kes", "api-key", "identity"]) == 0
    assert capsys.readouterr().out.strip() == ident
    monkeypatch.setattr(sys, "stdin", io.StringIO("kes:v1:AAAA\n"))
    assert main(["kes", "api-key", "identity"]) == os.EX_USAGE


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_kes_yaml(tmp_path: Path, workers: int) -> None:
    bao = DevBao(tmp_path / "bao").start()
    try:
        pki = Pki.create(tmp_path)
        (tmp_path / "server.crt").write_bytes(pki.server.cert_pem)
        (tmp_path / "server.key").write_bytes(pki.server.key_pem)
        admin = make_leaf(None, "admin", client=True)
        api_key = APIKey.generate()
        port = free_port()
        (tmp_path / "kes.yml").write_text(f"""
address: 127.0.0.1:{port}
admin:
  identity: ${{ADMIN_ID}}
tls:
  key: {tmp_path}/server.key
  cert: {tmp_path}/server.crt
policy:
  minio:
    allow: ["/v1/key/generate/minio-*", "/v1/status"]
    identities: ["{api_key.identity}"]
keys:
  - name: minio-default
log:
  error: on
  audit: off
keystore:
  vault:
    endpoint: {bao.address}
    engine: secret
    version: v2
    token: root
""")
        env = {**os.environ, "ADMIN_ID": of_certificate(admin.cert)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bootkey.cli", "kes", "serve", "--kes-config",
             str(tmp_path / "kes.yml"), "--workers", str(workers)],
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            lines: list[str] = []
            while len(lines) < 10 and not any("listening on" in ln for ln in lines):
                lines.append(proc.stderr.readline())
            assert any("created key 'minio-default' from the config" in ln for ln in lines)
            assert f"listening on 127.0.0.1:{port}" in lines[-1], lines
            if os.geteuid() == 0:  # root has CAP_IPC_LOCK: keys live in locked memory
                from bootkey_core.secret import vm_locked_kib
                assert vm_locked_kib(proc.pid) > 0
            ctx = pki.client_context(None)
            cert, key = tmp_path / "ak.crt", tmp_path / "ak.key"
            from cryptography.hazmat.primitives import serialization
            cert.write_bytes(api_key.certificate().public_bytes(serialization.Encoding.PEM))
            key.write_bytes(api_key.private_key_pem())
            ctx.load_cert_chain(str(cert), str(key))
            deks: list[bytes] = []
            for _ in range(4):  # new connections: with workers, the kernel spreads them
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
                conn.request("POST", "/v1/key/generate/minio-default",
                             body=b'{"context":"e30="}')
                r = conn.getresponse()
                body = json.loads(r.read())
                assert r.status == 200 and len(base64.b64decode(body["plaintext"])) == 32
                deks.append(base64.b64decode(body["plaintext"]))
                conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(20)
        assert rc == 0
        assert proc.stderr is not None
        logged = "".join(lines) + proc.stderr.read()
        for dek in deks:  # the server's whole output carries no data key in any spelling
            for form in (base64.b64encode(dek).decode(), dek.hex()):
                assert form not in logged
    finally:
        bao.stop()


def test_serve_config_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "kes.yml").write_text("admin:\n  identity: ${NOPE}\n")
    env = {k: v for k, v in os.environ.items() if k != "NOPE"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bootkey.cli", "kes", "serve", "--kes-config",
                        str(tmp_path / "kes.yml")], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == os.EX_CONFIG
    assert r.stderr.strip() == ("bootkey: kesconf: referenced env. variable 'NOPE' in line '2' "
                                "not found")
    assert time.monotonic() - start < 30


def test_vault_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kes.yml").write_text("""
admin: {identity: disabled}
keystore:
  vault:
    endpoint: https://vault:8200
    engine: secret
    version: v2
    prefix: kes
    transit: {key: kes-wrap}
""")
    assert main(["kes", "vault-policy", "--kes-config", str(tmp_path / "kes.yml")]) == 0
    out = capsys.readouterr().out
    assert 'path "secret/data/kes/*" {' in out and 'path "transit/decrypt/kes-wrap" {' in out


def test_sighup_reloads_policies(tmp_path: Path) -> None:
    bao = DevBao(tmp_path / "bao").start()
    try:
        pki = Pki.create(tmp_path)
        (tmp_path / "server.crt").write_bytes(pki.server.cert_pem)
        (tmp_path / "server.key").write_bytes(pki.server.key_pem)
        client = make_leaf(None, "late", client=True)
        ident = of_certificate(client.cert)
        port = free_port()
        conf = tmp_path / "kes.yml"

        def write(identities: str) -> None:
            conf.write_text(f"""
address: 127.0.0.1:{port}
admin: {{identity: disabled}}
tls: {{key: {tmp_path}/server.key, cert: {tmp_path}/server.crt}}
policy:
  status:
    allow: ["/v1/status"]
    identities: [{identities}]
keystore:
  vault: {{endpoint: "{bao.address}", engine: secret, version: v2, token: root}}
""")
        write("")
        proc = subprocess.Popen([sys.executable, "-m", "bootkey.cli", "kes", "serve",
                                 "--kes-config", str(conf)], stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            line = "-"
            while line and "listening on" not in line:
                line = proc.stderr.readline()
            assert line, "kes serve exited before listening"
            ctx = pki.client_context(client, "late")

            def status() -> int:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
                conn.request("GET", "/v1/status")
                code = conn.getresponse().status
                conn.close()
                return code
            assert status() == 403
            write(f'"{ident}"')
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: status() == 200, what="the reloaded policy to apply")
            assert proc.poll() is None  # SIGHUP reloads, it does not stop the server
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        bao.stop()


def test_identity_of_chain_skips_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.certs import make_ca
    ca = make_ca("ca")
    leaf = make_leaf(ca, "leaf", client=True)
    (tmp_path / "chain.pem").write_bytes(ca.cert_pem + leaf.cert_pem)
    assert main(["kes", "identity", "of", str(tmp_path / "chain.pem")]) == 0
    assert capsys.readouterr().out.strip() == of_certificate(leaf.cert)


def test_serve_dev(tmp_path: Path) -> None:
    import ssl

    from cryptography.hazmat.primitives import serialization
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bootkey.cli", "kes", "serve", "--dev",
                             "--addr", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        out = ""
        line = "-"
        while line and "listening on" not in line:
            line = proc.stderr.readline()
            out += line
        assert line, out
        admin = APIKey.parse(out.split("admin API key:", 1)[1].split()[0])
        pem = out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----")
                  + len("-----END CERTIFICATE-----")]
        (tmp_path / "a.crt").write_bytes(admin.certificate().public_bytes(
            serialization.Encoding.PEM))
        (tmp_path / "a.key").write_bytes(admin.private_key_pem())
        ctx = ssl.create_default_context(cadata=pem)
        ctx.load_cert_chain(str(tmp_path / "a.crt"), str(tmp_path / "a.key"))
        for method, path, want in (("POST", "/v1/key/create/k", 200),
                                   ("POST", "/v1/key/generate/k", 200),
                                   ("GET", "/v1/key/list/", 200)):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            r = conn.getresponse()
            assert r.status == want, (path, r.read())
            r.read()
            conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
