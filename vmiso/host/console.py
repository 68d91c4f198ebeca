"""What a guest writes into a file on the host: its console log, a step's log in a share.

One reader for all of them (provisioning follows its guest's steps with it; a warm
state's build waits with it for ssh-link to say it is ready).  The guest chose
every byte: the file is opened without following a link and read only if it is a
regular file, a poll reads at most ``read_max`` bytes, and a line longer than
LINE_MAX_BYTES is cut (what vmiso looks for in a line is short).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

LINE_MAX_BYTES = 64 * 1024


class GuestLog:
    """The lines a guest adds to ``path``, a poll at a time."""

    def __init__(self, path: Path, read_max: int = -1) -> None:
        self.path = path
        self.read_max = read_max  # bytes per poll; -1: all there is
        self._offset = 0
        self._partial = b""

    def _read(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return b""
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            f.seek(self._offset)
            return f.read(self.read_max)

    def lines(self) -> list[bytes]:
        """The complete lines written since the last poll."""
        data = self._read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-LINE_MAX_BYTES:]
        return lines

    @property
    def partial(self) -> bytes:
        """The line being written: what came after the last newline so far."""
        return self._partial
