"""The analyst's side of a run on a node: ``SshNode``, the Execution for ``--host ssh://NODE``.

The plan goes to the node as a request (the node checks it again and resolves it
against its own configuration), the inputs as a stream, stdin as it is read and
the first Ctrl-C or SIGTERM while the job runs as a SIGNAL; the job's output comes
back live, then the result, then the outputs that the node's collector took from
/out, with its MANIFEST.  Nothing the node sends is believed: the outputs are
received into a private directory with the transfer's refusals (plain names, only
files and directories, the limits), each file checked against MANIFEST's sha256,
and then copied into --output by the same collector a local run uses
(vmiso.host.outputs.collect), with all its refusals.  A compromised node can
deliver nothing a local run would refuse.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from ..doctor import Check
from ..errors import ConfigError, OutputError, VmisoError
from ..host import inputs, outputs, tree, workdir
from ..host.inputs import StagedInput, check_inputs
from ..plan import RunPlan
from ..progress import Steps
from ..run import Interruption, RunResult, check_env
from . import openssh, protocol
from .openssh import Link, Target
from .protocol import Reader, Writer
from .transfer import Bounds, receive_tree, send_directory, send_file

if TYPE_CHECKING:
    from ..execution import JobIO

log = logging.getLogger(__name__)

NODE_SLACK = 120  # seconds past a run's own limits that a node has to send its result
OUTPUT_MIN_RATE = 1 << 20  # bytes/s below which a node sending outputs is given up on (with NODE_SLACK)
NODE_COMMAND = "_node"  # the node's hidden entry point (vmiso.node.server)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_LINE = re.compile(r"([0-9a-f]{64})  (.+)")
_BOOTS = (None, "preloaded", "warm", "cold")
_ACCELS = (None, "kvm", "tcg")
_TEXT_MAX = 2000  # characters of one of the node's strings kept (a hint, a refusal's reason)
_CHECKS_MAX = 200  # doctor's checks a node may report (it makes about 20)


class NodeError(VmisoError):
    """The node could not be reached, broke the protocol, or the link to it was lost."""


# How the far side is started: the argv for (target, remote command line); ssh, or a test's fake.
ArgvFor = Any


def _ssh_argv(target: Target, remote: str) -> list[str]:
    return openssh.ssh_argv(target, remote)


@dataclass
class SshNode:
    """A run executed by the vmiso on ``target``, reached with the analyst's own ``ssh``."""

    target: Target
    remote_vmiso: str = "vmiso"
    argv_for: ArgvFor = _ssh_argv

    def execute(self, plan: RunPlan, io: JobIO, steps: Steps, interruption: Interruption) -> RunResult:
        result = RunResult.before_run(plan)
        try:
            self._execute(plan, io, steps, interruption, result)
        except VmisoError as err:
            result.timings = dict(steps.timings)
            err.record = err.record or result.failed(err, err.exit_code)
            raise
        result.timings = dict(steps.timings)
        return result

    def _execute(self, plan: RunPlan, io: JobIO, steps: Steps, interruption: Interruption,
                 result: RunResult) -> None:
        _refuse_unsupported(plan, io)
        if not plan.command:
            raise VmisoError("no command to run", "give one after --, e.g. vmiso run -- python job.py")
        check_inputs(plan.inputs, plan.input_limits)
        check_env(plan.env)
        if plan.output is not None:
            outputs.check_destination(plan.output)
        with steps.step("connect", f"ssh to {self.target.url}"):
            link, reader, writer = self._open()
        try:
            try:
                writer.send_json(protocol.REQUEST, _request(plan, io.stdin is not None))
                with steps.step("send", "inputs"):
                    _send_inputs(writer, plan.inputs)
            except protocol.LinkLost:
                _raise_why(link, reader, self.target)
            done = threading.Event()
            # A node that neither finishes nor drops the link is given up on when its run could no longer
            # be going: boot, job, an interruption's grace and the node's cleanup (NODE_SLACK) are over.
            deadline = _Deadline(time.monotonic() + plan.boot_timeout + plan.timeout + interruption.grace + NODE_SLACK,
                                 "sent no result in the time the run could take")
            threads = [threading.Thread(target=_forward_signals, args=(writer, interruption, done, link, deadline),
                                        name="vmiso-node-signals", daemon=True)]
            credit = _Credit(protocol.STDIN_WINDOW)
            if io.stdin is not None:
                threads.append(threading.Thread(target=_pump_stdin, args=(io.stdin, writer, credit, done),
                                                name="vmiso-node-stdin", daemon=True))
            else:
                writer.send(protocol.STDIN_END)
            for thread in threads:
                thread.start()
            try:
                reply = self._follow(link, reader, io, steps, interruption, credit)
                interruption.job_running = False
                # Then the outputs, within a deadline of their own: their bound at OUTPUT_MIN_RATE, and the
                # slack.  A node that stalls or trickles them does not hold vmiso past it.
                deadline.move(time.monotonic() + NODE_SLACK + plan.output_max_bytes / OUTPUT_MIN_RATE,
                              "did not finish sending the run's outputs in the time they could take")
                self._finish(link, reader, plan, steps, reply, result)
            finally:
                done.set()
                interruption.job_running = False
        finally:
            link.close()

    def images(self) -> list[dict[str, Any]]:
        """The node's images: name, size, created, sha256 (each checked; the CLI shows them neutralized)."""
        rows, peer = self._ask("images")
        return [_image_row(row, peer) for row in rows]

    def doctor(self) -> list[Check]:
        """What ``vmiso doctor`` finds on the node, with its own config (each checked; the CLI shows them
        neutralized)."""
        rows, peer = self._ask("doctor")
        if len(rows) > _CHECKS_MAX:
            raise protocol.ProtocolError(f"{peer} sent more than {_CHECKS_MAX} checks")
        return [_check_row(row, peer) for row in rows]

    def command(self, argv: list[str], out: Callable[[bytes], None], err: Callable[[bytes], None]) -> int:
        """``vmiso ARGV`` on the node (vmiso.node.server.COMMANDS), with its own configuration: its stdout
        and stderr handed to ``out`` and ``err`` as they come (raw: the caller neutralizes them), then
        its exit status."""
        link, reader, writer = self._open()
        try:
            try:
                writer.send_json(protocol.REQUEST, {"op": "command", "argv": argv})
                while True:
                    kind, payload = reader.expect(protocol.STDOUT, protocol.STDERR, protocol.RESULT)
                    if kind == protocol.RESULT:
                        break
                    (out if kind == protocol.STDOUT else err)(payload)
            except protocol.LinkLost:
                _raise_why(link, reader, self.target)
            code: int = protocol.field(protocol.header(payload, reader.peer, "result"), "exit_code", int,
                                       reader.peer, "result")
            if not 0 <= code <= 255:
                raise protocol.ProtocolError(f"{reader.peer} reported exit status {code}, which is not one")
            return code
        finally:
            link.close()

    def _ask(self, op: str) -> tuple[list[Any], str]:
        """The list a one-frame request ``op`` returns (its RESULT's key ``op``), and the peer's name."""
        link, reader, writer = self._open()
        try:
            try:
                writer.send_json(protocol.REQUEST, {"op": op})
                _, payload = reader.expect(protocol.RESULT)
            except protocol.LinkLost:
                _raise_why(link, reader, self.target)
            rows = protocol.header(payload, reader.peer, "result").get(op)
            if not isinstance(rows, list):
                raise protocol.ProtocolError(f"{reader.peer} sent {op} that are not a list")
            return rows, reader.peer
        finally:
            link.close()

    def _open(self) -> tuple[Link, Reader, Writer]:
        """The link to the node's vmiso, the versions agreed."""
        peer = f"node {self.target.node}"
        remote = openssh.remote_command(self.remote_vmiso, NODE_COMMAND)
        link = Link(self.argv_for(self.target, remote), on_line=lambda line: log.warning("%s: %s", peer, line))
        reader, writer = Reader(link.from_fd, peer), Writer(link.to_fd, peer)
        try:
            self._hello(link, reader, writer)
        except BaseException:
            link.close(wait=5)
            raise
        return link, reader, writer

    def _hello(self, link: Link, reader: Reader, writer: Writer) -> None:
        try:
            writer.send_json(protocol.HELLO, protocol.hello())
            frame = reader.read()
        except (protocol.LinkLost, protocol.ProtocolError):
            frame = None
        if frame is None or frame[0] != protocol.HELLO:
            link.close(wait=5)
            said = link.said()
            explained = openssh.explain(self.target, said)
            if explained is not None:
                raise NodeError(explained.message, explained.hint)
            last = said.splitlines()[-1] if said else "it said nothing"
            raise NodeError(f"{self.target.url} did not answer as a vmiso node ({last[:_TEXT_MAX]})",
                            f"check that '{self.target.command_to_add()}' logs in, and that vmiso is installed "
                            f"there as '{self.remote_vmiso}' (else name it with --remote-vmiso)")
        theirs = protocol.check_hello(frame[1], f"node {self.target.node}")
        log.info("node %s runs vmiso %s", self.target.node, str(theirs.get("vmiso"))[:40])

    def _follow(self, link: Link, reader: Reader, io: JobIO, steps: Steps, interruption: Interruption,
                credit: _Credit) -> dict[str, Any]:
        """The run as the node reports it, until its RESULT."""
        peer = reader.peer
        while True:
            try:
                kind, payload = reader.expect(protocol.STEP, protocol.STDOUT, protocol.STDERR, protocol.CREDIT,
                                              protocol.RESULT)
            except protocol.LinkLost:
                _raise_why(link, reader, self.target)
            if kind == protocol.CREDIT:
                given = protocol.field(protocol.header(payload, peer, "credit"), "bytes", int, peer, "credit")
                if not 0 < given <= protocol.STDIN_WINDOW:
                    raise protocol.ProtocolError(f"{peer} sent a credit of {given} bytes")
                credit.add(given)
            elif kind == protocol.STDOUT:
                io.stdout.write(payload)
                io.stdout.flush()
            elif kind == protocol.STDERR:
                io.stderr.write(payload)
                io.stderr.flush()
            elif kind == protocol.STEP:
                _replay(protocol.header(payload, peer, "step"), steps, interruption, peer)
            else:
                return protocol.header(payload, peer, "result")

    def _finish(self, link: Link, reader: Reader, plan: RunPlan, steps: Steps, reply: dict[str, Any],
                result: RunResult) -> None:
        peer = reader.peer
        record = reply.get("record")
        if not isinstance(record, dict):
            raise protocol.ProtocolError(f"{peer} sent a result without a record")
        _take_record(record, result, peer)
        failure = reply.get("error")
        sent_outputs = reply.get("outputs") is True
        if sent_outputs and plan.output is None:
            raise protocol.ProtocolError(f"{peer} sends outputs that were not asked for")
        if sent_outputs and plan.output is not None:
            node_refused = _refused(record, peer, plan.output_max_files)
            with steps.step("collect", f"receive, check and copy {peer}'s /out"):
                try:
                    report = receive_outputs(reader, plan)
                except protocol.LinkLost:
                    _raise_why(link, reader, self.target)
            report.refused[:0] = node_refused
            result.outputs = report
        if failure is not None:
            if not isinstance(failure, dict):
                raise protocol.ProtocolError(f"{peer} sent an error that is not an object")
            raise protocol.error_from(failure, peer)
        code, name = record.get("exit_code"), record.get("signal")
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
            raise protocol.ProtocolError(f"{peer} reported an exit status that no job can have")
        if name is not None:
            known = getattr(signal.Signals, name, None) if isinstance(name, str) and name.startswith("SIG") else None
            if not isinstance(known, signal.Signals) or code != 128 + known.value:
                raise protocol.ProtocolError(f"{peer} reported a signal that does not match its exit status")
        result.exit_code, result.signal = code, name


