"""A run's inputs: checked on the host, copied, and the copy made the disk the guest reads as /in.

The user's files are never shared directly: each run gets its own copy, files
0644 (with their modification times) and directories 0755, and the guest reads
an erofs image of that copy on a read-only disk (see "/in as a disk" below), so
nothing the guest does can reach the originals.

An input is what the user named (a link given as ``-i`` is followed, as ``cp -r``
follows its arguments); what an input directory holds is walked by directory
descriptor (vmiso.host.tree: each name opened relative to its directory with
O_NOFOLLOW, an explicit stack), never by path.  A symbolic link inside it is
refused, never followed: two links back into the directory (``a -> .``,
``b -> .``) would otherwise copy it without end.  What is staged is bounded in
bytes and in files and directories (``run.input_max_bytes``,
``run.input_max_files``), counted as the inputs are checked and again as they are
copied, so an input that grows meanwhile is stopped at the bound too.

A file of LARGE_FILE_BYTES or more reaches the guest another way: over a read-only
9p share, bound in the guest over an empty file of its name in the image (see
"Large files" below).

Each input is hashed as it is copied (what the run record lists): a file's
sha256 is its content's; a directory's is the sha256 of its files' ``sha256sum``
lines (``<sha256>  <path below it>``), sorted by path bytes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tools
from ..errors import ToolError, VmisoError
from . import tree
from .workdir import let_qemu_read, remove_tree

log = logging.getLogger(__name__)

GUEST_IN = "/in"
_CHUNK = 1024 * 1024
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int
    max_files: int  # files and directories, the inputs themselves included


@dataclass(frozen=True)
class StagedInput:
    """One input as the run staged it: what the job sees as /in/NAME, and its digest."""

    name: str
    kind: str  # "file" or "directory"
    bytes: int
    files: int  # regular files (1 for a file)
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "bytes": self.bytes, "files": self.files,
                "sha256": self.sha256}


def tree_digest(files: list[tuple[bytes, str]]) -> str:
    """A directory's sha256 from its files' (path below it, sha256): of their ``sha256sum``
    lines sorted by path bytes, which ``find . -type f -printf '%P\\0' | LC_ALL=C sort -z |
    xargs -0r sha256sum | sha256sum`` run in it prints too (for names without a newline or
    a backslash, which sha256sum escapes)."""
    digest = hashlib.sha256()
    for path, file_sha256 in sorted(files):
        digest.update(file_sha256.encode() + b"  " + path + b"\n")
    return digest.hexdigest()


@dataclass
class _Tally:
    """What the inputs staged so far hold, against the limits."""

    limits: InputLimits
    files: int = 0
    bytes: int = 0

    def add_entry(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise VmisoError(f"the inputs hold more than {self.limits.max_files} files and directories",
                             "give a smaller input, or raise run.input_max_files in vmiso.yaml")

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.limits.max_bytes:
            raise VmisoError(f"the inputs hold more than {self.limits.max_bytes} bytes",
                             "give a smaller input, or raise run.input_max_bytes in vmiso.yaml")


def input_name(path: Path) -> str:
    """The name an input appears under in the guest's /in: a link named on the command line is followed."""
    return path.resolve().name


