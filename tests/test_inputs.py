"""Inputs are checked before anything is made, then copied; the user's files are never shared."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmiso.errors import VmisoError
from vmiso.host.inputs import (
    LARGE_FILE_BYTES,
    LARGE_INDEX,
    PREFETCH_MAX,
    InputLimits,
    build_disk,
    check_inputs,
    disk_bytes,
    fill_disk,
    input_digest,
    prefetch_bytes,
    stage_inputs,
)

LIMITS = InputLimits(max_bytes=10**7, max_files=1000)


def disk_use(root):
    """Bytes of disk the files below ``root`` take (never following a link)."""
    total = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def test_inputs_are_copied_with_fixed_modes(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a\n")
    os.chmod(data, 0o600)
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "m.py").write_text("x = 1\n")
    os.chmod(tree / "sub", 0o700)
    staging = tmp_path / "staging"
    staging.mkdir()
    check_inputs((data, tree), LIMITS)
    stage_inputs((data, tree), staging, LIMITS)
    assert (staging / "data.csv").read_text() == "a\n"
    assert (staging / "data.csv").stat().st_mode & 0o777 == 0o644
    assert (staging / "pkg").stat().st_mode & 0o777 == 0o755
    assert (staging / "pkg" / "sub").stat().st_mode & 0o777 == 0o755
    assert (staging / "pkg" / "sub" / "m.py").read_text() == "x = 1\n"


def test_an_input_named_through_a_link_is_followed(tmp_path):
    (tmp_path / "real.csv").write_text("a\n")
    (tmp_path / "link.csv").symlink_to("real.csv")
    staging = tmp_path / "staging"
    staging.mkdir()
    check_inputs((tmp_path / "link.csv",), LIMITS)
    stage_inputs((tmp_path / "link.csv",), staging, LIMITS)
    assert (staging / "real.csv").read_text() == "a\n" and not (staging / "real.csv").is_symlink()


@pytest.mark.parametrize("target", ["/etc", "sub", "."])
def test_a_link_inside_an_input_is_refused_wherever_it_leads(tmp_path, target):
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "link").symlink_to(target)
    with pytest.raises(VmisoError, match="pkg/sub/link is a symbolic link; vmiso follows no link") as err:
        check_inputs((tree,), LIMITS)
    assert "give that as an input of its own" in err.value.hint
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(VmisoError, match="is a symbolic link"):
        stage_inputs((tree,), staging, LIMITS)


def test_an_input_that_links_back_into_itself_twice_is_refused_at_once(tmp_path):
    # a -> . and b -> . : followed, they copy the tree without end (3 GB in 8 s, measured).
    tree = tmp_path / "pkg"
    tree.mkdir()
    (tree / "data.bin").write_bytes(os.urandom(100_000))
    (tree / "a").symlink_to(".")
    (tree / "b").symlink_to(".")
    staging = tmp_path / "staging"
    staging.mkdir()
    started = time.monotonic()
    with pytest.raises(VmisoError, match="pkg/a is a symbolic link"):
        check_inputs((tree,), LIMITS)
    with pytest.raises(VmisoError, match="pkg/a is a symbolic link"):
        stage_inputs((tree,), staging, LIMITS)  # as a preloaded clone's run stages them, after the check
    assert time.monotonic() - started < 2
    assert disk_use(staging) < 200_000  # at most the one file ahead of the link in the walk


def test_inputs_past_the_limits_are_refused_with_the_key_to_raise(tmp_path):
    tree = tmp_path / "pkg"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}").write_bytes(b"x" * 1000)
    with pytest.raises(VmisoError, match="more than 10 files and directories") as err:
        check_inputs((tree,), InputLimits(max_bytes=10**6, max_files=10))
    assert "run.input_max_files" in err.value.hint
    with pytest.raises(VmisoError, match="more than 5000 bytes") as err:
        check_inputs((tree,), InputLimits(max_bytes=5000, max_files=100))
    assert "run.input_max_bytes" in err.value.hint
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(VmisoError, match="more than 5000 bytes"):
        stage_inputs((tree,), staging, InputLimits(max_bytes=5000, max_files=100))
    assert sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) <= 5000 + 1000


def test_an_input_that_grows_after_its_check_is_stopped_at_the_bound(tmp_path):
    data = tmp_path / "log.txt"
    data.write_bytes(b"x" * 1000)
    limits = InputLimits(max_bytes=4000, max_files=10)
    check_inputs((data,), limits)
    data.write_bytes(b"x" * 100_000)  # meanwhile, before the copy
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(VmisoError, match="more than 4000 bytes"):
        stage_inputs((data,), staging, limits)
    assert (staging / "log.txt").stat().st_size <= 4000 + 1024**2  # one read beyond the bound at most


def test_two_inputs_with_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.csv").write_text("")
    (tmp_path / "b" / "x.csv").write_text("")
    with pytest.raises(VmisoError, match="would both appear as /in/x.csv") as err:
        check_inputs((tmp_path / "a" / "x.csv", tmp_path / "b" / "x.csv"), LIMITS)
    assert err.value.hint == "rename one of them"


def test_missing_and_special_inputs_are_refused(tmp_path):
    with pytest.raises(VmisoError, match="does not exist"):
        check_inputs((tmp_path / "missing",), LIMITS)
    # The whole file system has no name under /in (and would be the analyst's every file).
    with pytest.raises(VmisoError, match="input / is the root directory") as err:
        check_inputs((Path("/"),), LIMITS)
    assert "each with -i" in err.value.hint
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    try:
        with pytest.raises(VmisoError, match="neither a file nor a directory"):
            check_inputs((tmp_path / "s",), LIMITS)
    finally:
        sock.close()
    (tmp_path / "pkg").mkdir()
    os.mkfifo(tmp_path / "pkg" / "fifo")
    with pytest.raises(VmisoError, match="pkg/fifo is not a regular file or directory"):
        check_inputs((tmp_path / "pkg",), LIMITS)


# --- /in as a disk: the image the guest mounts, read back with erofs-utils' own checker -------

def extract(image: Path, into: Path) -> Path:
    subprocess.run(["fsck.erofs", f"--extract={into}", str(image)], check=True, capture_output=True)
    return into


def test_the_inputs_disk_holds_the_staged_tree_as_the_job_should_see_it(tmp_path, deep_tree):
    tree = tmp_path / "odd tree"
    (tree / "empty dir").mkdir(parents=True)
    (tree / "naïve name.txt").write_text("ünïcode\n")
    (tree / "日本語").mkdir()
    (tree / "日本語" / "empty").write_bytes(b"")
    os.utime(tree / "naïve name.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    deep = deep_tree(tree, 60, file_every=20)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o755)
    limits = InputLimits(max_bytes=10**8, max_files=1000)
    check_inputs((tree, big), limits)
    staged = stage_inputs((tree, big), staging, limits)
    image = tmp_path / "inputs.img"
    size = build_disk(staging, image)
    assert size == image.stat().st_size and size % 4096 == 0 and size <= disk_bytes(limits)
    assert not staging.exists()  # the copy is gone once its image is built
    seen = extract(image, tmp_path / "seen")
    assert (seen / "odd tree" / "naïve name.txt").read_text() == "ünïcode\n"
    assert (seen / "odd tree" / "日本語" / "empty").read_bytes() == b""
    assert list((seen / "odd tree" / "empty dir").iterdir()) == []
    assert (seen / "big.bin").read_bytes() == big.read_bytes()
    assert (seen / "odd tree" / "/".join(deep) / "f").exists()
    # The modification times the analyst's files have; the modes staging gives.
    assert (seen / "odd tree" / "naïve name.txt").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (seen / "big.bin").stat().st_mtime_ns == big.stat().st_mtime_ns
    for directory, dirs, files in os.walk(seen):
        for name in dirs:
            assert os.lstat(os.path.join(directory, name)).st_mode == 0o40755
        for name in files:
            assert os.lstat(os.path.join(directory, name)).st_mode == 0o100644
    assert {s.name: s.sha256 for s in staged} == {"odd tree": input_digest(seen / "odd tree"),
                                                  "big.bin": input_digest(seen / "big.bin")}


def test_large_files_go_to_their_share_and_leave_an_empty_file_of_their_name_and_time(tmp_path, deep_tree):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(LARGE_FILE_BYTES))
    tree = tmp_path / "tree"
    (tree / "sub dir").mkdir(parents=True)
    (tree / "sub dir" / "naïve\nname").write_bytes(b"x" * (LARGE_FILE_BYTES + 1))
    (tree / "small").write_bytes(b"y" * (LARGE_FILE_BYTES - 1))
    # A large file deeper than a bind mount's target can be named stays on the disk.
    deep = deep_tree(tree, 1400, name="dd")
    deep_fd = os.open(tree / "/".join(deep[:1]), os.O_RDONLY | os.O_DIRECTORY)
    for name in deep[1:]:
        next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep_fd)
        os.close(deep_fd)
        deep_fd = next_fd
    out = os.open("far", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=deep_fd)
    os.write(out, b"z" * LARGE_FILE_BYTES)
    os.close(out)
    os.close(deep_fd)
    os.utime(big, ns=(1_600_000_000_123_456_789,) * 2)
    staging, large = tmp_path / "staging", tmp_path / "large"
    staging.mkdir()
    large.mkdir()
    limits = InputLimits(max_bytes=10**8, max_files=5000)
    staged = stage_inputs((big, tree), staging, limits, large=large)

    index = (large / LARGE_INDEX).read_bytes().split(b"\0")
    assert index == [b"0", b"big.bin", b"1", "tree/sub dir/naïve\nname".encode(), b""]
    assert (large / "0").read_bytes() == big.read_bytes()
    assert (large / "1").read_bytes() == b"x" * (LARGE_FILE_BYTES + 1)
    assert sorted(p.name for p in large.iterdir()) == ["0", "1", LARGE_INDEX]
    for shared, placeholder in ((large / "0", staging / "big.bin"),
                                (large / "1", staging / "tree" / "sub dir" / "naïve\nname")):
        assert placeholder.stat().st_size == 0
        assert placeholder.stat().st_mode == shared.stat().st_mode == 0o100644
        assert placeholder.stat().st_mtime_ns == shared.stat().st_mtime_ns
        # QEMU's mapped mode shows the guest the owner these say: root, as the rest of /in.
        assert os.getxattr(shared, "user.virtfs.uid") == os.getxattr(shared, "user.virtfs.gid") == bytes(4)
    assert (staging / "big.bin").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (staging / "tree" / "small").read_bytes() == b"y" * (LARGE_FILE_BYTES - 1)
    fd = os.open(staging / "tree" / "/".join(deep[:1]), os.O_RDONLY | os.O_DIRECTORY)
    for name in deep[1:]:
        next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    assert os.stat("far", dir_fd=fd).st_size == LARGE_FILE_BYTES
    os.close(fd)
    # The record hashes what the job reads, wherever it comes from.
    assert {s.name: s.sha256 for s in staged} == {"big.bin": input_digest(big), "tree": input_digest(tree)}


def test_the_largest_image_the_limits_allow_fits_the_warm_states_inputs_disk(tmp_path):
    # The worst case per entry: a one-byte file with a long name, each in a directory of its
    # own; 254 bytes for erofs, 255 for ext4 (erofs-utils 1.5 cannot take a name of 255).
    for length, magic in ((254, EROFS_MAGIC), (255, EXT4_MAGIC)):
        limits = InputLimits(max_bytes=1000, max_files=1000)
        tree = tmp_path / f"t{length}"
        tree.mkdir()
        for i in range(499):
            sub = tree / f"{i:03d}".ljust(length, "d")
            sub.mkdir()
            (sub / f"{i:03d}".ljust(length, "f")).write_bytes(b"x")
        staging = tmp_path / f"staging{length}"
        staging.mkdir(mode=0o755)
        stage_inputs((tree,), staging, limits)
        image = tmp_path / f"inputs{length}.img"
        assert build_disk(staging, image) <= disk_bytes(limits)
        assert magic(image)


def EROFS_MAGIC(image: Path) -> bool:
    with open(image, "rb") as f:
        f.seek(1024)
        return f.read(4) == (0xE0F5E1E2).to_bytes(4, "little")


def EXT4_MAGIC(image: Path) -> bool:
    with open(image, "rb") as f:
        f.seek(1024 + 0x38)
        return f.read(2) == (0xEF53).to_bytes(2, "little")


def test_a_tree_erofs_cannot_take_goes_on_ext4_whole(tmp_path, deep_tree):
    tree = tmp_path / "t"
    tree.mkdir()
    long_name = "n" * 255
    (tree / long_name).write_text("long\n")
    deep = deep_tree(tree, 50, name="d" * 100, file_every=50)  # a path past PATH_MAX
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o755)
    stage_inputs((tree,), staging, InputLimits(max_bytes=10**6, max_files=10_000))
    image = tmp_path / "inputs.img"
    build_disk(staging, image)
    assert EXT4_MAGIC(image)
    cat = subprocess.run(["debugfs", "-R", f"cat /t/{long_name}", str(image)], capture_output=True, text=True)
    assert cat.stdout == "long\n"
    stats = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in stats.splitlines() if ":" in line)
    used = int(fields["Inode count"]) - int(fields["Free inodes"])
    assert used >= 1 + 1 + len(deep) + 1  # /t, the long name, every level, the deepest file
    assert "has_journal" not in fields["Filesystem features"]


def test_a_tree_neither_tool_can_take_is_refused_with_the_way_out(tmp_path, deep_tree):
    tree = tmp_path / "t"
    tree.mkdir()
    deep_tree(tree, 2100, file_every=2100)  # past PATH_MAX and 2,100 deep: e2fsprogs 1.47 crashes on it
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o755)
    stage_inputs((tree,), staging, InputLimits(max_bytes=10**6, max_files=10_000))
    with pytest.raises(VmisoError, match="mkfs.erofs and mkfs.ext4 both failed") as caught:
        build_disk(staging, tmp_path / "inputs.img")
    assert "shorten its deepest paths" in caught.value.hint


def test_the_guest_reads_ahead_an_erofs_image_up_to_a_bound_and_no_ext4_one(tmp_path):
    staging = tmp_path / "staging"
    (staging / "d").mkdir(parents=True)
    for i in range(300):
        (staging / "d" / f"f{i}").write_bytes(os.urandom(700))
    image = tmp_path / "inputs.img"
    size = build_disk(staging, image)
    os.truncate(image, 64 * 1024 * 1024)  # as a warm state's inputs disk is
    assert prefetch_bytes(image) == size  # the image, not the disk
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(PREFETCH_MAX + 4096))
    build_disk(big, tmp_path / "big.img")
    assert prefetch_bytes(tmp_path / "big.img") == PREFETCH_MAX
    ext4 = tmp_path / "ext4"
    ext4.mkdir()
    (ext4 / ("n" * 255)).write_bytes(b"x")
    build_disk(ext4, tmp_path / "ext4.img")
    assert prefetch_bytes(tmp_path / "ext4.img") == 0


def test_a_preloaded_clones_disk_is_filled_in_place_and_keeps_its_size(tmp_path):
    staging = tmp_path / "staging"
    (staging / "d").mkdir(parents=True)
    (staging / "d" / "f").write_text("data\n")
    image = tmp_path / "inputs.build"
    build_disk(staging, image)
    disk = tmp_path / "inputs.img"
    with open(disk, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    inode = disk.stat().st_ino
    fill_disk(image, disk)
    assert disk.stat().st_size == 64 * 1024 * 1024 and disk.stat().st_ino == inode  # QEMU keeps reading it
    assert not image.exists()
    assert (extract(disk, tmp_path / "seen") / "d" / "f").read_text() == "data\n"
    small = tmp_path / "small.img"
    small.write_bytes(b"")
    build_again = tmp_path / "again"
    (build_again / "x").mkdir(parents=True)
    image2 = tmp_path / "inputs2.build"
    build_disk(build_again, image2)
    with pytest.raises(VmisoError, match="larger than the clone's inputs disk"):
        fill_disk(image2, small)
