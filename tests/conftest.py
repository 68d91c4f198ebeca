"""Shared fixtures.  VM tests (marked ``vm``) boot real guests through libvirt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmharness import DELETED_SECRET, NUMPY, TABULATE, make_state_root, remove_tree, vmiso, write_config

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
    # The marker stands for what provisioning sees and deletes (the requirements are copied
    # in, then removed at sealing): the template's free space must not carry it.
    config = write_config(vm_root / "config", vm_root / "state", requirements=TABULATE + NUMPY + DELETED_SECRET)
    done = vmiso("-q", "provision", "-c", config, timeout=2400)
    assert done.returncode == 0, done.stderr
    return {"config": config, "state": vm_root / "state", "output": done}


os.environ.setdefault("VMISO_ACCEL", "tcg")


@pytest.fixture
def deep_tree(tmp_path: Path):
    """deep_tree(root, depth, name="d", file_every=0) -> the names from ``root`` down.

    Built by descriptor, as a guest can: the path is far longer than PATH_MAX.
    ``file_every``: a file "f" (holding its depth) in every so many directories.
    Everything in ``tmp_path`` is removed afterwards by vmiso.host.tree: pytest's own
    cleanup (shutil.rmtree, recursive in Python 3.11) would crash on it, in this
    session or a later one."""
    def _make(root: Path, depth: int, name: str = "d", file_every: int = 0) -> list[str]:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for level in range(1, depth + 1):
                os.mkdir(name, dir_fd=fd)
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
                if file_every and level % file_every == 0:
                    out = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
                    os.write(out, str(level).encode())
                    os.close(out)
        finally:
            os.close(fd)
        return [name] * depth
    yield _make
    from vmiso.host import tree

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            assert tree.remove_tree(fd, name) == []
    finally:
        os.close(fd)