def _image_row(row: Any, peer: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise protocol.ProtocolError(f"{peer} sent an image that is not an object")
    name, size, created, sha256 = row.get("name"), row.get("size"), row.get("created"), row.get("sha256")
    if (not isinstance(name, str) or not 0 < len(name) <= 200 or not isinstance(size, int) or isinstance(size, bool)
            or not (created is None or (isinstance(created, str) and len(created) <= 64))
            or not (sha256 is None or (isinstance(sha256, str) and _HEX64.fullmatch(sha256)))):
        raise protocol.ProtocolError(f"{peer} sent an image whose name, size, date or sha256 is not one")
    return {"name": name, "size": size, "created": created, "sha256": sha256}


def _check_row(row: Any, peer: str) -> Check:
    if not isinstance(row, dict):
        raise protocol.ProtocolError(f"{peer} sent a check that is not an object")
    name, ok, detail, fix, warning = (row.get(k) for k in ("name", "ok", "detail", "fix", "warning"))
    if (not isinstance(name, str) or not 0 < len(name) <= 200 or not isinstance(ok, bool)
            or not isinstance(warning, bool) or not isinstance(detail, str) or not isinstance(fix, str)):
        raise protocol.ProtocolError(f"{peer} sent a check whose name, result, detail or fix is not one")
    return Check(name, ok, detail[:_TEXT_MAX], fix[:_TEXT_MAX], warning)


def _refuse_unsupported(plan: RunPlan, io: JobIO) -> None:
    unsupported = [what for what, given in (
        ("-t (a pseudo-terminal)", io.terminal is not None), ("-p/--publish", bool(plan.publish)),
        ("--allow-host/--allow-tcp (networked runs)", bool(plan.network))) if given]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} is not supported with --host yet",
                          "run without it, or on this host (without --host)")


