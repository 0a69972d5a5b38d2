"""Benchmark: wall time of `bootkey unlock --all --check` for 1, 4, 16 and 32 volumes
against a local OpenBao, next to the way existing tools do it (vaultlocker-style: one
fresh AppRole login and KV read per volume, and a default argon2id keyslot per volume).

    .venv/bin/python -m bench.unlock [--sizes 1,4,16,32] [--repeat 3]

Prints a Markdown table for docs/benchmarks.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hvac

from bootkey import luks
from bootkey_core.secret import SecretBuffer
from tests.support.bao import DevBao
from tests.support.luksimg import PASSPHRASE, enroll_direct, make_image
from tests.support.vaultenv import provision


def bootkey_check(cfg_file: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bootkey.cli", "--config", str(cfg_file), "unlock",
                    "--all", "--check"], check=True, capture_output=True)
    return time.perf_counter() - t0


def baseline(address: str, role_id: str, secret_id: str, mount: str, *, paths: list[str],
             images: list[str]) -> float:
    """One login + KV read + argon2id test per volume, serially (as vaultlocker does)."""
    t0 = time.perf_counter()
    for path, img in zip(paths, images, strict=True):
        c = hvac.Client(url=address)
        c.auth.approle.login(role_id, secret_id)
        c.secrets.kv.v2.read_secret_version(path, mount_point=mount,
                                            raise_on_deleted_version=True)
        with SecretBuffer.from_bytes(bytearray(PASSPHRASE)) as k:
            assert luks.test_key(img, k) is luks.KeyTest.OK
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4,16,32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-max", type=int, default=32,
                    help="largest size to run the (slow) baseline for")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bootkey-bench-"))
    bao = DevBao(work / "bao").start()
    try:
        root = bao.client()
        # the baseline's argon2id image: formatted once (≈10 s), copied per volume
        argon = work / "argon.img"
        argon.write_bytes(b"")
        os.truncate(argon, 20 << 20)
        subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                        "--key-file=-", str(argon)], input=PASSPHRASE, check=True)
        rows = []
        for n in sizes:
            env = provision(root, work / f"env{n}")
            cfg = env.config()
            vdir = work / f"vols{n}"
            vdir.mkdir()
            for i in range(n):
                enroll_direct(cfg, env.enroll_token, make_image(vdir / f"v{i}.img"),
                              name=f"v{i}")
            cfg_file = vdir / "bootkey.toml"
            cfg_file.write_text(env.toml(deadline="60s").replace(
                "[unlock]\n", f'[unlock]\nsearch = ["{vdir}/*.img"]\n'))
            ours = statistics.median(bootkey_check(cfg_file) for _ in range(a.repeat))
            base = float("nan")
            if n <= a.baseline_max:
                imgs = []
                for i in range(n):
                    dst = vdir / f"argon{i}.img.base"
                    shutil.copyfile(argon, dst)
                    imgs.append(str(dst))
                # vaultlocker stores one entry per volume; read the ones we made
                paths = [f"bootkey/{env.host_id}/{luks.inspect(str(vdir / f'v{i}.img')).uuid}"
                         for i in range(n)]
                base = baseline(env.address, env.role_id, env.secret_id_file.read_text(),
                                env.kv_mount, paths=paths, images=imgs)
            rows.append((n, ours, base))
            print(f"{n:>3} volumes: bootkey {ours:.3f} s, baseline {base:.3f} s",
                  file=sys.stderr)
        print("| volumes | `bootkey unlock --all --check` (median of "
              f"{a.repeat}) | baseline: login + KV read + argon2id per volume | speed-up |")
        print("|---:|---:|---:|---:|")
        for n, ours, base in rows:
            print(f"| {n} | {ours:.3f} s | {base:.2f} s | {base / ours:.0f}x |")
    finally:
        bao.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
