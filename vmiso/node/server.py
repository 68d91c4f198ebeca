"""The node's side of a run: ``vmiso _node``, started by the analyst's ssh, speaking the protocol on its
stdin and stdout.  (Or of a question, its images or what its doctor finds, or of one of the
commands a client may run here, ``COMMANDS``.)

Everything the client sends is untrusted input: the request is checked and resolved
against this node's own configuration (its state directory, libvirt, limits), the
inputs are received into a private directory with the transfer's refusals and this
node's input limits, then the run is the ordinary local one (vmiso.execution.ThisHost),
with its output into a private directory that is streamed back with its MANIFEST.

A link that ends (the client killed, the connection dropped) ends the run: the reader
sees end of file and interrupts the main thread (``stop``), whose cleanup destroys the
VM as a local run's does on Ctrl-C; if this process is killed instead, the run's
watchdog destroys it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from .. import tools
from ..config import Config
from ..doctor import run_checks
from ..errors import VmisoError
from ..execution import JobIO, ThisHost
from ..host import outputs, tree, workdir
from ..image.store import list_images, summary
from ..plan import RunRequest, plan_run
from ..progress import Steps
from ..run import Interruption, RunResult
from . import protocol
from .protocol import Reader, Writer
from .transfer import Bounds, receive_tree, send_directory

log = logging.getLogger(__name__)

PEER = "the client"
_SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


class _Framed:
    """A job's stream (stdout or stderr) as frames of ``kind``."""

    def __init__(self, writer: Writer, kind: int) -> None:
        self._writer, self._kind = writer, kind

    def write(self, data: bytes) -> int:
        if data:
            self._writer.send_data(self._kind, bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def _request(payload: bytes, config: Config, inputs: tuple[Path, ...], output: Path | None) -> RunRequest:
    """The client's request, checked field by field, as a RunRequest for this node's plan."""
    head = protocol.header(payload, PEER, "request")

    def get(key: str, kind: type | tuple[type, ...]) -> Any:
        return protocol.field(head, key, kind, PEER, "request")
    command = get("command", list)
    env = get("env", list)
    if not command or not all(isinstance(a, str) and "\0" not in a for a in command):
        raise protocol.ProtocolError(f"{PEER} sent a command that is not a list of strings")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in env):
        raise protocol.ProtocolError(f"{PEER} sent an environment that is not a list of [name, value]")
    numbers = {key: get(key, int) for key in ("timeout", "memory_mib", "cpus", "scratch_bytes")}
    if numbers["timeout"] < 1 or numbers["memory_mib"] < 128 or numbers["cpus"] < 1:
        raise VmisoError("the request's timeout, memory or CPUs are out of range")
    return RunRequest(command=tuple(command), image=get("image", str), inputs=inputs, output=output,
                      timeout=numbers["timeout"], memory_mib=numbers["memory_mib"], cpus=numbers["cpus"],
                      scratch_bytes=numbers["scratch_bytes"], warm=get("warm", bool), env=tuple(map(tuple, env)),
                      accept_tool_files=get("accept_tool_files", bool))


def serve(config: Config, in_fd: int, out_fd: int, stop: Callable[[], None], config_path: Path | None = None) -> int:
    """One run for the client on ``in_fd``/``out_fd``; the exit status of this process.

    ``stop`` interrupts the main thread (the CLI's handler raises Interrupted there): the
    reader calls it when the link ends, or when a second signal must stop the run now.
    """
    reader, writer = Reader(in_fd, PEER), Writer(out_fd, PEER)
    try:
        _, payload = reader.expect(protocol.HELLO)
        writer.send_json(protocol.HELLO, protocol.hello())
        protocol.check_hello(payload, PEER)
        _, request = reader.expect(protocol.REQUEST)
        op = protocol.header(request, PEER, "request").get("op")
        if op == "images":
            writer.send_json(protocol.RESULT, {"images": _images(config)})
            return 0
        if op == "doctor":
            writer.send_json(protocol.RESULT, {"doctor": [dataclasses.asdict(c) for c in run_checks(config)]})
            return 0
        if op == "command":
            return _command(_command_argv(request, config_path), reader, writer)
        if op != "run":
            raise protocol.ProtocolError(f"{PEER} asked for {str(op)[:40]!r}, which this node does not do")
    except VmisoError as err:
        _send_error(writer, err)
        return err.exit_code
    work = Path(tempfile.mkdtemp(prefix="vmiso-node-"))
    try:
        return _serve(config, reader, writer, request, work, stop)
    finally:
        if failures := workdir.remove_tree(work):
            log.warning("could not remove %s: %s", work, failures[0])


