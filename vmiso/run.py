"""``vmiso run``: one disposable, offline clone per job, from start to cleanup.

The clone is a fresh qcow2 overlay over the read-only template (or over a warm
state's disk), started as a transient libvirt domain with no network device at
all.  Its one link to the host is SSH over a virtio-serial port whose host end
is a Unix socket in the run's own directory.  Inputs are copied into a per-run
directory shared read-only; outputs come back through a second share and are
checked before they are copied out.  Whatever happens, the domain, the overlay
and the staging directories are removed.

``run`` reads as its steps: check the plan, stage the run directory, boot a
clone (warm when a saved state fits, cold otherwise), connect, execute the job,
tear the VM down, judge how the job ended, collect the outputs, clean up.
"""

from __future__ import annotations

import logging
import re
import secrets
import shlex
import signal
import time
import typing
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import __version__, accel, clones, ssh, tools
from .clones import warm
from .clones.clone import CloneDir, make_clone_dir, size_inputs_disk
from .domain import NAME_PREFIX, Hypervisor
from .errors import EXIT_VMISO, GuestError, Interrupted, RunTimeout, VmisoError
from .host import outputs, reaper, state
from .host.inputs import GUEST_IN, StagedInput, build_disk, check_inputs, fill_disk, prefetch_bytes, stage_inputs
from .host.workdir import bounded_share_size, check_room, private_dir, share_full
from .image.seed import RUN_USER
from .image.store import Image, check_guest, get_image, verified_sha256
from .network import allow
from .network.gateway import Gateway
from .plan import LOCAL, RunPlan
from .progress import Steps

log = logging.getLogger(__name__)

GUEST_OUT = "/out"
GUEST_VENV = "/opt/vmiso/venv"
GUEST_TMP = "/tmp"  # the scratch disk
INTERRUPT_GRACE = 10  # seconds a job has to end after the first SIGINT/SIGTERM is passed to it


@dataclass
class Interruption:
    """Ctrl-C and SIGTERM while a job runs: the first is the job's, the second (or the
    grace period's end) vmiso's.

    The CLI's signal handler calls ``request``; while the job runs, the run passes
    the first signal on to the job and gives it INTERRUPT_GRACE seconds to end.
    """

    grace: float = INTERRUPT_GRACE
    job_running: bool = False
    received: signal.Signals | None = None
    at: float = 0.0
    _forwarded: bool = False

    def request(self, sig: signal.Signals) -> bool:
        """True when the running job gets ``sig``; False when vmiso must stop now."""
        if not self.job_running or self.received is not None:
            return False
        self.received, self.at = sig, time.monotonic()
        return True

    def take(self) -> signal.Signals | None:
        """The signal to pass on to the job, once."""
        if self.received is None or self._forwarded:
            return None
        self._forwarded = True
        return self.received

    def expired(self) -> bool:
        return self.received is not None and time.monotonic() - self.at > self.grace


# The run record's shape (--json), the same for every outcome: a job that ended (whatever its
# code), one stopped by its timeout or an interruption, vmiso's own error, a refusal before any
# VM started.  What was not known when the run ended is null (or empty).  Bump RECORD_SCHEMA
# when a key changes meaning or goes; a key added keeps it.
RECORD_SCHEMA = 1
RECORD_KEYS: dict[str, tuple[type, ...]] = {
    "schema": (int,), "vmiso": (str,), "run_id": (str, type(None)), "command": (list,), "image": (str, type(None)),
    "sha256": (str, type(None)), "accel": (str, type(None)), "boot": (str, type(None)), "inputs": (list,),
    "memory_mib": (int,), "scratch_bytes": (int,), "exit_code": (int,), "signal": (str, type(None)),
    "error": (str, type(None)), "hints": (list,), "timings": (dict,), "outputs": (dict, type(None)),
    "published": (dict,), "network": (dict, type(None)), "host": (str, type(None)),
}


