"""The share helper (vmiso/host/sharemount.py): what it does for an analyst, and what it refuses.

It runs as root for members of group vmiso (sudo), so each test here is a caller
trying to make it mount, unmount or create something that is not theirs.  The
tests run as root, like the suite, and call it as the analysts scripts/setup-host
--test made, through the same sudo rule they use.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from vmiso.host import sharemount, workdir

from vmharness import make_state_root, remove_tree

ANALYST, OTHER = "vmiso-test", "vmiso-test2"
MIB = 1024**2


def as_user(user: str, *argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *map(str, argv)], capture_output=True, text=True,
                          timeout=60)


def helper(user: str, *args: str | Path) -> subprocess.CompletedProcess:
    return as_user(user, "sudo", "-n", workdir.SHARE_HELPER, *args)


@pytest.fixture
def home():
    """A run directory of the analyst's, that QEMU may traverse (pytest's own are root's 0700)."""
    base = make_state_root()
    try:
        path = base / "run"
        path.mkdir(mode=0o700)
        entry = pwd.getpwnam(ANALYST)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        workdir.set_traverse_acl(path, workdir.qemu_ids()[0])
        (path / "out").mkdir()
        os.chown(path / "out", entry.pw_uid, entry.pw_gid)
        yield path
    finally:  # a setup that failed half-way too
        for point in workdir.mounts_below(base):
            subprocess.run(["umount", "--lazy", str(point)], check=False)
        remove_tree(base)


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_the_installed_helper_is_this_one():
    assert workdir.SHARE_HELPER.read_bytes() == Path(sharemount.__file__).read_bytes()
    assert helper(ANALYST, "check").returncode == 0


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_an_analyst_gets_a_bounded_share_that_qemu_writes_and_they_read(home):
    done = helper(ANALYST, "mount", home, "out", 4 * MIB, 20)
    assert done.returncode == 0, done.stderr
    assert os.path.ismount(home / "out")
    image = (home / "out.fs").stat()
    assert (image.st_uid, stat.S_IMODE(image.st_mode)) == (0, 0o600)  # made by root: nobody else wrote it
    root = (home / "out").stat()
    assert root.st_uid == workdir.qemu_ids()[0] and stat.S_IMODE(root.st_mode) == 0o750  # 0700 + ACL mask
    assert os.listdir(home / "out") == []  # lost+found gone
    # QEMU's user creates a file as 9p's mapped mode does with fmode 0640; the analyst reads it.
    script = f"umask 077; echo hello > {home}/out/f; chmod 640 {home}/out/f"
    made = subprocess.run(["setpriv", f"--reuid={workdir.QEMU_USER}", f"--regid={workdir.qemu_ids()[1]}",
                           "--clear-groups", "sh", "-c", script], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert as_user(ANALYST, "cat", home / "out" / "f").stdout == "hello\n"
    assert as_user(OTHER, "cat", home / "out" / "f").returncode != 0
    mounts = Path("/proc/self/mounts").read_text()
    line = next(m for m in mounts.splitlines() if f" {home}/out " in m)
    assert line.startswith("/dev/loop") and all(flag in line for flag in ("nosuid", "nodev", "noexec"))
    done = helper(ANALYST, "umount", home, "out")
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(home / "out")


@pytest.mark.parametrize("args, said", [
    (["mount", "{home}", "out", "-1", "20"], "usage"),
    (["mount", "{home}", "../out", str(4 * MIB), "20"], "is not a share name"),
    (["mount", "{home}", "out", str(1024), "20"], "size must be between"),
    (["mount", "{home}", "out", str(4 * MIB), "3"], "inode count must be between"),
    (["mount", "relative", "out", str(4 * MIB), "20"], "is not an absolute path"),
    (["mount", "/", "out", str(4 * MIB), "20"], "is not a directory of yours"),
])
@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_bad_requests_are_refused_with_their_reason(home, args, said):
    done = helper(ANALYST, *[a.format(home=home) for a in args])
    assert done.returncode == 2 and said in done.stderr
    assert not os.path.ismount(home / "out") and not (home / "out.fs").exists()


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_another_analysts_directory_is_refused(home):
    done = helper(OTHER, "mount", home, "out", 4 * MIB, 20)
    assert done.returncode == 2 and "is not a directory of yours" in done.stderr
    assert not os.path.ismount(home / "out")


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_a_symbolic_link_is_not_followed(home):
    # The analyst points "out" at a directory of root's: nothing is mounted over it.
    target = home.parent / "roots"
    target.mkdir()
    (home / "out").rmdir()
    (home / "out").symlink_to(target)
    done = helper(ANALYST, "mount", home, "out", 4 * MIB, 20)
    assert done.returncode == 2 and not os.path.ismount(target)
    assert "Too many levels of symbolic links" in done.stderr or "Not a directory" in done.stderr
    (home / "out").unlink()
    (home / "out").mkdir()
    os.chown(home / "out", *pwd.getpwnam(ANALYST)[2:4])
    link = home.parent / "link"
    link.symlink_to(home)
    done = helper(ANALYST, "mount", link, "out", 4 * MIB, 20)
    assert done.returncode == 2 and "is not a directory of yours" in done.stderr  # O_NOFOLLOW on a link
    assert not os.path.ismount(home / "out")


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_a_prepared_image_is_never_mounted(home):
    # A filesystem image of the analyst's own making in place of out.fs: the helper
    # makes the image itself (O_EXCL) and refuses to reuse one.
    fake = home / "out.fs"
    fake.write_bytes(b"\0" * MIB)
    done = helper(ANALYST, "mount", home, "out", 4 * MIB, 20)
    assert done.returncode == 2 and "File exists" in done.stderr
    assert not os.path.ismount(home / "out")


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_only_a_share_the_helper_made_is_unmounted(home):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home / "out")], check=True)
    done = helper(ANALYST, "umount", home, "out")
    assert done.returncode == 0 and os.path.ismount(home / "out")  # not a loop device: left alone
    subprocess.run(["umount", str(home / "out")], check=True)
    # A share made in one directory cannot be unmounted through another's name for it.
    assert helper(ANALYST, "mount", home, "out", 4 * MIB, 20).returncode == 0
    other = home.parent / "other"
    other.mkdir(mode=0o700)
    entry = pwd.getpwnam(OTHER)
    os.chown(other, entry.pw_uid, entry.pw_gid)
    done = helper(OTHER, "umount", home, "out")
    assert done.returncode == 2 and os.path.ismount(home / "out")


@pytest.mark.root(reason="runs the share helper as the test analysts")
@pytest.mark.hostsetup(reason="the test analysts, the share helper and its sudo rule")
def test_root_tells_no_caller_what_exists_where_they_cannot_look(home):
    # The helper resolves paths as root: every refusal reads the same, so another
    # analyst's private directory cannot be probed for what it holds.
    private = home.parent / "private"
    private.mkdir(mode=0o700)
    (private / "project").mkdir()
    (private / "salaries.xlsx").write_text("")
    answers = {helper(OTHER, "mount", private / name, "out", 4 * MIB, 20).stderr.split(" is ", 1)[1]
               for name in ("project", "salaries.xlsx", "nothing-here")}
    assert answers == {"not a directory of yours that only you can write\n"}


def test_the_filesystem_type_comes_from_the_mount_table():
    assert sharemount._filesystem_type(os.stat("/proc").st_dev) == "proc"
    assert sharemount._filesystem_type(os.stat("/var/tmp").st_dev) in sharemount.LOCAL_FILESYSTEMS
