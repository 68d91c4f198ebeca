"""The run's scratch disk: made on the host, sparse, bounded, and refused when the host lacks room."""

import subprocess

import pytest

from vmiso.clones.clone import CloneDir, make_scratch
from vmiso.errors import VmisoError
from vmiso.host.workdir import check_room

MiB = 1024**2


def superblock(image) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def test_scratch_is_a_sparse_ext4_of_its_size(tmp_path):
    clone = CloneDir(tmp_path)
    make_scratch(clone, 256 * MiB)
    info = clone.scratch.stat()
    assert info.st_size == 256 * MiB
    assert info.st_blocks * 512 < 8 * MiB  # only metadata is written
    assert info.st_mode & 0o777 == 0o600
    sb = superblock(clone.scratch)
    assert sb["Filesystem volume name"] == "vmiso-tmp"
    assert int(sb["Block count"]) * int(sb["Block size"]) == 256 * MiB
    assert sb["Reserved block count"] == "0"
    assert "has_journal" not in sb["Filesystem features"]


def test_a_restored_clone_gets_an_identical_sparse_copy(tmp_path):
    pristine = CloneDir(tmp_path / "slot")
    pristine.path.mkdir()
    make_scratch(pristine, 64 * MiB)
    run = CloneDir(tmp_path / "run")
    run.path.mkdir()
    make_scratch(run, 0, like=pristine.scratch)
    assert run.scratch.read_bytes() == pristine.scratch.read_bytes()
    assert run.scratch.stat().st_blocks <= pristine.scratch.stat().st_blocks


def test_scratch_never_replaces_a_file(tmp_path):
    clone = CloneDir(tmp_path)
    clone.scratch.write_text("precious")
    with pytest.raises(FileExistsError):
        make_scratch(clone, 64 * MiB)
    assert clone.scratch.read_text() == "precious"


def test_a_scratch_larger_than_the_free_space_is_refused(tmp_path):
    check_room(tmp_path, 64 * MiB, 64 * MiB)
    with pytest.raises(VmisoError) as caught:
        check_room(tmp_path, 1024**6, 64 * MiB)
    assert "scratch space and /out need up to" in caught.value.message and "--scratch" in caught.value.hint
    with pytest.raises(VmisoError) as caught:
        check_room(tmp_path, 64 * MiB, 1024**6)
    assert "run.output_max_bytes" in caught.value.hint
    check_room(tmp_path, 64 * MiB, 64 * MiB, 64 * MiB)
    with pytest.raises(VmisoError) as caught:
        check_room(tmp_path, 64 * MiB, 64 * MiB, 1024**6)  # the inputs' copy and image, in the run's directory
    assert "and its inputs (a copy and its image)" in caught.value.message and "smaller inputs" in caught.value.hint
