#!/usr/bin/python3 -I
"""vmiso's share helper: a run's bounded writable share, for analysts who are not root.

A writable share (a run's /out, a provisioning's report) lives on an ext4 of its
own, on a sparse file, so that the kernel bounds what the guest can put there.
Making and mounting that filesystem takes root.  vmiso as root calls ``make`` and
``release`` itself; an analyst's vmiso runs this file through sudo, as installed
by ``scripts/setup-host`` (``/usr/local/libexec/vmiso/share-mount``):

    share-mount mount DIR NAME BYTES INODES    make DIR/NAME.fs, mount it on DIR/NAME
    share-mount umount DIR NAME                unmount what "mount" mounted there
    share-mount check                          succeed (that sudo lets the caller run it)

It trusts nothing it is given.  DIR must be a directory of the calling user's
(sudo's SUDO_UID) that no one else can write; NAME a directory of theirs in
it.  The filesystem image is made here, by root, through one descriptor
(``O_EXCL``, never a path again): the kernel only ever mounts a filesystem that
mkfs made, never one the user or a guest wrote.  The loop device is set up from
that descriptor and the mount aimed at descriptors, so no path can be swapped
between a check and its use.  It unmounts only a mount whose loop device is
backed by root's DIR/NAME.fs.  Standard library only, run with ``python3 -I``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import pwd
import re
import stat
import struct
import subprocess
import sys

QEMU_USER = "libvirt-qemu"  # whom QEMU runs as (qemu:///system); the filesystem's owner
FS_SUFFIX = ".fs"
MIN_BYTES, MAX_BYTES = 1024**2, 16 * 1024**4
MIN_INODES, MAX_INODES = 12, 2**32 - 1  # ext4's own 11, and one
_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_UMOUNT_NOFOLLOW = 0x8
_LOOP_CTL_GET_FREE, _LOOP_CONFIGURE, _LOOP_GET_STATUS64 = 0x4C82, 0x4C0A, 0x4C05
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_MAJOR = 7
# struct loop_info64 (linux/loop.h): five u64, four u32, names and key, two u64.
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_EXT4_ROOT_INO = 2


class ShareError(Exception):
    """What the helper refuses or fails to do; its message is the whole story."""


# --- POSIX ACLs, as the kernel stores them in system.posix_acl_* xattrs -----------------
# (linux/posix_acl_xattr.h): a version, then (tag, permissions, id) entries sorted by tag.
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl_blob(owner: int, users: dict[int, int], *, group: int = 0) -> bytes:
    """An ACL: the owner's permissions, each of ``users`` (uid -> rwx bits), the owning
    group's, nothing for others; the mask lets each have what it is given."""
    entries = [(ACL_USER_OBJ, owner, _ACL_UNDEFINED_ID)]
    entries += [(ACL_USER, perms, uid) for uid, perms in sorted(users.items())]
    mask = group
    for perms in users.values():
        mask |= perms
    entries += [(ACL_GROUP_OBJ, group, _ACL_UNDEFINED_ID), (ACL_MASK, mask, _ACL_UNDEFINED_ID),
                (ACL_OTHER, 0, _ACL_UNDEFINED_ID)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


# --- the filesystem ------------------------------------------------------------------------

def mkfs_argv(image: str, inodes: int, owner: tuple[int, int]) -> list[str]:
    # Its size bounds the bytes (names, directories and xattrs included), -N the files
    # and directories.  4 KiB blocks and 256-byte inodes whatever the size (small
    # filesystems would get 128-byte inodes, and 9p's mapped-mode xattrs would each
    # take a block of their own).  No journal: nothing in it outlives the run.
    return ["mkfs.ext4", "-q", "-F", "-L", "vmiso-share", "-b", "4096", "-I", "256", "-m", "0",
            "-N", str(inodes), "-O", "^has_journal,^resize_inode",
            "-E", f"lazy_itable_init=1,nodiscard,root_owner={owner[0]}:{owner[1]}", image]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ShareError(f"{what}: {os.strerror(err)}")


# Where the image may live: filesystems whose contents only the kernel serves (overlay:
# a container's root).  Not FUSE (its server, the caller on a host that allows it,
# could change the image under the mounted filesystem) and not network filesystems.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "overlay"})


def _open_dir_of(caller: int, directory: str) -> int:
    """An O_PATH descriptor of ``directory``: the caller's, writable by no one else, on a
    local filesystem.  One answer for every refusal: root resolves the path, and must
    not tell the caller what exists where they cannot look."""
    if not os.path.isabs(directory):
        raise ShareError(f"{directory!r} is not an absolute path")
    refused = ShareError(f"{directory} is not a directory of yours that only you can write")
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise refused from None
    st = os.fstat(fd)
    if st.st_uid != caller or st.st_mode & 0o022:
        os.close(fd)
        raise refused
    kind = _filesystem_type(st.st_dev)
    if kind not in LOCAL_FILESYSTEMS:
        os.close(fd)
        raise ShareError(f"{directory} is on a {kind} filesystem; vmiso's state must be on a local one "
                         f"({', '.join(sorted(LOCAL_FILESYSTEMS))})")
    return fd


def _filesystem_type(device: int) -> str:
    wanted = f"{os.major(device)}:{os.minor(device)}"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == wanted and "-" in fields:
                return fields[fields.index("-") + 1]
    return "unknown"


def _attach_loop(image_fd: int) -> int:
    """A loop device over ``image_fd``, freed by the kernel once unmounted and closed."""
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR, b"vmiso-share", b"", b"", 0, 0)
    config = struct.pack("=II", image_fd, 0) + info + bytes(64)
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(64):  # another process may take the free device first
            number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            loop = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop, _LOOP_CONFIGURE, config)
                return loop
            except OSError as err:
                os.close(loop)
                if err.errno != 16:  # EBUSY
                    raise ShareError(f"cannot set up a loop device: {err.strerror}") from None
        raise ShareError("cannot set up a loop device: every free one was taken first")
    finally:
        os.close(control)