def open_input(path: Path) -> int:
    """An input opened for reading, never as a terminal and never blocking on a FIFO; a clear error if it cannot be."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise VmisoError(f"cannot read input {path}: {err.strerror}") from None


def check_inputs(inputs: tuple[Path, ...], limits: InputLimits) -> int:
    """Everything about the inputs that can be refused before a run makes anything; the host's
    bytes staging them takes at most (``room_for``: the copy and its image).

    Walks each input directory, copying nothing: its links, special files and
    size are refused here, before a VM is started.
    """
    seen: dict[str, Path] = {}
    for path in inputs:
        if not path.exists():
            raise VmisoError(f"input {path} does not exist")
        if not input_name(path):
            raise VmisoError(f"input {path} is the root directory: it has no name to appear under {GUEST_IN}",
                             "give the files or directories the job needs, each with -i")
        if not (path.is_file() or path.is_dir()):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        name = input_name(path)
        if name in seen:
            raise VmisoError(f"inputs {seen[name]} and {path} would both appear as {GUEST_IN}/{name}",
                             "rename one of them")
        seen[name] = path
    tally = _Tally(limits)
    for path in inputs:
        _stage_one(path, None, tally)
    return room_for(tally.bytes, tally.files)


def stage_inputs(inputs: tuple[Path, ...], staging: Path, limits: InputLimits, *,
                 large: Path | None = None) -> list[StagedInput]:
    """Copy inputs into the run's staging directory (the user's files are never shared directly);
    what was staged, with the digest of what was copied.

    ``large``: the run's share of large files (an empty directory); each file of
    LARGE_FILE_BYTES or more is copied there instead, with an empty file in its place
    in the staging directory, and listed in its LARGE_INDEX.
    """
    staging_fd = os.open(staging, tree.OPEN_DIR)
    shelf = _Large(os.open(large, tree.OPEN_DIR)) if large is not None else None
    try:
        tally = _Tally(limits)
        staged = []
        for path in inputs:
            done = _stage_one(path, staging_fd, tally, shelf)
            assert done is not None
            staged.append(done)
        if shelf is not None:
            try:
                shelf.write_index()
            except OSError as err:
                raise VmisoError(f"cannot stage the inputs: {err.strerror or err}") from None
        return staged
    finally:
        os.close(staging_fd)
        if shelf is not None:
            os.close(shelf.fd)


def _stage_one(path: Path, staging_fd: int | None, tally: _Tally, shelf: _Large | None = None) -> StagedInput | None:
    """Check (``staging_fd`` None) or copy one input, counting it in ``tally``; what was copied."""
    name = input_name(path)
    fd = open_input(path)
    try:
        st = os.fstat(fd)
        tally.add_entry()
        before = tally.bytes
        if stat.S_ISREG(st.st_mode):
            if staging_fd is None:
                tally.add_bytes(st.st_size)
                return None
            digest = _copy_file(fd, staging_fd, name, path, tally, os.fsencode(name), shelf)
            return StagedInput(name, "file", tally.bytes - before, 1, digest)
        if not stat.S_ISDIR(st.st_mode):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        if staging_fd is None:
            _walk_directory(fd, path, None, tally)
            return None
        os.mkdir(name, 0o755, dir_fd=staging_fd)
        out_fd = os.open(name, tree.OPEN_DIR, dir_fd=staging_fd)
        try:
            os.fchmod(out_fd, 0o755)
            files = _walk_directory(fd, path, out_fd, tally, shelf, os.fsencode(name))
        finally:
            os.close(out_fd)
        return StagedInput(name, "directory", tally.bytes - before, len(files), tree_digest(files))
    except FileExistsError:
        raise VmisoError(f"inputs would both appear as {GUEST_IN}/{name}", "rename one of them") from None
    finally:
        os.close(fd)


def _walk_directory(root_fd: int, root: Path, out_fd: int | None, tally: _Tally,
                    shelf: _Large | None = None, staged_as: bytes = b"") -> list[tuple[bytes, str]]:
    """Every entry below ``root_fd`` checked, counted and, when ``out_fd`` is given, copied into it
    (``staged_as``: its name under /in); each file copied, as (its path below ``root``, its sha256)."""
    def unreadable(where: tree.DirPath, name: str | None, err: OSError) -> None:
        raise VmisoError(f"cannot read input {root / tree.shorten(where.path(name))}: {err.strerror or err}")

    out = tree.DirPath(out_fd) if out_fd is not None else None
    files: list[tuple[bytes, str]] = []
    try:
        for entry in tree.walk(root_fd, sort=True, on_error=unreadable):
            shown = root / tree.shorten(entry.path())
            if stat.S_ISLNK(entry.st.st_mode):
                raise VmisoError(f"input refused: {shown} is a symbolic link; vmiso follows no link inside an input",
                                 "replace it by what it points to, or give that as an input of its own (-i)")
            if not (entry.is_dir or stat.S_ISREG(entry.st.st_mode)):
                raise VmisoError(f"input refused: {shown} is not a regular file or directory",
                                 "remove it from the input (FIFOs, sockets and devices cannot be copied)")
            tally.add_entry()
            if out is None:
                if not entry.is_dir:
                    tally.add_bytes(entry.st.st_size)
                continue
            while out.depth >= entry.depth:
                out.leave()
            try:
                source = entry.open()
                if entry.is_dir:
                    os.mkdir(entry.name, 0o755, dir_fd=out.fd)
                    os.fchmod(out.enter(entry.name), 0o755)
                else:
                    below = os.fsencode(entry.path())
                    digest = _copy_file(source, out.fd, entry.name, Path(shown), tally,
                                        staged_as + b"/" + below, shelf)
                    files.append((below, digest))
            except OSError as err:  # TreeChanged among them: the input changed while it was copied
                raise VmisoError(f"cannot copy input {shown}: {err.strerror or err}") from None
    finally:
        if out is not None:
            out.close()
    return files


def _copy_file(fd_in: int, dir_fd: int, name: str, shown: Path, tally: _Tally, where: bytes = b"",
               shelf: _Large | None = None) -> str:
    """``fd_in`` copied to a new file ``name`` in ``dir_fd``, mode 0644 and the original's
    modification time; its bytes counted as they are read; the sha256 of what was copied.

    A large file (``shelf.takes`` it; ``where``: its path below /in) is copied onto the
    shelf instead, and ``name`` made an empty file of the same mode and time.
    """
    shelved = shelf is not None and shelf.takes(os.fstat(fd_in).st_size, where)
    if shelved:
        assert shelf is not None
        _make_file(dir_fd, name).close()  # the placeholder, first: a name taken twice fails here
        try:
            fd_out = os.open(shelf.add(where), _CREATE, 0o644, dir_fd=shelf.fd)
        except OSError as err:
            raise VmisoError(f"cannot copy input {shown}: {err.strerror or err}") from None
    else:
        fd_out = os.open(name, _CREATE, 0o644, dir_fd=dir_fd)
    digest = hashlib.sha256()
    try:
        os.fchmod(fd_out, 0o644)
        while block := os.read(fd_in, _CHUNK):
            tally.add_bytes(len(block))
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(fd_out, view):]
        mtime = os.fstat(fd_in).st_mtime_ns
        os.utime(fd_out, ns=(mtime, mtime))
        if shelved:
            _guest_root_owns(fd_out)
            os.utime(name, ns=(mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        raise VmisoError(f"cannot copy input {shown}: {err.strerror or err}") from None
    finally:
        os.close(fd_out)
    return digest.hexdigest()


def _make_file(dir_fd: int, name: str) -> Any:
    """A new, empty file ``name`` in ``dir_fd``, mode 0644 (an open file object)."""
    fd = os.open(name, _CREATE, 0o644, dir_fd=dir_fd)
    os.fchmod(fd, 0o644)
    return os.fdopen(fd, "wb")


# --- Large files -------------------------------------------------------------------------
# Under emulation the guest reads a file from a disk through its page cache, a page at
# a time of emulated kernel code (83 MB/s for a 100 MB file), and from 9p straight into
# the job's buffer (about 900 MB/s): README, "Inputs".  A file of LARGE_FILE_BYTES or
# more is therefore shared over 9p, read-only to QEMU and to the guest, and bound in the
# guest over the empty file of its name in the image, so the job sees one /in.  A walk
# of many small files stays on the disk, where 9p's round trips per file made it 36 x
# slower.  1 MiB: 9p's cost per file (about 5 ms for the first open under emulation)
# is what reading 0.4 MiB from the disk costs; above that 9p is faster.

LARGE_FILE_BYTES = 1024**2
LARGE_INDEX = "index"  # on the share: (number, path below /in) pairs, each NUL-terminated
# A bind mount's target must be a path the guest's mount(2) takes: "/in/" (or
# "/root/in/", before switch_root) and the path below it, under PATH_MAX (4096).
_BIND_PATH_MAX = 4000
_VIRTFS_OWNER = ("user.virtfs.uid", "user.virtfs.gid")  # QEMU's "mapped" owner, little-endian


class _Large:
    """The run's share of large files: each file numbered in the order it is copied."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.index = bytearray()
        self.count = 0

    def takes(self, size: int, where: bytes) -> bool:
        return size >= LARGE_FILE_BYTES and 0 < len(where) < _BIND_PATH_MAX

    def add(self, where: bytes) -> str:
        name = str(self.count)
        self.count += 1
        self.index += name.encode() + b"\0" + where + b"\0"
        return name

    def write_index(self) -> None:
        if self.count:
            with _make_file(self.fd, LARGE_INDEX) as f:
                f.write(self.index)


