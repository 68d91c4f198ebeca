"""Host directories that QEMU must reach: modes and owners set in one place.

QEMU runs as another user (``libvirt-qemu`` on Debian).  libvirt hands it the
disks and kernel itself, but 9p share directories are opened by QEMU directly,
so a writable share must belong to that user.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import tools, tree
from .errors import VmisoError

QEMU_USER = "libvirt-qemu"


def qemu_ids(user: str = QEMU_USER) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise VmisoError(f"the QEMU user {user!r} does not exist",
                         "install libvirt-daemon-system (scripts/setup-host does)") from None
    return entry.pw_uid, entry.pw_gid


def private_dir(path: Path) -> Path:
    """A directory of this user's that only QEMU may traverse (not list), and nobody else.

    Mode 0700 plus one POSIX ACL entry, ``user:QEMU:--x``: a run's paths are in
    QEMU's command line, which every local user can read, so "cannot list" is not
    enough; other users must not be able to pass through at all.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    # Set whole, never by chmod: a chmod of a directory with an ACL rewrites its
    # mask, which would lock QEMU out of runs that are starting meanwhile.
    set_traverse_acl(path, qemu_ids()[0])
    return path


# POSIX ACLs as the kernel stores them in the system.posix_acl_access xattr
# (linux/posix_acl_xattr.h): a version, then (tag, permissions, id) entries sorted by tag.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_X = 1


def set_traverse_acl(path: Path, uid: int) -> None:
    """Owner rwx, ``uid`` search (x) only, group and others nothing."""
    entries = [(_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID), (_ACL_USER, _ACL_X, uid),
               (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID), (_ACL_MASK, _ACL_X, _ACL_UNDEFINED_ID),
               (_ACL_OTHER, 0, _ACL_UNDEFINED_ID)]
    blob = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", blob, follow_symlinks=False)
    except OSError as err:
        raise VmisoError(f"cannot give QEMU access to {path}: {err.strerror} (its filesystem needs POSIX ACLs)",
                         "put vmiso's state_dir on a filesystem with ACLs (ext4, xfs, btrfs, tmpfs)") from None


def share_dir(path: Path, *, writable: bool) -> Path:
    """A directory exported over 9p: world-readable when read-only, QEMU's own when writable."""
    path.mkdir(mode=0o700)
    if writable:
        uid, gid = qemu_ids()
        os.chown(path, uid, gid)
        os.chmod(path, 0o700)
    else:
        os.chmod(path, 0o755)
    return path


# --- bounded shares: a writable share on a filesystem of its own ----------------------
# The guest writes a writable share through QEMU's 9p server, as the QEMU user.  A
# sized ext4 on a sparse file, mounted on the share's directory, makes the kernel
# bound what it can hold: bytes (data, directories, names, xattrs: every block)
# and entries (every file and directory is an inode).  The host kernel is the only
# writer of that filesystem, so no guest-made filesystem image is ever parsed.

SHARE_FS_SUFFIX = ".fs"
_INODE_BYTES = 256
_MiB = 1024**2


def bounded_share_size(max_bytes: int, max_files: int) -> int:
    """The filesystem's size: ``max_bytes`` free for the guest after ext4's own metadata
    (inode tables; bitmaps and descriptors, 8 KiB per 128 MiB group; 1 MiB to spare) and the
    clusters ext4 keeps back for delayed allocation (2 %, at most 16 MiB)."""
    size = max_bytes + max_files * _INODE_BYTES + max_bytes // 16384 + _MiB
    return size + min(size // 49, 16 * _MiB)


def bounded_share(path: Path, *, max_bytes: int, max_files: int) -> Path:
    """A writable share at ``path`` that can never hold more than about ``max_bytes``
    bytes or ``max_files`` files and directories; undo with ``unmount_share``.

    The filesystem image, ``path`` + ".fs", is root's (0600): QEMU never sees it.
    """
    image = path.with_name(path.name + SHARE_FS_SUFFIX)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, bounded_share_size(max_bytes, max_files))
    finally:
        os.close(fd)
    # Inodes 1-10 are ext4's own and lost+found (11) is removed below: -N counts them.
    tools.run(tools.mkfs_share_argv(image, max_files + 11, qemu_ids()))
    path.mkdir(mode=0o700)
    tools.run(tools.mount_share_argv(image, path))
    try:
        os.rmdir(path / "lost+found")
        os.chmod(path, 0o700)
    except OSError:
        unmount_share(path)
        raise
    return path


def unmount_share(path: Path) -> None:
    if os.path.ismount(path):
        tools.run(tools.umount_argv(path))


def share_full(path: Path) -> str | None:
    """What a bounded share ran out of ("bytes", "files"), or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_favail == 0:
        return "files"
    # bounded_share_size leaves at most 1 MiB beyond the limit: less than that free
    # (a writer's last chunk may not fit in what is left) means the guest used it all.
    if st.f_bavail * st.f_frsize < _MiB + 64 * 1024:
        return "bytes"
    return None


# --- owners: which vmiso process a directory belongs to -----------------------------
# Run directories and build directories record their owner; reaper.py removes
# those whose owner no longer exists.

OWNER_FILE = "owner.json"


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5), counted after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return None


def claim(directory: Path) -> None:
    """Mark ``directory`` as this process's."""
    pid = os.getpid()
    (directory / OWNER_FILE).write_text(json.dumps({"pid": pid, "start": _start_time(pid)}))


def owner_alive(directory: Path) -> bool:
    try:
        owner = json.loads((directory / OWNER_FILE).read_text())
        pid, start = int(owner["pid"]), owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _start_time(pid) == start and start is not None


def _unescape_mount(field: bytes) -> bytes:
    """The kernel writes a mount point's bytes as they are, except space, tab, newline
    and backslash, which it writes as octal escapes (\\040 ...)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounts_below(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = []
    for line in mounts_file.read_bytes().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = os.fsdecode(_unescape_mount(fields[1]))
        if point == base or point.startswith(base + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> list[tree.Failure]:
    """Remove ``path`` and everything below it; what could not be removed, or [].

    By descriptor (vmiso.tree): any depth and name length, no symbolic link
    followed, no other filesystem entered, and nothing that a tree holds raises.
    What a killed build left mounted below ``path`` is detached first (mmdebstrap
    mounts /proc, /sys and device nodes inside its target); an unmount that fails
    raises ToolError rather than leave the walk next to the host's own files.
    """
    if not os.path.lexists(path):
        return []
    for point in mounts_below(path):
        tools.run(tools.umount_argv(point))
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return tree.remove_tree(parent, path.name)
    finally:
        os.close(parent)


def install_dir(new: Path, final: Path) -> None:
    """Move a finished directory into place, replacing an older one only once the new one is there."""
    if not final.exists():
        os.rename(new, final)
        return
    old = final.with_name(f".replaced-{final.name}-{os.getpid()}")
    os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def flocked(path: Path, *, shared: bool = False, wait: bool = True, directory: bool = False) -> Iterator[int]:
    """flock(2) on ``path`` until the block ends; the kernel drops it when vmiso dies.

    ``directory``: lock an existing directory (FileNotFoundError when it is gone);
    otherwise ``path`` is a lock file, created mode 0600.  Without ``wait`` a lock
    held elsewhere raises BlockingIOError.  Yields the open descriptor.
    """
    if directory:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)
