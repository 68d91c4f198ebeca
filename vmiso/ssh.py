"""SSH to a guest over its virtio-serial link: the one module that imports paramiko.

``Session`` is what the core does over the link (a Protocol: ``connect`` makes the
real one, an ``SshSession``; tests/fakes.py has a fake).  The host key is pinned
(the public half recorded when the image was sealed); an unknown or different key
is refused, never added.  No agent, no keys from ``~/.ssh``: only the image's own
client key.  Output is streamed as it arrives.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

# paramiko's ssh_config reader imports invoke, when it can, for "Match exec" lines; vmiso
# reads no ssh_config, and invoke (with unittest.mock and asyncio) cost 35 ms of every
# run's start.  A None entry makes that import fail as paramiko expects it may.
if "invoke" not in sys.modules:
    sys.modules["invoke"] = None  # type: ignore[assignment]
import paramiko
from paramiko.buffered_pipe import BufferedPipe

from .errors import GuestError

log = logging.getLogger(__name__)

# The name under which the pinned key is stored; the link is a socket, not a host.
GUEST_HOST = "vmiso-guest"
DRAIN_CHUNKS = 16  # 64 KiB each
START_SECONDS = 30.0  # for the guest to start the job once asked
# Signal names a guest may report (RFC 4254 sends them without "SIG"); anything else
# it sends is not repeated to the host's terminal.
_SIGNALS = {s.name.removeprefix("SIG"): s for s in signal.Signals if not s.name.startswith("SIG_")}


@dataclass(frozen=True)
class JobExit:
    """How the job's process ended, as sshd reported it."""

    code: int | None = None  # its exit status, when it exited
    signal: signal.Signals | None = None  # the signal that killed it
    unknown_signal: bool = False  # killed by a signal whose name vmiso does not know
    core_dumped: bool = False

    @property
    def reported(self) -> bool:
        return self.code is not None or self.signal is not None or self.unknown_signal


@dataclass(frozen=True)
class Terminal:
    """A pseudo-terminal for the job: its type, and the host terminal's size
    (columns, rows), polled so that the job's follows it."""

    term: str
    size: Callable[[], tuple[int, int]]


def _handle_request(channel: paramiko.Channel, message: paramiko.Message) -> None:
    """paramiko's channel-request handler, plus the "exit-signal" request it ignores.

    sshd sends "exit-signal" instead of "exit-status" when the command was killed by a
    signal (RFC 4254, 6.10): signal name without "SIG", core dumped, message, language.
    """
    start = message.packet.tell()
    if message.get_text() != "exit-signal":
        message.packet.seek(start)
        paramiko.Channel._handle_request(channel, message)  # type: ignore[attr-defined]  # private API
        return
    message.get_boolean()  # want_reply: false for exit-signal
    known = _SIGNALS.get(message.get_string().decode("ascii", "replace"))
    exit_ = JobExit(signal=known, unknown_signal=known is None, core_dumped=message.get_boolean())
    channel.vmiso_exit = exit_  # type: ignore[attr-defined]  # read back by _job_exit
    channel.status_event.set()


def _with_exit_signals(transport: paramiko.Transport) -> None:
    # paramiko has no public hook for channel requests; its handler table is private.
    table = dict(transport._channel_handler_table)  # type: ignore[attr-defined]
    table[paramiko.common.MSG_CHANNEL_REQUEST] = _handle_request
    transport._channel_handler_table = table  # type: ignore[attr-defined]


class HostKeyMismatch(GuestError):
    """The guest presented a host key other than the pinned one."""


def _pinned_key(line: str) -> paramiko.PKey:
    try:
        key_type, blob = line.split()[:2]
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    except (ValueError, paramiko.SSHException) as err:
        raise GuestError(f"the image's recorded host key is unreadable: {err}") from None


class Closable(Protocol):
    """What stays open until closed: a guest port served, a port published."""

    def close(self) -> None: ...


class PublishedPort(Closable, Protocol):
    """A guest port reachable at ``host``:``host_port`` on this host's loopback (``Published``)."""

    guest_port: int
    host: str
    host_port: int


