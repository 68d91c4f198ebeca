"""vmiso.ssh against a real SSH server: paramiko's own, in this process, on a Unix socket.

The server plays a guest's sshd: it checks the client key, runs "commands" from a
small script table, and reports their end as sshd does (exit-status or exit-signal).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from vmiso import ssh
from vmiso.errors import GuestError


def keypair(directory: Path, name: str) -> tuple[Path, str]:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path, path.with_suffix(".pub").read_text().strip()


def listen(path: Path) -> socket.socket:
    """The host end of a guest's virtio-serial port, as QEMU makes it: a listening Unix socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    return listener


def send_exit_signal(channel: paramiko.Channel, name: bytes) -> None:
    """What sshd sends when the command died by a signal (RFC 4254, 6.10)."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exit-signal")
    message.add_boolean(False)
    message.add_string(name)
    message.add_boolean(False)
    message.add_string("")
    message.add_string("")
    channel.transport._send_user_message(message)


SCRIPTS = {
    "exit 3": lambda ch: (ch.sendall(b"out-1\n"), ch.sendall_stderr(b"err-1\n"), ch.send_exit_status(3)),
    "kill ILL": lambda ch: (ch.sendall(b"before\n"), send_exit_signal(ch, b"ILL")),
    "kill BOGUS": lambda ch: send_exit_signal(ch, b"\x1b]0;owned\x07"),
    "vanish": lambda ch: None,
    "hang": lambda ch: time.sleep(3),
    "mute": lambda ch: None,
}


def upper_echo(channel: paramiko.Channel) -> None:
    while data := channel.recv(65536):
        channel.sendall(data.upper())
    channel.close()


def trap(channel: paramiko.Channel, server: FakeGuest) -> None:
    """A job that traps SIGINT: it ends with 3 once the signal arrives (1 if it never does)."""
    channel.send_exit_status(3 if server.signalled.wait(5) else 1)


def follow_resize(channel: paramiko.Channel, server: FakeGuest) -> None:
    """A job on a pseudo-terminal that waits for SIGWINCH: it ends with 3 once its terminal was resized."""
    deadline = time.monotonic() + 5
    while not server.resized and time.monotonic() < deadline:
        time.sleep(0.01)
    channel.send_exit_status(3 if server.resized else 1)


def checksum(channel: paramiko.Channel) -> None:
    """``sha256sum``: reads its stdin to the end, prints the digest, exits 0."""
    digest = hashlib.sha256()
    while data := channel.recv(65536):
        digest.update(data)
    channel.sendall(digest.hexdigest().encode() + b"\n")
    channel.send_exit_status(0)


SCRIPTS["sha256sum"] = checksum
WITH_SERVER = {"trap": trap, "resize": follow_resize}  # scripts that need what the guest's sshd saw


class FakeGuest(paramiko.ServerInterface):
    def __init__(self, client_public: str) -> None:
        self.client_public = client_public
        self.commands: list[str] = []
        self.ran = threading.Event()
        self.forwarded: dict[int, tuple] = {}  # channel id -> (host, port) asked for
        self.signals: list[str] = []  # what "signal" requests named, as sshd would deliver them
        self.signalled = threading.Event()
        self.listening: list[int] = []  # guest ports the host asked this sshd to listen on
        self.refuse_listening: set[int] = set()  # guest ports this sshd will not listen on
        self.cancelled: list[int] = []  # guest ports the host asked this sshd to stop listening on
        self.refuse_connections = 0  # how many connections to the guest's loopback fail next
        self.pty: tuple[str, int, int] | None = None  # the pseudo-terminal asked for: type, columns, rows
        self.resized: list[tuple[int, int]] = []
        self.transport: paramiko.Transport | None = None

    def check_port_forward_request(self, address: str, port: int) -> int | bool:
        if port in self.refuse_listening:
            return False
        self.listening.append(port)
        return port

    def cancel_port_forward_request(self, address: str, port: int) -> None:
        self.cancelled.append(port)

    def check_channel_pty_request(self, channel, term, width, height, pixelwidth, pixelheight, modes) -> bool:
        self.pty = (term.decode(), width, height)
        return True

    def check_channel_window_change_request(self, channel, width, height, pixelwidth, pixelheight) -> bool:
        self.resized.append((width, height))
        return True

    def hear_signals(self, transport: paramiko.Transport) -> None:
        """paramiko's server ignores "signal" requests; sshd delivers them to the command."""
        def handle(channel: paramiko.Channel, message: paramiko.Message) -> None:
            start = message.packet.tell()
            if message.get_text() == "signal":
                message.get_boolean()
                self.signals.append(message.get_text())
                self.signalled.set()
                return
            message.packet.seek(start)
            paramiko.Channel._handle_request(channel, message)
        table = dict(transport._channel_handler_table)
        table[paramiko.common.MSG_CHANNEL_REQUEST] = handle
        transport._channel_handler_table = table

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "vmiso" and f"{key.get_name()} {key.get_base64()}" == " ".join(
            self.client_public.split()[:2])
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        """A connection to a port on the guest's loopback (vmiso run --publish): an upper-casing echo,
        or refused (nothing listens there) while ``refuse_connections`` counts down."""
        if self.refuse_connections:
            self.refuse_connections -= 1
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        self.forwarded[chanid] = destination
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if command == b"mute":
            time.sleep(1)  # a guest that takes the request and does not answer (for longer than START_SECONDS)
        self.commands.append(command.decode())
        self.ran.set()
        return True