def _guest_root_owns(fd: int) -> None:
    """The guest sees a shared large file as root's, as everything else in /in, not as the
    analyst's (QEMU's mapped mode reads the owner from these xattrs); without user xattrs on
    the state directory's filesystem, the guest sees the analyst's uid."""
    try:
        for key in _VIRTFS_OWNER:
            os.setxattr(fd, key, (0).to_bytes(4, "little"))
    except OSError as err:
        if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def _hash_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while block := os.read(fd, _CHUNK):
        digest.update(block)
    return digest.hexdigest()


def input_digest(path: Path) -> str:
    """The sha256 a run would record for input ``path`` (``StagedInput.sha256``), read without copying
    it: a file's content's; a directory's, its files' (``tree_digest``).  A batch compares it with a
    finished task's record to know whether the input changed.  VmisoError for what a run would refuse."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise VmisoError(f"cannot read input {path}: {err.strerror}") from None

    def unreadable(where: tree.DirPath, name: str | None, err: OSError) -> None:
        raise VmisoError(f"cannot read input {path / tree.shorten(where.path(name))}: {err.strerror or err}")
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return _hash_fd(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        files: list[tuple[bytes, str]] = []
        for entry in tree.walk(fd, sort=True, on_error=unreadable):
            if not (entry.is_dir or stat.S_ISREG(entry.st.st_mode)):
                raise VmisoError(f"input refused: {path / tree.shorten(entry.path())} is not a regular file "
                                 "or directory")
            if not entry.is_dir:
                files.append((os.fsencode(entry.path()), _hash_fd(entry.open())))
        return tree_digest(files)
    except OSError as err:
        raise VmisoError(f"cannot read input {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)


# --- /in as a disk ---------------------------------------------------------------------
# The guest reads its inputs from a filesystem image of the staged copy, on a read-only
# virtio disk: a walk of many small files then costs what it costs on a local disk, not
# a 9p round trip per file (README, "Many small files").  The host only writes that
# image and never reads anything back from the guest.  erofs (read-only by design,
# compact, built fast); a tree that erofs-utils cannot take (Debian 12's 1.5 fails on a
# name of 255 bytes and on a path longer than PATH_MAX, both of which staging allows)
# goes on ext4 instead, which the guest mounts read-only without replaying anything.

# What a file or directory costs an image above its bytes, bounded for both: an inode,
# a directory entry with a name of up to 255 bytes, and a block's padding.
DISK_ENTRY_BYTES = 8 * 1024
_DISK_SLACK = 16 * 1024**2  # superblocks, group descriptors, bitmaps
_MiB = 1024**2


def disk_bytes(limits: InputLimits) -> int:
    """The size of an inputs disk that holds the image of any inputs within ``limits``: a warm
    state is saved with one this size (a restored clone keeps the disk size it was saved with)."""
    size = limits.max_bytes + limits.max_files * DISK_ENTRY_BYTES + _DISK_SLACK
    return -(-size // _MiB) * _MiB


def room_for(input_bytes: int, input_files: int = 0) -> int:
    """The host's bytes a run's inputs take at most: the staged copy and its image at once."""
    return input_bytes + disk_bytes(InputLimits(input_bytes, input_files))


# What the guest reads ahead of the job as it mounts an erofs image: erofs reads its
# metadata, and the small files' data packed with it, a block at a time, each a
# request to QEMU; read ahead in large requests, a walk of many small files costs
# what it costs in memory.  Bounded, for the guest's memory: a large input's data
# is read when the job reads it, with the kernel's own readahead.
PREFETCH_MAX = 32 * _MiB
_EROFS_MAGIC = 0xE0F5E1E2


def prefetch_bytes(image: Path) -> int:
    """How much of ``image`` (an inputs disk this host built) the guest reads ahead: the
    erofs image's own size, at most PREFETCH_MAX; 0 for an ext4 one."""
    with open(image, "rb") as f:
        f.seek(1024)
        superblock = f.read(40)  # erofs_super_block: magic at 0, blkszbits at 12, blocks at 36
    if len(superblock) < 40 or int.from_bytes(superblock[:4], "little") != _EROFS_MAGIC:
        return 0
    return min(int.from_bytes(superblock[36:40], "little") << superblock[12], PREFETCH_MAX)


