"""``vmiso batch --on slurm``: a batch's tasks as one Slurm job array, each element one task's ``vmiso run``.

Two sides, one module:

- the submitter (``Slurm``, an ``Engine``): it writes, in a new ``DIR/.batch/slurm/N/``,
  one JSON file per element (``INDEX.json``: the task's argv, log, run record, the image
  and its sha256) and the fixed script ``element.sh``, then submits them with one
  ``sbatch --array=0-(n-1)%J``, each element asking for the run's CPUs and its memory
  plus QEMU_OVERHEAD_MIB (libvirt keeps QEMU in machine.slice, outside the job's
  cgroup: Slurm accounts what it does not see), and a ``--time`` from the run's
  timeout.  It then follows the array through the files each element writes
  (``INDEX.started.json``, ``INDEX.result.json``) and ``squeue``; an element that
  leaves the queue without a result (cancelled, timed out, its node lost) gets a run
  record that says so.  No ``sacct``: a site may have no accounting database.
- the element (``element``, behind the hidden ``vmiso _slurm_element INDEX.json``
  that ``element.sh`` execs): on its node it checks the image by sha256, runs the
  task's ``vmiso run`` argv as a child (stdout and stderr to the task's log), passes
  on every signal Slurm sends (scancel, --time: SIGTERM, then SIGKILL after KillWait;
  vmiso run destroys its VM on the second SIGTERM at once), and writes its result.

Nothing here builds a shell command: the script is fixed text, every name travels in JSON
files and as argv.  DIR and the inputs must be on a filesystem the nodes share.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import config as config_mod, tools
from ..errors import EXIT_VMISO, ConfigError, ImageError, ToolError, VmisoError
from ..image import store
from .engines import Ended, Listener, Stop
from .plan import TASK_OVERHEAD_MIB, BatchPlan, Resources, Task

# What each element asks beyond the run's --memory: QEMU's own memory and vmiso run's Python (the
# same allowance as the local engine's -j rule).
QEMU_OVERHEAD_MIB = TASK_OVERHEAD_MIB
# An element's --time: the run's boot timeout and job timeout plus this, for what comes after the
# job (copying the outputs back, the cleanup, the result).
TIME_ALLOWANCE_S = 300
# An element that left the queue gets this long to show its result file (a shared filesystem's
# caches) before it counts as ended without one.
RESULT_GRACE_S = 5.0
# The element passes Slurm's first signal on; a second one, or this many seconds, sends another
# (vmiso run then destroys its VM at once): well within Slurm's KillWait (30 s by default).
ELEMENT_ESCALATE_S = 10.0
JOB_NAME = "vmiso-batch"
SCRIPT_NAME = "element.sh"
JOB_FILE = "job"  # the array's id, once sbatch gave it
# The script every element runs: fixed text, the interpreter and the array's directory its arguments.
SCRIPT = """#!/bin/sh
# vmiso batch --on slurm: one element of the job array.  Its task is in the JSON file named
# by its index in this directory; $1 is the Python that runs vmiso, $2 this directory.
exec "$1" -P -m vmiso _slurm_element "$2/$SLURM_ARRAY_TASK_ID.json"
"""
SHARED_FS = ("DIR and the inputs must be on a filesystem that the submitting host and the nodes share, "
             "at the same paths")


@dataclass(frozen=True)
class Element:
    """One element's task, as its file holds it (written by the submitter, read on the node)."""

    name: str
    argv: tuple[str, ...]
    log: str
    record: str  # the task's run record (vmiso run --json)
    command: tuple[str, ...]  # the task's command, for a record the element writes itself
    image: str
    template_sha256: str
    config: str | None
    state_dir: str | None
    started: str  # INDEX.started.json
    result: str  # INDEX.result.json

    @classmethod
    def of(cls, task: Task, plan: BatchPlan, directory: Path, index: int) -> Element:
        dash = task.argv.index("--")
        return cls(task.name, task.argv, str(task.log), str(task.record), task.argv[dash + 1:], plan.image,
                   plan.template_sha256, str(plan.config) if plan.config else None,
                   str(plan.state_dir) if plan.state_dir else None,
                   str(directory / f"{index}.started.json"), str(directory / f"{index}.result.json"))

    @classmethod
    def read(cls, path: Path) -> Element:
        try:
            data = json.loads(path.read_text())
            data["argv"], data["command"] = tuple(data["argv"]), tuple(data["command"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise VmisoError(f"cannot read the element's task from {path}: {err}",
                             f"the batch's directory must be on a filesystem this node shares ({SHARED_FS})") \
                from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` to a new file renamed to ``path``: whoever polls for it reads it whole or not at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def minutes_for(resources: Resources) -> int | None:
    """An element's --time in minutes: the run's boot timeout and timeout plus TIME_ALLOWANCE_S (past it,
    vmiso run would have stopped the job itself); None without a timeout."""
    if resources.timeout is None:
        return None
    return math.ceil((resources.boot_timeout + resources.timeout + TIME_ALLOWANCE_S) / 60)


def write_failed_record(path: Path, element: Element, error: str) -> None:
    """The task's run record, in vmiso run's shape, for a run that never started or never wrote one."""
    from ..run import RunResult  # the run record's one owner

    record = RunResult(None, element.image, None, element.command, EXIT_VMISO).failed(VmisoError(error), EXIT_VMISO)
    _write_json(path, record)


# --- the element, on its node --------------------------------------------------------------------

def node_name() -> str:
    """This node as Slurm names it (SLURMD_NODENAME), else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_image(element: Element, node: str) -> None:
    """ImageError when this node's image of that name is missing or is not the template the batch planned."""
    fix = (f"provision image {element.image} on {node} from the same config (or copy the submitting host's "
           f"image there), check it with 'vmiso images verify {element.image}', then run the batch again")
    config = config_mod.override(config_mod.load(Path(element.config) if element.config else None),
                                 state_dir=Path(element.state_dir) if element.state_dir else None)
    try:
        image = store.get_image(config.state_dir, element.image)
        digest = store.verified_sha256(image)
    except ImageError as err:
        raise ImageError(f"node {node}: {err.message}; the batch needs sha256 {element.template_sha256}", fix) \
            from None
    if digest != element.template_sha256:
        raise ImageError(f"node {node}: image {element.image} has sha256 {digest}, not the batch's "
                         f"{element.template_sha256}", fix)


def element(path: Path, *, poll: float = 0.2) -> int:
    """Run one element's task on this node; its exit status (the task's vmiso run's, 128 + N for a
    signal N, 125 when the image is not the batch's).  The result file says the same."""
    task = Element.read(path)
    node = node_name()
    start = time.time()
    _write_json(Path(task.started), {"node": node, "start": start, "job": _element_id()})
    log_fd = os.open(task.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            check_image(task, node)
        except VmisoError as err:
            os.write(log_fd, f"vmiso: error: {err}\n".encode())
            write_failed_record(Path(task.record), task, str(err))
            code = EXIT_VMISO
        else:
            code = _run_task(task, log_fd, poll)
    finally:
        os.close(log_fd)
    _write_json(Path(task.result), {"node": node, "start": start, "end": time.time(), "exit_code": code,
                                    "job": _element_id()})
    return code if code >= 0 else 128 - code


def _element_id() -> str:
    return f"{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"


def _run_task(task: Element, log_fd: int, poll: float) -> int:
    """The task's vmiso run, with every signal this element gets passed on; its returncode."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    stop = Stop()
    before = [signal.signal(sig, lambda _s, _f: stop.request()) for sig in signals]
    try:
        process = tools.start_task(task.argv, log_fd)
        sent = 0
        while (code := process.poll()) is None:
            wanted = 0 if not stop.requested else stop.requests + int(
                (time.monotonic() - (stop.first or 0)) // ELEMENT_ESCALATE_S)
            while sent < wanted:
                sent += 1
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            time.sleep(poll)
        return code
    finally:
        for sig, handler in zip(signals, before, strict=True):
            signal.signal(sig, handler)


# --- the submitter ------------------------------------------------------------------------------

def check_slurm() -> None:
    """ConfigError when this host cannot submit: no sbatch, or no Slurm controller answers."""
    fix = ("run vmiso batch --on slurm on a host that can submit to your cluster (sbatch and 'scontrol ping' "
           "work there: the Slurm client and the cluster's slurm.conf, SLURM_CONF), or use --on local")
    conf = os.environ.get("SLURM_CONF")
    if conf is not None and not Path(conf).is_file():  # Slurm's clients would retry for a minute
        raise ConfigError(f"--on slurm: SLURM_CONF names {conf}, which is not a file", fix)
    try:
        code, out, err = tools.slurm_query(["scontrol", "ping"], timeout=30)
    except ToolError as error:
        raise ConfigError(f"--on slurm: {error.message}", fix) from None
    try:
        tools.which("sbatch")
    except ToolError as error:
        raise ConfigError(f"--on slurm: {error.message}", fix) from None
    if code != 0 or "is UP" not in out:
        said = (out + err).strip().replace("\n", "; ") or f"exit status {code}"
        raise ConfigError(f"--on slurm: no Slurm controller answers ({said})", fix)


@dataclass
class _Element:
    index: int
    task: Task
    started: Path
    result: Path
    node: str | None = None
    start: float | None = None
    left_queue: float | None = None  # when squeue stopped listing it without a result
    done: bool = False


class Slurm:
    """Every task one element of one job array, at most ``jobs`` at once (Slurm places them)."""

    def __init__(self, plan: BatchPlan, *, poll: float = 1.0, queue_every: float = 3.0,
                 python: str | None = None) -> None:
        self.plan = plan
        self.poll = poll
        self.queue_every = queue_every
        self.python = python or sys.executable
        self.job: str | None = None

    @classmethod
    def connect(cls, plan: BatchPlan) -> Slurm:
        """The engine once this host can submit (check_slurm)."""
        check_slurm()
        return cls(plan)

    def run(self, tasks: Sequence[Task], listener: Listener, stop: Stop) -> None:
        self._refuse_running_arrays()
        ready = [task for task in tasks if not stop.requested and listener.prepare(task)]
        if not ready:
            return
        directory = self._new_directory()
        elements = []
        for index, task in enumerate(ready):
            item = Element.of(task, self.plan, directory, index)
            _write_json(directory / f"{index}.json", asdict(item))
            elements.append(_Element(index, task, Path(item.started), Path(item.result)))
        script = directory / SCRIPT_NAME
        script.write_text(SCRIPT)
        script.chmod(0o700)
        self.job = self._submit(script, directory, len(ready))
        (directory / JOB_FILE).write_text(self.job + "\n")
        self._follow(elements, listener, stop, directory)

    def _new_directory(self) -> Path:
        root = self.plan.layout.slurm
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o700)
        number = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
        while True:
            try:
                (root / str(number)).mkdir(mode=0o700)
                return root / str(number)
            except FileExistsError:
                number += 1

    def _refuse_running_arrays(self) -> None:
        """An array an earlier vmiso batch left running (that batch was killed) would write the same
        outputs: VmisoError until it ends."""
        root = self.plan.layout.slurm
        for job_file in root.glob(f"*/{JOB_FILE}") if root.is_dir() else []:
            job = job_file.read_text().strip()
            if job.isdigit() and self._queued(job):  # (None: squeue did not answer; sbatch will say why)
                raise VmisoError(f"Slurm job array {job} of an earlier vmiso batch into {self.plan.layout.root} "
                                 "is still queued or running", f"wait for it to end, or cancel it: scancel {job}")

    def _submit(self, script: Path, directory: Path, count: int) -> str:
        resources = self.plan.resources
        throttle = min(self.plan.jobs, count)
        argv = tools.sbatch_argv(script, self.python, str(directory), array=f"0-{count - 1}%{throttle}",
                                 cpus=resources.cpus, memory_mib=resources.memory_mib + QEMU_OVERHEAD_MIB,
                                 minutes=minutes_for(resources), workdir=directory, name=JOB_NAME)
        code, out, err = tools.slurm_query(argv)
        job = out.strip().split(";")[0]
        if code != 0 or not job.isdigit():
            raise VmisoError(f"sbatch refused the batch's job array: {(err or out).strip() or code}",
                             "see what your cluster allows (partitions, --mem, --time); "
                             "give smaller --memory, --cpus or --timeout")
        return job

    def _queued(self, job: str) -> dict[int, tuple[str, str]] | None:
        """The array's elements in the queue: index -> (state, node); None when squeue did not answer."""
        try:
            code, out, err = tools.slurm_query(tools.squeue_array_argv(job))
        except ToolError:
            return None
        if code != 0:
            return {} if "Invalid job id" in err else None
        queued = {}
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].isdigit():
                queued[int(words[0])] = (words[1], words[2] if len(words) > 2 else "")
        return queued

    def _follow(self, elements: list[_Element], listener: Listener, stop: Stop, directory: Path) -> None:
        assert self.job is not None
        cancelled = 0
        asked = 0.0
        while not all(e.done for e in elements):
            if stop.requested and cancelled < stop.level():
                cancelled = self._cancel(cancelled, stop.level())
            for item in elements:
                if item.done:
                    continue
                if item.node is None and (started := _read_json(item.started)) is not None:
                    item.node, item.start = str(started.get("node")), float(started.get("start") or time.time())
                    listener.starting(item.task, item.node)
                if (result := _read_json(item.result)) is not None:
                    self._ended(item, result, listener)
            now = time.monotonic()
            if now - asked >= self.queue_every:
                asked = now
                queued = self._queued(self.job)
                if queued is not None:
                    for item in elements:
                        if item.done or item.index in queued:
                            continue
                        if item.left_queue is None:
                            item.left_queue = now
                        elif now - item.left_queue >= RESULT_GRACE_S:
                            self._lost(item, listener, stop, directory)
            if not all(e.done for e in elements):
                time.sleep(self.poll)

    def _cancel(self, done: int, level: int) -> int:
        """Stop the array: scancel (SIGTERM to running elements, pending ones never start), then SIGTERM
        again to every process of the running ones (vmiso run destroys its VM at once), then SIGKILL."""
        assert self.job is not None
        while done < level:
            done += 1
            argv = tools.scancel_argv(self.job, None if done == 1 else "KILL" if done >= 3 else "TERM")
            with contextlib.suppress(ToolError):
                tools.slurm_query(argv)
        return done

    def _ended(self, item: _Element, result: dict[str, Any], listener: Listener) -> None:
        node = str(result.get("node") or item.node or "")
        if item.node is None:  # it ended before its start was seen
            listener.starting(item.task, node)
        code = result.get("exit_code")
        start, end = float(result.get("start") or time.time()), float(result.get("end") or time.time())
        listener.ended(Ended(item.task, code if isinstance(code, int) else EXIT_VMISO, node, start, end))
        item.done = True

    def _lost(self, item: _Element, listener: Listener, stop: Stop, directory: Path) -> None:
        """The element left the queue and wrote no result: Slurm ended it (cancelled, past --time, its
        node lost) or its script failed; its run record says so."""
        item.done = True
        if (result := _read_json(item.result)) is not None:  # it came after all
            item.done = False
            self._ended(item, result, listener)
            return
        element_id = f"{self.job}_{item.index}"
        state = self._final_state(element_id)
        if item.node is None and stop.requested:
            return  # cancelled before it started: the task stays pending
        output = directory / f"{item.index}.out"
        error = (f"slurm ended element {element_id}" + (f" on {item.node}" if item.node else " before it started")
                 + f": {state}, before it wrote its result (its own output: {output})")
        record = Path(item.task.record)
        run = _read_json(record)
        if run is None:  # vmiso run wrote none, or was killed while it wrote it
            with contextlib.suppress(FileNotFoundError):
                record.unlink()
            write_failed_record(record, Element.of(item.task, self.plan, directory, item.index), error)
        code = run.get("exit_code") if run is not None else EXIT_VMISO
        if item.node is None:
            listener.starting(item.task, "")
        now = time.time()
        listener.ended(Ended(item.task, code if isinstance(code, int) else EXIT_VMISO, item.node or "",
                             item.start or now, now))

    def _final_state(self, element_id: str) -> str:
        """``JobState`` (``Reason``, ``ExitCode``) as scontrol still knows it; what it said otherwise."""
        try:
            code, out, err = tools.slurm_query(tools.scontrol_job_argv(element_id))
        except ToolError as error:
            return f"state unknown ({error.message})"
        fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
        if code != 0 or "JobState" not in fields:
            return f"state unknown ({(err or out).strip()})"
        return f"{fields['JobState']} (reason {fields.get('Reason', '?')}, exit code {fields.get('ExitCode', '?')})"