# What a restored clone's link expects (vmiso.clones.warm.HELLO has the real bytes).
HELLO = ssh.Hello(lambda: b"hi!", b"ready\n", b"G")


@pytest.fixture
def guest(tmp_path):
    host_key_path, host_public = keypair(tmp_path, "host")
    client_key, client_public = keypair(tmp_path, "client")
    socket_path = tmp_path / "ssh.sock"
    listener = listen(socket_path)
    server = FakeGuest(client_public)
    hellos: list[bytes] = []
    gos: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the test ended without connecting
        hellos.append(conn.recv(3))
        conn.sendall(HELLO.ready)
        gos.append(conn.recv(1))  # sshd starts only once the host says go
        transport = paramiko.Transport(conn)
        transport.add_server_key(paramiko.Ed25519Key.from_private_key_file(str(host_key_path)))
        # Before it starts: on a loaded host the client can be done with the link before start_server returns.
        server.transport = transport
        server.hear_signals(transport)
        try:
            transport.start_server(server=server)
        except (OSError, EOFError, paramiko.SSHException):
            return  # the client has gone already
        while transport.is_active():
            channel = transport.accept(1)
            if channel is None:
                continue
            if channel.chanid in server.forwarded:
                threading.Thread(target=upper_echo, args=(channel,), daemon=True).start()
                continue
            server.ran.wait(5)
            try:
                if server.commands[-1] in WITH_SERVER:
                    WITH_SERVER[server.commands[-1]](channel, server)
                else:
                    SCRIPTS[server.commands[-1]](channel)
                channel.close()
            except (OSError, EOFError):
                return  # the client has gone (as the tests that cut it short mean it to)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield {"socket": socket_path, "host_key": host_public, "client_key": client_key, "server": server,
           "hellos": hellos, "gos": gos}
    listener.close()


def connect(guest, **changes):
    args = dict(name="vmiso-run-test", host_key=guest["host_key"], client_key=guest["client_key"], user="vmiso",
                deadline=time.monotonic() + 20, alive=lambda: True, hello=HELLO)
    args.update(changes)
    return ssh.connect(guest["socket"], **args)


