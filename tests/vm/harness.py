"""Boot a debootstrapped Debian bookworm systemd guest under qemu TCG with bootkey installed.

Layers, each cached under $BOOTKEY_VM_CACHE (default /var/cache/bootkey-vm) by a hash of
its inputs, built under a file lock so parallel test processes share them:

  kernel     Debian's cloud kernel, `apt-get download` + `dpkg-deb -x` + `busybox depmod`
  initramfs  busybox + virtio modules; mounts /dev/vda and switch_roots to systemd
  base       `debootstrap --variant=minbase` with BASE_PACKAGES (~50 s, once)
  image      base + kernel modules + `dpkg -i bootkey.deb` + harness/test files, as a raw
             ext4 made with `mkfs.ext4 -d` (no loop mounts)

Every boot runs on a throw-away qcow2 overlay of the image. Per-boot data (config, secrets,
the guest's test script) goes in as a raw tar on a disk with serial "bkcfg"; results come
back as a raw tar on the disk "bkout" (test output, the journal, failed units). The guest
reaches exactly one host port, 10.0.2.100:8200 → 127.0.0.1:<vault_port>. QMP hot-plugs disks.
Only one VM runs at a time on the machine (a lock file): two TCG guests on 2 cores each
take twice as long and time out.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.scan import REGISTRY

GUEST_DIR = Path(__file__).resolve().parent / "guest"
QEMU = shutil.which("qemu-system-x86_64")
SWTPM = shutil.which("swtpm")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "cryptsetup-bin", "python3", "iproute2",
    "e2fsprogs", "util-linux", "libsystemd0", "tar", "procps",
)
# Modules the initramfs loads (plus their modules.dep closure); ext4 is built in.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk")
# A fixed machine id, so host_id (default: /etc/machine-id) is known to the host.
MACHINE_ID = "b007c0deb007c0deb007c0deb007c0de"
VAULT_GUEST_URL = "http://10.0.2.100:8200"
IMAGE_SIZE = "2G"
KEEP_IMAGES = 8          # old images (~0.5 GB each) are pruned beyond this many
KEEP_INSTALLED = 3       # and old installed layers (~0.45 GB each)
BOOT_TIMEOUT = 360.0     # boot to poweroff: 15-60 s under TCG on 2 shared cores
SILENT_BOOT_LIMIT = 90.0  # no console byte by then: a hung boot (VM._restart_if_silent)
# Masked in every image: no logins, and periodic jobs that only cost emulated CPU time.
UNNEEDED_UNITS = (
    "getty@tty1.service", "serial-getty@ttyS0.service", "getty-static.service",
    "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer",
)
# Bump when the image recipe changes in a way the hashed inputs do not show.
RECIPE = "3"


def cache_dir() -> Path:
    d = Path(os.environ.get("BOOTKEY_VM_CACHE", "/var/cache/bootkey-vm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    with (cache_dir() / f"{name}.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: Sequence[str], *, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), check=False, capture_output=True, text=True, timeout=timeout, **kw
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)}: rc {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return proc


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()[:20]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- kernel ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path            # the extracted linux-image .deb

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def _cloud_kernel_version() -> str:
    def query() -> str:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-cloud-amd64"],
            check=False, capture_output=True, text=True, timeout=60,
        ).stdout
        m = re.search(r"Depends: linux-image-(\S+-cloud-amd64)", out)
        return m.group(1) if m else ""

    version = query()
    if not version:  # fresh machine: no package lists yet
        _run(["apt-get", "update", "-qq"], timeout=300)
        version = query()
    if not version:
        raise RuntimeError("linux-image-cloud-amd64: cannot resolve its kernel package")
    return version


def kernel() -> Kernel:
    version = _cloud_kernel_version()
    dest = cache_dir() / f"kernel-{version}"
    k = Kernel(version, dest / "root")
    with _locked("kernel"):
        if (dest / "done").exists():
            return k
        shutil.rmtree(dest, ignore_errors=True)
        dl = dest / "dl"
        dl.mkdir(parents=True)
        _run(["apt-get", "download", "-q", f"linux-image-{version}"], timeout=600, cwd=dl)
        (deb,) = dl.glob("*.deb")
        _run(["dpkg-deb", "-x", str(deb), str(k.root)], timeout=300)
        # The host has no kmod; busybox's depmod writes modules.dep for the initramfs.
        _run(["busybox", "depmod", "-b", str(k.root), version], timeout=120)
        shutil.rmtree(dl)
        (dest / "done").touch()
    return k


# --- initramfs -------------------------------------------------------------------------


def module_closure(k: Kernel, names: Sequence[str]) -> list[str]:
    deps: dict[str, list[str]] = {}
    for line in (k.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    out: list[str] = []
    todo = [by_name[n.replace("-", "_")] for n in names if n.replace("-", "_") in by_name]
    while todo:
        m = todo.pop()
        if m not in out:
            out.append(m)
            todo.extend(deps[m])
    return out


def initramfs(k: Kernel) -> Path:
    init = (GUEST_DIR / "init").read_bytes()
    busybox = Path("/bin/busybox")
    key = _sha(RECIPE, k.version, init, _file_sha(busybox), *INITRAMFS_MODULES)
    out = cache_dir() / f"initrd-{key}.cpio.gz"
    with _locked("initramfs"):
        if out.exists():
            return out
        w = cache_dir() / f"initrd-{key}.tmp"
        shutil.rmtree(w, ignore_errors=True)
        for d in ("bin", "sbin", "proc", "sys", "dev", "newroot", f"lib/modules/{k.version}"):
            (w / d).mkdir(parents=True)
        shutil.copy2(busybox, w / "bin/busybox")
        applets = _run([str(busybox), "--list"], timeout=30).stdout.split()
        for a in applets:
            if a != "busybox":  # a link named busybox over the binary breaks /init (ELOOP)
                (w / "bin" / a).symlink_to("busybox")
        (w / "sbin/modprobe").symlink_to("../bin/busybox")
        for m in module_closure(k, INITRAMFS_MODULES):
            dst = w / "lib/modules" / k.version / m
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(k.modules / m, dst)
        for f in ("modules.dep", "modules.alias", "modules.builtin", "modules.order"):
            if (k.modules / f).exists():
                shutil.copy2(k.modules / f, w / "lib/modules" / k.version / f)
        (w / "init").write_bytes(init)
        (w / "init").chmod(0o755)
        names = subprocess.run(
            ["find", "."], cwd=w, check=True, capture_output=True, timeout=30
        ).stdout
        cpio = subprocess.run(
            [str(busybox), "cpio", "-o", "-H", "newc"], cwd=w, input=names,
            check=True, capture_output=True, timeout=60,
        ).stdout
        tmp = out.with_suffix(".part")
        tmp.write_bytes(_gzip(cpio))
        tmp.rename(out)
        shutil.rmtree(w)
    return out


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


# --- base rootfs (debootstrap) ----------------------------------------------------------


def base_rootfs(packages: Sequence[str] = BASE_PACKAGES) -> Path:
    key = _sha(SUITE, MIRROR, *sorted(packages))
    dest = cache_dir() / f"base-{key}"
    with _locked("base"):
        if (dest / "done").exists():
            return dest / "rootfs"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        _run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
             SUITE, str(dest / "rootfs"), MIRROR],
            timeout=900,
        )
        shutil.rmtree(dest / "rootfs/var/cache/apt/archives", ignore_errors=True)
        (dest / "rootfs/var/cache/apt/archives/partial").mkdir(parents=True)
        (dest / "done").touch()
    return dest / "rootfs"


# --- image -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """Everything baked into an image. `files` maps guest paths to (content, mode); units
    named in `enable`/`mask` are enabled/masked offline with `systemctl --root`."""

    deb: Path | None
    files: Mapping[str, tuple[bytes, int]] = field(default_factory=dict)
    enable: Sequence[str] = ()
    mask: Sequence[str] = ()
    packages: Sequence[str] = BASE_PACKAGES


def populate(root: Path, spec: ImageSpec) -> None:
    """Write the harness's and `spec`'s files into a copied rootfs; enable and mask units."""
    files = {**_harness_files(), **spec.files}
    for path, (content, mode) in files.items():
        dst = root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.chmod(0o600)
            dst.unlink()
        dst.write_bytes(content)
        dst.chmod(mode)
    enable = ["systemd-networkd.service", "vmtest-setup.service", "vmtest.service",
              *spec.enable]
    _run(["systemctl", f"--root={root}", "enable", *enable], timeout=60)
    mask = [*UNNEEDED_UNITS, *spec.mask]
    _run(["systemctl", f"--root={root}", "mask", *mask], timeout=60)


def _harness_files() -> dict[str, tuple[bytes, int]]:
    g = GUEST_DIR
    return {
        "/etc/systemd/network/20-wired.network": ((g / "20-wired.network").read_bytes(), 0o644),
        "/etc/systemd/system/vmtest-setup.service": (
            (g / "vmtest-setup.service").read_bytes(), 0o644),
        "/etc/systemd/system/vmtest.service": ((g / "vmtest.service").read_bytes(), 0o644),
        "/usr/local/sbin/vmtest-run": ((g / "vmtest-run").read_bytes(), 0o755),
        "/etc/machine-id": (MACHINE_ID.encode() + b"\n", 0o444),
        "/etc/hostname": (b"bootkey-vm\n", 0o644),
        "/etc/hosts": (b"127.0.0.1 localhost\n127.0.1.1 bootkey-vm\n", 0o644),
        "/etc/fstab": (b"LABEL=root / ext4 rw,errors=remount-ro 0 1\n", 0o644),
    }


def installed_rootfs(deb: Path | None, packages: Sequence[str] = BASE_PACKAGES) -> Path:
    """base + the kernel's modules + `dpkg -i` of the .deb, cached by the .deb's hash (the
    images of all scenarios share it; only their files differ)."""
    k = kernel()
    base = base_rootfs(packages)
    key = _sha(RECIPE, base.parent.name, k.version, _file_sha(deb) if deb else "no-deb")
    dest = cache_dir() / f"installed-{key}"
    with _locked("installed"):
        if (dest / "done").exists():
            (dest / "done").touch()
            return dest / "rootfs"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        root = dest / "rootfs"
        _run(["cp", "-a", "--reflink=auto", str(base), str(root)], timeout=300)
        shutil.copytree(k.modules, root / "lib/modules" / k.version, symlinks=True)
        _run(["chroot", str(root), "depmod", k.version], timeout=300)
        if deb:
            shutil.copy2(deb, root / "tmp/bootkey.deb")
            _run(["chroot", str(root), "dpkg", "-i", "/tmp/bootkey.deb"], timeout=600,
                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
            (root / "tmp/bootkey.deb").unlink()
        (dest / "done").touch()
        layers = sorted(cache_dir().glob("installed-*/done"), key=lambda p: p.stat().st_mtime,
                        reverse=True)
        for old in layers[KEEP_INSTALLED:]:
            shutil.rmtree(old.parent, ignore_errors=True)
    return root


def image(spec: ImageSpec) -> Path:
    """The raw root image for `spec` (built, or taken from the cache)."""
    installed = installed_rootfs(spec.deb, spec.packages)
    files = {**_harness_files(), **spec.files}
    parts: list[bytes | str] = [RECIPE, installed.parent.name]
    for path in sorted(files):
        content, mode = files[path]
        parts += [path, content, str(mode)]
    parts += ["enable", *spec.enable, "mask", *spec.mask]
    key = _sha(*parts)
    images = cache_dir() / "images"
    images.mkdir(exist_ok=True)
    out = images / f"{key}.img"
    with _locked("image"):
        if out.exists():
            out.touch()  # recently used: survives pruning
            return out
        stage = cache_dir() / f"stage-{key}"
        shutil.rmtree(stage, ignore_errors=True)
        root = stage / "rootfs"
        stage.mkdir()
        _run(["cp", "-a", "--reflink=auto", str(installed), str(root)], timeout=300)
        populate(root, spec)
        raw = stage / "root.img"
        _run(["truncate", "-s", IMAGE_SIZE, str(raw)], timeout=30)
        _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw)], timeout=600)
        raw.rename(out)
        shutil.rmtree(stage)
        old = sorted(images.glob("*.img"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in old[KEEP_IMAGES:]:
            p.unlink(missing_ok=True)
    return out


# --- per-boot disks ----------------------------------------------------------------------


def tar_disk(path: Path, files: Mapping[str, tuple[bytes, int]], size: int = 16 << 20) -> Path:
    """A raw disk holding a tar of `files` (guest path → (content, mode)), zero-padded."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    tf.addfile(ti)
            content, mode = files[name]
            ti = tarfile.TarInfo(name.strip("/"))
            ti.size, ti.mode, ti.mtime = len(content), mode, 0
            tf.addfile(ti, io.BytesIO(content))
    data = buf.getvalue()
    if len(data) > size:
        raise ValueError(f"{path}: {len(data)} bytes of data do not fit a {size}-byte disk")
    with path.open("wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def read_tar_disk(path: Path) -> dict[str, bytes]:
    """Files of the tar the guest wrote to a raw disk; empty if it wrote none."""
    out: dict[str, bytes] = {}
    with path.open("rb") as f:
        if not f.read(512).strip(b"\0"):
            return out
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    fo = tf.extractfile(m)
                    assert fo is not None
                    out[m.name.removeprefix("./")] = fo.read()
    return out


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str            # /dev/disk/by-id/virtio-<serial> in the guest (≤ 20 chars)
    fmt: str = "raw"


# --- QMP ---------------------------------------------------------------------------------


class QMP:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._buf = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP: qemu closed the monitor")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self._sock.close()


# --- the VM ------------------------------------------------------------------------------


@dataclass
class Result:
    rc: int | None           # the test script's exit status (None: no results written)
    files: dict[str, bytes]
    console: str
    seconds: float           # qemu wall time

    def text(self, name: str) -> str:
        return self.files.get(name, b"").decode(errors="replace")

    @property
    def journal(self) -> str:
        return self.text("journal.txt")

    def describe(self) -> str:
        """Everything useful when a VM test fails."""
        return (f"--- test.log ---\n{self.text('test.log')[-6000:]}\n"
                f"--- failed units ---\n{self.text('failed.txt')}\n"
                f"--- journal (tail) ---\n{self.journal[-8000:]}\n"
                f"--- console (tail) ---\n{self.console[-4000:]}")


class VM:
    """One boot of `image`. Use as a context manager; `wait()` returns the Result.

    `data` is unpacked over / before sysinit (per-boot config, secrets, /vmtest/test.sh,
    which runs after multi-user.target with the results directory as $1).
    """

    def __init__(
        self,
        image_path: Path,
        workdir: Path,
        *,
        kernel_: Kernel | None = None,
        initrd: Path | None = None,
        data: Mapping[str, tuple[bytes, int]] | None = None,
        disks: Sequence[Disk] = (),
        vault_port: int | None = None,
        memory_mb: int = 1024,
        smp: int = 2,
        timeout: float = BOOT_TIMEOUT,
        overlay: Path | None = None,
        cmdline: str = "",
        console_input: bool = False,
        tpm_state: Path | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.kernel = kernel_ or kernel()
        self.initrd = initrd or initramfs(self.kernel)
        self.image = image_path
        self.overlay = overlay or workdir / "root.qcow2"
        self.data = dict(data or {})
        self.disks = list(disks)
        self.vault_port = vault_port
        self.memory_mb, self.smp, self.timeout = memory_mb, smp, timeout
        self.cmdline = cmdline  # appended to the kernel command line
        self.console_path = workdir / "console.log"
        # console_input: the serial port is a socket qemu waits on until the harness
        # connects; a thread copies the guest's output to console.log, and
        # type_console() writes to it. Otherwise the serial port writes the file itself.
        self.console_input = console_input
        self.console_sock = workdir / "console.sock"
        self._console_conn: socket.socket | None = None
        self._console_thread: threading.Thread | None = None
        self.qmp_path = workdir / "qmp.sock"
        self.out_disk = workdir / "bkout.img"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: Any = None
        self._started = 0.0
        self._qmp: QMP | None = None
        self._hotplugged = 0
        self._restarted = False
        # tpm_state: a TPM2 (swtpm, its state in this directory, which it updates) on the
        # guest's TIS interface; a fresh directory is a TPM nobody has used.
        self.tpm_state = tpm_state
        self.tpm_sock = workdir / "tpm.sock"
        self._swtpm: subprocess.Popen[bytes] | None = None

    def _serial_args(self) -> list[str]:
        if not self.console_input:
            return ["-serial", f"file:{self.console_path}"]
        return ["-chardev", f"socket,id=con0,path={self.console_sock},server=on,wait=on",
                "-serial", "chardev:con0"]

    def _attach_console(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(str(self.console_sock))
                break
            except OSError:
                conn.close()
                if time.monotonic() > deadline:
                    raise AssertionError("qemu never opened its console socket") from None
                time.sleep(0.05)
        self._console_conn = conn

        def copy() -> None:
            with self.console_path.open("ab") as log:
                while chunk := conn.recv(65536):
                    log.write(chunk)
                    log.flush()

        self._console_thread = threading.Thread(target=copy, name="console", daemon=True)
        self._console_thread.start()

    def argv(self) -> list[str]:
        assert QEMU
        net = "user,id=n0,restrict=on"
        if self.vault_port is not None:
            # One relay process per guest connection (the tcp: target form serves only the
            # first connection: TESTING-ON-THESE-MACHINES §8).
            net += (f",guestfwd=tcp:10.0.2.100:8200-cmd:/bin/busybox nc 127.0.0.1 "
                    f"{self.vault_port}")
        argv = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(self.smp),
            "-m", str(self.memory_mb), "-nodefaults", "-display", "none", "-no-reboot",
            *self._serial_args(),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.initrd),
            "-append", " ".join(("console=ttyS0 panic=-1 rw loglevel=4 systemd.show_status=1",
                                 self.cmdline)).strip(),
            "-drive", f"file={self.overlay},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root,serial=bkroot",
            "-netdev", net, "-device", "virtio-net-pci,netdev=n0",
        ]
        if self.tpm_state is not None:
            argv += ["-chardev", f"socket,id=chrtpm,path={self.tpm_sock}",
                     "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                     "-device", "tpm-tis,tpmdev=tpm0"]
        disks = [Disk(self.workdir / "bkcfg.img", "bkcfg"), Disk(self.out_disk, "bkout"),
                 *self.disks]
        for i, d in enumerate(disks):
            argv += ["-drive", f"file={d.path},if=none,id=d{i},format={d.fmt}",
                     "-device", f"virtio-blk-pci,drive=d{i},serial={d.serial}"]
        return argv

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def start(self) -> None:
        if not self.overlay.exists():
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                  str(self.image), str(self.overlay)], timeout=60)
        tar_disk(self.workdir / "bkcfg.img", self.data)
        for disk in (self.overlay, self.workdir / "bkcfg.img"):
            REGISTRY.machine_disk(disk)
        with self.out_disk.open("wb") as f:
            f.truncate(64 << 20)
        self.console_path.write_bytes(b"")
        self.qmp_path.unlink(missing_ok=True)
        self._lock = (cache_dir() / "vm-run.lock").open("a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # one VM at a time on this machine
        if self.tpm_state is not None:
            self._start_swtpm()
        log = (self.workdir / "qemu.log").open("wb")
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if self.console_input:
            self._attach_console()

    @property
    def console(self) -> str:
        return self.console_path.read_bytes().decode(errors="replace").replace("\r", "")

    def _remaining(self) -> float:
        return self.timeout - (time.monotonic() - self._started)

    def wait_console(self, pattern: str, timeout: float | None = None) -> re.Match[str]:
        """Wait until the serial console matches `pattern`; fail on timeout or qemu exit."""
        deadline = time.monotonic() + min(timeout or self.timeout, self._remaining())
        rx = re.compile(pattern, re.MULTILINE)
        while True:
            m = rx.search(self.console)
            if m:
                return m
            if self._restart_if_silent():
                deadline = time.monotonic() + min(timeout or self.timeout, self._remaining())
                continue
            assert self._proc
            if self._proc.poll() is not None:
                raise AssertionError(
                    f"qemu exited (rc {self._proc.returncode}) before the console showed "
                    f"{pattern!r}:\n{self.console[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"console never showed {pattern!r}:\n{self.console[-4000:]}")
            time.sleep(0.2)

    def type_console(self, text: bytes) -> None:
        """Type `text` on the serial console (needs console_input=True)."""
        if self._console_conn is None:
            raise AssertionError("type_console needs VM(..., console_input=True)")
        self._console_conn.sendall(text)

    def qmp(self) -> QMP:
        if self._qmp is None:
            deadline = time.monotonic() + 30
            while not self.qmp_path.exists():
                if time.monotonic() > deadline:
                    raise AssertionError("qemu never created its QMP socket")
                time.sleep(0.05)
            self._qmp = QMP(self.qmp_path)
        return self._qmp

    def hotplug(self, disk: Disk) -> None:
        """Attach a virtio disk to the running guest (QMP blockdev-add + device_add)."""
        n = self._hotplugged = self._hotplugged + 1
        q = self.qmp()
        q.execute("blockdev-add", **{
            "node-name": f"hp{n}", "driver": disk.fmt,
            "file": {"driver": "file", "filename": str(disk.path)},
        })
        q.execute("device_add", driver="virtio-blk-pci", drive=f"hp{n}", id=f"hpdev{n}",
                  serial=disk.serial)

    def wait(self) -> Result:
        """Wait for the guest to power off (within the VM's timeout) and collect results."""
        assert self._proc
        while True:
            try:
                self._proc.wait(timeout=min(max(self._remaining(), 1.0), 5.0))
                break
            except subprocess.TimeoutExpired:
                if self._restart_if_silent():
                    continue
                if self._remaining() <= 0:
                    self.kill()
                    raise AssertionError(
                        f"VM did not power off within {self.timeout:.0f} s:\n"
                        f"{self._qemu_log()}{self.console[-6000:]}") from None
        seconds = time.monotonic() - self._started
        self._release()
        files = read_tar_disk(self.out_disk)
        keep = self.workdir / "results"  # for a look after the test
        keep.mkdir(exist_ok=True)
        for name, content in files.items():
            (keep / Path(name).name).write_bytes(content)
        rc = int(files["rc"]) if "rc" in files else None
        return Result(rc, files, self.console, seconds)

    def _start_swtpm(self) -> None:
        assert self.tpm_state is not None and SWTPM, "swtpm is not installed"
        self.tpm_state.mkdir(parents=True, exist_ok=True)
        self.tpm_sock.unlink(missing_ok=True)
        self._swtpm = subprocess.Popen(
            [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state.resolve()}",
             "--ctrl", f"type=unixio,path={self.tpm_sock}", "--terminate",
             "--log", f"file={self.workdir / 'swtpm.log'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.tpm_sock.exists():
            if self._swtpm.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"swtpm did not start: "
                                     f"{(self.workdir / 'swtpm.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def _restart_if_silent(self) -> bool:
        """Boot the guest again, once, if it printed nothing within SILENT_BOOT_LIMIT.

        Under TCG a guest can hang before its first console line (a cause not seen from
        outside; TCG -smp boots are known to hang bringing up a second vCPU): it happened
        once in CI, a 360 s timeout with an empty console. Nothing of the test has run by
        then: systemd prints its first line 3-10 s after start. The restart is said on
        stderr, so it is not hidden.
        """
        assert self._proc
        if (self._restarted or self._remaining() > self.timeout - SILENT_BOOT_LIMIT
                or self._proc.poll() is not None or self.console_path.stat().st_size > 0):
            return False
        self._restarted = True
        print(f"\nvm harness: {self.workdir.name}: no console output in "
              f"{SILENT_BOOT_LIMIT:.0f} s, booting it again (once):\n{self._qemu_log()}",
              file=sys.stderr)
        self.kill()
        self.start()
        return True

    def _qemu_log(self) -> str:
        log = self.workdir / "qemu.log"
        text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return f"--- qemu.log ---\n{text}\n--- console ---\n" if text.strip() else ""

    def kill(self) -> None:
        if self._qmp:
            self._qmp.close()
            self._qmp = None
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        self._release()

    def _release(self) -> None:
        if self._swtpm is not None:  # --terminate: it ends with qemu's connection
            try:
                self._swtpm.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._swtpm.kill()
                self._swtpm.wait(timeout=10)
            self._swtpm = None
        if self._console_thread is not None:  # ends at qemu's exit: the console is whole
            self._console_thread.join(timeout=10)
            self._console_thread = None
        if self._console_conn is not None:
            self._console_conn.close()
            self._console_conn = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def journal_monotonic(journal: str, pattern: str) -> float | None:
    """Guest uptime (s) of the first `journalctl -o short-monotonic` line matching `pattern`."""
    rx = re.compile(pattern)
    for line in journal.splitlines():
        m = re.match(r"\[\s*(\d+\.\d+)\]", line)
        if m and rx.search(line):
            return float(m.group(1))
    return None


# --- host-side disks ---------------------------------------------------------------------

FAST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")  # as bootkey enrolls


def luks_disk(path: Path, key: bytes, files: Mapping[str, bytes], size_mb: int = 64,
              uuid: str | None = None) -> Path:
    """A LUKS2 image (key on stdin) holding an ext4 filesystem with `files`, built without
    device-mapper: mkfs.ext4 -d, then cryptsetup's offline in-place encryption."""
    payload = path.with_name(path.name + ".payload")
    shutil.rmtree(payload, ignore_errors=True)
    payload.mkdir()
    for name, content in files.items():
        (payload / name).parent.mkdir(parents=True, exist_ok=True)
        (payload / name).write_bytes(content)
    path.unlink(missing_ok=True)
    _run(["truncate", "-s", f"{size_mb}M", str(path)], timeout=30)
    _run(["mkfs.ext4", "-q", "-F", "-d", str(payload), str(path), f"{size_mb - 16}M"],
         timeout=60)
    shutil.rmtree(payload)
    proc = subprocess.run(
        ["cryptsetup", "reencrypt", "--encrypt", "--batch-mode", "--type", "luks2",
         "--reduce-device-size", "16M", "--force-offline-reencrypt", *FAST_PBKDF,
         *(("--uuid", uuid) if uuid else ()), "--key-file=-", str(path)],
        input=key, capture_output=True, timeout=120, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cryptsetup reencrypt {path}: rc {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')}")
    return path