def _request(plan: RunPlan, stdin: bool) -> dict[str, Any]:
    """What the node needs of the plan; it resolves the rest against its own configuration."""
    return {
        "command": list(plan.command), "image": plan.image, "env": [list(pair) for pair in plan.env],
        "timeout": plan.timeout, "memory_mib": plan.memory_mib, "cpus": plan.cpus,
        "scratch_bytes": plan.scratch_bytes, "warm": plan.warm, "accept_tool_files": plan.accept_tool_files,
        "output": plan.output is not None, "stdin": stdin, "op": "run",
    }


def _send_inputs(writer: Writer, paths: tuple[Path, ...]) -> None:
    """Each input as the local run stages it: a link named on the command line followed, nothing inside."""
    for path in paths:
        name = inputs.input_name(path)
        fd = inputs.open_input(path)
        try:
            st = os.fstat(fd)
            if os.path.isdir(path) and tree.identity(st) == tree.identity(os.stat(path)):
                writer.send_json(protocol.ENTRY, {"kind": "dir", "path": name})
                send_directory(writer, fd, name, path)
            else:
                send_file(writer, fd, name, st.st_size)
        finally:
            os.close(fd)
    writer.send(protocol.TREE_END)


class _Deadline:
    """When (monotonic) the node is given up on, and what it had not done by then; moved from one
    phase of the run to the next while another thread watches it."""

    def __init__(self, at: float, why: str) -> None:
        self.value = (at, why)

    def move(self, at: float, why: str) -> None:
        self.value = (at, why)  # one assignment: the watcher sees the old pair or the new one