def run(session: ssh.Session, command: str, **kwargs) -> tuple[ssh.JobExit | None, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    status = session.execute(command, out, err, **kwargs)
    return status, out.getvalue(), err.getvalue()


def run_once(guest, command: str, **kwargs) -> tuple[ssh.JobExit | None, bytes, bytes]:
    """Connect, run ``command``, close."""
    session = connect(guest)
    try:
        return run(session, command, **kwargs)
    finally:
        session.close()


def test_exit_status_and_streams(guest):
    status, out, err = run_once(guest, "exit 3")
    assert status == ssh.JobExit(code=3)
    assert (out, err) == (b"out-1\n", b"err-1\n")
    assert guest["hellos"] == [b"hi!"]  # sent before SSH, as a restored clone expects
    assert guest["gos"] == [b"G"]  # once it said it was ready


def test_a_signal_is_reported_by_name(guest):
    status, out, _ = run_once(guest, "kill ILL")
    assert status.signal.name == "SIGILL" and status.code is None and out == b"before\n"


def test_an_unknown_signal_name_is_not_repeated(guest):
    status, _, _ = run_once(guest, "kill BOGUS")
    assert status.unknown_signal and status.signal is None


def test_no_status_at_all(guest):
    status, _, _ = run_once(guest, "vanish")
    assert status == ssh.JobExit() and not status.reported


def test_deadline_stops_waiting(guest):
    session = connect(guest)
    try:
        started = time.monotonic()
        status, _, _ = run(session, "hang", deadline=time.monotonic() + 0.5)
    finally:
        session.close()
    assert status is None and time.monotonic() - started < 2.5


def test_another_host_key_is_refused(guest, tmp_path):
    _, other = keypair(tmp_path, "other")
    with pytest.raises(ssh.HostKeyMismatch, match="not the pinned one"):
        connect(guest, host_key=other)


def test_a_dead_vm_is_not_waited_for(tmp_path):
    client_key, _ = keypair(tmp_path, "client")
    _, host = keypair(tmp_path, "host")
    with pytest.raises(GuestError, match="stopped before it answered"):
        ssh.connect(tmp_path / "nothing.sock", name="vmiso-run-x", host_key=host, client_key=client_key,
                    user="vmiso", deadline=time.monotonic() + 5, alive=lambda: False)


def test_a_flood_of_output_does_not_starve_the_deadline(guest):
    def flood(channel):
        until = time.monotonic() + 8  # finite, so that a regression fails instead of hanging
        try:
            while time.monotonic() < until:
                channel.sendall(b"x" * 65536)
        except OSError:
            pass  # the client went away, as it should

    SCRIPTS["flood"] = flood

    class Slow(io.RawIOBase):  # a host side that writes more slowly than the job prints
        def write(self, data):
            time.sleep(0.005)
            return len(data)

    session = connect(guest)
    try:
        started = time.monotonic()
        status = session.execute("flood", Slow(), io.BytesIO(), deadline=time.monotonic() + 1.0)
    finally:
        session.close()
    assert status is None and time.monotonic() - started < 3


def test_should_stop_ends_the_wait(guest):
    status, _, _ = run_once(guest, "hang", should_stop=lambda: True)
    assert status is None


def test_a_closed_session_runs_nothing(guest):
    session = connect(guest)
    session.close()
    with pytest.raises(GuestError, match="the SSH link to vmiso-run-test is closed"):
        run(session, "exit 3")
    with pytest.raises(GuestError, match="the SSH link to vmiso-run-test is closed"):
        session.publish(8888)
    with pytest.raises(GuestError, match="the SSH link to vmiso-run-test is closed"):
        session.serve_guest_ports({4000: lambda channel: None})


def test_a_client_key_the_guest_does_not_know_is_refused(guest, tmp_path):
    other, _ = keypair(tmp_path, "stranger")
    with pytest.raises(GuestError, match="refused the image's client key"):
        connect(guest, client_key=other)


def test_unreadable_keys_are_named(guest, tmp_path):
    with pytest.raises(GuestError, match="recorded host key is unreadable"):
        connect(guest, host_key="ssh-ed25519 not-base64!")
    with pytest.raises(GuestError, match="cannot read the image's client key"):
        connect(guest, client_key=tmp_path / "missing")


def test_a_guest_that_never_answers_ends_at_the_deadline(tmp_path):
    client_key, _ = keypair(tmp_path, "client")
    _, host = keypair(tmp_path, "host")
    with pytest.raises(GuestError, match=r"did not answer SSH in time \(.*No such file"):
        ssh.connect(tmp_path / "nothing.sock", name="vmiso-run-x", host_key=host, client_key=client_key,
                    user="vmiso", deadline=time.monotonic() + 0.3, alive=lambda: True)


def test_a_guest_that_hangs_up_is_tried_again(tmp_path):
    # The port's socket exists before sshd listens behind it: connections end at once.
    client_key, _ = keypair(tmp_path, "client")
    _, host = keypair(tmp_path, "host")
    path = tmp_path / "ssh.sock"
    listener = listen(path)
    accepted = []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.close()
    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with pytest.raises(GuestError, match="did not answer SSH in time"):
            ssh.connect(path, name="vmiso-run-x", host_key=host, client_key=client_key, user="vmiso",
                        deadline=time.monotonic() + 1, alive=lambda: True)
    finally:
        listener.close()
    assert len(accepted) >= 2


class FakeChannel:
    """Just enough of paramiko.Channel for Session.execute: a job whose link goes away."""

    in_window_size = 2 * 1024**2

    def __init__(self) -> None:
        self._read, self._write = os.pipe()  # select() needs a descriptor; nothing arrives
        self.closed = False
        self.eof_received = False

    def fileno(self) -> int:
        return self._read

    def exec_command(self, command: str) -> None:
        self.command = command

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return False

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


class FakeTransport:
    def __init__(self, channel: FakeChannel | None) -> None:
        self.channel = channel
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float) -> FakeChannel:
        if self.channel is None:
            raise paramiko.SSHException("administratively prohibited")
        return self.channel


