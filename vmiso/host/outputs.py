"""What the guest wrote to /out, checked before any of it reaches the user.

The share uses 9p's "mapped" mode: the host holds only regular files and
directories owned by the QEMU user, and the guest's idea of a file's type and
mode lives in the ``user.virtfs.mode`` xattr.  A guest symlink, FIFO or device
therefore lands as a regular file marked in that xattr; it is refused here, as
are setuid/setgid bits, names that a terminal or a command line would act on
(controls, bidirectional overrides, line separators, a leading ``-``), what host
tools run code from (by name; a git repository by what it holds, under any name)
and anything beyond the limits.  Files are copied (never moved or linked) into a
destination that must be new or empty, with exclusive creates: nothing of the user's is overwritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError
from . import tree

MANIFEST_NAME = "MANIFEST"
# Names that common host tools run code from when an analyst opens or enters the
# directory that holds them; refused at any depth unless accepted knowingly.
TOOL_FILES = {
    ".git": "git runs hooks and configured commands (core.fsmonitor, aliases) from it",
    ".hg": "Mercurial runs hooks configured in it",
    ".sl": "Sapling runs hooks configured in it",
    ".jj": "Jujutsu runs the commands its repository config names (pager, editors)",
    ".envrc": "direnv runs it on entering the directory",
    ".env": "direnv loads it on entering the directory (with load_dotenv): its variables reach every command",
    ".vscode": "VS Code runs its tasks and settings",
    ".idea": "JetBrains IDEs run its configurations",
    ".dir-locals.el": "Emacs evaluates it",
    ".exrc": "vim runs it (with 'exrc')",
    ".nvimrc": "Neovim runs it (with 'exrc')",
    ".nvim.lua": "Neovim runs it (with 'exrc')",
    ".lvimrc": "vim's localvimrc runs it",
}
TOOL_SUFFIXES = {".desktop": "desktop file managers launch it"}
# git takes a directory as a repository under any name, with no `.git` in sight:
# when it holds HEAD and objects/ and refs/ (or a commondir file pointing to them),
# `git status` or `git log` run inside it, or below it, read its config and run the
# commands that config names (core.fsmonitor, core.pager, ...).
GIT_LAYOUT = ("a git repository under another name: git run in it runs the commands its config names "
              "(core.fsmonitor, core.pager)")
GIT_CONFIG = ("a git config (a [core] or [include] section): git run here may take it as a repository's "
              "and run the commands it names")
_GIT_SECTION = re.compile(rb"\[[ \t]{0,8}(core|include)", re.IGNORECASE)  # includeIf too; git allows no blank
# Characters a terminal acts on, or that reorder or break the text it shows: in a
# name they would reach a terminal through `ls`, `sha256sum -c MANIFEST` or a shell.
_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C))
_SEPARATORS = frozenset("\u2028\u2029")
VIRTFS_MODE = "user.virtfs.mode"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class OutputFile:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass
class OutputReport:
    files: list[OutputFile] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "refused": [{"path": p, "reason": r} for p, r in self.refused],
            "total_bytes": self.total_bytes,
        }


_OWN_DIRECTORY = "name a new directory, or an empty one of your own that only you can write"


def not_own(st: os.stat_result) -> str | None:
    """Why a directory with ``st`` is not the caller's alone to write, or None."""
    if st.st_uid != os.geteuid():
        return "is not yours: its owner could read and replace the checked outputs"
    if st.st_mode & 0o022:
        return "is writable by others, who could read and replace the checked outputs"
    return None


def check_destination(dest: Path) -> None:
    """Before a run: the destination must be new, or an empty directory of the caller's that only they can write."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise OutputError(f"--output {dest}: its parent directory does not exist") from None
        return
    except OSError as err:
        raise OutputError(f"--output {dest}: {err.strerror}", _OWN_DIRECTORY) from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"--output {dest} is a symbolic link", _OWN_DIRECTORY)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"--output {dest} exists and is not a directory", _OWN_DIRECTORY)
    if (problem := not_own(st)) is not None:
        raise OutputError(f"--output {dest} {problem}", _OWN_DIRECTORY)
    if any(dest.iterdir()):
        raise OutputError(f"--output {dest} is not empty; vmiso never overwrites files", _OWN_DIRECTORY)


def open_record(path: Path) -> int:
    """``--json FILE``, opened once before the run starts: a new file, never through a symbolic link.

    The run's record is written to this descriptor at its end, so whatever is put
    at ``path`` meanwhile (a link to another file, say) is never written through.
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise OutputError(f"--json {path} exists already; vmiso never overwrites files", "name a new file") from None
    except FileNotFoundError:
        raise OutputError(f"--json {path}: its directory does not exist", "name a file in an existing directory") \
            from None
    except OSError as err:
        raise OutputError(f"cannot create --json {path}: {err.strerror}") from None


