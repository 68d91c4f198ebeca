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
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import tools
from ..errors import ToolError, VmisoError
from . import sharemount, tree

QEMU_USER = "libvirt-qemu"


def qemu_ids(user: str = QEMU_USER) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise VmisoError(f"the QEMU user {user!r} does not exist",
                         "install libvirt-daemon-system (scripts/setup-host does)") from None
    return entry.pw_uid, entry.pw_gid


GROUP = "vmiso"  # its members run vmiso without root (scripts/setup-host --user NAME)


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


def shared_dir(path: Path) -> Path:
    """``private_dir``, but the directory's group (vmiso's, in a shared image store) may read it too."""
    private_dir(path)
    set_traverse_acl(path, qemu_ids()[0], group=0o5)
    return path


def let_qemu_read(fd: int) -> None:
    """A file of this user's that QEMU may read, and nobody else: owner rw, ``user:QEMU:r``.

    For a disk libvirt must not relabel (domain.Disk.relabel): it stays this user's,
    so QEMU, whoever takes it over, can read it but neither write nor chmod it.
    """
    try:
        os.setxattr(fd, "system.posix_acl_access", sharemount.acl_blob(6, {qemu_ids()[0]: 4}))
    except OSError as err:
        raise VmisoError(f"cannot give QEMU read access to a run's disk: {err.strerror} (its filesystem needs "
                         "POSIX ACLs)", "put vmiso's state_dir on a filesystem with ACLs (ext4, xfs, btrfs, "
                         "tmpfs)") from None


def set_traverse_acl(path: Path, uid: int, *, group: int = 0) -> None:
    """Owner rwx, ``uid`` search (x) only, the group ``group``'s bits, others nothing."""
    try:
        os.setxattr(path, "system.posix_acl_access", sharemount.acl_blob(7, {uid: 1}, group=group),
                    follow_symlinks=False)
    except OSError as err:
        raise VmisoError(f"cannot give QEMU access to {path}: {err.strerror} (its filesystem needs POSIX ACLs)",
                         "put vmiso's state_dir on a filesystem with ACLs (ext4, xfs, btrfs, tmpfs)") from None


def link_dir(path: Path) -> Path:
    """A directory for what libvirt makes for this user's VM: the SSH link's socket.

    libvirt makes the socket QEMU's, writable by QEMU's group; for an analyst a
    default ACL gives them a named entry there, which that group write lets through.
    """
    path.mkdir(mode=0o700)
    if (uid := os.geteuid()) != 0:
        os.setxattr(path, "system.posix_acl_default", sharemount.acl_blob(7, {uid: 7}))
    return path