@dataclass
class RunResult:
    """One run as its record tells it (RECORD_KEYS), filled in as the run goes: complete for a
    job that ended, up to the failure for one that did not (VmisoError.record)."""

    run_id: str | None
    image: str | None  # None: the configuration was not read
    sha256: str | None  # the template's
    command: tuple[str, ...]
    exit_code: int
    boot: str | None = None  # "preloaded", "warm" or "cold"
    memory_mib: int = 0
    scratch_bytes: int = 0
    signal: str | None = None  # "SIGKILL" when a signal ended the job
    timings: dict[str, float] = field(default_factory=dict)
    outputs: outputs.OutputReport | None = None
    published: dict[int, str] = field(default_factory=dict)  # guest port -> "127.a.b.c:port" on this host
    network: dict[str, Any] | None = None  # a networked run's record (network.gateway.Record.as_dict); None: offline
    hints: tuple[str, ...] = ()  # what vmiso's rules explain about a failure (failure_hints)
    accel: str | None = None  # what the clone ran under: "kvm" or "tcg"
    inputs: tuple[StagedInput, ...] = ()
    error: str | None = None  # why the run has no exit code of the job's (vmiso's own code then)
    host: str | None = None  # the node it ran on ("ssh://..."); None: this host

    @classmethod
    def before_run(cls, plan: RunPlan) -> RunResult:
        """What a run's record says before anything of the run is known."""
        return cls(None, plan.image, None, plan.command, EXIT_VMISO, memory_mib=plan.memory_mib,
                   scratch_bytes=plan.scratch_bytes, host=None if plan.where == LOCAL else plan.where)

    def failed(self, err: BaseException, exit_code: int) -> dict[str, Any]:
        """The record of a run that ``err`` ended, with vmiso's ``exit_code``."""
        self.exit_code, self.error = exit_code, str(err) or type(err).__name__
        return self.as_dict()

    def signal_message(self) -> tuple[str, str] | None:
        """(what happened, what to do) when a signal ended the job, for the CLI to say."""
        if self.signal is None:
            return None
        hint = {
            "SIGILL": "an illegal instruction: a compiled package needs a CPU feature the guest's CPU lacks",
            "SIGKILL": ("most likely the guest's out-of-memory killer: raise --memory "
                        f"(this run had {self.memory_mib} MiB)"),
            "SIGSEGV": "a crash in native code (or a stack overflow)",
            "SIGBUS": "a bad memory access; also what a full /tmp gives a job that maps its files",
        }.get(self.signal, "")
        return f"the job was killed by {self.signal}", hint

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": RECORD_SCHEMA,
            "vmiso": __version__,
            "run_id": self.run_id,
            "command": list(self.command),
            "image": self.image,
            "sha256": self.sha256,
            "accel": self.accel,
            "boot": self.boot,
            "inputs": [i.as_dict() for i in self.inputs],
            "memory_mib": self.memory_mib,
            "scratch_bytes": self.scratch_bytes,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "hints": list(self.hints),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "outputs": self.outputs.as_dict() if self.outputs else None,
            "published": {str(guest): where for guest, where in self.published.items()},
            "network": self.network,
            "host": self.host,
        }


class Tail:
    """A stream that passes every byte on unchanged and keeps the last ``size`` of them."""

    def __init__(self, stream: BinaryIO, size: int = 16 * 1024) -> None:
        self._stream = stream
        self._size = size
        self.kept = b""

    def write(self, data: bytes) -> int:
        written = self._stream.write(data)
        self.kept = (self.kept + bytes(data))[-self._size:]
        return len(data) if written is None else written

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, ...: the stream's own
        return getattr(self._stream, name)


_OFFLINE = re.compile(rb"Temporary failure in name resolution|Name or service not known|"
                      rb"nodename nor servname|getaddrinfo failed|Could not resolve host|"
                      rb"Network is unreachable|No route to host|Failed to establish a new connection")
