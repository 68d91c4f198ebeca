"""vmiso.ssh against a real SSH server: paramiko's own, in this process, on a Unix socket.

The server plays a guest's sshd: it checks the client key, runs "commands" from a
small script table, and reports their end as sshd does (exit-status or exit-signal).
"""

from __future__ import annotations

import io
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
}


class FakeGuest(paramiko.ServerInterface):
    def __init__(self, client_public: str) -> None:
        self.client_public = client_public
        self.commands: list[str] = []
        self.ran = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "vmiso" and f"{key.get_name()} {key.get_base64()}" == " ".join(
            self.client_public.split()[:2])
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())
        self.ran.set()
        return True


@pytest.fixture
def guest(tmp_path):
    host_key_path, host_public = keypair(tmp_path, "host")
    client_key, client_public = keypair(tmp_path, "client")
    socket_path = tmp_path / "ssh.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)
    server = FakeGuest(client_public)
    hellos: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        hellos.append(conn.recv(3))
        transport = paramiko.Transport(conn)
        transport.add_server_key(paramiko.Ed25519Key.from_private_key_file(str(host_key_path)))
        transport.start_server(server=server)
        while transport.is_active():
            channel = transport.accept(1)
            if channel is None:
                continue
            server.ran.wait(5)
            SCRIPTS[server.commands[-1]](channel)
            channel.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield {"socket": socket_path, "host_key": host_public, "client_key": client_key, "server": server,
           "hellos": hellos}
    listener.close()


def connect(guest, **changes):
    args = dict(name="vmiso-run-test", host_key=guest["host_key"], client_key=guest["client_key"], user="vmiso",
                deadline=time.monotonic() + 20, alive=lambda: True, hello=lambda: b"hi!")
    args.update(changes)
    return ssh.connect(guest["socket"], **args)


def run(session: ssh.Session, command: str, **kwargs) -> tuple[ssh.JobExit | None, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    status = session.execute(command, out, err, **kwargs)
    return status, out.getvalue(), err.getvalue()


def test_exit_status_and_streams(guest):
    session = connect(guest)
    try:
        status, out, err = run(session, "exit 3")
    finally:
        session.close()
    assert status == ssh.JobExit(code=3)
    assert (out, err) == (b"out-1\n", b"err-1\n")
    assert guest["hellos"] == [b"hi!"]  # sent before SSH, as a restored clone expects


def test_a_signal_is_reported_by_name(guest):
    session = connect(guest)
    try:
        status, out, _ = run(session, "kill ILL")
    finally:
        session.close()
    assert status.signal.name == "SIGILL" and status.code is None and out == b"before\n"


def test_an_unknown_signal_name_is_not_repeated(guest):
    session = connect(guest)
    try:
        status, _, _ = run(session, "kill BOGUS")
    finally:
        session.close()
    assert status.unknown_signal and status.signal is None


def test_no_status_at_all(guest):
    session = connect(guest)
    try:
        status, _, _ = run(session, "vanish")
    finally:
        session.close()
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