def _forward_signals(writer: Writer, interruption: Interruption, done: threading.Event, link: Link,
                     deadline: _Deadline) -> None:
    """The first Ctrl-C or SIGTERM while the job runs, passed to the node (which passes it to the job);
    the link ended at ``deadline`` if the node has not finished by then."""
    while not done.wait(0.05):
        at, why = deadline.value
        if time.monotonic() > at:
            link.late = why
            link.process.kill()  # the node sees the link end and destroys the VM
            return
        sig = interruption.take()
        if sig is None:
            continue
        log.warning("%s passed to the job; it has %.0f s to end (once more: stop it now)", sig.name,
                    interruption.grace)
        try:
            writer.send_json(protocol.SIGNAL, {"signal": sig.name})
        except protocol.LinkLost:
            return


class _Credit:
    """The stdin bytes the node will take now: STDIN_WINDOW at first, more with each of its CREDITs."""

    def __init__(self, start: int) -> None:
        self._left = start
        self._changed = threading.Condition()

    def add(self, count: int) -> None:
        with self._changed:
            self._left += count
            self._changed.notify_all()

    def take(self, most: int, done: threading.Event) -> int:
        """Up to ``most`` bytes of it, waiting for some; 0 once ``done`` is set (the run is over)."""
        with self._changed:
            while self._left <= 0:
                if done.is_set():
                    return 0
                self._changed.wait(0.1)
            taken = min(most, self._left)
            self._left -= taken
            return taken