_NO_MODULE = re.compile(rb"ModuleNotFoundError: No module named '([A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z0-9_.]*)?'")
_READ_ONLY_IN = re.compile(rb"Read-only file system: '" + re.escape(GUEST_IN.encode()) + rb"(?:/|')")


def failure_hints(tail: bytes, image: str) -> tuple[str, ...]:
    """What vmiso's rules explain about a failed job's last output: one line each, at most one of a kind.

    ``tail`` is the guest's and hostile: only what the patterns match goes into a hint,
    and a module name only as the identifier the pattern admits."""
    hints = []
    if _OFFLINE.search(tail):
        hints.append("this run has no network, on purpose: the VM has no network device, no DNS and no "
                     "route out; give the job what it needs with -i, or let it reach one service with "
                     "--allow-host HOST (README, \"Networked runs\")")
    if found := _NO_MODULE.findall(tail):
        module = found[-1].decode()
        # The name is the job's to choose: vmiso names no package to install (a typosquat's lure).
        hints.append(f"the job's output says image {image} has no module {module!r}: see what it holds "
                     f"with 'vmiso images show {image}'; to add a package, name it in the requirements "
                     "from a source you trust and provision again")
    if _READ_ONLY_IN.search(tail):
        hints.append(f"{GUEST_IN} is read-only: write results to {GUEST_OUT} ($VMISO_OUT) and copy them "
                     "out with -o")
    return tuple(hints)


@dataclass(frozen=True)
class TimedOut:
    """The job ran past its timeout; the VM was destroyed."""

    seconds: int


# How a job ended: by itself (as sshd reported it), or stopped by vmiso.
Outcome = ssh.JobExit | TimedOut


# ssh.connect, or a fake of it in tests.
Connect = Callable[..., ssh.Session]


def run(plan: RunPlan, hv: Hypervisor, stdout: BinaryIO, stderr: BinaryIO, steps: Steps | None = None,
        stdin: BinaryIO | None = None, *, connect: Connect = ssh.connect, interruption: Interruption | None = None,
        terminal: ssh.Terminal | None = None,
        on_published: Callable[[int, str], None] = lambda guest, where: None) -> RunResult:
    """Run ``plan.command`` in a fresh clone; the job's exit code, or an error saying why it has none.

    ``stdin`` is streamed to the job (None: end of file); ``interruption`` passes the
    first Ctrl-C or SIGTERM while the job runs on to it (see Interruption);
    ``terminal`` gives the job a pseudo-terminal (``vmiso shell``, ``run -t``);
    ``on_published(guest_port, "127.a.b.c:port")`` is called as each of
    ``plan.publish`` opens, before the job starts.
    """
    interruption = interruption or Interruption()
    steps = steps or Steps()
    result = RunResult.before_run(plan)
    result.run_id = secrets.token_hex(6)
    try:
        _run(plan, hv, result, stdout, stderr, steps, stdin, connect, interruption, terminal, on_published)
    except VmisoError as err:  # the record up to the failure goes with the error
        result.timings = dict(steps.timings)
        err.record = result.failed(err, err.exit_code)
        raise
    return result


