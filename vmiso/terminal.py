"""Bytes from the guest, made safe for the analyst's terminal.

A terminal obeys escape sequences: a job (or a file name it chose) that prints
them can retitle the window, rewrite what is on the screen, hide text, or on some
terminals answer back into the shell.  What vmiso shows on a terminal therefore
passes through here, as ``qvm-run`` does by default: control characters become
caret notation (ESC -> ``^[``), C1 controls, bidirectional overrides and line
separators become ``<U+XXXX>``, invalid UTF-8 becomes U+FFFD.  Tabs and newlines
stay.  Pipes and files get the job's bytes unchanged (``vmiso run --raw`` also
passes them to a terminal unchanged).
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from typing import BinaryIO

# Unicode categories a terminal acts on or that hide or reorder text: controls
# (C0, DEL, C1), format characters (bidi overrides and isolates, zero-width
# joiners and spaces, soft hyphen, BOM, tag characters), line and paragraph
# separators, private-use, unassigned and surrogate code points.
_SHOWN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs"}
# Everything but tab, newline and printable ASCII: only these runs are examined.
_CANDIDATES = re.compile(r"[^\t\n\x20-\x7e]+")


def _shown(char: str) -> str:
    code = ord(char)
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    if unicodedata.category(char) in _SHOWN_CATEGORIES:
        return f"<U+{code:04X}>"
    return char


def neutralize(text: str) -> str:
    """``text`` with every character a terminal would act on made visible instead."""
    return _CANDIDATES.sub(lambda run: "".join(map(_shown, run.group())), text)


class SafeStream:
    """A binary stream that neutralizes what it writes (for stdout/stderr on a terminal).

    Decoding is incremental, so a UTF-8 character split across two writes survives.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> int:
        self._raw.write(neutralize(self._decoder.decode(data)).encode())
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def finish(self) -> None:
        """The end of the stream: a character cut short by it is shown as U+FFFD."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._raw.write(neutralize(tail).encode())
        self._raw.flush()


def for_terminal(stream: BinaryIO, *, is_terminal: bool, raw: bool) -> BinaryIO | SafeStream:
    """The stream a job's output should go to: neutralized on a terminal unless ``raw``."""
    return stream if raw or not is_terminal else SafeStream(stream)