# What a client may run here with "command" (vmiso --host NODE gc, pool ..., images show|verify|warm|rm):
# the command, then its subcommand when it has them.  The rest of its argv is the command's own to check.
COMMANDS: dict[str, frozenset[str] | None] = {
    "gc": None,
    "pool": frozenset({"start", "stop", "status"}),
    "images": frozenset({"show", "verify", "warm", "rm"}),
}
_THIS_MACHINES = ("-c", "--config", "--state-dir", "--accel")  # the node's own configuration decides these
_ARGV_MAX, _ARG_MAX = 64, 4096


def _command_argv(request: bytes, config_path: Path | None) -> list[str]:
    """The vmiso argv a "command" request asks for, checked, with this node's config inserted (-c)."""
    argv = protocol.header(request, PEER, "request").get("argv")
    if (not isinstance(argv, list) or not 0 < len(argv) <= _ARGV_MAX
            or not all(isinstance(a, str) and len(a) <= _ARG_MAX and "\0" not in a for a in argv)):
        raise protocol.ProtocolError(f"{PEER} asked for a command whose argv is not one")
    subcommands = COMMANDS.get(argv[0], frozenset())
    depth = 1 if subcommands is None else 2
    if subcommands is not None and (len(argv) < 2 or argv[1] not in subcommands):
        raise VmisoError(f"'vmiso {' '.join(argv[:2])[:80]}' is not a command a client may run on this node",
                         "these are: " + ", ".join(sorted(f"{c} {s}".strip() for c, subs in COMMANDS.items()
                                                          for s in (subs or {""}))))
    # Also -cPATH, as click reads it.
    if given := [a for a in argv if a.split("=", 1)[0] in _THIS_MACHINES or (a.startswith("-c") and a[1:2] != "-")]:
        raise VmisoError(f"{given[0].split('=', 1)[0][:40]} is for the node's own configuration, not the client's",
                         "leave it out with --host")
    # images takes -c as a group, before its subcommand; gc and pool's subcommands after their name.
    at = 1 if argv[0] == "images" else depth
    mine = ["-c", str(config_path)] if config_path is not None else []
    return [*argv[:at], *mine, *argv[at:]]


def _command(argv: list[str], reader: Reader, writer: Writer) -> int:
    """``vmiso ARGV`` here, its stdout and stderr sent as they come, then its exit status in RESULT.

    The link's end (the client gone) ends it: SIGTERM, as a Ctrl-C would (vmiso cleans up)."""
    # --host local: here, whatever a VMISO_HOST in the environment ssh gave this process or the config says.
    process = tools.start_relayed(tools.vmiso_argv("--host", "local", *argv))
    assert process.stdout is not None and process.stderr is not None

    def relay(fd: int, kind: int) -> None:
        try:
            while block := os.read(fd, protocol.CHUNK):
                writer.send(kind, block)
        except (OSError, VmisoError):
            pass

    def watch_link() -> None:
        try:
            while reader.read() is not None:
                pass  # nothing more is due from the client
        except (OSError, VmisoError):
            pass
        if process.poll() is None:
            process.terminate()

    relays = [threading.Thread(target=relay, args=(s.fileno(), k), daemon=True)
              for s, k in ((process.stdout, protocol.STDOUT), (process.stderr, protocol.STDERR))]
    for thread in [*relays, threading.Thread(target=watch_link, daemon=True)]:
        thread.start()
    try:
        code = process.wait()
    except BaseException:  # this vmiso stopped (a signal): so does the command
        process.terminate()
        raise
    for thread in relays:
        thread.join(5)  # unless something it started holds its output open
    process.stdout.close()
    process.stderr.close()
    code = 128 - code if code < 0 else code
    try:
        writer.send_json(protocol.RESULT, {"exit_code": code})
    except protocol.LinkLost:
        pass
    return code


