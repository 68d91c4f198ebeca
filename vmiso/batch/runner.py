"""A batch from start to end: its directory, resume, the engine's rounds, retries, the exit status.

``run_batch`` opens (or makes) the batch's directory, holds its lock, reads the
record a batch there left, skips each task that ended well on the same template
and inputs, and hands the others to the engine.  Before a task starts, what an
earlier attempt left at its name (outputs, run record) is moved aside, never
removed or followed: a successful task's outputs are never lost.  After each
task ends its run record is read and the batch's record written again.  Tasks
that failed for vmiso's own reasons (exit 125) run again, up to ``--retry``
times each, in rounds of their own after the others; a job's own non-zero
exit never does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import EXIT_INTERRUPTED, EXIT_VMISO, OutputError, VmisoError
from ..host import tree
from ..host.inputs import input_digest
from ..host.outputs import MANIFEST_NAME, not_own
from ..host.workdir import flocked
from . import record
from .engines import Ended, Engine, Stop
from .plan import PREVIOUS, RECORD_NAME, WORK, BatchPlan, Task, input_name, run_record_name
from .record import ERROR, OK, PENDING, RUNNING, BatchRecord, TaskEntry

# vmiso batch's exit status when the batch ran but a task did not exit 0 (as xargs: 123 when an
# invocation of the command exited non-zero).  0: every task exited 0; 125: the batch itself could
# not run; 130: it was interrupted (the next batch resumes it).
EXIT_SOME_FAILED = 123


class Watcher(Protocol):
    """Who follows the batch as it goes (the CLI's progress)."""

    def planned(self, total: int, skipped: list[str], to_run: list[str]) -> None: ...

    def started(self, entry: TaskEntry) -> None: ...

    def ended(self, entry: TaskEntry) -> None: ...


@dataclass
class BatchResult:
    record: BatchRecord
    names: list[str]  # this batch's tasks, in order
    skipped: list[str]  # found done: not run
    ran: list[str] = field(default_factory=list)  # the tasks that ran, each once however often it was tried
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 0 if all(self.record.tasks[n].status == OK for n in self.names) else EXIT_SOME_FAILED


def open_output(root: Path) -> int:
    """The batch's directory, made when new, opened once (O_NOFOLLOW): the same rules as run's --output
    (new, or the caller's own that only they can write), and an existing one must be empty or hold the
    record of a batch."""
    own = "name a new directory, or the directory of the batch to resume (it holds batch.json)"
    try:
        os.mkdir(root, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise OutputError(f"--output {root}: its parent directory does not exist") from None
    except OSError as err:
        raise OutputError(f"cannot make --output {root}: {err.strerror}") from None
    try:
        fd = os.open(root, tree.OPEN_DIR)
    except OSError as err:
        what = "is a symbolic link" if os.path.islink(root) else f"is not a directory ({err.strerror})"
        raise OutputError(f"--output {root} {what}", own) from None
    try:
        if (problem := not_own(os.fstat(fd))) is not None:
            raise OutputError(f"--output {root} {problem}", own)
        names = os.listdir(fd)
        if names and RECORD_NAME not in names:
            raise OutputError(f"--output {root} is not empty and holds no {RECORD_NAME}: vmiso never overwrites "
                              "files", own)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _work_dir(root_fd: int, shown: Path) -> int:
    """DIR/.batch, made if new: the batch's own (0700), never a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(WORK, 0o700, dir_fd=root_fd)
    fd = os.open(WORK, tree.OPEN_DIR, dir_fd=root_fd)
    st = os.fstat(fd)
    if not_own(st) is not None or st.st_mode & 0o077:
        os.close(fd)
        raise OutputError(f"{shown / WORK} is not this batch's own (mode 0700, yours)", "remove it, or name a new "
                          "--output directory")
    with contextlib.suppress(FileExistsError):
        os.mkdir(PREVIOUS, 0o700, dir_fd=fd)
    return fd


def _read_json(dir_fd: int, name: str) -> dict[str, Any] | None:
    """A run record vmiso run wrote: None when there is none or it cannot be read."""
    try:
        fd = os.open(name, tree.OPEN_FILE, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(64 * 1024**2))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def manifest_digest(root_fd: int, name: str) -> str | None:
    """The sha256 of DIR/NAME/MANIFEST, opened without following a link; None when there is none."""
    try:
        dir_fd = os.open(name, tree.OPEN_DIR, dir_fd=root_fd)
    except OSError:
        return None
    try:
        fd = os.open(MANIFEST_NAME, tree.OPEN_FILE, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        while block := os.read(fd, 1024 * 1024):
            digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _move_aside(root_fd: int, work_fd: int, task: Task, attempt: int) -> None:
    """What an earlier attempt left at the task's names (its outputs, its run record) renamed into
    .batch/previous/NAME.N/ and NAME.N.json: renamed, never followed or removed."""
    previous_fd = os.open(PREVIOUS, tree.OPEN_DIR, dir_fd=work_fd)
    try:
        number = attempt
        while any(_exists(n, previous_fd) for n in (f"{task.name}.{number}", run_record_name(f"{task.name}.{number}"))):
            number += 1
        for name, from_fd, to in ((task.name, root_fd, f"{task.name}.{number}"),
                                  (run_record_name(task.name), work_fd, run_record_name(f"{task.name}.{number}"))):
            if _exists(name, from_fd):
                os.rename(name, to, src_dir_fd=from_fd, dst_dir_fd=previous_fd)
    except OSError as err:
        raise VmisoError(f"cannot move the earlier outputs of task {task.name} aside: {err.strerror or err}",
                         f"move {task.output} out of the way yourself") from None
    finally:
        os.close(previous_fd)


def _write_header(task: Task, attempt: int, now: float) -> None:
    fd = os.open(task.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"==> vmiso batch: task {task.name}, attempt {attempt}, {record.utc(now)}\n".encode())
    finally:
        os.close(fd)


class _Batch:
    """The engine's listener: each task's entry kept up to date, and the record written."""

    def __init__(self, plan: BatchPlan, rec: BatchRecord, root_fd: int, work_fd: int, stop: Stop,
                 watcher: Watcher, clock: Callable[[], float]) -> None:
        self.plan, self.rec, self.root_fd, self.work_fd = plan, rec, root_fd, work_fd
        self.stop, self.watcher, self.clock = stop, watcher, clock
        self.prepared: set[str] = set()  # handed to the engine, not started yet

    def save(self) -> None:
        record.write(self.root_fd, self.rec, self.clock())

    def prepare(self, task: Task) -> bool:
        entry = self.rec.tasks[task.name]
        try:
            _move_aside(self.root_fd, self.work_fd, task, entry.attempts)
        except VmisoError as err:  # the task cannot run: said in its entry, the others go on
            entry.status, entry.exit_code, entry.error = ERROR, EXIT_VMISO, str(err)
            self.save()
            self.watcher.ended(entry)
            return False
        entry.attempts += 1
        _write_header(task, entry.attempts, self.clock())
        self.prepared.add(task.name)
        return True

    def starting(self, task: Task, host: str) -> bool:
        if task.name not in self.prepared and not self.prepare(task):
            return False
        self.prepared.discard(task.name)
        entry = self.rec.tasks[task.name]
        entry.status, entry.host, entry.start, entry.end = RUNNING, host, record.utc(self.clock()), None
        self.save()
        self.watcher.started(entry)
        return True

    def ended(self, ended: Ended) -> None:
        entry = self.rec.tasks[ended.task.name]
        run = _read_json(self.work_fd, run_record_name(ended.task.name))
        entry.ended(run, exit_code=ended.exit_code, host=ended.host, start=ended.start, end=ended.end,
                    manifest_sha256=manifest_digest(self.root_fd, ended.task.name),
                    interrupted=self.stop.requested)
        self.save()
        self.watcher.ended(entry)


def _merge(old: BatchRecord | None, plan: BatchPlan, now: float, shown: Path) -> BatchRecord:
    """This batch's record: the earlier one's tasks kept (those not in this batch too), this batch's added."""
    new = BatchRecord.new(plan, now)
    if old is None:
        return new
    if old.command != list(plan.command):
        raise VmisoError(f"{shown} holds a batch of another command ({' '.join(old.command)})",
                         "name a new --output directory, or give the same command to resume that batch")
    tasks = dict(old.tasks)
    for name, entry in new.tasks.items():
        kept = tasks.get(name)
        if kept is None or kept.input != entry.input:
            tasks[name] = entry if kept is None else TaskEntry(name, entry.input, attempts=kept.attempts)
        elif kept.status == RUNNING:  # a batch killed while it ran
            kept.status = PENDING
    new.tasks = tasks
    return new


def _done(plan: BatchPlan, rec: BatchRecord, root_fd: int) -> list[str]:
    """The tasks that ended well on this template, with these inputs, whose outputs are as they wrote them."""
    shared: dict[str, str] | None = None
    done = []
    for task in plan.tasks:
        entry = rec.tasks[task.name]
        if entry.status != OK:
            continue
        try:
            if shared is None:
                shared = {input_name(p): input_digest(p) for p in plan.shared}
            digest = input_digest(task.input)
        except VmisoError:
            continue  # the run says why, when the task runs again
        if entry.done_with(template_sha256=plan.template_sha256, input_sha256=digest, shared_sha256=shared,
                           manifest_sha256=manifest_digest(root_fd, task.name)):
            done.append(task.name)
    return done


def run_batch(plan: BatchPlan, engine: Engine, watcher: Watcher, stop: Stop, *,
              clock: Callable[[], float] = time.time) -> BatchResult:
    """Run ``plan``'s tasks that are not done yet on ``engine``; the batch's record as it ended."""
    root = plan.layout.root
    with contextlib.ExitStack() as stack:
        root_fd = open_output(root)
        stack.callback(os.close, root_fd)
        rec = _merge(record.read(root_fd, str(plan.layout.record)), plan, clock(), plan.layout.record)
        work_fd = _work_dir(root_fd, root)
        stack.callback(os.close, work_fd)
        try:
            stack.enter_context(flocked(plan.layout.lock, wait=False))
        except BlockingIOError:
            raise VmisoError(f"another vmiso batch is writing to {root}",
                             "wait for it to end, or name another --output directory") from None
        return _run(plan, engine, watcher, stop, rec, root_fd, work_fd, clock)
    raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions


def _run(plan: BatchPlan, engine: Engine, watcher: Watcher, stop: Stop, rec: BatchRecord, root_fd: int,
         work_fd: int, clock: Callable[[], float]) -> BatchResult:
    names = [t.name for t in plan.tasks]
    skipped = _done(plan, rec, root_fd)
    rec.skipped = len(skipped)
    result = BatchResult(rec, names, skipped)
    batch = _Batch(plan, rec, root_fd, work_fd, stop, watcher, clock)
    todo = [t for t in plan.tasks if t.name not in skipped]
    batch.save()
    watcher.planned(len(names), skipped, [t.name for t in todo])
    result.ran = [t.name for t in todo]
    tries = dict.fromkeys(result.ran, 0)
    while todo and not stop.requested:
        engine.run(todo, batch, stop)
        todo = [t for t in todo if record.retryable(rec.tasks[t.name]) and tries[t.name] < plan.retry]
        for task in todo:
            tries[task.name] += 1
    result.interrupted = stop.requested
    rec.interrupted = stop.requested
    batch.save()
    return result