def _run(plan: RunPlan, hv: Hypervisor, result: RunResult, stdout: BinaryIO, stderr: BinaryIO, steps: Steps,
         stdin: BinaryIO | None, connect: Connect, interruption: Interruption, terminal: ssh.Terminal | None,
         on_published: Callable[[int, str], None]) -> None:
    """The steps of ``run``, each writing what it learnt into ``result``."""
    assert result.run_id is not None
    image, result.accel, input_room = _check(plan)
    reaper.collect(hv, plan.state_dir)  # what a vmiso killed earlier left behind
    with ExitStack() as cleanup:
        with steps.step("verify", "template sha256"):
            result.sha256 = verified_sha256(image)
        key = warm.key_for(plan, template_sha256=result.sha256, hypervisor=hv.version(), accel=result.accel)
        vm = clones.bring_up(clones.ways_for(plan), clones.CloneJob(
            hv, plan, image, key, f"{NAME_PREFIX}run-{result.run_id}", steps, cleanup,
            stage=lambda: _stage(plan, result, key, input_room, steps, cleanup)))
        result.boot = vm.boot
        if not vm.inputs_staged:
            result.inputs = _stage_inputs(plan, vm.clone, input_room, steps)
        session = _connect(hv, vm, image, plan, connect, steps, cleanup)
        gateway = _open_network(session, plan.network, image, result, steps, cleanup)
        published = _publish(session, plan.publish, on_published, cleanup)
        result.published = {p.guest_port: f"{p.host}:{p.host_port}" for p in published}
        # What the job said last, on stderr (or on its terminal, where both streams are one).
        said = Tail(stdout if terminal is not None else stderr)
        through = typing.cast(BinaryIO, said)
        outcome = _execute(session, vm.clone, plan, through if terminal is not None else stdout,
                           through if terminal is None else stderr, stdin, steps, interruption, terminal)
        _teardown(hv, vm, session, gateway, published, steps)
        if gateway is not None:
            result.network = gateway.record.as_dict(plan.network)
        result.outputs = _collect(plan, vm.clone, steps)
        result.exit_code, result.signal = _judge(outcome, result.outputs, plan.output)
        with steps.step("cleanup", "remove the overlay and staging directories"):
            cleanup.close()
    result.memory_mib, result.scratch_bytes = key.memory_mib, key.scratch_bytes
    result.timings = dict(steps.timings)
    if result.exit_code != 0:
        result.hints = failure_hints(said.kept, image.name)


def _stage_inputs(plan: RunPlan, clone: CloneDir, input_room: int, steps: Steps) -> tuple[StagedInput, ...]:
    """A preloaded clone's inputs: staged, their image built and copied onto the clone's inputs
    disk, which its guest mounts once the run says GO (warm.HELLO)."""
    with steps.step("stage", "inputs, and the image of them on the clone's inputs disk"):
        check_room(clone.inputs, 0, 0, input_room)
        staged = tuple(stage_inputs(plan.inputs, clone.inputs, plan.input_limits, large=clone.inputs_large))
        build_disk(clone.inputs, clone.inputs_image)
        fill_disk(clone.inputs_image, clone.inputs_disk)
        return staged


def _teardown(hv: Hypervisor, vm: clones.Booted, session: ssh.Session, gateway: Gateway | None,
              published: list[ssh.PublishedPort], steps: Steps) -> None:
    with steps.step("teardown", "destroy the VM"):
        for port in published:
            port.close()
        if gateway is not None:
            gateway.close()  # every connection the job opened ends with it
        session.close()
        hv.destroy(vm.name)


def _collect(plan: RunPlan, clone: CloneDir, steps: Steps) -> outputs.OutputReport | None:
    """What the job wrote, collected whatever ended it: a job stopped by its timeout keeps its
    partial results, under the same checks (the VM is gone: /out is still)."""
    if plan.output is None:
        return None
    with steps.step("collect", f"check and copy {GUEST_OUT}"):
        return outputs.collect(clone.outputs, plan.output, max_bytes=plan.output_max_bytes,
                               max_files=plan.output_max_files, accept_tool_files=plan.accept_tool_files)


def _check(plan: RunPlan) -> tuple[Image, str, int]:
    """Everything that can be refused before anything is made: (the image, the accelerator, the host's
    bytes the inputs take staged)."""
    if not plan.command:
        raise VmisoError("no command to run", "give one after --, e.g. vmiso run -- python job.py")
    input_room = check_inputs(plan.inputs, plan.input_limits)
    tools.which("mkfs.erofs")  # /in is an image of the inputs, always
    check_env(plan.env)
    if plan.output is not None:
        outputs.check_destination(plan.output)
    accel_name = accel.resolve(plan.accel, tcg_cpu_features=plan.tcg_cpu_features)
    image = get_image(plan.state_dir, plan.image)
    check_guest(image)
    return image, accel_name, input_room