def _images(config: Config) -> list[dict[str, Any]]:
    """What ``vmiso images`` lists, the fields a client shows: name, size, created, sha256."""
    rows = [summary(image) for image in list_images(config.state_dir)]
    return [{key: row[key] for key in ("name", "size", "created", "sha256")} for row in rows]


def _send_error(writer: Writer, err: VmisoError) -> None:
    try:
        protocol.error_frame(writer, err)
    except protocol.LinkLost:
        pass


def _serve(config: Config, reader: Reader, writer: Writer, request: bytes, work: Path,
           stop: Callable[[], None]) -> int:
    received = work / "in"
    received.mkdir(mode=0o700)
    try:
        wants = protocol.header(request, PEER, "request")
        output = work / "out" if protocol.field(wants, "output", bool, PEER, "request") else None
        stdin_wanted = protocol.field(wants, "stdin", bool, PEER, "request")
        fd = os.open(received, tree.OPEN_DIR)
        try:
            got = receive_tree(reader, fd, Bounds(config.run.input_max_bytes, config.run.input_max_files,
                                                  "the inputs", "the node's run.input_max_bytes and "
                                                  "run.input_max_files bound them"))
        finally:
            os.close(fd)
        tops = sorted({path.split("/")[0] for path, _, _ in got.files} | {p.split("/")[0] for p in got.directories})
        plan = plan_run(config, _request(request, config, tuple(received / name for name in tops), output))
    except VmisoError as err:
        _send_error(writer, err)
        return err.exit_code
    feed = _StdinFeed(writer) if stdin_wanted else None
    interruption = Interruption()
    finished = threading.Event()
    listener = threading.Thread(target=_listen, args=(reader, feed, interruption, finished, stop),
                                name="vmiso-node-reader", daemon=True)
    listener.start()
    stdin = feed.job_end if feed is not None else None

    def step(event: str, name: str, detail: str, elapsed: float) -> None:
        writer.send_json(protocol.STEP, {"event": event, "step": name, "detail": detail, "elapsed": elapsed})
    io = JobIO(cast(BinaryIO, _Framed(writer, protocol.STDOUT)), cast(BinaryIO, _Framed(writer, protocol.STDERR)),
               cast(BinaryIO | None, stdin))
    error: VmisoError | None = None
    try:
        result = ThisHost().execute(plan, io, Steps(step), interruption)
        record = result.as_dict()
    except VmisoError as err:
        error = err
        record = err.record or RunResult.before_run(plan).failed(err, err.exit_code)
    finally:
        finished.set()
        if feed is not None:
            feed.stop()  # before the RESULT: no CREDIT follows it
    if writer.lost:
        log.warning("the link to the client was lost; the run's VM was destroyed")
        return protocol.LinkLost.exit_code
    shown = str(output) if output is not None else None
    failure = None if error is None else {
        "message": error.message.replace(shown, "--output") if shown else error.message,
        "hint": error.hint, "exit_code": error.exit_code}
    sends = output is not None and (output / outputs.MANIFEST_NAME).is_file()
    try:
        writer.send_json(protocol.RESULT, {"record": record, "error": failure, "outputs": sends})
        if sends:
            assert output is not None
            _send_outputs(writer, output)
    except protocol.LinkLost:
        log.warning("the link to the client was lost before the result was sent")
        return protocol.LinkLost.exit_code
    return 0 if error is None else error.exit_code