def _guest_mode(fd: int) -> int | None:
    try:
        raw = os.getxattr(fd, VIRTFS_MODE)
    except OSError:
        return None
    return int.from_bytes(raw[:4], sys.byteorder)


def name_problem(name: str) -> str | None:
    """Why a name the guest (or a node) gave would act on a terminal or a command line, or None."""
    if any("\udc80" <= c <= "\udcff" for c in name):  # undecodable bytes (surrogateescape)
        return "name is not valid UTF-8"
    if any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in name):  # C0, DEL and C1
        return "name contains control characters"
    if any(c in _BIDI_CONTROLS for c in name):
        return "name contains bidirectional controls, which reorder what a terminal shows"
    if any(c in _SEPARATORS for c in name):
        return "name contains a line or paragraph separator"
    if name.startswith("-"):
        return "name begins with '-': a command given it (tar cf x.tar *, rm *) would take it as an option"
    if name in (".", "..") or "/" in name or "\\" in name:
        return "name is not a plain file name"
    return None


def _accept_hint(reason: str) -> str:
    return f"{reason} (accept such files with --accept-tool-files)"


def tool_file_problem(name: str) -> str | None:
    """Why a host tool would run code from an output called ``name``, or None."""
    lower = name.lower()  # .Git is .git where the outputs may be copied to (macOS, Windows)
    reason = TOOL_FILES.get(lower) or next((r for suffix, r in TOOL_SUFFIXES.items() if lower.endswith(suffix)),
                                           None)
    return _accept_hint(reason) if reason else None


# A git config is small: one larger than this is taken as one, unread (a sparse file of
# terabytes would otherwise be read to its end before any size is counted).
_CONFIG_READ_MAX = 1024 * 1024