class Session(Protocol):
    """What vmiso does over its SSH link to a guest: the seam between the core and paramiko."""

    def execute(self, command: str, stdout: BinaryIO, stderr: BinaryIO, *, stdin: BinaryIO | None = None,
                deadline: float | None = None, should_stop: Callable[[], bool] = ...,
                signals: Callable[[], signal.Signals | None] = ..., terminal: Terminal | None = None,
                on_start: Callable[[], None] = ...) -> JobExit | None:
        """Run ``command``, streaming its output; how it ended, or None when stopped (``SshSession.execute``)."""
        ...

    def publish(self, guest_port: int) -> PublishedPort:
        """Make 127.0.0.1:``guest_port`` in the guest reachable on a port of the host's loopback."""
        ...

    def serve_guest_ports(self, routes: Mapping[int, Callable[[paramiko.Channel], None]],
                          on_busy: Callable[[int], None] = ...) -> Closable:
        """Connections the guest makes to its own 127.0.0.1:PORT served on this host by ``routes[PORT]``;
        ``on_busy(PORT)`` for one refused unread, all slots taken."""
        ...

    def close(self) -> None: ...


class SshSession(Session):
    """A logged-in SSH connection to a guest (made by ``connect``)."""

    def __init__(self, client: paramiko.SSHClient, name: str) -> None:
        self._client = client
        self._name = name

    def close(self) -> None:
        self._client.close()

    def publish(self, guest_port: int) -> Published:
        """Make 127.0.0.1:``guest_port`` in the guest reachable on a port of the host's loopback."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"the SSH link to {self._name} is closed")
        return Published(transport, guest_port, self._name)

    def serve_guest_ports(self, routes: Mapping[int, Callable[[paramiko.Channel], None]],
                          on_busy: Callable[[int], None] = lambda port: None) -> GuestPorts:
        """Connections the guest makes to its own 127.0.0.1:PORT, for each PORT of ``routes``,
        served on this host by ``routes[PORT](channel)`` (see GuestPorts)."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"the SSH link to {self._name} is closed")
        return GuestPorts(transport, routes, self._name, on_busy)

    def execute(self, command: str, stdout: BinaryIO, stderr: BinaryIO, *, stdin: BinaryIO | None = None,
                deadline: float | None = None, should_stop: Callable[[], bool] = lambda: False,
                signals: Callable[[], signal.Signals | None] = lambda: None,
                terminal: Terminal | None = None, on_start: Callable[[], None] = lambda: None) -> JobExit | None:
        """Run ``command``, streaming its output; how it ended, or None when stopped.

        ``stdin``: streamed to the job as it is read, then end of file (None: end
        of file at once).  SSH's flow control bounds what is in flight, so a
        stream of any size passes without being held in memory.

        ``signals``: polled while the job runs; a signal it returns is sent to the
        job (sshd delivers it to the job's process).

        ``terminal``: run the job on a pseudo-terminal of that type and size, resized
        when the host's changes (its stdout and stderr are then one stream).

        ``on_start``: called once the guest has started the job.  Starting it is
        bounded too (START_SECONDS, or what is left of ``deadline``): a guest that
        never answers the request does not hold vmiso.

        Returns None when ``deadline`` passed or ``should_stop`` said so; a JobExit
        that reports nothing when the channel closed without a status.
        """
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"the SSH link to {self._name} is closed")
        try:
            channel = transport.open_session(timeout=30)
        except (paramiko.SSHException, OSError) as err:
            raise GuestError(f"cannot start the job in {self._name}: {err}") from None
        bound_input(channel)
        # paramiko waits for the answers to pty-req and exec without a time limit.
        left = START_SECONDS if deadline is None else max(0.0, min(START_SECONDS, deadline - time.monotonic()))
        gave_up = threading.Event()

        def give_up_now() -> None:
            gave_up.set()
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                channel.close()
        give_up = threading.Timer(left, give_up_now)
        give_up.start()
        try:
            if terminal is not None:
                size = terminal.size()
                channel.get_pty(term=terminal.term, width=size[0], height=size[1])
            channel.exec_command(command)
            if stdin is None:
                channel.shutdown_write()  # the job reads EOF on stdin
        except (paramiko.SSHException, OSError, EOFError) as err:
            if gave_up.is_set():
                state = "its sshd still answers" if _answers(transport) else "its sshd no longer answers"
                raise GuestError(f"the guest did not start the job in {self._name} within {left:.0f} s ({state})") \
                    from None
            raise GuestError(f"cannot start the job in {self._name}: {err}") from None
        finally:
            give_up.cancel()
        on_start()
        if stdin is not None:
            threading.Thread(target=_pump, args=(stdin, channel), name="vmiso-stdin", daemon=True).start()
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                if should_stop():
                    return None
                if (forward := signals()) is not None:
                    _send_signal(channel, forward)
                if terminal is not None and (now := terminal.size()) != size:
                    size = now
                    _resize(channel, size)
                select.select([channel], [], [], 0.2)
                # At most DRAIN_CHUNKS a stream per pass: a job that prints faster than
                # the host writes cannot keep this loop from checking the deadline.
                drained = False
                for _ in range(DRAIN_CHUNKS):
                    if not channel.recv_ready():
                        break
                    stdout.write(channel.recv(65536))
                    drained = True
                for _ in range(DRAIN_CHUNKS):
                    if not channel.recv_stderr_ready():
                        break
                    stderr.write(channel.recv_stderr(65536))
                    drained = True
                if drained:
                    stdout.flush()
                    stderr.flush()
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    # The status arrives before the last data only when the stream is closed.
                    if channel.eof_received or channel.closed:
                        return _job_exit(channel)
                if channel.closed and not channel.exit_status_ready():
                    if not transport.is_active():
                        raise GuestError(f"the SSH link to {self._name} broke while the job ran")
                    return JobExit()
        finally:
            channel.close()


