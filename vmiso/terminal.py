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


def _erases_scrollback(parameters: str) -> bool:
    """Whether an erase (final ``J``) with these parameters reaches the scrollback: a 3 among
    them, however written (``03``, ``3;0``, ``?3``), as terminals read them."""
    return any(int(number) == 3 for number in re.findall(r"\d+", parameters))


class InteractiveFilter:
    """For an interactive session on a pseudo-terminal (``vmiso shell``, ``run -t``).

    A shell or an editor needs the terminal's escape sequences, so this parses the
    stream as a terminal does (UTF-8 characters, not bytes) and passes only what
    acts on the session's own screen: text, C0 controls, CSI sequences (colours,
    cursor, erasing, modes) and two-character ESC sequences.  It drops what could
    reach beyond the screen: OSC (window title, clipboard writes with OSC 52,
    hyperlinks; ended by BEL or ST), DCS (including tmux's passthrough), SOS, PM
    and APC strings (ended by ST), C1 controls (U+0080-U+009F), CSI window
    operations (final ``t``: moving, resizing, title reports), the erasing of
    the terminal's scrollback (``CSI 3 J`` in any spelling: ``CSI 03 J``,
    ``CSI 3;0 J``, ``CSI ? 3 J``), the full reset (``ESC c``, which clears the
    scrollback too) and screen's and tmux's title strings (``ESC k ... ESC \\``).  As a terminal does, ESC anywhere
    starts a new sequence and CAN or SUB cancels one, so a sequence cannot be
    smuggled through a half-finished one.  Stateful across writes.
    """

    _NORMAL, _ESC, _CSI, _STRING, _STRING_ESC = range(5)
    _STRINGS = frozenset("]PX^_k")  # after ESC: OSC, DCS, SOS, PM, APC; screen's title
    _DROPPED_ESC = frozenset("c")  # RIS, the full reset: it erases the scrollback
    _CANCEL = frozenset("\x18\x1a")  # CAN, SUB
    _CSI_MAX = 64  # parameter and intermediate characters; a longer CSI is dropped
    # The modes a full-screen program may leave on, turned off when the session ends:
    # soft reset, colours, cursor, alternate screen, mouse and focus reporting and
    # their encodings, bracketed paste, the kitty keyboard protocol, modifyOtherKeys
    # and the line-drawing character set.
    RESET = (b"\x1b[!p\x1b[0m\x1b[?25h\x1b[?1049l\x1b[?9l\x1b[?1000l\x1b[?1002l\x1b[?1003l"
             b"\x1b[?1004l\x1b[?1005l\x1b[?1006l\x1b[?1015l\x1b[?2004l\x1b[<99u\x1b[>4m\x1b(B")

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._state = self._NORMAL
        self._csi = ""  # the CSI sequence's characters so far
        self._osc = False  # the open string is an OSC, which BEL may also end

    def write(self, data: bytes) -> int:
        out: list[str] = []
        for char in self._decoder.decode(data):
            self._feed(char, out)
        self._raw.write("".join(out).encode())
        return len(data)

    def _feed(self, char: str, out: list[str]) -> None:
        code = ord(char)
        state = self._state
        if char in self._CANCEL:
            self._state = self._NORMAL
            return
        if state in (self._STRING, self._STRING_ESC):
            if (state == self._STRING_ESC and char == "\\") or code == 0x9C or (char == "\x07" and self._osc):
                self._state = self._NORMAL  # ST (ESC \ or U+009C), or BEL ending an OSC
            elif state == self._STRING_ESC:
                self._state = self._ESC  # ESC inside a string ends it and starts a sequence
                self._feed(char, out)
            elif char == "\x1b":
                self._state = self._STRING_ESC
            return  # everything inside a control string is dropped
        if char == "\x1b":
            self._state = self._ESC  # anything half-finished is abandoned
            return
        if 0x80 <= code <= 0x9F:
            self._state = self._NORMAL  # C1 controls: never passed on
            return
        if state == self._ESC:
            if char == "[":
                self._state, self._csi = self._CSI, ""
            elif char in self._STRINGS:
                self._state, self._osc = self._STRING, char == "]"
            elif char == "\\":
                self._state = self._NORMAL  # a stray ST: it ends nothing
            elif 0x20 <= code <= 0x7E:
                if char not in self._DROPPED_ESC:
                    out.append("\x1b" + char)
                self._state = self._NORMAL
            else:  # a control or a non-ASCII character ends the escape; it is itself handled
                self._state = self._NORMAL
                self._feed(char, out)
            return
        if state == self._CSI:
            if 0x20 <= code <= 0x3F:
                self._csi += char
                if len(self._csi) > self._CSI_MAX:
                    self._state = self._NORMAL
            elif 0x40 <= code <= 0x7E:
                self._state = self._NORMAL
                if char != "t" and not (char == "J" and _erases_scrollback(self._csi)):
                    out.append("\x1b[" + self._csi + char)
            else:  # not a CSI a terminal would finish: dropped, the character handled
                self._state = self._NORMAL
                self._feed(char, out)
            return
        out.append(char)

    def flush(self) -> None:
        self._raw.flush()

    def finish(self) -> None:
        """The session is over: leave the terminal in its ordinary modes."""
        self._raw.write(self.RESET)
        self._raw.flush()