def _has_git_section(dir_fd: int, name: str) -> bool:
    """Whether ``name`` in ``dir_fd`` is a regular file with a section git acts on, read to its end
    (or larger than _CONFIG_READ_MAX, and so taken as one without reading it)."""
    try:
        fd = os.open(name, tree.OPEN_FILE, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        if info.st_size > _CONFIG_READ_MAX:
            return True
        tail = b""
        while block := os.read(fd, _CHUNK):
            if _GIT_SECTION.search(tail + block):
                return True
            tail = block[-32:]
        return False
    finally:
        os.close(fd)


def repository_markers(dir_fd: int) -> set[str]:
    """The names in ``dir_fd`` that make git take it as a repository (HEAD, config, ...), or an empty set.

    Judged by what the directory holds, whatever its name: HEAD with objects/ or
    refs/ or a commondir file (git needs HEAD in the directory itself, the rest
    may be elsewhere), or a config with a [core] or [include] section.  Without
    the names returned the directory is none.
    """
    # Compared without case: copied to a case-insensitive file system (exFAT, a Mac's
    # APFS, a Windows share), "Head" and "OBJECTS" are the HEAD and objects git opens.
    names: dict[str, set[str]] = {}
    for name in os.listdir(dir_fd):
        names.setdefault(name.casefold(), set()).add(name)
    layout = "head" in names and bool(names.keys() & {"objects", "refs", "commondir"})
    markers = set().union(*(names[n] for n in names.keys() & {"head", "commondir", "config"})) if layout else set()
    for config in sorted(names.get("config", ())):
        if _has_git_section(dir_fd, config):
            markers.add(config)
    return markers


def _directory_problem(entry: tree.Entry) -> str | None:
    """Why a host tool would run code from the directory ``entry`` by what it holds, or None."""
    try:
        markers = repository_markers(entry.open())
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not markers:
        return None
    return _accept_hint(GIT_LAYOUT if markers - {"config"} else GIT_CONFIG)


def _entry_problem(entry: tree.Entry) -> str | None:
    if not (stat.S_ISREG(entry.st.st_mode) or entry.is_dir):
        return "not a regular file or directory"
    try:
        mode = _guest_mode(entry.open())
    except OSError as err:
        return f"cannot be opened ({err.strerror or err})"
    if mode is not None:
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            return "symbolic link"
        if kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            return "device, FIFO or socket"
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            return "unknown file type"
        if mode & (stat.S_ISUID | stat.S_ISGID):
            return "setuid or setgid bit"
    return None


def _copy(fd_in: int, fd_out: int, planned: int) -> tuple[int, str] | None:
    """Copy ``planned`` bytes and check that nothing follows them; None when the file was not that size."""
    digest = hashlib.sha256()
    size = 0
    try:
        while size < planned and (block := os.read(fd_in, min(_CHUNK, planned - size))):
            digest.update(block)
            size += len(block)
            view = memoryview(block)
            while view:
                view = view[os.write(fd_out, view):]
        if size != planned or os.read(fd_in, 1):
            return None
    finally:
        os.close(fd_out)
    return size, digest.hexdigest()


# What the first pass decided for each entry, in walk order: None refused, else
# (device, inode, size or -1 for a directory) of what is copied.
_Plan = list[tuple[int, int, int] | None]


def collect(share: Path, dest: Path, *, max_bytes: int, max_files: int,
            accept_tool_files: bool = False) -> OutputReport:
    """Copy what the guest left in ``share`` into ``dest`` after the checks; write MANIFEST.

    ``accept_tool_files``: also copy what TOOL_FILES names (.git/, .envrc, ...).

    Two walks of the share, both by descriptor (vmiso.host.tree): the first checks
    every entry and the limits and copies nothing; the second copies what the
    first accepted, checking each entry is the one the first saw.  The
    destination is written relative to descriptors only: the --output directory
    opened once with O_NOFOLLOW, each subdirectory opened right after vmiso made
    it, so a directory swapped for a symbolic link meanwhile is never followed.
    """
    report = OutputReport()
    share_fd = os.open(share, tree.OPEN_DIR)
    try:
        plan = _check(share_fd, report, max_bytes=max_bytes, max_files=max_files,
                      accept_tool_files=accept_tool_files)
        dest_fd = _open_destination(dest)
        try:
            _copy_planned(share_fd, dest_fd, plan, report)
            manifest = "".join(f"{f.sha256}  {f.path}\n" for f in report.files)
            fd = _create(MANIFEST_NAME, dest_fd, MANIFEST_NAME)
        finally:
            os.close(dest_fd)
    finally:
        os.close(share_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(manifest)
    return report


def _check(share_fd: int, report: OutputReport, *, max_bytes: int, max_files: int,
           accept_tool_files: bool) -> _Plan:
    """The first walk: each entry refused (in ``report``) or planned; OutputError past a limit.

    Every entry the guest wrote counts against ``max_files``, refused or not, and
    each reported path's length against ``max_bytes`` with the files' sizes: the
    MANIFEST and the report hold them, and a guest can make a path megabytes long.
    """
    plan: _Plan = []
    planned_bytes = 0
    prefix = [0]  # per depth, the length of the path down to it (with its '/')

    def unreadable(where: tree.DirPath, name: str | None, err: OSError) -> None:
        raise OutputError(f"cannot read {tree.shorten(where.path(name))} in /out: {err.strerror or err}")

    # /out itself may be laid out as a repository: then the names that make it one are refused.
    root_markers = set() if accept_tool_files else repository_markers(share_fd)
    root_reason = _accept_hint(GIT_LAYOUT if root_markers - {"config"} else GIT_CONFIG)
    for entry in tree.walk(share_fd, sort=True, on_error=unreadable):
        del prefix[entry.depth:]
        path_len = prefix[-1] + len(entry.name)
        problem = name_problem(entry.name) or _entry_problem(entry)
        if problem is None and not accept_tool_files:
            problem = tool_file_problem(entry.name)
            if problem is None and entry.depth == 1 and entry.name in root_markers:
                problem = f"/out itself is {root_reason}"
            if problem is None and entry.is_dir:
                problem = _directory_problem(entry)
        if problem is None and entry.depth == 1 and entry.name == MANIFEST_NAME:
            problem = "the name MANIFEST is vmiso's own"
        if problem:
            entry.descend = False
            shown = entry.path().encode("utf-8", "backslashreplace").decode()
            report.refused.append((shown, problem))
            planned_bytes += len(shown)
            plan.append(None)
        elif entry.is_dir:
            prefix.append(path_len + 1)
            plan.append((*tree.identity(entry.st), -1))
        else:
            planned_bytes += entry.st.st_size + path_len
            plan.append((*tree.identity(entry.st), entry.st.st_size))
        if len(plan) > max_files:
            raise OutputError(f"the job wrote more than {max_files} files and directories to /out",
                              "raise run.output_max_files in vmiso.yaml if that is expected")
        if planned_bytes > max_bytes:
            raise OutputError(f"the job wrote more than {max_bytes} bytes to /out",
                              "raise run.output_max_bytes in vmiso.yaml if that is expected")
    return plan


def _open_destination(dest: Path) -> int:
    """The --output directory, made if new, opened once: O_NOFOLLOW refuses a symbolic link put in its place,
    and one that another user made or opened to others meanwhile is refused too."""
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        pass
    except OSError as err:
        raise OutputError(f"cannot make --output {dest}: {err.strerror}") from None
    try:
        fd = os.open(dest, tree.OPEN_DIR)
    except OSError as err:
        raise OutputError(f"--output {dest} is no longer a directory ({err.strerror}); "
                          "was it replaced while the job ran?", _OWN_DIRECTORY) from None
    if (problem := not_own(os.fstat(fd))) is not None:  # made or swapped in by another user meanwhile
        os.close(fd)
        raise OutputError(f"--output {dest} {problem}; was it made or replaced while the job ran?", _OWN_DIRECTORY)
    return fd


def _create(name: str, dir_fd: int, shown: str, *, directory: bool = False) -> int:
    """A new file (its descriptor) or directory (0) in ``dir_fd``; never one that exists."""
    try:
        if directory:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
            return 0
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                       dir_fd=dir_fd)
    except FileExistsError:
        raise OutputError(f"{tree.shorten(shown)} exists already; vmiso never overwrites files",
                          "name a new or empty --output directory") from None


def _copy_planned(share_fd: int, dest_fd: int, plan: _Plan, report: OutputReport) -> None:
    """The second walk: copy what ``plan`` accepted into ``dest_fd``, entry for entry."""
    out = tree.DirPath(dest_fd)
    changed = OutputError("the output share changed while it was copied",
                          "nothing may write to it once the VM is gone; run the job again")

    def unreadable(where: tree.DirPath, name: str | None, err: OSError) -> None:
        raise OutputError(f"cannot read {tree.shorten(where.path(name))} in /out: {err.strerror or err}")

    try:
        seen = 0
        for entry in tree.walk(share_fd, sort=True, on_error=unreadable):
            expected = plan[seen] if seen < len(plan) else ()
            seen += 1
            if expected is None:
                entry.descend = False
                continue
            size = -1 if entry.is_dir else entry.st.st_size
            if expected != (*tree.identity(entry.st), size):
                raise changed
            while out.depth >= entry.depth:
                out.leave()
            copied = _copy_entry(entry, out)
            if copied is not None:
                report.files.append(copied)
        if seen != len(plan):
            raise changed
    finally:
        out.close()


def _copy_entry(entry: tree.Entry, out: tree.DirPath) -> OutputFile | None:
    """``entry`` made in ``out``'s directory: a directory (entered: what follows goes in it) or a copied file."""
    rel = entry.path()
    try:
        if entry.is_dir:
            _create(entry.name, out.fd, rel, directory=True)
            out.enter(entry.name)
            return None
        fd_in = entry.open()
    except OSError as err:  # TreeChanged among them: a directory of --output was moved meanwhile
        raise OutputError(f"cannot copy {tree.shorten(rel)}: {err.strerror or err}") from None
    try:
        copied = _copy(fd_in, _create(entry.name, out.fd, rel), entry.st.st_size)
    except OSError as err:
        raise OutputError(f"cannot copy {tree.shorten(rel)}: {err.strerror or err}") from None
    if copied is None:
        raise OutputError(f"{tree.shorten(rel)} in /out changed size while it was copied",
                          "nothing may write to it once the VM is gone; run the job again")
    return OutputFile(rel, *copied)