class FakeClient:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport

    def get_transport(self) -> FakeTransport:
        return self.transport

    def close(self) -> None:
        self.transport.active = False


def test_a_link_that_breaks_while_the_job_runs_is_an_error():
    channel = FakeChannel()
    transport = FakeTransport(channel)
    session = ssh.SshSession(FakeClient(transport), "vmiso-run-x")

    def breaks() -> bool:
        channel.closed, transport.active = True, False
        return False
    with pytest.raises(GuestError, match="broke while the job ran"):
        session.execute("job", io.BytesIO(), io.BytesIO(), should_stop=breaks)


def test_a_channel_closed_without_a_status_reports_none():
    channel = FakeChannel()
    channel.closed = True
    session = ssh.SshSession(FakeClient(FakeTransport(channel)), "vmiso-run-x")
    assert session.execute("job", io.BytesIO(), io.BytesIO()) == ssh.JobExit()


def test_a_job_that_cannot_start_is_a_guest_error():
    session = ssh.SshSession(FakeClient(FakeTransport(None)), "vmiso-run-x")
    with pytest.raises(GuestError, match="cannot start the job in vmiso-run-x: administratively prohibited"):
        session.execute("job", io.BytesIO(), io.BytesIO())


def test_a_signal_is_passed_to_the_job_once(guest):
    pending = [signal.SIGINT]
    status, _, _ = run_once(guest, "trap", signals=lambda: pending.pop() if pending else None)
    assert status == ssh.JobExit(code=3)
    assert guest["server"].signals == ["INT"]


def test_a_published_port_reaches_the_guests_loopback_only_while_open(guest):
    session = connect(guest)
    try:
        published = session.publish(8888)
        assert published.host.startswith("127.") and published.host != "127.0.0.1"
        with socket.create_connection((published.host, published.host_port), timeout=10) as conn:
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)  # a half-close: the answer still comes back
            assert conn.recv(100) == b"HELLO"
        assert list(guest["server"].forwarded.values()) == [("127.0.0.1", 8888)]
        published.close()
        with pytest.raises(OSError):
            socket.create_connection((published.host, published.host_port), timeout=2)
    finally:
        session.close()


def test_a_guest_that_never_starts_the_job_does_not_hold_vmiso(guest, monkeypatch):
    monkeypatch.setattr(ssh, "START_SECONDS", 0.3)
    started = time.monotonic()
    # The error says whether the guest's sshd still answers (this one does, once its 1 s is up).
    with pytest.raises(GuestError, match=r"did not start the job .* \(its sshd still answers\)"):
        run_once(guest, "mute")
    assert time.monotonic() - started < 0.3 + 5 + 2  # START_SECONDS, then at most 5 s for the keepalive


def test_a_preloaded_link_that_sshd_dropped_gives_way_to_a_new_one(guest):
    # A pool's link whose guest went away or sends
    # garbage: the run opens a new link, hello first, as a warm run does.
    mine, theirs = socket.socketpair()
    theirs.sendall(b"not an SSH greeting\r\n")
    theirs.close()
    session = connect(guest, link=mine)
    try:
        assert guest["hellos"] == [b"hi!"]
        assert run(session, "exit 3")[0] == ssh.JobExit(code=3)
    finally:
        session.close()


def _guest_connects(server: FakeGuest, port: int) -> paramiko.Channel:
    """A connection made in the guest to its own 127.0.0.1:``port``, as sshd hands it to the host."""
    deadline = time.monotonic() + 10
    while port not in server.listening:
        assert time.monotonic() < deadline, "the host never asked the guest to listen"
        time.sleep(0.01)
    assert server.transport is not None
    return server.transport.open_forwarded_tcpip_channel(("127.0.0.1", 40000), ("127.0.0.1", port))


