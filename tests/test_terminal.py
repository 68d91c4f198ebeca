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
