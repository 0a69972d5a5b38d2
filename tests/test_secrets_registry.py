"""The whole-suite secrets scan (tests/support/secrets_plugin.py) finds planted leaks:
in a file the product wrote, in a log a test opened for a subprocess, in a captured
report section; it leaves a test's own key file alone; and a real pytest run with a leak
fails and names the place and encoding, never the key."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.scan import LUKS_MAGIC, REGISTRY, SecretsRegistry, encodings
from tests.support.secrets_plugin import report_blobs, scan_run

REPO = Path(__file__).resolve().parents[1]


def fresh_registry(key: bytes) -> SecretsRegistry:
    # never the session's registry: a planted key registered there would fail the run
    reg = SecretsRegistry(test_written=REGISTRY.test_written)
    reg.register(key, "planted key")
    return reg


def test_planted_files_are_found_and_test_inputs_are_not(tmp_path: Path) -> None:
    key = os.urandom(64)
    reg = fresh_registry(key)
    (tmp_path / "key.bin").write_bytes(key)                      # a test's key file
    (tmp_path / "secret-id").write_text(key.hex() + "\n")        # a test's credential file
    (tmp_path / "luks.img").write_bytes(LUKS_MAGIC + key)        # images are not read
    with open(tmp_path / "agent.log", "wb") as log:              # a test-opened log ...
        subprocess.run([sys.executable, "-c",                    # ... the product writes
                        f"print('unsealed', {base64.b64encode(key).decode()!r})"],
                       stdout=log, check=True)
    subprocess.run([sys.executable, "-c",                        # the product's own file
                    f"open({str(tmp_path / 'cache')!r}, 'w').write({key.hex().upper()!r})"],
                   check=True)
    leaks = {(Path(x.where).name, x.encoding) for x in reg.scan_files([tmp_path])}
    assert {name for name, _ in leaks} == {"agent.log", "cache"}
    assert {("agent.log", "base64"), ("cache", "HEX")} <= leaks


def test_every_encoding_of_every_secret_is_found_in_one_large_blob() -> None:
    # the scan matches all probes in one pass over binary data (bytes > 0x7f included)
    reg = SecretsRegistry(test_written=REGISTRY.test_written)
    keys = {os.urandom(32 + i % 33): f"key {i}" for i in range(60)}
    for key, what in keys.items():
        reg.register(key, what)
    parts = [os.urandom(4096)]
    for key in keys:
        for enc in encodings(key).values():
            parts += [enc, os.urandom(997)]
    leaks = reg.scan([("disk.img", b"".join(parts))])
    assert sorted((x.what, x.encoding) for x in leaks) == sorted(
        (what, kind) for key, what in keys.items() for kind in encodings(key))
    assert reg.scan([("noise", b"".join(parts[:1]))]) == []


def test_a_vm_disk_may_hold_its_hosts_secret_id_and_no_other_secret(tmp_path: Path) -> None:
    secret_id, volume_key = os.urandom(36), os.urandom(64)
    reg = SecretsRegistry(test_written=REGISTRY.test_written)
    reg.register(secret_id, "secret_id of host h", host_credential=True)
    reg.register(volume_key, "volume key")
    write = "import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))"
    for name, blob in (("root.qcow2", b"fs" + secret_id + b"journal" + volume_key),
                       ("bkcfg.img", b"tar" + secret_id), ("agent.log", secret_id)):
        # written by a subprocess, as qemu writes a guest's disks
        subprocess.run([sys.executable, "-c", write, str(tmp_path / name), blob.hex()],
                       check=True)
    reg.machine_disk(tmp_path / "root.qcow2")
    reg.machine_disk(tmp_path / "bkcfg.img")
    leaks = {(Path(x.where).name, x.what) for x in reg.scan_files([tmp_path])}
    assert leaks == {("root.qcow2", "volume key"), ("agent.log", "secret_id of host h")}


def test_planted_report_section_is_found_and_the_report_never_holds_the_key() -> None:
    key = os.urandom(32)
    reg = fresh_registry(key)
    report = pytest.TestReport(
        "tests/test_x.py::test_y", ("tests/test_x.py", 1, "test_y"), {}, "passed",
        None, "call", [("Captured log call", f"DEBUG key={key.hex()}\n"),
                       ("Captured stdout call", "nothing here\n")])
    (leak,) = scan_run(reg, report_blobs(report), [])
    assert (leak.where, leak.encoding) == ("tests/test_x.py::test_y [call] Captured log call",
                                           "hex")
    assert not any(e.decode("latin-1") in str(leak) for e in encodings(key).values())


INNER = """
import os
from tests.support.scan import register_secret

def test_leaks(capsys):
    key = os.urandom(64)
    register_secret(key, "inner key")
    print("debug:", key.hex())
"""


def test_a_run_with_a_leak_fails_naming_test_and_encoding(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.support.secrets_plugin",
         "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}", f"--rootdir={tmp_path}",
         str(tmp_path / "test_inner.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    assert "LEAK test_inner.py::test_leaks [call] Captured stdout call: inner key (hex)" \
        in res.stdout