def make(directory: str, name: str, size: int, inodes: int, *, caller: int) -> None:
    """Make ``directory/name.fs`` (root's, 0600) of ``size`` bytes and ``inodes`` inodes
    and mount it on the empty directory ``directory/name``; QEMU's user owns its root,
    which only QEMU may write and, when ``caller`` is not root, ``caller`` may read."""
    _check_request(name, size, inodes)
    qemu = pwd.getpwnam(QEMU_USER)
    dir_fd = _open_dir_of(caller, directory)
    fds = [dir_fd]
    try:
        point = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        fds.append(point)
        if os.fstat(point).st_uid != caller:
            raise ShareError(f"{directory}/{name} is not a directory of yours")
        image = os.open(name + FS_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600, dir_fd=dir_fd)
        fds.append(image)
        os.fchown(image, 0, 0)
        os.ftruncate(image, size)
        done = subprocess.run(mkfs_argv(f"/proc/self/fd/{image}", inodes, (qemu.pw_uid, qemu.pw_gid)),
                              pass_fds=(image,), env=_PATH, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise ShareError(f"mkfs.ext4 failed: {done.stderr.strip()}")
        loop = _attach_loop(image)
        fds.append(loop)
        # Aimed at the directory checked above through its descriptor.  The device by its
        # name in root's /dev (the name /proc/mounts shows): the one this process holds.
        device = f"/dev/loop{os.minor(os.fstat(loop).st_rdev)}"
        _check(_libc().mount(device.encode(), f"/proc/self/fd/{point}".encode(), b"ext4",
                             _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"noinit_itable"),
               f"cannot mount {directory}/{name}")
        try:
            _prepare_root(dir_fd, name, os.fstat(loop).st_rdev, caller)
        except BaseException:
            _unmount(dir_fd, name)
            raise
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _prepare_root(dir_fd: int, name: str, device: int, caller: int) -> None:
    root = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(root)
        if st.st_dev != device or st.st_ino != _EXT4_ROOT_INO:
            raise ShareError(f"{name} changed while it was being mounted")
        os.rmdir("lost+found", dir_fd=root)  # -N counts its inode; the guest gets it back
        os.chmod(root, 0o700)
        if caller != 0:
            # QEMU creates files 0640 and directories 0750 there (the share's fmode and
            # dmode); these entries, inherited by everything below, let the caller read them.
            # The guest cannot change them: 9p's mapped mode keeps its ACLs in user.virtfs.*.
            blob = acl_blob(7, {caller: 5})
            os.setxattr(root, "system.posix_acl_access", blob)
            os.setxattr(root, "system.posix_acl_default", blob)
    finally:
        os.close(root)


def release(directory: str, name: str, *, caller: int) -> bool:
    """Unmount ``directory/name`` if it is the mount ``make`` made there; False when nothing was mounted."""
    _check_name(name)
    dir_fd = _open_dir_of(caller, directory)
    try:
        try:
            root = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        try:
            device = os.fstat(root).st_dev
            if os.fstat(root).st_ino != _EXT4_ROOT_INO or os.major(device) != _LOOP_MAJOR:
                return False
            if not _backed_by(device, dir_fd, name + FS_SUFFIX):
                raise ShareError(f"{directory}/{name} is not a share that vmiso mounted")
        finally:
            os.close(root)
        _unmount(dir_fd, name)
        return True
    finally:
        os.close(dir_fd)


def _backed_by(device: int, dir_fd: int, image_name: str) -> bool:
    """Whether loop ``device`` is backed by root's ``image_name`` in ``dir_fd``."""
    try:
        image = os.stat(image_name, dir_fd=dir_fd, follow_symlinks=False)
        loop = os.open(f"/dev/loop{os.minor(device)}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(loop).st_rdev != device:
            return False
        status = _LOOP_INFO64.unpack(fcntl.ioctl(loop, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size)))
    except OSError:
        return False
    finally:
        os.close(loop)
    lo_device, lo_inode = status[0], status[1]
    return (stat.S_ISREG(image.st_mode) and image.st_uid == 0
            and (image.st_dev, image.st_ino) == (lo_device, lo_inode))


def _unmount(dir_fd: int, name: str) -> None:
    # Lazy: a process still in it (none should be: QEMU is gone) keeps it until it leaves.
    _check(_libc().umount2(f"/proc/self/fd/{dir_fd}/{name}".encode(), _UMOUNT_NOFOLLOW | 2),  # | MNT_DETACH
           f"cannot unmount {name}")


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ShareError(f"{name!r} is not a share name (a lowercase letter, then letters and digits, at most 16)")


def _check_request(name: str, size: int, inodes: int) -> None:
    _check_name(name)
    if not MIN_BYTES <= size <= MAX_BYTES:
        raise ShareError(f"a share's size must be between {MIN_BYTES} and {MAX_BYTES} bytes, not {size}")
    if not MIN_INODES <= inodes <= MAX_INODES:
        raise ShareError(f"a share's inode count must be between {MIN_INODES} and {MAX_INODES}, not {inodes}")


def caller_uid() -> int:
    """Whom this runs for: sudo's caller, or the process's own user."""
    if os.geteuid() == 0 and "SUDO_UID" in os.environ:
        return int(os.environ["SUDO_UID"])
    return os.getuid()


def main(argv: list[str]) -> int:
    usage = "usage: share-mount mount DIR NAME BYTES INODES | share-mount umount DIR NAME | share-mount check"
    try:
        if os.geteuid() != 0:
            raise ShareError("must run as root (members of group vmiso run it through sudo)")
        if len(argv) == 5 and argv[0] == "mount" and argv[3].isdigit() and argv[4].isdigit():
            make(argv[1], argv[2], int(argv[3]), int(argv[4]), caller=caller_uid())
        elif len(argv) == 3 and argv[0] == "umount":
            release(argv[1], argv[2], caller=caller_uid())
        elif argv == ["check"]:
            pass
        else:
            raise ShareError(usage)
    except (ShareError, OSError, KeyError, ValueError) as err:
        print(f"share-mount: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