def test_a_guest_that_ignores_the_window_cannot_grow_the_hosts_memory(guest):
    """A hostile sshd sends 8 MiB into a connection the host is not reading, never waiting for
    the window (paramiko would buffer it all): the host keeps at most the window, then the
    connection ends."""
    session = connect(guest)
    seen: dict[str, int] = {}
    release, done = threading.Event(), threading.Event()

    def route(channel: paramiko.Channel) -> None:
        release.wait(10)  # the gateway busy resolving or connecting: nothing is read meanwhile
        seen["held"] = len(channel.in_buffer)
        seen["window"] = channel.in_window_size
        total = 0
        while chunk := channel.recv(65536):
            total += len(chunk)
        seen["read"] = total
        done.set()
    try:
        ports = session.serve_guest_ports({4000: route})
        channel = _guest_connects(guest["server"], 4000)
        for _ in range(256):  # 32 KiB a message
            message = paramiko.Message()
            message.add_byte(paramiko.common.cMSG_CHANNEL_DATA)
            message.add_int(channel.remote_chanid)
            message.add_string(b"x" * 32768)
            guest["server"].transport._send_user_message(message)
        time.sleep(0.5)  # the host's transport has taken in what it was sent
        release.set()
        assert done.wait(10)
        ports.close()
    finally:
        session.close()
    cap = seen["window"] + ssh.WINDOW_SLACK
    assert seen["held"] <= cap and 0 < seen["read"] <= cap < 8 * 1024**2


def test_connections_past_the_slots_are_refused_and_told(guest, monkeypatch):
    monkeypatch.setattr(ssh.GuestPorts, "SLOTS", 2)
    session = connect(guest)
    busy: list[int] = []
    hold = threading.Event()
    try:
        ports = session.serve_guest_ports({4001: lambda channel: hold.wait(10)}, busy.append)
        for _ in range(3):
            with contextlib.suppress(paramiko.SSHException):  # the third is closed as it opens
                _guest_connects(guest["server"], 4001)
        deadline = time.monotonic() + 10
        while not busy and time.monotonic() < deadline:
            time.sleep(0.01)
        hold.set()
        ports.close()
    finally:
        session.close()
    assert busy == [4001]


def test_a_pseudo_terminal_starts_at_the_hosts_size_and_follows_it(guest):
    size = [(80, 24)]
    terminal = ssh.Terminal("xterm-256color", lambda: size[0])
    # The host's terminal is resized once the job runs: the job's follows, once, though the job's
    # stdin ended at the start (paramiko's resize_pty refuses a channel whose end of file was sent).
    status, _, _ = run_once(guest, "resize", terminal=terminal, on_start=lambda: size.__setitem__(0, (120, 40)))
    assert status == ssh.JobExit(code=3)
    assert guest["server"].pty == ("xterm-256color", 80, 24)
    assert guest["server"].resized == [(120, 40)]


@pytest.mark.parametrize("source", ["file", "memory"])
def test_stdin_reaches_the_job_whole_past_the_window_then_ends(guest, tmp_path, source):
    data = os.urandom(3 * 1024**2)  # more than a channel's window: SSH's flow control paces it
    (tmp_path / "input").write_bytes(data)
    with open(tmp_path / "input", "rb") if source == "file" else io.BytesIO(data) as stdin:
        # A file is read from its descriptor; a BytesIO has none.
        status, out, _ = run_once(guest, "sha256sum", stdin=stdin, deadline=time.monotonic() + 30)
    # The job saw every byte, then end of file (without it, it would still be reading at the deadline).
    assert status == ssh.JobExit(code=0)
    assert out == hashlib.sha256(data).hexdigest().encode() + b"\n"


