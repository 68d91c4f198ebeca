"""A writable share on a filesystem of its own: the kernel bounds what a guest can put there.

These write as a hostile guest would through QEMU's 9p server (here as root, which
the filesystem bounds as well: it keeps no blocks back for root), and check that
every shape of tree runs into the same two limits: bytes and entries.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmiso.errors import OutputError
from vmiso.host import outputs, workdir

MiB = 1024**2
SLACK_FILES = 16  # ext4 rounds the inode count up to fill a block of its inode table


@pytest.fixture
def bounded(tmp_path):
    """bounded(max_bytes, max_files) -> a mounted share, unmounted and removed afterwards."""
    made = []

    def _make(max_bytes: int, max_files: int) -> Path:
        path = workdir.bounded_share(tmp_path / f"out{len(made)}", max_bytes=max_bytes, max_files=max_files)
        made.append(path)
        return path
    yield _make
    for path in made:
        assert workdir.remove_tree(path) == []  # unmounts it first


def until_full(make_one) -> int:
    """Call ``make_one(i)`` until the filesystem says it is full; how many succeeded."""
    count = 0
    with pytest.raises(OSError) as full:
        while count < 10**6:
            make_one(count)
            count += 1
    assert full.value.errno == errno.ENOSPC, full.value
    return count


def mounted_options(path: Path) -> set[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return set(fields[3].split(","))
    raise AssertionError(f"{path} is not mounted")


@pytest.mark.root(reason="mounts a bounded share")
@pytest.mark.parametrize(("max_bytes", "max_files"), [(1 * MiB, 3), (48 * MiB, 500)])
def test_a_share_holds_its_limits_and_no_more(bounded, max_bytes, max_files):
    share = bounded(max_bytes, max_files)
    files = until_full(lambda i: (share / f"f{i}").touch())
    assert max_files <= files <= max_files + SLACK_FILES
    for f in share.iterdir():
        f.unlink()
    chunk = b"x" * (64 * 1024)
    with open(share / "big", "wb", buffering=0) as f:
        written = 64 * 1024 * until_full(lambda i: f.write(chunk))
    assert max_bytes <= written <= max_bytes + MiB
    assert workdir.share_full(share) == "bytes"


@pytest.mark.root(reason="mounts a bounded share")
def test_deep_trees_empty_directories_and_long_names_all_count(bounded):
    share = bounded(8 * MiB, 200)
    fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
    fds = [fd]

    def deeper(i):  # a chain far past PATH_MAX if nothing stopped it
        os.mkdir("d" * 255, dir_fd=fds[-1])
        fds.append(os.open("d" * 255, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    depth = until_full(deeper)
    for each in fds:
        os.close(each)
    assert 200 <= depth <= 200 + SLACK_FILES
    assert workdir.share_full(share) == "files"


@pytest.mark.root(reason="mounts a bounded share")
def test_directory_blocks_count_as_bytes(bounded):
    """Names cost directory blocks: many long names run out of bytes before entries."""
    share = bounded(1 * MiB, 100_000)
    made = until_full(lambda i: os.mkdir(share / f"{i:08d}{'n' * 240}"))
    assert made < 1000  # each directory takes a 4 KiB block: 1 MiB (+1 spare) holds a few hundred
    assert workdir.share_full(share) == "bytes"


@pytest.mark.root(reason="mounts a bounded share")
def test_a_sparse_file_passes_the_kernel_and_is_refused_by_the_collector(bounded, tmp_path):
    share = bounded(1 * MiB, 10)
    with open(share / "sparse", "wb") as f:
        f.truncate(10 * 1024**3)
        f.seek(5 * 1024**3)
        f.write(b"data")
    assert (share / "sparse").stat().st_blocks * 512 <= 2 * MiB  # the host's disk holds a few blocks
    with pytest.raises(OutputError, match="more than 1048576 bytes to /out"):
        outputs.collect(share, tmp_path / "dest", max_bytes=1 * MiB, max_files=10)
    assert not (tmp_path / "dest" / "sparse").exists()


@pytest.mark.root(reason="mounts a bounded share")
def test_the_share_is_qemus_private_directory_on_a_filesystem_nothing_runs_from(bounded):
    share = bounded(1 * MiB, 10)
    st = share.stat()
    assert (st.st_uid, st.st_gid) == workdir.qemu_ids() and stat.S_IMODE(st.st_mode) == 0o700
    assert list(share.iterdir()) == []  # no lost+found for the guest to see or fill
    assert {"nosuid", "nodev", "noexec"} <= mounted_options(share)
    image = Path(f"{share}{workdir.SHARE_FS_SUFFIX}")
    st = image.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)  # QEMU cannot write the image itself


@pytest.mark.root(reason="mounts a bounded share")
def test_removing_the_run_unmounts_the_share_and_frees_its_loop_device(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    share = workdir.bounded_share(run / "out", max_bytes=1 * MiB, max_files=10)
    (share / "left-behind").write_text("by the guest")
    image = f"{share}{workdir.SHARE_FS_SUFFIX}"
    assert workdir.remove_tree(run) == []
    assert not run.exists() and not os.path.ismount(share)
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout
    assert image not in loops


def test_doctor_explains_missing_loop_devices(tmp_path):
    from vmiso.doctor import _loop_devices
    assert _loop_devices().ok
    missing = _loop_devices(tmp_path / "loop-control")
    assert not missing.ok and "runs cannot bound /out" in missing.detail and "modprobe loop" in missing.fix
