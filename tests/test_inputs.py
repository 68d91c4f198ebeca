"""Inputs are checked before anything is made, then copied; the user's files are never shared."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from vmiso.errors import VmisoError
from vmiso.host.inputs import InputLimits, check_inputs, stage_inputs

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
