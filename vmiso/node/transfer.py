"""Trees as frames: the inputs (client -> node) and the outputs (node -> client).

A tree is ENTRY headers (``{"kind": "dir" | "file", "path": "a/b", "size": N}``), each
file's bytes in DATA frames after its ENTRY and an ENTRY_END, then TREE_END.  A
directory comes before what it holds.  The sender walks by directory descriptor and
sends nothing but regular files and directories.

The receiver trusts nothing of it: each path is split into names that must be plain
(no '', '.', '..', '/', NUL), each parent must have come before, everything is made
relative to directory descriptors with O_NOFOLLOW and O_EXCL in a directory only this
process writes, a file must hold exactly the bytes its header announced, and the files,
directories and bytes are counted against the limits as they arrive.  Any breach ends
the whole transfer with an error: a peer that keeps to the protocol never sends one.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VmisoError
from ..host import tree
from . import protocol
from .protocol import Reader, Writer

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# --- sending ----------------------------------------------------------------------------------

def send_file(writer: Writer, fd: int, path: str, size: int) -> None:
    """One file: its ENTRY, exactly ``size`` bytes of ``fd``, ENTRY_END (VmisoError if it changed size)."""
    writer.send_json(protocol.ENTRY, {"kind": "file", "path": path, "size": size})
    sent = 0
    while sent < size and (block := os.read(fd, min(protocol.CHUNK, size - sent))):
        writer.send(protocol.DATA, block)
        sent += len(block)
    if sent != size or os.read(fd, 1):
        raise VmisoError(f"{tree.shorten(path)} changed size while it was sent", "send it again once it is complete")
    writer.send(protocol.ENTRY_END)


def send_directory(writer: Writer, root_fd: int, prefix: str, shown: Path, *,
                   skip: frozenset[str] | set[str] = frozenset()) -> None:
    """What ``root_fd`` holds, below ``prefix``: directories and regular files; VmisoError for anything else.
    ``skip``: names at the top left out."""
    def unreadable(where: tree.DirPath, name: str | None, err: OSError) -> None:
        raise VmisoError(f"cannot read {shown / tree.shorten(where.path(name))}: {err.strerror or err}")

    for entry in tree.walk(root_fd, sort=True, on_error=unreadable):
        if entry.depth == 1 and entry.name in skip:
            entry.descend = False
            continue
        path = f"{prefix}/{entry.path()}" if prefix else entry.path()
        if entry.is_dir:
            writer.send_json(protocol.ENTRY, {"kind": "dir", "path": path})
        elif stat.S_ISREG(entry.st.st_mode):
            send_file(writer, entry.open(), path, entry.st.st_size)
        else:
            raise VmisoError(f"refused: {shown / tree.shorten(entry.path())} is not a regular file or directory; "
                             "vmiso follows no link inside a tree it sends",
                             "replace it by what it points to")


# --- receiving --------------------------------------------------------------------------------

# The problem with one name of a path, or None: the receiver's own rule first (what a peer that keeps
# to the protocol never sends), then the caller's (the output checks' name rules, for outputs).
NameRule = Callable[[str], str | None]


@dataclass
class Received:
    """What a tree held: each file's (path, size, sha256), in the order they came; directories."""

    files: list[tuple[str, int, str]] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Bounds:
    max_bytes: int  # the files' bytes and the paths' lengths
    max_files: int  # files and directories
    what: str  # "the inputs", "the outputs": named in errors
    raise_hint: str  # which key raises them


def _split(path: object, peer: str, rule: NameRule | None) -> list[str]:
    if not isinstance(path, str) or not path:
        raise protocol.ProtocolError(f"{peer} sent an entry without a path")
    names = path.split("/")
    for name in names:
        if name in ("", ".", "..") or "\0" in name or "\\" in name:
            raise VmisoError(f"refused: {peer} sent the path {tree.shorten(path)!r}, which is not a plain "
                             "relative path; nothing of it was kept")
        problem = rule(name) if rule is not None else None
        if problem is not None:
            raise VmisoError(f"refused: {peer} sent {tree.shorten(path)!r}: {problem}; a local run refuses it, "
                             "and nothing of what it sent was kept")
    return names