class Published:
    """A port on the guest's loopback, reachable from the host's loopback while it is open.

    Listens on an address of its own in 127.0.0.0/8 (a random one, ``host``: a
    browser keeps cookies per host name, not per port, so a page the guest serves
    shares them with no other local service) and an ephemeral port
    (``host_port``); each connection it accepts, MAX_CONNECTIONS at a time,
    becomes an SSH "direct-tcpip" channel to 127.0.0.1:``guest_port`` in the
    guest, copied both ways.  Nothing is added to the VM (no network device); the
    guest's sshd allows only such channels, opened by the host.
    """

    MAX_CONNECTIONS = 64

    def __init__(self, transport: paramiko.Transport, guest_port: int, name: str) -> None:
        self.guest_port = guest_port
        self._transport, self._name = transport, name
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.host = "127." + ".".join(str(secrets.randbelow(254) + 1) for _ in range(3))
        self._listener.bind((self.host, 0))
        self._listener.listen(16)
        self.host_port: int = self._listener.getsockname()[1]
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self._open: set[socket.socket | paramiko.Channel] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"vmiso-publish-{guest_port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            self._slots.acquire()  # at most MAX_CONNECTIONS at once; the rest wait in the backlog
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            try:
                channel = self._transport.open_channel("direct-tcpip", ("127.0.0.1", self.guest_port), peer,
                                                       timeout=30)
                bound_input(channel)
            except (paramiko.SSHException, OSError, EOFError) as err:
                log.debug("%s: no connection to guest port %d: %s", self._name, self.guest_port, err)
                conn.close()
                self._slots.release()
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    channel.close()
                    return
                self._open.update((conn, channel))
            threading.Thread(target=self._serve, args=(conn, channel), daemon=True).start()

    def _serve(self, conn: socket.socket, channel: paramiko.Channel) -> None:
        _join(conn, channel)
        with self._lock:
            self._open.difference_update((conn, channel))
        self._slots.release()

    def close(self) -> None:
        """Stop listening and end every connection: the port is the run's only while it lasts."""
        with self._lock:
            self._closed = True
            ends = list(self._open)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; stops listening
        self._listener.close()
        for end in ends:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                end.close()


def _join(conn: socket.socket, channel: paramiko.Channel) -> None:
    """Copy both ways until both directions end, then close both: an end of file in one
    direction is passed on as such (a half-close).  A forward's connection, either way round."""
    upstream = threading.Thread(target=_copy, args=(conn, channel), daemon=True)
    upstream.start()
    _copy(channel, conn)
    upstream.join()
    for end in (conn, channel):
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            end.close()


def _copy(source: socket.socket | paramiko.Channel, sink: socket.socket | paramiko.Channel) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        if isinstance(sink, socket.socket):
            sink.shutdown(socket.SHUT_WR)
        else:
            sink.shutdown_write()


class ForwardRefused(GuestError):
    """The guest's sshd would not listen for the host (its config predates networked runs)."""