def _pump_stdin(source: BinaryIO, writer: Writer, credit: _Credit, done: threading.Event) -> None:
    """This side's stdin to the node as it is read, never more than the node's credit ahead of the job."""
    try:
        fd = source.fileno()
        while block := os.read(fd, protocol.CHUNK):
            view = memoryview(block)
            while view:
                count = credit.take(len(view), done)
                if not count:
                    return
                writer.send(protocol.STDIN, bytes(view[:count]))
                view = view[count:]
        writer.send(protocol.STDIN_END)
    except (OSError, ValueError, protocol.LinkLost):
        pass  # the run ended, or the link is gone: nobody reads any more


def _replay(event: dict[str, Any], steps: Steps, interruption: Interruption, peer: str) -> None:
    """One of the node's step events, told here as this host's own (the printer shows them neutralized)."""
    kind = event.get("event")
    name = protocol.field(event, "step", str, peer, "step")[:80]
    detail = event.get("detail")
    detail = detail[:_TEXT_MAX] if isinstance(detail, str) else ""
    if kind == "start":
        steps.start(name, detail)
        if name == "exec":
            interruption.job_running = True
    elif kind in ("done", "fail"):
        if name == "exec":
            interruption.job_running = False
        steps.finish(name, ok=kind == "done")
    elif kind == "note":
        steps.note(name, detail)
    elif kind == "status":
        steps.status(name, detail)


def _raise_why(link: Link, reader: Reader, target: Target) -> NoReturn:
    """The link ended early: the node's ERROR if it sent one, else that the link was lost."""
    try:
        frame = reader.read()
    except VmisoError:
        frame = None
    if frame is not None and frame[0] == protocol.ERROR:
        raise protocol.peer_error(frame[1], reader.peer)
    link.close(wait=5)
    if link.late:
        raise NodeError(f"{target.node} {link.late}; vmiso ended the link, "
                        "and the node destroys the run's VM when it sees that",
                        f"check the node with '{target.command_to_add()}'")
    said = link.said()
    last = said.splitlines()[-1][:_TEXT_MAX] if said else "the connection ended"
    raise NodeError(f"the link to {target.node} was lost ({last}); the node destroys the run's VM when it "
                    "sees the link end", f"check the node with '{target.command_to_add()}', then run again")


def _text(value: Any) -> str | None:
    return value[:_TEXT_MAX] if isinstance(value, str) else None


