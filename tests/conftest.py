"""Shared fixtures.  VM tests (marked ``vm``) boot real guests through libvirt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmharness import NUMPY, TABULATE, make_state_root, remove_tree, vmiso, write_config

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


# The VM tests' state directory and the one image they provision in it, shared by
# every test file (the OS layer cached there serves later provisionings too).
@pytest.fixture(scope="session")
def vm_root():
    root = make_state_root()
    yield root
    remove_tree(root)


@pytest.fixture(scope="session")
def image(vm_root):
    config = write_config(vm_root / "config", vm_root / "state", requirements=TABULATE + NUMPY)
    done = vmiso("-q", "provision", "-c", config, timeout=2400)
    assert done.returncode == 0, done.stderr
    return {"config": config, "state": vm_root / "state", "output": done}


os.environ.setdefault("VMISO_ACCEL", "tcg")