def _stage(plan: RunPlan, result: RunResult, key: warm.WarmKey, input_room: int, steps: Steps,
           cleanup: ExitStack) -> CloneDir:
    """The run's directory, removed when ``cleanup`` closes, with the inputs' image (its /in) in it."""
    with steps.step("stage", "run directory, inputs and their image"):
        runs = state.home(plan.state_dir).runs
        check_room(private_dir(runs), key.scratch_bytes, bounded_share_size(*plan.output_limits), input_room)
        assert result.run_id is not None
        path = runs / result.run_id
        cleanup.callback(reaper.remove, path)  # whatever make_clone_dir got to
        clone = make_clone_dir(path, output_limits=plan.output_limits)
        result.inputs = tuple(stage_inputs(plan.inputs, clone.inputs, plan.input_limits, large=clone.inputs_large))
        build_disk(clone.inputs, clone.inputs_disk)
        # One size for every way it boots (a warm state's inputs disk is this size); sparse.
        # (A disk of an image's few KiB is also more than the guest's erofs would mount.)
        size_inputs_disk(clone, key.inputs_bytes)
    return clone


def _connect(hv: Hypervisor, vm: clones.Booted, image: Image, plan: RunPlan, connect: Connect, steps: Steps,
             cleanup: ExitStack) -> ssh.Session:
    with steps.step("connect", "SSH over the virtio-serial link"):
        session = connect(
            vm.clone.ssh_socket, name=vm.name, host_key=image.read(image.host_key.name), client_key=image.client_key,
            user=RUN_USER, deadline=time.monotonic() + plan.boot_timeout,
            alive=lambda: hv.is_running(vm.name), link=vm.link,
            hello=warm.hello_for(prefetch_bytes(vm.clone.inputs_disk)) if vm.boot != "cold" else None)
        cleanup.callback(session.close)
    return session


def _open_network(session: ssh.Session, rules: allow.Rules, image: Image, result: RunResult, steps: Steps,
                  cleanup: ExitStack) -> Gateway | None:
    """A networked run's gateway, in this process, and the guest ports its sshd listens on for it."""
    if not rules:
        return None
    shown = ", ".join([*map(str, rules.hosts), *(f"127.0.0.1:{r.guest_port} -> {r.host}:{r.port}" for r in rules.tcp)])
    with steps.step("network", f"the run's gateway, forwarding only to {shown}"):
        gateway = Gateway.start(rules)
        cleanup.callback(gateway.close)
        try:
            ports = session.serve_guest_ports(gateway.routes(), gateway.busy)
        except ssh.ForwardRefused as err:
            raise GuestError(err.message, f"image {image.name} was provisioned before vmiso allowed networked runs; "
                             f"provision it again to use --allow-host or --allow-tcp") from None
        cleanup.callback(ports.close)

    def keep_record(kind: object, err: BaseException | None, tb: object) -> None:
        if err is not None:  # a run that failed (a timeout) still says what its job reached
            result.network = gateway.record.as_dict(rules)
    cleanup.push(keep_record)
    return gateway


def _publish(session: ssh.Session, ports: tuple[int, ...], on_published: Callable[[int, str], None],
             cleanup: ExitStack) -> list[ssh.PublishedPort]:
    """Listen on the host's loopback for each guest port, until the job ends."""
    published = []
    for port in ports:
        forward = session.publish(port)
        cleanup.callback(forward.close)
        published.append(forward)
        on_published(port, f"{forward.host}:{forward.host_port}")
    return published


