"""Walking and removing directory trees that something hostile shaped, by descriptor.

A guest can leave any tree in its output share: 100,000 nested directories,
255-byte names, paths far beyond PATH_MAX.  So nothing here builds a path or
recurses.  Every step opens one name relative to an open directory, with
O_NOFOLLOW (a symbolic link swapped in is never followed) and, for directories,
O_DIRECTORY; what is opened is checked with fstat against what lstat saw.  The
walk keeps its own stack, so no depth reaches Python's recursion limit.

Descriptors stay few at any depth.  `DirPath` keeps open the root, the last
WINDOW directories of the current path, and the directories at "binary
checkpoints" of the current depth (the depth with its lowest bits cleared one by
one: at depth 1011010b, depths 1000000b, 1010000b, 1011000b): at most
WINDOW + log2(depth) + 1 of them.  Climbing back to a directory whose descriptor
was closed re-descends by name from the nearest one still open, never through
``..``, checking each directory's device and inode on the way: a directory
moved or replaced meanwhile is reported (TreeChanged), not entered.  Going down
a chain of depth D and back up costs O(D log D) opens.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file does not block the open; O_NOCTTY: a tty never becomes ours.
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
WINDOW = 16
SHOWN_PATH = 200  # characters of a path shown in a message; the middle of a longer one is elided

Identity = tuple[int, int]  # (st_dev, st_ino)


class TreeChanged(OSError):
    """A directory was moved, replaced or removed while the tree was walked."""


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def shorten(path: str, limit: int = SHOWN_PATH) -> str:
    """``path`` for a message: a very long one keeps its start and end."""
    if len(path) <= limit:
        return path
    half = limit // 2
    return f"{path[:half]}...({len(path) - 2 * half} characters)...{path[-half:]}"


def _kept(depth: int, current: int, window: int) -> bool:
    """Whether the directory at ``depth`` keeps its descriptor while the walk is at ``current``."""
    if depth == 0 or current - depth < window:
        return True
    low = depth & -depth
    return current & ~(low - 1) == depth  # a binary checkpoint of ``current``


class DirPath:
    """An open directory below ``root_fd``, moved one name at a time; holds few descriptors.

    ``root_fd`` stays the caller's; every other descriptor is closed by ``close``.
    """

    def __init__(self, root_fd: int, window: int = WINDOW) -> None:
        self._window = window
        self.names: list[str] = []  # from the root down; len(names) is the depth
        self._ids: list[Identity] = [identity(os.fstat(root_fd))]
        self._fds: dict[int, int] = {0: root_fd}  # depth -> open descriptor

    @property
    def depth(self) -> int:
        return len(self.names)

    @property
    def fd(self) -> int:
        """The current directory's descriptor, reopened when it was closed (TreeChanged if it moved)."""
        depth = self.depth
        if depth not in self._fds:
            self._reopen(depth)
        return self._fds[depth]

    def enter(self, name: str, fd: int | None = None) -> int:
        """Go into the directory ``name``, or hand over ``fd``, already opened on it with OPEN_DIR."""
        if fd is None:
            fd = os.open(name, OPEN_DIR, dir_fd=self.fd)
        self.names.append(name)
        self._ids.append(identity(os.fstat(fd)))
        self._fds[self.depth] = fd
        current = self.depth
        for depth in [d for d in self._fds if not _kept(d, current, self._window)]:
            os.close(self._fds.pop(depth))
        return fd

    def leave(self) -> None:
        depth = self.depth
        if depth == 0:
            raise ValueError("already at the root")
        fd = self._fds.pop(depth, None)
        if fd is not None:
            os.close(fd)
        self.names.pop()
        self._ids.pop()

    def is_open(self) -> bool:
        """Whether the current directory's descriptor is open now (``fd`` would not reopen it)."""
        return self.depth in self._fds

    def close(self) -> None:
        for depth, fd in list(self._fds.items()):
            if depth:
                os.close(fd)
        self._fds = {0: self._fds[0]}

    def path(self, name: str | None = None) -> str:
        """The '/'-separated path from the root (for messages and reports)."""
        parts = self.names if name is None else [*self.names, name]
        return "/".join(parts)

    def _reopen(self, target: int) -> None:
        start = max(d for d in self._fds if d < target)
        fd = self._fds[start]
        for depth in range(start + 1, target + 1):
            name = self.names[depth - 1]
            try:
                child = os.open(name, OPEN_DIR, dir_fd=fd)
            except OSError as err:
                if depth - 1 != start and depth - 1 not in self._fds:
                    os.close(fd)
                raise TreeChanged(err.errno, f"cannot reopen {shorten(self.path())}: {err.strerror}") from None
            if depth - 1 != start and depth - 1 not in self._fds:
                os.close(fd)
            if identity(os.fstat(child)) != self._ids[depth]:
                os.close(child)
                raise TreeChanged(0, f"{shorten(self.path())} was moved or replaced during the walk")
            if _kept(depth, target, self._window):
                self._fds[depth] = child
            fd = child


