import io

from vmiso.terminal import SafeStream, for_terminal, neutralize


def test_escape_sequences_are_shown_not_obeyed():
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\rover\x08\x7f"
    assert neutralize(hostile) == "^[]0;owned^G^[[2J^[[31mred^Mover^H^?"


def test_tabs_newlines_and_ordinary_text_stay():
    text = "a\tb\nnaïve ✓ 日本\n"
    assert neutralize(text) == text


def test_c1_bidi_and_line_separators_are_made_visible():
    # U+202E turns "exe.txt" visually into "txt.exe"; U+009B is an 8-bit CSI.
    assert neutralize("report\u202etxt.exe") == "report<U+202E>txt.exe"
    assert neutralize("\u009b31m\u2028\u2066x\u2069") == "<U+009B>31m<U+2028><U+2066>x<U+2069>"


def test_safe_stream_keeps_utf8_split_across_writes_and_replaces_invalid_bytes():
    raw = io.BytesIO()
    stream = SafeStream(raw)
    data = "✓ ok\x1b[0m\n".encode()
    for i in range(len(data)):  # one byte at a time
        stream.write(data[i:i + 1])
        stream.flush()
    stream.write(b"\xff\xfe end \xe2\x9c")  # invalid bytes, then a cut-short character
    stream.finish()
    assert raw.getvalue().decode() == "✓ ok^[[0m\n\ufffd\ufffd end \ufffd"


def test_pipes_and_raw_get_the_bytes_unchanged():
    raw = io.BytesIO()
    assert for_terminal(raw, is_terminal=False, raw=False) is raw
    assert for_terminal(raw, is_terminal=True, raw=True) is raw
    assert isinstance(for_terminal(raw, is_terminal=True, raw=False), SafeStream)


def test_invisible_and_unassigned_characters_are_made_visible():
    for char in ("\u200b", "\u200d", "\u2060", "\ufeff", "\u180e", "\u00ad", "\ufff9", "\U000e0041",
                 "\ue000", "\U0010ffff", "\udc9b"):
        assert neutralize(f"a{char}b") == f"a<U+{ord(char):04X}>b", hex(ord(char))
    assert neutralize("émoji ✓ 🙂 ") == "émoji ✓ 🙂 "


def test_fast_enough_for_a_job_that_prints_a_lot():
    import time
    text = ("log line 12345 with some ascii text and a tab\there\n" * 20000) + "naïve ✓\n" * 20000
    started = time.monotonic()
    assert neutralize(text) == text
    assert time.monotonic() - started < 1.0  # about 1.4 MB


def test_an_interactive_session_keeps_its_screen_control_but_not_more():
    from vmiso.terminal import InteractiveFilter

    raw = io.BytesIO()
    screen = InteractiveFilter(raw)
    session = (b"\x1b[1;31mred\x1b[0m \x1b[2J\x1b[H\x1b7x\x1b8"  # colours, clear, cursor: kept
               b"\x1b]0;owned title\x07"  # window title: dropped
               b"\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x1b\\"  # clipboard write, ST-terminated: dropped
               b"\x1bPtmux;\x1b\x1b]0;x\x07\x1b\\"  # tmux passthrough (DCS): dropped
               b"\xc2\x9b31m \xc2\xa9 ok\n")  # C1 CSI in UTF-8 dropped; (c) sign kept
    for i in range(len(session)):  # state carries across writes
        screen.write(session[i:i + 1])
    assert raw.getvalue() == b"\x1b[1;31mred\x1b[0m \x1b[2J\x1b[H\x1b7x\x1b831m \xc2\xa9 ok\n"
    screen.finish()
    assert raw.getvalue().endswith(InteractiveFilter.RESET)


def test_sequences_cannot_be_smuggled_through_half_finished_ones():
    from vmiso.terminal import InteractiveFilter

    attempts = [
        b"\x1b\x1b]52;c;aGk=\x07",  # ESC ESC: the second ESC starts the OSC
        b"\x1b[\x1b]52;c;aGk=\x07",  # ESC inside a CSI
        b"\x1b[1\x18\x1b]0;x\x07",  # CAN cancels the CSI, then an OSC
        b"\xc2\x1b]0;pwned\x07",  # a UTF-8 lead byte before ESC
        b"\xc2\xc2\x9d0;x\x07",  # U+009D: OSC as a C1 control
        b"\x9d0;x\x07",  # a raw 8-bit C1 byte
        b"\x1bP1$r\x1b\\",  # DCS (an answerback request)
        b"\x1b[9t\x1b[21t\x1b[3J",  # window operations, title report, scrollback erase
        b"\x1b[" + b"1;" * 100 + b"m",  # an endless CSI
    ]
    for attempt in attempts:
        for pieces in ([attempt], [attempt[i:i + 1] for i in range(len(attempt))]):
            raw = io.BytesIO()
            screen = InteractiveFilter(raw)
            for piece in pieces:
                screen.write(piece)
            shown = raw.getvalue().decode()
            assert "\x1b]" not in shown and "\x1bP" not in shown, (attempt, shown)
            assert "\x1b[9t" not in shown and "\x1b[21t" not in shown, (attempt, shown)
            assert not any(0x80 <= ord(c) <= 0x9F for c in shown), (attempt, shown)
            assert "\x1b[3J" not in shown and not shown.startswith("\x1b[1;1;1;"), (attempt, shown)


def test_no_spelling_of_the_scrollback_erase_or_full_reset_and_no_screen_title_passes():
    from vmiso.terminal import InteractiveFilter

    dropped = [b"\x1b[3J", b"\x1b[03J", b"\x1b[3;0J", b"\x1b[0;3J", b"\x1b[?3J", b"\x1b[003J",
               b"\x1bc", b"\x1bkowned title\x1b\\"]
    for sequence in dropped:
        for pieces in ([sequence], [sequence[i:i + 1] for i in range(len(sequence))]):
            raw = io.BytesIO()
            screen = InteractiveFilter(raw)
            for piece in [b"a", *pieces, b"b"]:
                screen.write(piece)
            assert raw.getvalue() == b"ab", (sequence, raw.getvalue())
    raw = io.BytesIO()
    screen = InteractiveFilter(raw)
    screen.write(b"\x1b[J\x1b[2J\x1b[1J\x1b[?2J\x1b[13J")  # erasing the screen is the session's own
    assert raw.getvalue() == b"\x1b[J\x1b[2J\x1b[1J\x1b[?2J\x1b[13J"
