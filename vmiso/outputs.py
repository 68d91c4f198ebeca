"""What the guest wrote to /out, checked before any of it reaches the user.

The share uses 9p's "mapped" mode: the host holds only regular files and
directories owned by the QEMU user, and the guest's idea of a file's type and
mode lives in the ``user.virtfs.mode`` xattr.  A guest symlink, FIFO or device
therefore lands as a regular file marked in that xattr; it is refused here, as
are setuid/setgid bits, names with control characters and anything beyond the
limits.  Files are copied (never moved or linked) into a destination that must
be new or empty, with exclusive creates: nothing of the user's is overwritten.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError

MANIFEST_NAME = "MANIFEST"
# Names that common host tools run code from when an analyst opens or enters the
# directory that holds them; refused at any depth unless accepted knowingly.
TOOL_FILES = {
    ".git": "git runs hooks and configured commands (core.fsmonitor, aliases) from it",
    ".hg": "Mercurial runs hooks configured in it",
    ".envrc": "direnv runs it on entering the directory",
    ".vscode": "VS Code runs its tasks and settings",
    ".idea": "JetBrains IDEs run its configurations",
    ".dir-locals.el": "Emacs evaluates it",
    ".exrc": "vim runs it (with 'exrc')",
    ".nvimrc": "Neovim runs it (with 'exrc')",
    ".nvim.lua": "Neovim runs it (with 'exrc')",
    ".lvimrc": "vim's localvimrc runs it",
}
TOOL_SUFFIXES = {".desktop": "desktop file managers launch it"}
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

    def as_dict(self) -> dict:
        return {
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "refused": [{"path": p, "reason": r} for p, r in self.refused],
            "total_bytes": self.total_bytes,
        }


def check_destination(dest: Path) -> None:
    """Before a run: the destination must be new or an empty directory."""
    if dest.is_symlink():
        raise OutputError(f"--output {dest} is a symbolic link", "name a new or empty directory")
    if dest.exists():
        if not dest.is_dir():
            raise OutputError(f"--output {dest} exists and is not a directory", "name a new or empty directory")
        if any(dest.iterdir()):
            raise OutputError(f"--output {dest} is not empty; vmiso never overwrites files",
                              "name a new or empty directory")
    elif not dest.parent.is_dir():
        raise OutputError(f"--output {dest}: its parent directory does not exist")


def _guest_mode(path: str) -> int | None:
    try:
        raw = os.getxattr(path, VIRTFS_MODE, follow_symlinks=False)
    except OSError:
        return None
    return int.from_bytes(raw[:4], sys.byteorder)


def _name_problem(name: str) -> str | None:
    if any("\udc80" <= c <= "\udcff" for c in name):  # undecodable bytes (surrogateescape)
        return "name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "name contains control characters"
    if name in (".", "..") or "/" in name or "\\" in name:
        return "name is not a plain file name"
    return None


def tool_file_problem(name: str) -> str | None:
    """Why a host tool would run code from an output called ``name``, or None."""
    reason = TOOL_FILES.get(name) or next((r for suffix, r in TOOL_SUFFIXES.items() if name.endswith(suffix)), None)
    return f"{reason} (accept such files with --accept-tool-files)" if reason else None


def _entry_problem(path: str, st: os.stat_result) -> str | None:
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return "not a regular file or directory"
    mode = _guest_mode(path)
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


def usage(root: Path, stop_after_files: int) -> tuple[int, int]:
    """(bytes, files) under ``root`` as the host sees them; stops counting past the limit."""
    total = files = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        files += 1
                        try:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                        except OSError:
                            pass
                    if files > stop_after_files:
                        return total, files
        except OSError:
            continue
    return total, files


def _copy(src: str, dest: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            while block := os.read(fd_in, _CHUNK):
                digest.update(block)
                size += len(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd_out, view):]
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return size, digest.hexdigest()


def collect(share: Path, dest: Path, *, max_bytes: int, max_files: int,
            accept_tool_files: bool = False) -> OutputReport:
    """Copy what the guest left in ``share`` into ``dest`` after the checks; write MANIFEST.

    ``accept_tool_files``: also copy what TOOL_FILES names (.git/, .envrc, ...).
    """
    report = OutputReport()
    plan: list[tuple[str, str, bool]] = []  # (host path, relative path, is_dir)
    planned_bytes = 0

    def walk(directory: str, prefix: str) -> None:
        nonlocal planned_bytes
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                shown = rel.encode("utf-8", "backslashreplace").decode()
                problem = _name_problem(entry.name)
                st = entry.stat(follow_symlinks=False)
                problem = problem or _entry_problem(entry.path, st)
                if problem is None and not accept_tool_files:
                    problem = tool_file_problem(entry.name)
                if problem is None and not prefix and entry.name == MANIFEST_NAME:
                    problem = "the name MANIFEST is vmiso's own"
                if problem:
                    report.refused.append((shown, problem))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    plan.append((entry.path, rel, True))
                    walk(entry.path, rel + "/")
                else:
                    plan.append((entry.path, rel, False))
                    planned_bytes += st.st_size
                if len(plan) > max_files:
                    raise OutputError(f"the job wrote more than {max_files} files and directories to /out",
                                      "raise run.output_max_files in vmiso.yaml if that is expected")
                if planned_bytes > max_bytes:
                    raise OutputError(f"the job wrote more than {max_bytes} bytes to /out",
                                      "raise run.output_max_bytes in vmiso.yaml if that is expected")

    walk(str(share), "")
    dest.mkdir(mode=0o755, exist_ok=True)
    try:
        for host_path, rel, is_dir in plan:
            target = dest / rel
            if is_dir:
                target.mkdir(mode=0o755)
                continue
            size, digest = _copy(host_path, target)
            report.files.append(OutputFile(rel, size, digest))
        manifest = "".join(f"{f.sha256}  {f.path}\n" for f in report.files)
        fd = os.open(dest / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError as err:
        raise OutputError(f"{err.filename} exists already; vmiso never overwrites files",
                          "name a new or empty --output directory") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(manifest)
    return report