def _execute(session: ssh.Session, clone: CloneDir, plan: RunPlan, stdout: BinaryIO, stderr: BinaryIO,
             stdin: BinaryIO | None,
             steps: Steps, interruption: Interruption, terminal: ssh.Terminal | None) -> Outcome:
    """Run the job, streaming its output, until it ends or times out.

    What it can write to /out is bounded by the kernel (clone.make_clone_dir): a job
    that fills it gets "no space left on device" as on any full disk, and vmiso says
    so once the job has ended.
    """
    with steps.step("exec", shlex.join(plan.command)):
        try:
            env = (*plan.network.guest_env().items(), *plan.env)
            status = session.execute(job_command(plan.command, env), stdout, stderr, stdin=stdin,
                                     deadline=time.monotonic() + plan.timeout,
                                     should_stop=interruption.expired,
                                     signals=lambda: _forward(interruption), terminal=terminal,
                                     on_start=lambda: setattr(interruption, "job_running", True))
        finally:
            interruption.job_running = False
    if full := share_full(clone.outputs):
        limit = (f"{plan.output_max_files} files and directories (run.output_max_files)" if full == "files"
                 else f"{plan.output_max_bytes} bytes (run.output_max_bytes)")
        log.warning("the job filled %s: it may hold %s; raise that in vmiso.yaml if the job needs more",
                    GUEST_OUT, limit)
    if status is None and interruption.expired():
        assert interruption.received is not None
        raise Interrupted(f"the job did not end within {interruption.grace:.0f} s of "
                          f"{interruption.received.name}; the VM was destroyed")
    if status is None:
        return TimedOut(plan.timeout)
    return status


def _forward(interruption: Interruption) -> signal.Signals | None:
    sig = interruption.take()
    if sig is not None:
        log.warning("%s passed to the job; it has %.0f s to end (once more: stop it now)",
                    sig.name, interruption.grace)
    return sig


def _judge(outcome: Outcome, collected: outputs.OutputReport | None = None,
           output: Path | None = None) -> tuple[int, str | None]:
    """(vmiso's exit code, the signal's name) of a job that ended; an error for one that did not,
    saying what of its outputs was kept."""
    if isinstance(outcome, TimedOut):
        kept = ""
        if collected is not None and output is not None:
            count = len(collected.files)
            kept = (f"; {count} file{'s' if count != 1 else ''} it had written, checked, "
                    f"{'are' if count != 1 else 'is'} in {output}" if count
                    else "; nothing it had written to /out was kept")
        raise RunTimeout(f"the job ran longer than {outcome.seconds} s; the VM was destroyed{kept}",
                         "raise --timeout if the job needs longer")
    if outcome.unknown_signal:
        raise GuestError("the job was killed by a signal that vmiso does not know")
    if outcome.signal is not None:
        return 128 + outcome.signal.value, outcome.signal.name  # as a shell and docker run report it
    if outcome.code is not None:
        if not 0 <= outcome.code <= 255:  # what no process can exit with (and 256 would wrap to 0)
            raise GuestError(f"the guest reported exit status {outcome.code}, which no job can have")
        return outcome.code, None
    raise GuestError("the job ended without an exit status")


# --- the steps' helpers ----------------------------------------------------------------


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env(pairs: tuple[tuple[str, str], ...]) -> None:
    for key, value in pairs:
        if not _ENV_NAME.fullmatch(key):
            raise VmisoError(f"{key!r} is not a valid environment variable name",
                             "use letters, digits and '_', not starting with a digit: -e NAME=VALUE")
        if "\0" in value:
            raise VmisoError(f"the value of {key} contains a NUL character, which no environment can hold")


def job_command(command: tuple[str, ...], env: tuple[tuple[str, str], ...] = ()) -> str:
    """The shell line sshd runs for the job: a fixed environment (nothing of the host's),
    then the user's -e variables, then the user's argv, all quoted."""
    fixed = {
        "VMISO_IN": GUEST_IN,
        "VMISO_OUT": GUEST_OUT,
        "PATH": f"{GUEST_VENV}/bin:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": GUEST_VENV,
        "HOME": f"/home/{RUN_USER}",
        "LANG": "C.UTF-8",
        "TMPDIR": GUEST_TMP,
    }
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in [*fixed.items(), *env])
    return f"cd {GUEST_IN} && exec env -i {assignments} {shlex.join(command)}"
