"""vmiso on a terminal: shell completion, and live progress that stays plain on a pipe."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from vmiso.cli import _Progress, _Session, _setup_logging
from vmiso.image.provision import ConsoleWatcher, guest_activity
from vmiso.progress import Steps
from vmiso.terminal import InteractiveFilter

VMISO_BIN = Path(sys.executable).parent / "vmiso"
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # anything but printable text and newlines


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _complete(var: str, **env: str) -> str:
    done = subprocess.run([str(VMISO_BIN)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **{"_VMISO_COMPLETE": var}, **env))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bash_completion_completes_commands_in_a_real_bash():
    script = _complete("bash_source")
    assert "complete -o nosort -F _vmiso_completion vmiso" in script
    # What the README tells a user to put in ~/.bashrc, then a <TAB> after 'vmiso images '.
    bash = ('eval "$(_VMISO_COMPLETE=bash_source vmiso)"\n'
            'COMP_WORDS=(vmiso images ""); COMP_CWORD=2; _vmiso_completion vmiso\n'
            'echo "${COMPREPLY[*]}"\n')
    done = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PATH=f"{VMISO_BIN.parent}:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["audit", "diff", "rm", "sbom", "show", "verify", "warm"]
    assert _complete("bash_complete", COMP_WORDS="vmiso pro", COMP_CWORD="1").split() == ["plain,provision"]


def test_zsh_completion_script():
    script = _complete("zsh_source")
    assert script.startswith("#compdef vmiso") and "_VMISO_COMPLETE=zsh_complete" in script


def _events(printer: _Progress) -> None:
    printer("start", "boot", "networked provisioning VM, cloud-init", 1.0)
    printer("status", "boot", "starting cloud-init.service", 2.0)
    printer("done", "boot", "", 3.0)
    printer("start", "pip", "inside the VM", 3.0)
    printer("status", "pip", "collecting tabulate==0.9.0", 4.0)
    printer("note", "pip", "a note", 5.0)
    printer("fail", "pip", "", 6.0)


PLAIN = ("[    1.0s] boot: networked provisioning VM, cloud-init\n"
         "[    3.0s] pip: inside the VM\n"
         "[    5.0s] pip: a note\n"
         "[    6.0s] pip FAILED\n")


def test_progress_on_a_pipe_is_plain_timestamped_lines():
    for live in (False, True):
        stream = FakeStream(tty=False)
        with _Progress(quiet=False, live=live, stream=stream, interval=0.01) as printer:
            _events(printer)
            time.sleep(0.05)
        assert stream.getvalue() == PLAIN  # no status, no control characters
    quiet = FakeStream(tty=True)
    with _Progress(quiet=True, live=True, stream=quiet) as printer:
        _events(printer)
    assert quiet.getvalue() == ""


def test_progress_on_a_dumb_terminal_is_plain(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    stream = FakeStream(tty=True)
    with _Progress(quiet=False, live=True, stream=stream, interval=0.01) as printer:
        _events(printer)
        time.sleep(0.05)
    assert stream.getvalue() == PLAIN


def test_progress_on_a_terminal_shows_a_live_status_line(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream = FakeStream(tty=True)
    with _Progress(quiet=False, live=True, stream=stream, interval=0.05) as printer:
        printer("start", "boot", "networked provisioning VM, cloud-init", 1.0)
        printer("status", "boot", "starting cloud-init.service", 2.0)
        time.sleep(1.2)  # the clock moves on without any event
        printer("done", "boot", "", 3.0)
        printer("start", "pip", "inside the VM", 3.0)
        printer("status", "pip", "collecting tabulate==0.9.0", 4.0)
        during = stream.getvalue()
    out = stream.getvalue()
    assert "\r\x1b[K" in out
    assert "  boot 0:00  starting cloud-init.service" in during
    assert "  boot 0:01  starting cloud-init.service" in during
    assert during.endswith("  pip 0:00  collecting tabulate==0.9.0")
    assert out.endswith("\r\x1b[K")  # erased when the command ends
    # What remains on screen once each status line is erased: the plain lines.
    screen = "\n".join(re.sub(r"^.*\r\x1b\[K", "", line) for line in out.split("\n"))
    assert screen.splitlines() == ["[    1.0s] boot: networked provisioning VM, cloud-init",
                                   "[    3.0s] pip: inside the VM"]


def test_a_log_message_erases_the_status_line_first(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream = FakeStream(tty=True)
    monkeypatch.setattr(sys, "stderr", stream)
    _setup_logging(0, False)
    with _Progress(quiet=False, live=True, stream=stream, interval=60) as printer:
        printer("start", "warm", "boot and save warm slot 1 of 2", 1.0)
        logging.getLogger("vmiso.test").warning("no warm state")
    assert "  warm 0:00\r\x1b[Kvmiso: WARNING: no warm state\n" in stream.getvalue()
    assert not logging.getLogger().handlers[0].filters


def test_progress_shows_control_characters_never_sends_them(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    for tty in (False, True):
        stream = FakeStream(tty=tty)
        with _Progress(quiet=False, live=True, stream=stream, interval=60) as printer:
            printer("note", "cloud-image", "kernel 6.1\x1b]0;owned\x07", 1.0)
            printer("start", "pip", "", 1.0)
            printer("status", "pip", "collecting \x1b[2Jx", 1.0)
        assert "kernel 6.1^[]0;owned^G\n" in stream.getvalue()
        assert "\x1b]" not in stream.getvalue() and "\x1b[2J" not in stream.getvalue()
        assert ("collecting ^[[2Jx" in stream.getvalue()) == tty


def test_steps_status_reaches_the_listener_only():
    seen = []
    steps = Steps(lambda *event: seen.append(event[:3]))
    steps.status("pip", "collecting x")
    assert seen == [("status", "pip", "collecting x")] and steps.timings == {}


def test_guest_activity_from_console_and_step_logs():
    assert guest_activity("\x1b[0;1;39m         Starting \x1b[0;1;39mcloud-init.service\x1b[0m - Initial "
                          "cloud-init job (metadata service crawler)...") == \
        "starting cloud-init.service - Initial cloud-init job (metadata service crawler)"
    # Bytes from a real console: systemd shortened the name, mangling its colour codes; the kernel
    # log line before it has the whole name.
    shortened = b"         Starting \x1b[0;1;39msystemd-udev-trig\xe2\x80\xa6[0m - Coldplug All udev Devices...\r"
    assert guest_activity(shortened.decode()) is None
    assert guest_activity("[   16.036972] systemd[1]: Starting systemd-udev-trigger.service - Coldplug All udev "
                          "Devices...") == "starting systemd-udev-trigger.service - Coldplug All udev Devices"
    assert guest_activity("Cloud-init v. 22.4.2 running 'modules:final' at Fri, 27 Nov 2026") == \
        "cloud-init modules:final"
    assert guest_activity("Collecting tabulate==0.9.0 (from -r /var/lib/vmiso/requirements.txt (line 1))") \
        == "collecting tabulate==0.9.0"
    assert guest_activity("  Downloading tabulate-0.9.0-py3-none-any.whl (35 kB)") == \
        "downloading tabulate-0.9.0-py3-none-any.whl"
    assert guest_activity("Installing collected packages: tabulate") == "installing tabulate"
    assert guest_activity("Get:3 http://deb.debian.org/debian bookworm/main amd64 tini amd64 0.19.0-1 [255 kB]") \
        == "downloading tini"
    assert guest_activity("Setting up tini (0.19.0-1) ...") == "setting up tini"
    assert guest_activity("Successfully installed tabulate-0.9.0") is None
    # Guest-chosen bytes never reach a terminal as control characters.
    hostile = guest_activity("Collecting evil\x1b]0;owned\x07\x1b[2J" + "x" * 500)
    assert not CONTROL.search(hostile) and len(hostile) <= 120


def test_console_watcher_reports_markers_and_the_latest_activity(tmp_path):
    log = tmp_path / "pip.log"
    watcher = ConsoleWatcher(log)
    assert watcher.poll() == [] and watcher.activity is None  # not written yet
    log.write_bytes(b"Collecting a==1\nVMISO-STEP pip\nCollecting b==2\nColl")
    assert watcher.poll() == [("STEP", "pip")] and watcher.activity == "collecting b==2"
    with open(log, "ab") as f:
        f.write(b"ecting c==3\n")
    assert watcher.poll() == [] and watcher.activity == "collecting c==3"
    capped = ConsoleWatcher(log, read_max=16)  # a step log is read a bounded piece at a time
    assert capped.poll() == [] and capped.activity == "collecting a==1"
    assert capped.poll() == [("STEP", "pip")]
    link = tmp_path / "link.log"
    link.symlink_to(log)
    followed = ConsoleWatcher(link)
    assert followed.poll() == [] and followed.activity is None


def test_third_party_log_lines_are_escaped_too(monkeypatch):
    # paramiko logs what a hostile sshd sent as its banner; it must not reach the terminal raw.
    stream = FakeStream(tty=True)
    monkeypatch.setattr(sys, "stderr", stream)
    _setup_logging(0, False)
    logging.getLogger("paramiko.transport").error('Indecipherable protocol version "\x1b]0;OWNED\x07"')
    assert "^[]0;OWNED^G" in stream.getvalue() and "\x1b" not in stream.getvalue()


def _job_events(printer: _Progress) -> None:
    printer("start", "verify", "template sha256", 0.1)
    printer("done", "verify", "", 0.2)
    printer("start", "connect", "SSH over the virtio-serial link", 0.2)


def test_a_job_shows_one_status_line_until_it_starts_and_nothing_after(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream = FakeStream(tty=True)
    with _Progress(quiet=False, live=True, stream=stream, interval=0.05, lines=False, last=("exec",)) as printer:
        _job_events(printer)
        time.sleep(0.2)
        before = stream.getvalue()
        printer.message("vmiso: the job's port 8888 is at 127.0.0.2:4000")
        printer("done", "connect", "", 1.0)
        printer("start", "exec", "python job.py", 1.0)
        started = stream.getvalue()
        time.sleep(0.3)  # the job runs: the ticker draws nothing over its output
        printer("done", "exec", "", 2.0)
        printer("start", "teardown", "destroy the VM", 2.0)
        time.sleep(0.2)
    assert before.endswith("  connect 0:00") and "\n" not in before  # no step lines without -v
    assert "\r\x1b[Kvmiso: the job's port 8888 is at 127.0.0.2:4000\n  connect 0:00" in started
    assert started.endswith("\r\x1b[K")  # erased as the job starts
    assert stream.getvalue() == started  # and never drawn again


def test_a_job_on_a_pipe_shows_no_progress_unless_asked(monkeypatch):
    for lines, expected in ((False, ""), (True, "[    0.1s] verify: template sha256\n"
                                                "[    0.2s] connect: SSH over the virtio-serial link\n")):
        stream = FakeStream(tty=False)
        with _Progress(quiet=False, live=True, stream=stream, interval=0.01, lines=lines, last=("exec",)) as printer:
            _job_events(printer)
            time.sleep(0.05)
        assert stream.getvalue() == expected


def test_a_job_on_a_terminal_has_it_raw_while_it_runs_and_gives_it_back_as_it_was(monkeypatch):
    """vmiso shell on a real pseudo-terminal: raw while the job runs (Ctrl-C is the job's), then
    the terminal's own modes back, and what was typed for the job but not read discarded."""
    master, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    own_modes = termios.tcgetattr(secondary)
    events: list[tuple] = []
    with open(secondary, closefd=False) as stdin, open(secondary, "w", closefd=False) as stdout:
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys, "stdout", stdout)
        session = _Session.for_job(tty=True, raw=False)
        assert isinstance(session.stdout, InteractiveFilter) and session.stderr is session.stdout
        assert session.terminal is not None and session.terminal.size() == (100, 30)
        listen = session.around(lambda *event: events.append(event))
        with session:
            listen("start", "connect", "SSH", 0.5)
            assert termios.tcgetattr(secondary) == own_modes  # not before the job runs
            listen("start", "exec", "bash", 1.0)
            modes = termios.tcgetattr(secondary)
            assert not modes[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw: Ctrl-C is a byte
            os.write(master, b"typed ahead, never read\n")
            # The pty hands the bytes to its line discipline asynchronously: wait until they are there.
            assert select.select([secondary], [], [], 5)[0] == [secondary]
            listen("done", "exec", "", 2.0)
            assert termios.tcgetattr(secondary) == own_modes
        monkeypatch.undo()
    readable, _, _ = select.select([secondary], [], [], 0.3)
    assert readable == []  # discarded: it never reaches the shell
    assert [event[:2] for event in events] == [("start", "connect"), ("start", "exec"), ("done", "exec")]
    os.close(master)
    os.close(secondary)
