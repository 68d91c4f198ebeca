"""The node protocol: length-prefixed, typed frames over the ssh process's stdin and stdout.

A frame is one byte of type, four bytes of length (big-endian) and that many bytes
of payload, at most MAX_FRAME.  Headers are small JSON objects (at most MAX_JSON
bytes, never pickle); data (a file's bytes, the job's output) is raw.  Either side
is untrusted by the other: every frame is bounded before it is read and every
header checked where it is used.

Client -> node: HELLO, REQUEST, the inputs as a tree (ENTRY, DATA, ENTRY_END ...,
TREE_END), then STDIN ... STDIN_END and SIGNAL at any time.
Node -> client: HELLO, then STEP, STDOUT, STDERR and CREDIT as the run goes, RESULT, and
when the client asked for outputs, MANIFEST and the outputs as a tree; or ERROR, at any
point, and nothing after it.  A REQUEST whose "op" is "images" or "doctor" is answered by one
RESULT holding a list under that key (the node's images, what its ``vmiso doctor`` finds); one
whose "op" is "command" (an "argv" of vmiso.node.server.COMMANDS) by that command's STDOUT and
STDERR as they come, then RESULT {"exit_code": N}.

Stdin is flow-controlled: the client sends at most STDIN_WINDOW bytes of STDIN beyond
what the node has handed to the job, which each CREDIT ({"bytes": N}) reports.  So the
node's reader never waits on a job that does not read its stdin, and a SIGNAL or the
link's end reaches it at once.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

from .. import __version__
from ..errors import VmisoError

VERSION = 2  # bump when a frame changes meaning; both sides refuse another (2: stdin's CREDIT)
MAX_FRAME = 256 * 1024
MAX_JSON = 64 * 1024
CHUNK = 64 * 1024  # data frames are cut to this
STDIN_WINDOW = 4 * CHUNK  # stdin bytes the client may send ahead of the node's CREDITs
_HEAD = struct.Struct(">BI")

HELLO = 1
ERROR = 2
REQUEST = 3
ENTRY = 10
DATA = 11
ENTRY_END = 12
TREE_END = 13
STDIN = 20
STDIN_END = 21
SIGNAL = 22
STDOUT = 30
STDERR = 31
STEP = 32
RESULT = 33
MANIFEST = 34
CREDIT = 35
NAMES = {HELLO: "HELLO", ERROR: "ERROR", REQUEST: "REQUEST", ENTRY: "ENTRY", DATA: "DATA", ENTRY_END: "ENTRY_END",
         TREE_END: "TREE_END", STDIN: "STDIN", STDIN_END: "STDIN_END", SIGNAL: "SIGNAL", STDOUT: "STDOUT",
         STDERR: "STDERR", STEP: "STEP", RESULT: "RESULT", MANIFEST: "MANIFEST", CREDIT: "CREDIT"}


class ProtocolError(VmisoError):
    """The other side broke the protocol (a frame too large, of the wrong type, a bad header)."""


class LinkLost(VmisoError):
    """The stream ended (or could not be written) before the exchange was over."""


class Reader:
    """Frames read from a file descriptor, each bounded before it is read."""

    def __init__(self, fd: int, peer: str) -> None:
        self._fd = fd
        self.peer = peer  # named in errors: "node HOST", "the client"

    def _exactly(self, count: int, *, at_start: bool = False) -> bytes | None:
        parts: list[bytes] = []
        left = count
        while left:
            block = os.read(self._fd, min(left, CHUNK))
            if not block:
                if at_start and left == count:
                    return None
                raise LinkLost(f"the link to {self.peer} was lost in the middle of a frame")
            parts.append(block)
            left -= len(block)
        return b"".join(parts)

    def read(self) -> tuple[int, bytes] | None:
        """The next frame (type, payload); None at end of file between frames."""
        head = self._exactly(_HEAD.size, at_start=True)
        if head is None:
            return None
        kind, length = _HEAD.unpack(head)
        if kind not in NAMES:
            raise ProtocolError(f"{self.peer} sent a frame of unknown type {kind}")
        if length > MAX_FRAME:
            raise ProtocolError(f"{self.peer} sent a frame of {length} bytes; at most {MAX_FRAME} are allowed")
        payload = self._exactly(length) if length else b""
        assert payload is not None
        return kind, payload

    def expect(self, *kinds: int) -> tuple[int, bytes]:
        """The next frame, which must be one of ``kinds`` (an ERROR is raised as the peer's error)."""
        frame = self.read()
        if frame is None:
            raise LinkLost(f"the link to {self.peer} was lost")
        kind, payload = frame
        if kind == ERROR and ERROR not in kinds:
            raise peer_error(payload, self.peer)
        if kind not in kinds:
            wanted = " or ".join(NAMES[k] for k in kinds)
            raise ProtocolError(f"{self.peer} sent {NAMES[kind]} where {wanted} was due")
        return kind, payload


class Writer:
    """Frames written whole to a file descriptor, from any thread."""

    def __init__(self, fd: int, peer: str) -> None:
        self._fd = fd
        self.peer = peer
        self._lock = threading.Lock()
        self.lost = False

    def send(self, kind: int, payload: bytes = b"") -> None:
        assert len(payload) <= MAX_FRAME, len(payload)
        data = memoryview(_HEAD.pack(kind, len(payload)) + payload)
        with self._lock:
            if self.lost:
                raise LinkLost(f"the link to {self.peer} was lost")
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError:
                self.lost = True
                raise LinkLost(f"the link to {self.peer} was lost") from None

    def send_json(self, kind: int, value: dict[str, Any]) -> None:
        self.send(kind, json.dumps(value).encode())

    def send_data(self, kind: int, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            self.send(kind, data[start:start + CHUNK])


def header(payload: bytes, peer: str, what: str) -> dict[str, Any]:
    """A JSON header: an object, at most MAX_JSON bytes; ProtocolError otherwise."""
    if len(payload) > MAX_JSON:
        raise ProtocolError(f"{peer} sent a {what} of {len(payload)} bytes; at most {MAX_JSON} are allowed")
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{peer} sent a {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{peer} sent a {what} that is not a JSON object")
    return value


def field(value: dict[str, Any], key: str, kind: type | tuple[type, ...], peer: str, what: str) -> Any:
    """``value[key]``, which must be of ``kind`` (bool is no int here); ProtocolError otherwise."""
    found = value.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(found, kinds) or (isinstance(found, bool) and bool not in kinds):
        raise ProtocolError(f"{peer} sent a {what} whose {key!r} is not {' or '.join(k.__name__ for k in kinds)}")
    return found


def hello() -> dict[str, Any]:
    return {"protocol": VERSION, "vmiso": __version__}


def check_hello(payload: bytes, peer: str) -> dict[str, Any]:
    """The peer's HELLO; VmisoError naming both versions when they do not agree."""
    theirs = header(payload, peer, "hello")
    version, vmiso = theirs.get("protocol"), theirs.get("vmiso")
    if version != VERSION:
        raise VmisoError(f"{peer} speaks vmiso's node protocol {version!r} (vmiso {vmiso!r}); this vmiso "
                         f"{__version__} speaks protocol {VERSION}",
                         "install the same vmiso version on both sides")
    return theirs


def error_frame(writer: Writer, err: VmisoError) -> None:
    writer.send_json(ERROR, {"message": err.message, "hint": err.hint, "exit_code": err.exit_code})


def peer_error(payload: bytes, peer: str) -> VmisoError:
    """The error an ERROR frame carries, as the peer's (its exit code kept when it is one of vmiso's own)."""
    return error_from(header(payload, peer, "error"), peer)


def error_from(value: dict[str, Any], peer: str) -> VmisoError:
    """An error as the peer described it: its words, quoted as the peer's, never more than its exit code."""
    message = value.get("message")
    hint = value.get("hint")
    error = VmisoError(f"{peer}: {message[:4000] if isinstance(message, str) else 'an error without a message'}",
                       hint[:4000] if isinstance(hint, str) else None)
    code = value.get("exit_code")
    if code in (124, 125, 130):
        error.exit_code = code
    return error