@dataclass
class Entry:
    """One name in a directory, valid until the walk moves on.

    ``dir_fd`` is the directory holding it.  A directory is walked into after
    this entry unless the consumer clears ``descend``.  ``after`` marks the second
    time a walked directory is yielded, once its contents are done.
    """

    where: DirPath  # the walk's position: the directory holding this entry
    dir_fd: int
    name: str
    st: os.stat_result
    after: bool = False
    descend: bool = True
    _fd: int | None = field(default=None, repr=False)

    @property
    def depth(self) -> int:
        """1 for the root's own entries."""
        return self.where.depth + 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    def path(self) -> str:
        """'/'-separated from the root; as long as the tree is deep."""
        return self.where.path(self.name)

    def open(self) -> int:
        """A descriptor on this entry (closed by the walk), checked to be what lstat saw."""
        if self._fd is None:
            fd = os.open(self.name, OPEN_DIR if self.is_dir else OPEN_FILE, dir_fd=self.dir_fd)
            seen = os.fstat(fd)
            if identity(seen) != identity(self.st) or stat.S_IFMT(seen.st_mode) != stat.S_IFMT(self.st.st_mode):
                os.close(fd)
                raise TreeChanged(0, f"{shorten(self.name)!r} was replaced while it was read")
            self._fd = fd
        return self._fd

    def _release(self) -> int | None:
        fd, self._fd = self._fd, None
        return fd


# Called with the walk's position, the name there that could not be read or
# reached (None: the directory itself could not be listed) and the error; the
# walk then goes on without that part.
OnError = Callable[[DirPath, "str | None", OSError], None]


def _ignore(_where: DirPath, _name: str | None, _err: OSError) -> None:
    pass


def walk(root_fd: int, *, sort: bool = False, dirs_after: bool = False, on_error: OnError = _ignore,
         window: int = WINDOW) -> Iterator[Entry]:
    """Every entry below ``root_fd``, depth first, never following a symbolic link.

    Entries are lstat'ed relative to their directory.  ``sort``: each directory's
    names in sorted order.  ``dirs_after``: a walked directory is yielded a second
    time (``after``) once its contents are done, for removal.  What cannot be
    listed, stat'ed or entered goes to ``on_error`` and is skipped; an exception
    ``on_error`` raises ends the walk.
    """
    where = DirPath(root_fd, window)
    pending: list[list[str]] = []  # per depth, the names still to visit (reversed when sorted)
    entered: list[Entry] = []  # per depth below the root, the entry walked into

    def listing(fd: int) -> list[str]:
        try:
            names = os.listdir(fd)
        except OSError as err:
            on_error(where, None, err)
            return []
        return sorted(names, reverse=True) if sort else names

    try:
        pending.append(listing(root_fd))
        while pending:
            if not pending[-1]:
                pending.pop()
                if entered:
                    done = entered.pop()
                    where.leave()
                    if dirs_after:
                        try:
                            done.dir_fd = where.fd
                        except OSError as err:
                            _give_up(where, pending, entered, on_error, err)
                            continue
                        done.after = True
                        yield done
                continue
            name = pending[-1].pop()
            try:
                dir_fd = where.fd
            except OSError as err:
                _give_up(where, pending, entered, on_error, err)
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as err:
                on_error(where, name, err)
                continue
            entry = Entry(where, dir_fd, name, st)
            try:
                yield entry
                if entry.is_dir and entry.descend:
                    try:
                        entry.open()
                    except OSError as err:
                        on_error(where, name, err)
                        continue
                    fd = where.enter(name, entry._release())
                    entered.append(entry)
                    pending.append(listing(fd))
            finally:
                unused = entry._release()
                if unused is not None:
                    os.close(unused)
    finally:
        where.close()


def _give_up(where: DirPath, pending: list[list[str]], entered: list[Entry], on_error: OnError,
             err: OSError) -> None:
    """The current directory cannot be reached again (moved or replaced): drop it and
    everything between it and its nearest ancestor still open, unvisited, and report
    that ancestor's child which was lost."""
    lost = where.names[-1]
    while where.depth and not where.is_open():
        lost = where.names[-1]
        pending.pop()
        entered.pop()
        where.leave()
    on_error(where, lost, err)


@dataclass(frozen=True)
class Failure:
    path: str  # below the removed tree's parent, shortened for messages
    reason: str


def remove_tree(parent_fd: int, name: str, *, window: int = WINDOW) -> list[Failure]:
    """Remove ``name`` in ``parent_fd`` and everything below it; what could not be removed, or [].

    Never follows a symbolic link, never crosses into another filesystem (a mount
    point is reported, not entered), never raises for what the tree holds: each
    part that cannot go is reported once (its ancestors, left non-empty, are not).
    """
    failures: list[Failure] = []
    blocked: set[int] = set()  # depths whose directory keeps something, so cannot be removed

    def fail(where: DirPath, entry_name: str | None, err: OSError) -> None:
        failures.append(Failure(shorten(f"{name}/{where.path(entry_name)}".rstrip("/")),
                                err.strerror or str(err)))
        blocked.add(where.depth)

    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return []
        root = os.open(name, OPEN_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        return []
    except OSError as err:
        return [Failure(shorten(name), err.strerror or str(err))]
    try:
        if identity(os.fstat(root)) != identity(st):
            return [Failure(shorten(name), "was replaced during removal")]
        for entry in walk(root, dirs_after=True, on_error=fail, window=window):
            if entry.after:
                if entry.depth in blocked:  # something below stays: so does this directory
                    blocked.discard(entry.depth)
                    blocked.add(entry.depth - 1)
                    continue
                _remove(entry, os.rmdir, fail)
            elif entry.is_dir:
                blocked.discard(entry.depth)
                if entry.st.st_dev != st.st_dev:
                    entry.descend = False
                    fail(entry.where, entry.name, OSError(errno.EXDEV, "a mount point; not entered"))
            else:
                _remove(entry, os.unlink, fail)
    finally:
        os.close(root)
    if not failures:
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError as err:
            failures.append(Failure(shorten(name), err.strerror or str(err)))
    return failures


def _remove(entry: Entry, remove: Callable[..., None], fail: OnError) -> None:
    try:
        remove(entry.name, dir_fd=entry.dir_fd)
    except FileNotFoundError:
        pass
    except OSError as err:
        fail(entry.where, entry.name, err)