def console_file(path: Path) -> Path:
    """The file libvirt writes a VM's console to, made here first so that it is this user's
    (the domain has libvirt append to it and leave its owner: domain._console_source)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return path


def share_dir(path: Path) -> Path:
    """A directory exported over 9p that QEMU may read but not write: a read-only share,
    or the writable share of a clone made to be saved as a warm state, which never
    mounts it (a run's writable shares are bounded_share)."""
    path.mkdir(mode=0o700)
    os.chmod(path, 0o755)
    return path


# --- bounded shares: a writable share on a filesystem of its own ----------------------
# The guest writes a writable share through QEMU's 9p server, as the QEMU user.  A
# sized ext4 on a sparse file, mounted on the share's directory, makes the kernel
# bound what it can hold: bytes (data, directories, names, xattrs: every block)
# and entries (every file and directory is an inode).  The host kernel is the only
# writer of that filesystem, so no guest-made filesystem image is ever parsed.

SHARE_FS_SUFFIX = sharemount.FS_SUFFIX
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
    Root makes and mounts it (vmiso.host.sharemount; through sudo for an analyst who is
    not root), and its root directory is QEMU's, readable by this user.
    """
    path.mkdir(mode=0o700)
    # Inodes 1-10 are ext4's own and lost+found (11) is removed: -N counts them.
    _share_helper("mount", str(path.parent), path.name, str(bounded_share_size(max_bytes, max_files)),
                  str(max_files + 11))
    return path


def unmount_share(path: Path) -> None:
    if os.path.ismount(path):
        _share_helper("umount", str(path.parent), path.name)


SHARE_HELPER = Path("/usr/local/libexec/vmiso/share-mount")  # scripts/setup-host installs it


def _share_helper(*args: str) -> None:
    """sharemount.py's command ``args``: in this process as root, else through sudo."""
    if os.geteuid() == 0:
        try:
            if args[0] == "mount":
                sharemount.make(args[1], args[2], int(args[3]), int(args[4]), caller=0)
            else:
                sharemount.release(args[1], args[2], caller=0)
        except (sharemount.ShareError, OSError) as err:
            raise VmisoError(f"the share {args[1]}/{args[2]}: {err}") from None
        return
    check_share_helper()
    try:
        tools.run(tools.sudo_argv(SHARE_HELPER, *args))
    except ToolError as err:
        raise VmisoError(f"the share {args[1]}/{args[2]}: {err.message}",
                         "vmiso doctor says what this host still needs") from None


def check_share_helper() -> None:
    """The helper sudo runs must be this vmiso's own sharemount.py."""
    ours = Path(sharemount.__file__).read_bytes()
    try:
        installed = SHARE_HELPER.read_bytes()
    except OSError:
        raise VmisoError(f"vmiso's share helper {SHARE_HELPER} is not installed",
                         "run scripts/setup-host as root") from None
    if installed != ours:
        raise VmisoError(f"vmiso's share helper {SHARE_HELPER} is not this vmiso's (an older setup?)",
                         "run scripts/setup-host as root again") from None


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
    """When process ``pid`` started (clock ticks since boot); None when it is gone, or a
    zombie: killed, and not yet reaped (a slow reaper as PID 1 leaves it so for seconds)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):  # field 3, the state
            return None
        return int(fields[19])  # field 22 of stat(5), counted after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return None


def claim(directory: Path) -> None:
    """Mark ``directory`` as this process's."""
    pid = os.getpid()
    # Whole or not at all: a reaper reading it meanwhile must never see a half-written record.
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{OWNER_FILE}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"pid": pid, "start": _start_time(pid)}))
    os.replace(temporary, directory / OWNER_FILE)


def pid_alive(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie."""
    return _start_time(pid) is not None


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

    By descriptor (vmiso.host.tree): any depth and name length, no symbolic link
    followed, no other filesystem entered, and nothing that a tree holds raises.
    What a killed build left mounted below ``path`` is detached first (mmdebstrap
    mounts /proc, /sys and device nodes inside its target); an unmount that fails
    raises ToolError rather than leave the walk next to the host's own files.
    """
    if not os.path.lexists(path):
        return []
    if not stat.S_ISDIR(os.lstat(path).st_mode):  # a file, or a symbolic link: never followed
        os.unlink(path)
        return []
    for point in mounts_below(path):
        if os.geteuid() == 0:
            tools.run(tools.umount_argv(point))
        else:  # only a share vmiso mounted can be below a directory of an analyst's
            unmount_share(point)
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return tree.remove_tree(parent, path.name)
    finally:
        os.close(parent)


def install_dir(new: Path, final: Path, aside: Path) -> None:
    """Move a finished directory into place, replacing an older one only once the new one is there
    (the older one is put ``aside`` meanwhile, then removed)."""
    if not final.exists():
        os.rename(new, final)
        return
    old = aside
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


def check_room(directory: Path, scratch_bytes: int, output_bytes: int, input_bytes: int = 0) -> None:
    """/tmp and /out are sparse files the job may fill, and the inputs are copied in:
    refuse a run that could fill the host's disk."""
    free = shutil.disk_usage(directory).free
    if free < scratch_bytes + output_bytes + input_bytes:
        inputs = f", and its inputs (a copy and its image) {input_bytes // 1024**2} MiB," if input_bytes else ""
        raise VmisoError(f"the run's scratch space and /out need up to {scratch_bytes // 1024**2} MiB and "
                         f"{output_bytes // 1024**2} MiB{inputs} under {directory}, which has "
                         f"{free // 1024**2} MiB free",
                         "free space there, or give the job less with --scratch (run.scratch) "
                         "or run.output_max_bytes" + (", or smaller inputs" if input_bytes else ""))
