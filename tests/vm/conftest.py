"""Fixtures for VM tests: the built .deb and cached guest images (tests/vm/harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import debpkg
from tests.vm import harness


@pytest.fixture(scope="session")
def vm_deb() -> Path:
    return debpkg.built()[1]


@pytest.fixture(scope="session")
def plain_image(vm_deb: Path) -> Path:
    """The guest with bootkey installed and nothing of bootkey's enabled."""
    return harness.image(harness.ImageSpec(deb=vm_deb))
