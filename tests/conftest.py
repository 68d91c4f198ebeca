"""Shared fixtures.  VM tests (marked ``vm``) boot real guests through libvirt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write(tmp_path: Path):
    """write("name", "text") -> path of a new file under tmp_path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    return _write


def pytest_collection_modifyitems(config, items):
    # VM tests last: the fast ones report first.
    items.sort(key=lambda item: item.get_closest_marker("vm") is not None)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


os.environ.setdefault("VMISO_ACCEL", "tcg")
