"""What a pool and a run say to each other: one JSON object a message, descriptors beside it.

Both ends are processes of one user, on a Unix socket in that user's private
pool directory; each end still checks the other's uid (SO_PEERCRED) and reads
nothing larger than MAX_MESSAGE.  The conversation of a hand-out (see
vmiso.clones.pool):

    run  -> pool   {"op": "take", "key": PoolKey}
    pool -> run    {"clone": DIR, "name": DOMAIN} + (the slot's lock, [the open link])
                   or {"none": WHY}
    run  -> pool   {"taken": true}
    pool -> run    {"yours": true}

and the two questions a user asks: ``{"op": "status"}`` (answered with the pool's
status) and ``{"op": "stop"}`` (answered with ``{"stopping": true}``; the pool
closes the connection once its clones are gone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from ...plan import RunPlan
from ..warm import WarmKey

TAKE_WAIT = 5.0  # how long a run waits for a clone the pool is restoring
ANSWER_SECONDS = 10.0  # for either side to answer during a hand-out
MAX_MESSAGE = 65536
CLONE_PREFIX = "pool-"  # a pool's clone directories in the user's runs


@dataclass(frozen=True)
class PoolKey:
    """What a clone must match for a run to take it."""

    warm: WarmKey
    output_max_bytes: int
    output_max_files: int
    libvirt_uri: str  # a run on another connection could neither guard nor destroy the clone

    @classmethod
    def for_plan(cls, plan: RunPlan, warm: WarmKey) -> PoolKey:
        """The key of a run of ``plan`` whose clone must match ``warm``."""
        return cls(warm, plan.output_max_bytes, plan.output_max_files, plan.libvirt_uri)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def send(conn: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [frame], list(fds))
    else:
        conn.sendall(frame)


def receive(conn: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One message; EOFError when the other side closed, ValueError for one that is not ours."""
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE + 4, max_fds)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        if len(data) > MAX_MESSAGE + 4:
            break
        more = conn.recv(MAX_MESSAGE + 4 - len(data))
        if not more:
            for fd in fds:
                os.close(fd)
            raise EOFError
        data += more
    (length,) = struct.unpack("!I", data[:4])
    try:
        if length > MAX_MESSAGE or len(data) != 4 + length:
            raise ValueError("a message of the wrong length")
        try:
            message = json.loads(data[4:])
        except RecursionError:
            raise ValueError("a message nested too deeply") from None
        if not isinstance(message, dict):
            raise ValueError("a message that is not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def same_user(conn: socket.socket) -> bool:
    """The other end is a process of this user (the socket's directory is private already)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())