def _take_record(record: dict[str, Any], result: RunResult, peer: str) -> None:
    """What of the node's record the analyst's record keeps, each value checked for its type and range."""
    run_id = record.get("run_id")
    result.run_id = run_id if isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{1,32}", run_id) else None
    sha256 = record.get("sha256")
    result.sha256 = sha256 if isinstance(sha256, str) and _HEX64.fullmatch(sha256) else None
    result.boot = record.get("boot") if record.get("boot") in _BOOTS else None
    result.accel = record.get("accel") if record.get("accel") in _ACCELS else None
    for key in ("memory_mib", "scratch_bytes"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            setattr(result, key, value)
    hints = record.get("hints")
    result.hints = tuple(h[:_TEXT_MAX] for h in hints[:10] if isinstance(h, str)) if isinstance(hints, list) else ()
    staged = []
    inputs = record.get("inputs")
    for item in inputs[:1000] if isinstance(inputs, list) else []:
        if not isinstance(item, dict):
            raise protocol.ProtocolError(f"{peer} sent an input record that is not an object")
        name, kind = _text(item.get("name")), item.get("kind")
        size, files, digest = item.get("bytes"), item.get("files"), item.get("sha256")
        if (name is None or kind not in ("file", "directory") or not isinstance(size, int)
                or not isinstance(files, int) or not isinstance(digest, str) or not _HEX64.fullmatch(digest)):
            raise protocol.ProtocolError(f"{peer} sent an input record that is not one")
        staged.append(StagedInput(name, kind, size, files, digest))
    result.inputs = tuple(staged)


def _refused(record: dict[str, Any], peer: str, limit: int) -> list[tuple[str, str]]:
    """The node's own refusals of what the job wrote (shown, never acted on; the CLI neutralizes them)."""
    found = record.get("outputs")
    rows = found.get("refused") if isinstance(found, dict) else None
    refused = []
    for row in rows[:limit] if isinstance(rows, list) else []:
        path = _text(row.get("path")) if isinstance(row, dict) else None
        reason = _text(row.get("reason")) if isinstance(row, dict) else None
        if path is None or reason is None:
            raise protocol.ProtocolError(f"{peer} sent a refusal that is not one")
        refused.append((path, f"{reason} (refused on the node)"))
    return refused


def _manifest(reader: Reader, plan: RunPlan) -> dict[str, str]:
    """The node's MANIFEST (path -> sha256), read whole, bounded by what the limits allow it to list."""
    bound = plan.output_max_bytes + plan.output_max_files * 68
    data = bytearray()
    while True:
        _, payload = reader.expect(protocol.MANIFEST)
        data += payload
        if len(data) > bound:
            raise OutputError(f"refused: {reader.peer}'s MANIFEST is larger than the output limits allow")
        if not payload:  # the empty MANIFEST frame ends it
            break
    try:
        lines = bytes(data).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise OutputError(f"refused: {reader.peer}'s MANIFEST is not UTF-8; nothing of the outputs was kept") \
            from None
    listed: dict[str, str] = {}
    for line in lines:
        match = _MANIFEST_LINE.fullmatch(line)
        if match is None or match.group(2) in listed:
            raise OutputError(f"refused: {reader.peer}'s MANIFEST has a line that is not '<sha256>  <path>' "
                              "or lists a path twice; nothing of the outputs was kept")
        listed[match.group(2)] = match.group(1)
    return listed


def receive_outputs(reader: Reader, plan: RunPlan) -> outputs.OutputReport:
    """The node's outputs: MANIFEST, then the tree, received into a private directory and checked against
    MANIFEST, then copied into ``plan.output`` by the local collector with all its refusals."""
    assert plan.output is not None
    peer = reader.peer
    listed = _manifest(reader, plan)
    staging = Path(tempfile.mkdtemp(prefix="vmiso-from-node-"))
    try:
        fd = os.open(staging, tree.OPEN_DIR)
        try:
            def on_file(path: str, size: int, digest: str) -> None:
                expected = listed.pop(path, None)
                if expected is None:
                    raise OutputError(f"refused: {peer} sent {tree.shorten(path)!r}, which its MANIFEST does not "
                                      "list; nothing of the outputs was kept")
                if expected != digest:
                    raise OutputError(f"refused: {tree.shorten(path)!r} from {peer} does not match the sha256 "
                                      "its MANIFEST gives; nothing of the outputs was kept")
            receive_tree(reader, fd, Bounds(plan.output_max_bytes, plan.output_max_files, "the outputs",
                                            "raise run.output_max_bytes or run.output_max_files in vmiso.yaml "
                                            "if that is expected"),
                         rule=outputs.name_problem, on_file=on_file)
        finally:
            os.close(fd)
        if listed:
            raise OutputError(f"refused: {peer}'s MANIFEST lists {tree.shorten(next(iter(listed)))!r}, which it did "
                              "not send; nothing of the outputs was kept")
        return outputs.collect(staging, plan.output, max_bytes=plan.output_max_bytes,
                               max_files=plan.output_max_files, accept_tool_files=plan.accept_tool_files)
    finally:
        if failures := workdir.remove_tree(staging):
            log.warning("could not remove %s: %s", staging, failures[0])

