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


class InteractiveFilter:
    """For an interactive session on a pseudo-terminal (``vmiso shell``, ``run -t``).

    A shell or an editor needs the terminal's escape sequences: CSI sequences
    (colours, cursor movement, screen modes) and two-character ESC sequences pass.
    What could reach beyond the session's own screen is dropped: OSC (window title,
    clipboard writes with OSC 52, hyperlinks; ended by BEL or ST), DCS (including
    tmux's passthrough), SOS, PM and APC strings (ended by ST only), and C1 controls encoded in UTF-8 (U+0080-U+009F,
    which some terminals obey as 8-bit controls).  Stateful across writes.
    """

    _NORMAL, _ESC, _CSI, _STRING, _STRING_ESC, _C2 = range(6)
    # After ESC: what opens a control string, dropped with it up to BEL or ST.
    _STRINGS = frozenset(b"]PX^_")
    # The modes a full-screen program may leave on, turned off when the session ends.
    RESET = b"\x1b[0m\x1b[?25h\x1b[?1049l\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?2004l"

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._state = self._NORMAL
        self._osc = False  # the open string is an OSC, which BEL may also end

    def write(self, data: bytes) -> int:
        out = bytearray()
        for byte in data:
            state = self._state
            if state == self._NORMAL:
                if byte == 0x1B:
                    self._state = self._ESC
                elif byte == 0xC2:
                    self._state = self._C2
                else:
                    out.append(byte)
            elif state == self._C2:
                self._state = self._NORMAL
                if not 0x80 <= byte <= 0x9F:  # U+0080-U+009F: dropped; anything else kept
                    out += bytes((0xC2, byte))
            elif state == self._ESC:
                if byte in self._STRINGS:
                    self._state = self._STRING
                    self._osc = byte == ord("]")
                elif byte == ord("["):
                    out += b"\x1b["
                    self._state = self._CSI
                else:
                    out += bytes((0x1B, byte))
                    self._state = self._NORMAL
            elif state == self._CSI:
                out.append(byte)
                if 0x40 <= byte <= 0x7E:
                    self._state = self._NORMAL
            elif state == self._STRING:
                if byte == 0x07 and self._osc:
                    self._state = self._NORMAL
                elif byte == 0x1B:
                    self._state = self._STRING_ESC
            else:  # _STRING_ESC
                self._state = self._NORMAL if byte == ord("\\") else self._STRING
        self._raw.write(bytes(out))
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def finish(self) -> None:
        """The session is over: leave the terminal in its ordinary modes."""
        self._raw.write(self.RESET)
        self._raw.flush()