def _exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a new connection, half-close, and read the answer to its end."""
    with socket.create_connection(address, timeout=10) as conn:
        if data:
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def test_a_connection_the_guest_refuses_is_closed_and_frees_its_slot(guest, monkeypatch):
    monkeypatch.setattr(ssh.Published, "MAX_CONNECTIONS", 1)
    guest["server"].refuse_connections = 2  # nothing listens on the guest's port yet
    session = connect(guest)
    try:
        published = session.publish(8888)
        try:
            address = (published.host, published.host_port)
            assert _exchange(address, b"") == b"" and _exchange(address, b"") == b""  # closed, nothing sent
            # Its one slot came back each time: a third connection is served.
            assert _exchange(address, b"now") == b"NOW"
        finally:
            published.close()
    finally:
        session.close()
    assert guest["server"].refuse_connections == 0


def test_a_port_the_guests_sshd_will_not_listen_on_is_named_and_the_others_are_given_up(guest):
    guest["server"].refuse_listening = {4001}
    session = connect(guest)
    try:
        with pytest.raises(ssh.ForwardRefused,
                           match="vmiso-run-test: the guest's sshd refused to listen on its port 4001 for the host"):
            session.serve_guest_ports({4000: lambda channel: None, 4001: lambda channel: None})
        deadline = time.monotonic() + 10
        while not guest["server"].cancelled and time.monotonic() < deadline:  # asked without waiting
            time.sleep(0.01)
    finally:
        session.close()
    assert guest["server"].listening == [4000] and guest["server"].cancelled == [4000]


def test_a_connection_that_fails_on_the_host_is_logged_closed_and_frees_its_slot(guest, monkeypatch, caplog):
    monkeypatch.setattr(ssh.GuestPorts, "SLOTS", 1)
    served: list[bytes] = []

    def route(channel: paramiko.Channel) -> None:
        if not served:
            served.append(b"")
            raise RuntimeError("the gateway tripped")
        data = channel.recv(100)
        served.append(data)
        channel.sendall(data.upper())
    session = connect(guest)

    def guest_sends(data: bytes) -> bytes:
        """What the host answers a connection from the guest that sends ``data``; b"" when closed unanswered."""
        try:
            channel = _guest_connects(guest["server"], 4002)
        except paramiko.SSHException:  # closed before paramiko's open_channel returned it
            return b""
        channel.settimeout(10)
        channel.sendall(data)
        return channel.recv(100)
    try:
        ports = session.serve_guest_ports({4002: route})
        assert guest_sends(b"first") == b""  # the host closed it
        for _ in range(50):  # the slot is given back just after the close: soon, not at once
            if answer := guest_sends(b"again"):
                break
            time.sleep(0.05)
        ports.close()
    finally:
        session.close()
    assert answer == b"AGAIN" and served[-1] == b"again"
    assert "vmiso-run-test: a connection from the guest failed" in caplog.text
    assert "RuntimeError: the gateway tripped" in caplog.text


def test_open_link_waits_until_the_guest_is_ready_and_leaves_go_to_the_run(guest):
    link = ssh.open_link(guest["socket"], name="vmiso-run-test", hello=HELLO,
                         deadline=time.monotonic() + 10)
    time.sleep(0.2)
    assert guest["gos"] == []  # the guest waits: its inputs are not on their disk yet
    session = connect(guest, link=link)
    try:
        assert run(session, "exit 3")[0] == ssh.JobExit(code=3)
    finally:
        session.close()
    assert guest["hellos"] == [b"hi!"]  # the one link, opened once
    assert guest["gos"] == [b"G"]


def test_open_link_gives_up_on_a_link_that_never_greets(tmp_path):
    path = tmp_path / "ssh.sock"
    listener = listen(path)
    held: list[socket.socket] = []

    def silent() -> None:  # accepts, reads the hello, says nothing
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
    threading.Thread(target=silent, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(GuestError, match=r"VM vmiso-run-x was not ready on its SSH link in time "
                                             r"\(the guest did not say it was ready\)"):
            ssh.open_link(path, name="vmiso-run-x", hello=HELLO, deadline=time.monotonic() + 0.5)
        assert time.monotonic() - started < 2
        assert held and held[0].recv(3) == b"hi!"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_open_link_tries_again_after_a_link_that_closes_without_a_greeting(tmp_path):
    path = tmp_path / "ssh.sock"
    listener = listen(path)
    accepted: list[bytes] = []

    def hang_up() -> None:  # a restored sshd that reads the hello and drops the link
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn.recv(3))
            conn.close()
    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with pytest.raises(GuestError, match="VM vmiso-run-x was not ready on its SSH link in time"):
            ssh.open_link(path, name="vmiso-run-x", hello=HELLO, deadline=time.monotonic() + 1)
    finally:
        listener.close()
    assert len(accepted) >= 2 and set(accepted) == {b"hi!"}