class GuestPorts:
    """Remote ("tcpip-forward") forwards: the guest's sshd listens on the guest's own 127.0.0.1
    at each port of ``routes``, and hands each connection made there to this host, where
    ``routes[port](channel)`` serves it in a thread of its own (at most SLOTS at once).

    paramiko keeps one handler per link, and the port it is told comes from the guest's sshd:
    a channel for any port that is not a route is closed unread."""

    SLOTS = 64

    def __init__(self, transport: paramiko.Transport, routes: Mapping[int, Callable[[paramiko.Channel], None]],
                 name: str, on_busy: Callable[[int], None] = lambda port: None) -> None:
        self._transport, self._routes, self._name, self._on_busy = transport, dict(routes), name, on_busy
        self._slots = threading.BoundedSemaphore(self.SLOTS)
        self._closed = False
        self.guest_ports: list[int] = []
        for port in sorted(self._routes):
            try:
                transport.request_port_forward("127.0.0.1", port, handler=self._handle)
            except paramiko.SSHException as err:
                self.close()
                raise ForwardRefused(f"{name}: the guest's sshd refused to listen on its port {port} for the host: "
                                 f"{err}") from None
            self.guest_ports.append(port)

    def _handle(self, channel: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]) -> None:
        # Called in paramiko's transport thread, before any of the channel's data: serve in a thread of its own.
        bound_input(channel)
        serve = self._routes.get(server[1]) if not self._closed else None
        busy = serve is not None and not self._slots.acquire(blocking=False)
        if serve is None or busy:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                channel.close()
            if busy:
                self._on_busy(server[1])
            return
        threading.Thread(target=self._serve, args=(serve, channel), daemon=True).start()

    def _serve(self, serve: Callable[[paramiko.Channel], None], channel: paramiko.Channel) -> None:
        try:
            serve(channel)
        except Exception:  # one connection's failure is logged, never the run's
            log.warning("%s: a connection from the guest failed", self._name, exc_info=True)
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                channel.close()
            self._slots.release()

    def close(self) -> None:
        """Stop serving; ask the guest's sshd to stop listening without waiting for its answer
        (paramiko's cancel_port_forward waits with no limit, and a hostile sshd need not answer)."""
        self._closed = True
        for port in self.guest_ports:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._transport.global_request("cancel-tcpip-forward", ("127.0.0.1", port), wait=False)


# What a channel may hold unread beyond its window: a peer that keeps to SSH's flow control
# never sends past the window vmiso advertised.
WINDOW_SLACK = 64 * 1024