def build_disk(staged: Path, image: Path) -> int:
    """A filesystem image of the staged tree at ``image`` (a new file: nothing is replaced),
    then the staged copy removed; the image's size."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        let_qemu_read(fd)  # the mkfs tools write into this file, keeping it and its ACL
    finally:
        os.close(fd)
    try:
        tools.run(tools.mkfs_erofs_argv(image, staged))
    except ToolError as err:
        log.info("erofs could not take the inputs (%s): ext4 instead", err.message)
        counted = _counted(staged)
        os.truncate(image, 0)
        os.truncate(image, disk_bytes(counted))
        try:
            tools.run(tools.mkfs_inputs_ext4_argv(image, staged, counted.max_files))
        except ToolError as ext4_err:
            raise VmisoError(f"cannot put the inputs on the guest's disk: mkfs.erofs and mkfs.ext4 both failed "
                             f"({err.message}; {ext4_err.message})",
                             "an input with paths longer than 4095 bytes must also be less than 1,000 "
                             "directories deep; shorten its deepest paths") from None
    failures = remove_tree(staged)
    if failures:
        raise VmisoError(f"cannot remove the staged inputs {staged / failures[0].path}: {failures[0].reason}")
    return os.stat(image).st_size


def _counted(staged: Path) -> InputLimits:
    """The bytes and the files and directories of a staged tree (walked by descriptor)."""
    fd = os.open(staged, tree.OPEN_DIR)
    total, entries = 0, 0
    try:
        for entry in tree.walk(fd):
            entries += 1
            total += entry.st.st_size if not entry.is_dir else 0
    finally:
        os.close(fd)
    return InputLimits(total, entries)


def fill_disk(image: Path, disk: Path) -> None:
    """Copy ``image`` onto the start of ``disk``, the inputs disk of a clone that runs already
    (its guest mounts it only once told to), leaving the disk's size as it is."""
    size = os.stat(image).st_size
    if size > os.stat(disk).st_size:
        raise VmisoError(f"the inputs' image ({size // _MiB} MiB) is larger than the clone's inputs disk",
                         "boot the run without the pool (--cold), or lower run.input_max_bytes")
    source = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(disk, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            copied = 0
            while copied < size:
                done = os.copy_file_range(source, target, size - copied, copied, copied)
                if done == 0:
                    raise VmisoError(f"the inputs' image {image} ended while it was copied")
                copied += done
        finally:
            os.close(target)
    finally:
        os.close(source)
    image.unlink()
