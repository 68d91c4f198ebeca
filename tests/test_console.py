"""The one reader of what a guest writes into a host file (its console log, a step's log)."""

from __future__ import annotations

import os

from vmiso.host.console import LINE_MAX_BYTES, GuestLog


def test_lines_come_a_poll_at_a_time_and_the_line_being_written_waits(tmp_path):
    path = tmp_path / "console.log"
    log = GuestLog(path)
    assert log.lines() == [] and log.partial == b""  # not there yet
    path.write_bytes(b"one\ntw")
    assert log.lines() == [b"one"] and log.partial == b"tw"
    with open(path, "ab") as f:
        f.write(b"o\nthree\n")
    assert log.lines() == [b"two", b"three"] and log.partial == b""
    assert log.lines() == []


def test_a_link_or_a_fifo_is_never_read_and_a_long_line_is_cut(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"host's own\n")
    (tmp_path / "link").symlink_to(secret)
    assert GuestLog(tmp_path / "link").lines() == []
    os.mkfifo(tmp_path / "fifo")
    assert GuestLog(tmp_path / "fifo").lines() == []
    (tmp_path / "long").write_bytes(b"x" * (3 * LINE_MAX_BYTES) + b"VMISO-STEP pip")
    log = GuestLog(tmp_path / "long", read_max=LINE_MAX_BYTES)
    for _ in range(4):
        log.lines()
    assert len(log.partial) == LINE_MAX_BYTES and log.partial.endswith(b"VMISO-STEP pip")