def _send_outputs(writer: Writer, output: Path) -> None:
    """MANIFEST (in frames, then an empty one), then the checked outputs, MANIFEST itself left out."""
    manifest = (output / outputs.MANIFEST_NAME).read_bytes()
    writer.send_data(protocol.MANIFEST, manifest)
    writer.send(protocol.MANIFEST)
    fd = os.open(output, tree.OPEN_DIR)
    try:
        send_directory(writer, fd, "", output, skip={outputs.MANIFEST_NAME})
    finally:
        os.close(fd)
    writer.send(protocol.TREE_END)


class _StdinFeed:
    """The job's stdin, fed from the client's STDIN frames by a thread of its own: the link's reader
    only queues them, so it never waits on a job that does not read, and sees a SIGNAL or the link's
    end at once.  The client sends at most STDIN_WINDOW bytes ahead (more is a protocol error, so the
    queue is bounded); each block handed to the job is given back to it as a CREDIT."""

    def __init__(self, writer: Writer) -> None:
        read_end, self._job_w = os.pipe()
        self.job_end = os.fdopen(read_end, "rb", buffering=0)  # the job's stdin
        self._writer = writer
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._ahead = 0  # bytes received and not yet handed to the job
        self._ended = False
        self._thread = threading.Thread(target=self._feed, name="vmiso-node-stdin", daemon=True)
        self._thread.start()

    def data(self, payload: bytes) -> None:
        """A STDIN frame (the listener's thread)."""
        with self._lock:
            if self._ended:
                raise protocol.ProtocolError(f"{PEER} sent STDIN after STDIN_END")
            self._ahead += len(payload)
            if self._ahead > protocol.STDIN_WINDOW:
                raise protocol.ProtocolError(f"{PEER} sent more than {protocol.STDIN_WINDOW} bytes of stdin "
                                             "ahead of the node's credit")
        self._queue.put(payload)

    def end(self) -> None:
        """STDIN_END, or the link's end: the job sees end of file once what came before it is handed over."""
        with self._lock:
            self._ended = True
        self._queue.put(None)

    def _feed(self) -> None:
        try:
            while (payload := self._queue.get()) is not None:
                view = memoryview(payload)
                while view:
                    view = view[os.write(self._job_w, view):]
                with self._lock:
                    self._ahead -= len(payload)
                self._writer.send_json(protocol.CREDIT, {"bytes": len(payload)})
        except (OSError, VmisoError):
            pass  # the job's stdin was closed (the run is over), or the link is gone
        finally:
            os.close(self._job_w)

    def stop(self) -> None:
        """At the run's end: the job's end closed (a write waiting on it fails at once) and the feeding
        thread joined, so that no CREDIT follows the RESULT."""
        self.job_end.close()
        self._queue.put(None)
        self._thread.join(10)


def _listen(reader: Reader, feed: _StdinFeed | None, interruption: Interruption, finished: threading.Event,
            stop: Callable[[], None]) -> None:
    """The client's frames while the run goes: stdin, signals, and the link's end (which stops the run)."""
    try:
        while True:
            frame = reader.read()
            if frame is None:
                break
            kind, payload = frame
            if kind == protocol.STDIN and feed is not None:
                feed.data(payload)
            elif kind == protocol.STDIN_END and feed is not None:
                feed.end()
            elif kind == protocol.SIGNAL:
                name = protocol.header(payload, PEER, "signal").get("signal")
                sig = _SIGNALS.get(name) if isinstance(name, str) else None
                if sig is not None and not interruption.request(sig) and not finished.is_set():
                    stop()
            elif kind != protocol.STDIN_END:
                raise protocol.ProtocolError(f"{PEER} sent {protocol.NAMES[kind]} during the run")
    except (OSError, VmisoError) as err:
        log.warning("the link to the client broke: %s", err)
    finally:
        if feed is not None:
            feed.end()
    if not finished.is_set():
        stop()
