"""The Debian package: built by packaging/build-deb.sh, inspected with dpkg-deb, run from an
extracted tree with Debian's /usr/bin/python3 (what an installed host runs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.support import debpkg

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3").exists(),
        reason="needs dpkg-deb and /usr/bin/python3 (Debian)",
    ),
]

SYSTEM_PY = "/usr/bin/python3"


@pytest.fixture(scope="module")
def deb() -> Path:
    return debpkg.built()[1]


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("debroot")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
    return root


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()


def _listing(deb: Path) -> list[tuple[str, str, str, str]]:
    """(mode, owner, mtime, path) for every member of the data archive."""
    out = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True, timeout=60
    ).stdout
    lines = subprocess.run(
        ["tar", "--numeric-owner", "--full-time", "-tvf", "-"],
        input=out, check=True, capture_output=True, timeout=60,
    ).stdout.decode().splitlines()
    rows = []
    for line in lines:
        mode, owner, _size, day, clock, path = line.split(None, 5)
        rows.append((mode, owner, f"{day} {clock}", path.split(" -> ")[0]))
    return rows


def test_control_names_version_and_runtime_dependencies(deb: Path) -> None:
    version = tomllib.loads((debpkg.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _field(deb, "Package") == "bootkey"
    assert _field(deb, "Version") == f"{version}-1"
    depends = _field(deb, "Depends")
    for dep in ("python3 (>= 3.11)", "python3 (<< 3.12)", "cryptsetup-bin", "libsystemd0"):
        assert dep in depends
    # Debian's python3-pydantic/hvac are too old: the package must not depend on them.
    assert "pydantic" not in depends and "hvac" not in depends
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.split()
    assert conffiles == ["/etc/bootkey/bootkey.toml.example"]


def test_contents_layout_ownership_and_fixed_mtimes(deb: Path) -> None:
    rows = _listing(deb)
    paths = {p for _m, _o, _t, p in rows}
    modes = {p: m for m, _o, _t, p in rows}
    assert modes["./usr/bin/bootkey"] == "-rwxr-xr-x"
    assert modes["./etc/bootkey/"] == "drwx------"
    for must in (
        "./etc/bootkey/bootkey.toml.example",
        "./usr/lib/bootkey/bootkey/cli.py",
        "./usr/lib/bootkey/kes/__init__.py",
        "./usr/lib/bootkey/pydantic/__init__.py",
        "./usr/lib/bootkey/hvac/__init__.py",
        "./usr/share/doc/bootkey/README.md",
        "./usr/share/doc/bootkey/copyright",
    ):
        assert must in paths, must
    # systemd-python, compiled against libsystemd for /usr/bin/python3.
    assert any(re.fullmatch(r"\./usr/lib/bootkey/systemd/_daemon\.cpython-311-.*\.so", p)
               for p in paths)
    # Every unit in systemd/ is shipped.
    for unit in sorted((debpkg.REPO / "systemd").glob("*.service")) + sorted(
        (debpkg.REPO / "systemd").glob("*.socket")
    ):
        assert f"./usr/lib/systemd/system/{unit.name}" in paths
    if (debpkg.REPO / "systemd" / "bootkey.tmpfiles").exists():
        assert "./usr/lib/tmpfiles.d/bootkey.conf" in paths
    # No bytecode (postinst compiles it), no console scripts naming the build venv.
    assert not [p for p in paths if p.endswith(".pyc") or "__pycache__" in p]
    assert not [p for p in paths if p.startswith("./usr/lib/bootkey/bin/")]
    assert {o for _m, o, _t, _p in rows} == {"0/0"}
    assert len({t for _m, _o, t, _p in rows}) == 1  # SOURCE_DATE_EPOCH everywhere


def test_launcher_runs_with_system_python_from_extracted_tree(tree: Path) -> None:
    from bootkey import __version__

    # PYTHONPATH pointing at garbage must not matter: the launcher runs python3 -I.
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONPATH": "/nonexistent"}
    proc = subprocess.run(
        [str(tree / "usr/bin/bootkey"), "--version"],
        check=False, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bootkey {__version__}"
    with (tree / "usr/bin/bootkey").open() as f:
        assert f.readline().startswith("#!/usr/bin/python3 ")


def test_bundled_dependencies_win_over_debian_ones(tree: Path) -> None:
    # Same sys.path as the launcher; imports every runtime dependency (compiled ones too).
    lib = tree / "usr/lib/bootkey"
    code = (
        f"import sys; sys.path.insert(0, {str(lib)!r})\n"
        "import hvac, pydantic, pyudev, tenacity, OpenSSL, httptools, msgpack, yaml\n"
        "import prometheus_client, cryptography.hazmat.bindings._rust, systemd.daemon\n"
        "print(pydantic.__file__); print(pydantic.VERSION); print(systemd.daemon.__file__)\n"
    )
    proc = subprocess.run(
        [SYSTEM_PY, "-IS", "-c", code], check=False, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    pyd_file, pyd_version, sd_file = proc.stdout.split()
    assert pyd_file.startswith(str(lib)) and sd_file.startswith(str(lib))
    assert int(pyd_version.split(".")[0]) >= 2


def test_example_config_is_valid_for_the_packaged_bootkey(tree: Path) -> None:
    lib = tree / "usr/lib/bootkey"
    example = tree / "etc/bootkey/bootkey.toml.example"
    code = (
        f"import sys; sys.path.insert(0, {str(lib)!r})\n"
        "from bootkey import config\n"
        f"c = config.parse(open({str(example)!r}).read(), 'example')\n"
        "print(c.vault.address[0], c.unlock.deadline)\n"
    )
    proc = subprocess.run(
        [SYSTEM_PY, "-IS", "-c", code], check=False, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["https://vault.example:8200", "300.0"]


def test_rebuild_of_the_same_inputs_is_byte_identical(deb: Path, tmp_path: Path) -> None:
    snap, _ = debpkg.built()
    again = debpkg.build(snap, tmp_path / "again")
    assert again.read_bytes() == deb.read_bytes()
    assert os.path.basename(again) == os.path.basename(deb)


def test_rpm_spec_agrees_with_pyproject_and_the_deb_layout() -> None:
    spec = (debpkg.REPO / "packaging" / "bootkey.spec").read_text()
    version = tomllib.loads((debpkg.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(rf"^Version:\s+{re.escape(version)}$", spec, re.MULTILINE)
    build = (debpkg.REPO / "packaging" / "build-deb.sh").read_text()
    # Same launcher interpreter flags, same private library directory, same example config.
    assert "#!/usr/bin/python3 -IS" in spec and "#!/usr/bin/python3 -IS" in build
    for path in ("/usr/lib/bootkey", "bootkey.toml.example", "bootkey.tmpfiles"):
        assert path in spec and path in build, path
    # Every shipped unit is named by bootkey* in %files and installed from systemd/.
    units = [u.name for u in (debpkg.REPO / "systemd").iterdir()
             if u.suffix in (".service", ".socket")]
    assert all(u.startswith("bootkey") for u in units), units
    assert "%{_unitdir}/bootkey*" in spec
