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
from typing import BinaryIO

KEEP = {"\t", "\n"}
# Format characters that reorder or break lines: bidi embeddings, overrides and
# isolates, the implicit marks, and the Unicode line and paragraph separators.
_VISIBLE = {0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _shown(char: str) -> str:
    code = ord(char)
    if char in KEEP:
        return char
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    if 0x80 <= code < 0xA0 or code in _VISIBLE:
        return f"<U+{code:04X}>"
    return char


def neutralize(text: str) -> str:
    """``text`` with every character a terminal would act on made visible instead."""
    return "".join(_shown(c) for c in text)


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