def _open_parent(root_fd: int, names: list[str], directories: set[tuple[str, ...]], peer: str) -> int:
    """The directory that holds ``names[-1]``: every step one this transfer made, opened with O_NOFOLLOW."""
    if tuple(names[:-1]) not in directories:
        raise protocol.ProtocolError(f"{peer} sent {tree.shorten('/'.join(names))!r} before its directory")
    fd = os.dup(root_fd)
    try:
        for name in names[:-1]:
            child = os.open(name, tree.OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def receive_tree(reader: Reader, root_fd: int, bounds: Bounds, *, rule: NameRule | None = None,
                 on_file: Callable[[str, int, str], None] | None = None) -> Received:
    """Receive one tree into ``root_fd`` (a directory only this process writes), up to TREE_END.

    ``on_file(path, size, sha256)`` is called as each file is complete (the MANIFEST check).
    """
    peer = reader.peer
    received = Received()
    directories: set[tuple[str, ...]] = {()}
    count = total = 0

    def counted(entries: int, size: int) -> None:
        nonlocal count, total
        count, total = count + entries, total + size
        if count > bounds.max_files:
            raise VmisoError(f"refused: {bounds.what} from {peer} hold more than {bounds.max_files} files and "
                             "directories; nothing of them was kept", bounds.raise_hint)
        if total > bounds.max_bytes:
            raise VmisoError(f"refused: {bounds.what} from {peer} hold more than {bounds.max_bytes} bytes; nothing "
                             "of them was kept", bounds.raise_hint)

    while True:
        kind, payload = reader.expect(protocol.ENTRY, protocol.TREE_END)
        if kind == protocol.TREE_END:
            return received
        head = protocol.header(payload, peer, "tree entry")
        names = _split(head.get("path"), peer, rule)
        path = "/".join(names)
        what = head.get("kind")
        if what not in ("dir", "file"):
            raise VmisoError(f"refused: {peer} sent {tree.shorten(path)!r} as {str(what)[:40]!r}: only regular "
                             "files and directories cross the link; nothing of what it sent was kept")
        size = 0 if what == "dir" else protocol.field(head, "size", int, peer, "file entry")
        if size < 0:
            raise protocol.ProtocolError(f"{peer} sent a file of negative size")
        counted(1, size + len(path))
        parent = _open_parent(root_fd, names, directories, peer)
        try:
            if what == "dir":
                os.mkdir(names[-1], 0o700, dir_fd=parent)
                directories.add(tuple(names))
                received.directories.append(path)
                continue
            out = os.open(names[-1], _CREATE, 0o600, dir_fd=parent)
        except FileExistsError:
            raise VmisoError(f"refused: {peer} sent {tree.shorten(path)!r} twice; nothing of what it sent was "
                             "kept") from None
        finally:
            os.close(parent)
        digest = _receive_data(reader, out, size, path)
        received.files.append((path, size, digest))
        if on_file is not None:
            on_file(path, size, digest)


def _receive_data(reader: Reader, out: int, size: int, path: str) -> str:
    digest = hashlib.sha256()
    got = 0
    try:
        while True:
            kind, data = reader.expect(protocol.DATA, protocol.ENTRY_END)
            if kind == protocol.ENTRY_END:
                break
            got += len(data)
            if got > size:
                raise VmisoError(f"refused: {reader.peer} sent more bytes for {tree.shorten(path)!r} than the "
                                 f"{size} it announced; nothing of what it sent was kept")
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
    finally:
        os.close(out)
    if got != size:
        raise VmisoError(f"refused: {reader.peer} sent {got} bytes for {tree.shorten(path)!r}, not the {size} it "
                         "announced; nothing of what it sent was kept")
    return digest.hexdigest()
