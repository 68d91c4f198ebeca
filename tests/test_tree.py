"""vmiso.host.tree: trees of any depth and name length, walked and removed by descriptor."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from vmiso.host import tree

DEPTH = 3000  # beyond Python's recursion limit (1000), and with 20-byte names 63,000 bytes of path


def open_dir(path) -> int:
    return os.open(path, tree.OPEN_DIR)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_walk_goes_beyond_the_recursion_limit_and_path_max_with_few_descriptors(tmp_path, deep_tree):
    assert sys.getrecursionlimit() < DEPTH
    deep_tree(tmp_path, DEPTH, "d" * 20, file_every=100)
    before = open_fds()
    root = open_dir(tmp_path)
    most = deepest = files = 0
    try:
        for entry in tree.walk(root, sort=True):
            most = max(most, open_fds() - before)
            deepest = max(deepest, entry.depth)
            files += not entry.is_dir
    finally:
        os.close(root)
    assert deepest == DEPTH + 1  # the file in the deepest directory
    assert files == DEPTH // 100
    assert most <= tree.WINDOW + DEPTH.bit_length() + 3  # not one per level
    assert open_fds() == before


def test_a_walk_never_follows_a_symbolic_link(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside)
    root = open_dir(tmp_path / "root")
    try:
        seen = [(e.path(), stat.S_ISLNK(e.st.st_mode)) for e in tree.walk(root)]
    finally:
        os.close(root)
    assert seen == [("link", True)]


def test_a_directory_replaced_during_a_walk_is_reported_not_entered(tmp_path):
    # a/b/c/d/e with a window of 2: climbing back from e to a needs a re-descent by name,
    # which must notice that "a" is no longer the directory it walked into.
    root_path = tmp_path / "root"
    (root_path / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    (root_path / "a" / "later").write_text("x")
    (root_path / "z").write_text("z")
    errors, seen = [], []
    root = open_dir(root_path)
    try:
        for entry in tree.walk(root, sort=True, window=2,
                               on_error=lambda where, name, err: errors.append((where.path(name), err))):
            seen.append(entry.path())
            if entry.name == "e":
                os.rename(root_path / "a", tmp_path / "moved")
                (root_path / "a" / "b" / "c").mkdir(parents=True)
                (root_path / "a" / "b" / "c" / "planted").write_text("x")
    finally:
        os.close(root)
    assert [path for path, _ in errors] == ["a"]
    assert isinstance(errors[0][1], tree.TreeChanged)
    assert "a/b/c/planted" not in seen and seen[-1] == "z"  # the walk went on with the rest


def test_remove_tree_removes_any_depth_and_long_names(tmp_path, deep_tree):
    top = tmp_path / "top"
    top.mkdir()
    deep_tree(top, DEPTH, "n" * 255, file_every=7)  # 768,000 bytes of path
    parent = open_dir(tmp_path)
    try:
        assert tree.remove_tree(parent, "top") == []
    finally:
        os.close(parent)
    assert not top.exists()


def test_remove_tree_never_follows_a_symbolic_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (tmp_path / "top" / "sub").mkdir(parents=True)
    (tmp_path / "top" / "sub" / "link").symlink_to(outside)
    parent = open_dir(tmp_path)
    try:
        assert tree.remove_tree(parent, "top") == []
    finally:
        os.close(parent)
    assert not (tmp_path / "top").exists() and (outside / "keep").read_text() == "mine"


def immutable(path) -> bool:
    """chattr +i (root, on ext4 and most local filesystems); False where it cannot be set."""
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_remove_tree_reports_what_it_cannot_remove_and_removes_the_rest(tmp_path, monkeypatch):
    top = tmp_path / "top"
    (top / "a" / "locked").mkdir(parents=True)
    (top / "a" / "locked" / "file").write_text("x")
    (top / "a" / "gone").write_text("x")
    (top / "b").mkdir()
    if immutable(top / "a" / "locked"):
        reason = os.strerror(1)  # EPERM
    else:  # no chattr here: a fake that refuses the same way
        reason = "refused by the test"
        real_unlink = os.unlink

        def unlink(name, *, dir_fd=None):
            if name == "file":
                raise PermissionError(1, reason)
            real_unlink(name, dir_fd=dir_fd)
        monkeypatch.setattr(tree.os, "unlink", unlink)
    parent = open_dir(tmp_path)
    try:
        failures = tree.remove_tree(parent, "top")
    finally:
        os.close(parent)
        subprocess.run(["chattr", "-i", str(top / "a" / "locked")], capture_output=True)
    assert failures == [tree.Failure("top/a/locked/file", reason)]  # once: not its ancestors too
    assert sorted(p.name for p in (top / "a").iterdir()) == ["locked"] and not (top / "b").exists()


def test_shorten_keeps_both_ends():
    text = "a" * 500 + "z"
    short = tree.shorten(text, 20)
    assert short.startswith("a" * 10) and short.endswith("z") and "(481 characters)" in short
    assert tree.shorten("short") == "short"
