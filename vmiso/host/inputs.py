"""A run's inputs: checked on the host, then copied into the share the guest reads.

The user's files are never shared directly: each run gets its own copy, files
0644 and directories 0755, so nothing the guest does through the (read-only)
share can reach the originals.

An input is what the user named (a link given as ``-i`` is followed, as ``cp -r``
follows its arguments); what an input directory holds is walked by directory
descriptor (vmiso.host.tree: each name opened relative to its directory with
O_NOFOLLOW, an explicit stack), never by path.  A symbolic link inside it is
refused, never followed: two links back into the directory (``a -> .``,
``b -> .``) would otherwise copy it without end.  What is staged is bounded in
bytes and in files and directories (``run.input_max_bytes``,
``run.input_max_files``), counted as the inputs are checked and again as they are
copied, so an input that grows meanwhile is stopped at the bound too.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmisoError
from . import tree

GUEST_IN = "/in"
_CHUNK = 1024 * 1024
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int
    max_files: int  # files and directories, the inputs themselves included


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


def _name(path: Path) -> str:
    return path.resolve().name


def check_inputs(inputs: tuple[Path, ...], limits: InputLimits) -> int:
    """Everything about the inputs that can be refused before a run makes anything; the bytes they hold.

    Walks each input directory, copying nothing: its links, special files and
    size are refused here, before a VM is started.
    """
    seen: dict[str, Path] = {}
    for path in inputs:
        if not path.exists():
            raise VmisoError(f"input {path} does not exist")
        if not _name(path):
            raise VmisoError(f"input {path} is the root directory: it has no name to appear under {GUEST_IN}",
                             "give the files or directories the job needs, each with -i")
        if not (path.is_file() or path.is_dir()):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        name = _name(path)
        if name in seen:
            raise VmisoError(f"inputs {seen[name]} and {path} would both appear as {GUEST_IN}/{name}",
                             "rename one of them")
        seen[name] = path
    tally = _Tally(limits)
    for path in inputs:
        _stage_one(path, None, tally)
    return tally.bytes


def stage_inputs(inputs: tuple[Path, ...], staging: Path, limits: InputLimits) -> None:
    """Copy inputs into the run's read-only share: the user's files are never shared directly."""
    staging_fd = os.open(staging, tree.OPEN_DIR)
    try:
        tally = _Tally(limits)
        for path in inputs:
            _stage_one(path, staging_fd, tally)
    finally:
        os.close(staging_fd)


def _stage_one(path: Path, staging_fd: int | None, tally: _Tally) -> None:
    """Check (``staging_fd`` None) or copy one input, counting it in ``tally``."""
    name = _name(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise VmisoError(f"cannot read input {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        tally.add_entry()
        if stat.S_ISREG(st.st_mode):
            if staging_fd is None:
                tally.add_bytes(st.st_size)
            else:
                _copy_file(fd, staging_fd, name, path, tally)
        elif not stat.S_ISDIR(st.st_mode):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        elif staging_fd is None:
            _walk_directory(fd, path, None, tally)
        else:
            os.mkdir(name, 0o755, dir_fd=staging_fd)
            out_fd = os.open(name, tree.OPEN_DIR, dir_fd=staging_fd)
            try:
                os.fchmod(out_fd, 0o755)
                _walk_directory(fd, path, out_fd, tally)
            finally:
                os.close(out_fd)
    except FileExistsError:
        raise VmisoError(f"inputs would both appear as {GUEST_IN}/{name}", "rename one of them") from None
    finally:
        os.close(fd)


def _walk_directory(root_fd: int, root: Path, out_fd: int | None, tally: _Tally) -> None:
    """Every entry below ``root_fd`` checked, counted and, when ``out_fd`` is given, copied into it."""
    def unreadable(where: tree.DirPath, name: str | None, err: OSError) -> None:
        raise VmisoError(f"cannot read input {root / tree.shorten(where.path(name))}: {err.strerror or err}")

    out = tree.DirPath(out_fd) if out_fd is not None else None
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
                    _copy_file(source, out.fd, entry.name, Path(shown), tally)
            except OSError as err:  # TreeChanged among them: the input changed while it was copied
                raise VmisoError(f"cannot copy input {shown}: {err.strerror or err}") from None
    finally:
        if out is not None:
            out.close()


def _copy_file(fd_in: int, dir_fd: int, name: str, shown: Path, tally: _Tally) -> None:
    """``fd_in`` copied to a new file ``name`` in ``dir_fd``, mode 0644; its bytes counted as they are read."""
    fd_out = os.open(name, _CREATE, 0o644, dir_fd=dir_fd)
    try:
        os.fchmod(fd_out, 0o644)
        while block := os.read(fd_in, _CHUNK):
            tally.add_bytes(len(block))
            view = memoryview(block)
            while view:
                view = view[os.write(fd_out, view):]
    except OSError as err:
        raise VmisoError(f"cannot copy input {shown}: {err.strerror or err}") from None
    finally:
        os.close(fd_out)