class _BoundedPipe(BufferedPipe):  # type: ignore[type-arg]
    """A channel's input buffer that holds at most ``cap`` bytes.  paramiko buffers whatever the
    peer sends, window or not; a guest's sshd that ignores the window (only a hostile one does)
    would grow vmiso's memory without end.  Past the cap its bytes are dropped and the buffer
    ends: the reader sees end of file and closes the channel."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self._cap = cap
        self.overrun = False

    def feed(self, data: bytes) -> None:
        if self.overrun:
            return
        if len(self) + len(data) > self._cap:
            self.overrun = True
            log.warning("the guest sent past an SSH channel's window: that channel is cut off")
            self.close()
            return
        super().feed(data)


def bound_input(channel: paramiko.Channel) -> None:
    """Give ``channel`` input buffers bounded by its window (see _BoundedPipe); before its data flows."""
    cap = channel.in_window_size + WINDOW_SLACK
    channel.in_buffer = _BoundedPipe(cap)
    channel.in_stderr_buffer = _BoundedPipe(cap)


def _answers(transport: paramiko.Transport, seconds: float = 5.0) -> bool:
    """Whether the guest's sshd answers a keepalive request within ``seconds`` (any answer: sshd
    refuses what it does not know).  paramiko waits for the answer with no limit: in a thread."""
    answered = threading.Event()

    def ask() -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            transport.global_request("keepalive@openssh.com", wait=True)
            answered.set()
    threading.Thread(target=ask, name="vmiso-keepalive", daemon=True).start()
    return answered.wait(seconds) and transport.is_active()


def _request(channel: paramiko.Channel, kind: str, *fields: str | int) -> None:
    """A channel request that wants no reply, sent while the job runs, whether or not its stdin
    has ended (paramiko's own methods refuse once end of file was sent, as it is at once without stdin)."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string(kind)
    message.add_boolean(False)
    for value in fields:
        if isinstance(value, str):
            message.add_string(value)
        else:
            message.add_int(value)
    channel.get_transport()._send_user_message(message)  # type: ignore[attr-defined]


def _send_signal(channel: paramiko.Channel, sig: signal.Signals) -> None:
    """RFC 4254, 6.9: the "signal" request, which paramiko's client API lacks."""
    try:
        _request(channel, "signal", sig.name.removeprefix("SIG"))
    except (OSError, EOFError, AttributeError, paramiko.SSHException) as err:
        log.debug("could not send %s to the job: %s", sig.name, err)


def _resize(channel: paramiko.Channel, size: tuple[int, int]) -> None:
    """RFC 4254, 6.7: the "window-change" request, the job's terminal resized to ``size`` (columns, rows)."""
    try:
        _request(channel, "window-change", size[0], size[1], 0, 0)
    except (OSError, EOFError, AttributeError, paramiko.SSHException) as err:
        log.debug("could not resize the job's terminal: %s", err)


def _pump(source: BinaryIO, channel: paramiko.Channel) -> None:
    """Copy ``source`` to the job's stdin until end of file, then send end of file."""
    # From the file descriptor where there is one: a daemon thread blocked in a
    # buffered read holds its lock, and Python aborts at exit on that lock.
    try:
        fd = source.fileno()
        read: Callable[[int], bytes] = lambda size: os.read(fd, size)  # noqa: E731
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        read = getattr(source, "read1", source.read)
    try:
        while chunk := read(65536):
            channel.sendall(chunk)  # blocks while the job is not reading
        channel.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the job ended, or the link closed: nobody reads any more


def _job_exit(channel: paramiko.Channel) -> JobExit:
    by_signal: JobExit | None = getattr(channel, "vmiso_exit", None)
    if by_signal is not None:
        return by_signal
    status = channel.recv_exit_status()
    return JobExit(code=status) if status >= 0 else JobExit()


@dataclass(frozen=True)
class Hello:
    """What a clone restored from a warm state expects on a new link before SSH starts
    (vmiso.clones.warm): ``greeting()`` (called at the moment of sending), then it answers
    ``ready``; ``go`` then tells it to start sshd."""

    greeting: Callable[[], bytes]
    ready: bytes
    go: bytes


def connect(socket_path: Path, *, name: str, host_key: str, client_key: Path, user: str,
            deadline: float, alive: Callable[[], bool], hello: Hello | None = None,
            link: socket.socket | None = None) -> Session:
    """Connect once the guest answers; ``alive`` says whether the VM still runs.

    ``hello``: what a clone restored from a warm state expects first (None: a cold
    clone, whose sshd answers at once).
    ``link``: a link opened already (open_link, by a pool), ready: ``hello.go`` is
    sent and SSH starts on it; when the guest does not answer on it, a new link is
    opened as without one.
    """
    pinned = _pinned_key(host_key)
    try:
        key = paramiko.Ed25519Key.from_private_key_file(str(client_key))
    except (OSError, paramiko.SSHException) as err:
        raise GuestError(f"cannot read the image's client key {client_key}: {err}") from None
    if link is not None:
        assert hello is not None, "a preloaded link is a restored clone's"
        try:
            link.sendall(hello.go)
            return _handshake(link, name=name, pinned=pinned, key=key, user=user, deadline=deadline)
        except (_NotReady, OSError) as err:
            log.debug("SSH on %s's preloaded link failed (%s): opening a new one", name, err)
            link.close()
    errors = ["no answer"]
    for sock in _links(socket_path, name, hello, deadline, errors, alive):
        try:
            if hello is not None:
                _await_ready(sock, hello, deadline)
                sock.sendall(hello.go)
            return _handshake(sock, name=name, pinned=pinned, key=key, user=user, deadline=deadline)
        except (_NotReady, OSError) as err:
            sock.close()
            errors.append(str(err))
            log.debug("SSH to %s not ready: %s", name, err)
            time.sleep(0.2)
    raise GuestError(f"VM {name} did not answer SSH in time ({errors[-1]})")


class _NotReady(Exception):
    """The guest's sshd did not (yet) answer on this link."""


def _await_ready(sock: socket.socket, hello: Hello, deadline: float) -> None:
    """Read the guest's ``hello.ready``, byte for byte; _NotReady for anything else or nothing in time."""
    got = b""
    try:
        while len(got) < len(hello.ready):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(len(hello.ready) - len(got))
            if not chunk:
                raise _NotReady("the link closed before the guest was ready")
            got += chunk
    except TimeoutError:
        raise _NotReady("the guest did not say it was ready") from None
    finally:
        sock.settimeout(None)
    if got != hello.ready:
        raise _NotReady(f"the guest answered {got[:40]!r}, not {hello.ready!r}")


def _link(socket_path: Path, name: str, hello: Hello | None) -> socket.socket:
    """A connection to the clone's SSH link, ``hello``'s greeting sent; OSError while it is not there yet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
        if hello is not None:
            sock.sendall(hello.greeting())
    except PermissionError as err:  # no waiting will change that
        sock.close()
        raise GuestError(f"cannot reach VM {name}'s SSH link {socket_path}: {err.strerror}",
                         "vmiso doctor checks what this user may reach") from None
    except OSError:
        sock.close()
        raise
    return sock


def _links(socket_path: Path, name: str, hello: Hello | None, deadline: float, errors: list[str],
           alive: Callable[[], bool] = lambda: True) -> Iterator[socket.socket]:
    """Connections to the link, ``hello`` sent, one per try until ``deadline``; while nothing
    listens there yet, waits (the reason is appended to ``errors``)."""
    while time.monotonic() < deadline:
        if not alive():
            raise GuestError(f"VM {name} stopped before it answered SSH")
        try:
            sock = _link(socket_path, name, hello)
        except OSError as err:
            errors.append(str(err))
            time.sleep(0.05)
            continue
        yield sock


def open_link(socket_path: Path, *, name: str, hello: Hello, deadline: float) -> socket.socket:
    """Open a restored clone's link, send ``hello``'s greeting and wait until the guest is ready:
    whoever gets the socket next (a run, from a pool) sends ``hello.go`` and starts SSH on it."""
    errors = ["no answer"]
    for sock in _links(socket_path, name, hello, deadline, errors):
        try:
            _await_ready(sock, hello, deadline)
            return sock
        except (_NotReady, OSError) as err:
            errors.append(str(err))
        sock.close()
    raise GuestError(f"VM {name} was not ready on its SSH link in time ({errors[-1]})")


# AES-GCM only: the guest's sshd then spends no HMAC-SHA-256 on every packet, which an
# emulated CPU computes in software (no SHA extensions under TCG); measured in the README.
_NOT_GCM = {"ciphers": ["aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-cbc", "aes192-cbc", "aes256-cbc",
                        "3des-cbc"]}


def _handshake(sock: socket.socket, *, name: str, pinned: paramiko.PKey, key: paramiko.PKey, user: str,
               deadline: float) -> Session:
    """SSH on a connected link: the pinned host key, the image's client key.  _NotReady when
    the guest's sshd did not answer; GuestError for what no retry changes."""
    client = paramiko.SSHClient()
    client.get_host_keys().add(GUEST_HOST, pinned.get_name(), pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    remaining = max(1.0, deadline - time.monotonic())
    try:
        client.connect(GUEST_HOST, username=user, pkey=key, sock=sock, allow_agent=False,
                       look_for_keys=False, timeout=remaining, banner_timeout=remaining,
                       auth_timeout=30, channel_timeout=30, disabled_algorithms=_NOT_GCM)
        transport = client.get_transport()
        if transport is None:
            raise paramiko.SSHException("the SSH transport closed at once")
        _with_exit_signals(transport)
        return SshSession(client, name)
    except paramiko.BadHostKeyException as err:
        client.close()
        raise HostKeyMismatch(
            f"VM {name} presented host key {err.key.get_fingerprint().hex()}, not the pinned one; "
            "refusing to talk to it",
            "the image may have been tampered with: verify or re-provision it",
        ) from None
    except paramiko.AuthenticationException as err:
        client.close()
        raise GuestError(f"VM {name} refused the image's client key: {err}") from None
    except (paramiko.SSHException, OSError, EOFError) as err:
        client.close()
        raise _NotReady(str(err) or type(err).__name__) from None
