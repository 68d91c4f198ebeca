"""``DIR/batch.json``: the batch's record, one entry per task, and what it says about running again.

The record is written whole after every task that ends (to a new file, then
renamed over the old one), so a batch killed at any moment leaves the record of
every task that had ended.  ``schema`` (now 1) changes only when a key changes
meaning or goes; new keys may appear.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..errors import EXIT_TIMEOUT, EXIT_VMISO, VmisoError
from ..host import tree
from .plan import RECORD_NAME, WORK, BatchPlan, log_name, run_record_name

BATCH_SCHEMA = 1

# What became of a task.
OK = "ok"  # the job exited 0
FAILED = "failed"  # the job's own non-zero exit, or a signal that killed it
TIMEOUT = "timeout"  # it ran past --timeout (vmiso run's 124)
ERROR = "error"  # vmiso's own failure (125): the VM did not come up, an input or output refused, ...
INTERRUPTED = "interrupted"  # the batch was stopped while it ran
PENDING = "pending"  # not run (yet)
RUNNING = "running"  # while it runs (a batch killed then leaves it so: the next one runs it again)
STATUSES = (OK, FAILED, TIMEOUT, ERROR, INTERRUPTED, PENDING, RUNNING)


def status_of(exit_code: int, error: str | None, *, interrupted: bool) -> str:
    """A task's status from its vmiso run's exit code and the run record's ``error`` (set only when the
    run has no exit code of the job's); ``interrupted``: the batch was stopping when it ended."""
    if exit_code == 0:
        return OK
    if interrupted:
        return INTERRUPTED
    if error is None:
        return FAILED  # the job's own code, even 124 or 125
    if exit_code == EXIT_TIMEOUT:
        return TIMEOUT
    return ERROR


def retryable(entry: TaskEntry) -> bool:
    """vmiso's own failure (exit 125 with the run's error): --retry runs it again; never a job's own exit."""
    return entry.status == ERROR and entry.exit_code == EXIT_VMISO


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def utc(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


@dataclass
class TaskEntry:
    """One task in the record.  Paths are relative to the batch's directory."""

    name: str
    input: str  # absolute, as given
    status: str = PENDING
    input_sha256: str | None = None  # as its last run copied it
    shared_sha256: dict[str, str] = field(default_factory=dict)  # the shared inputs (name -> sha256), as copied
    sha256: str | None = None  # the template it ran on
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    boot: str | None = None  # "preloaded", "warm" or "cold"
    host: str | None = None  # where it ran
    start: str | None = None  # UTC, ISO 8601
    end: str | None = None
    seconds: float | None = None
    manifest_sha256: str | None = None  # of NAME/MANIFEST
    attempts: int = 0  # every batch that ran it, retries included

    @property
    def output(self) -> str:
        return f"{self.name}/"

    @property
    def log(self) -> str:
        return f"{WORK}/{log_name(self.name)}"

    @property
    def record(self) -> str:
        return f"{WORK}/{run_record_name(self.name)}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": self.input, "input_sha256": self.input_sha256,
                "shared_sha256": self.shared_sha256, "status": self.status, "exit_code": self.exit_code,
                "signal": self.signal, "error": self.error, "boot": self.boot, "host": self.host,
                "start": self.start, "end": self.end, "seconds": self.seconds, "sha256": self.sha256,
                "output": self.output, "manifest_sha256": self.manifest_sha256, "log": self.log,
                "record": self.record, "attempts": self.attempts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskEntry:
        names = ("name", "input", "status", "input_sha256", "shared_sha256", "sha256", "exit_code", "signal",
                 "error", "boot", "host", "start", "end", "seconds", "manifest_sha256", "attempts")
        entry = cls(**{key: data[key] for key in names if key in data})
        if not isinstance(entry.name, str) or entry.status not in STATUSES or not isinstance(entry.attempts, int):
            raise ValueError(f"task {entry.name!r} is not a task's entry")
        return entry

    def ended(self, run: dict[str, Any] | None, *, exit_code: int, host: str, start: float, end: float,
              manifest_sha256: str | None, interrupted: bool) -> None:
        """This attempt's end: its vmiso run's ``exit_code`` and run record (None: it wrote none)."""
        run = run or {}
        error = run.get("error")
        if not run:
            error = (f"vmiso run ended with {exit_code} and wrote no record" if exit_code >= 0 else
                     f"vmiso run was killed by {signal_name(-exit_code)}")
        if not run or exit_code < 0:
            exit_code = EXIT_VMISO
        self.exit_code = exit_code
        self.error = error if isinstance(error, str) else None
        self.status = status_of(self.exit_code, self.error, interrupted=interrupted)
        self.signal = run.get("signal")
        self.boot = run.get("boot")
        self.sha256 = run.get("sha256")
        own = {i.get("name"): i.get("sha256") for i in run.get("inputs") or [] if isinstance(i, dict)}
        self.input_sha256 = own.pop(self.name, None)
        self.shared_sha256 = {k: v for k, v in own.items() if isinstance(k, str) and isinstance(v, str)}
        self.host, self.start, self.end = host, utc(start), utc(end)
        self.seconds = round(end - start, 3)
        self.manifest_sha256 = manifest_sha256

    def done_with(self, *, template_sha256: str, input_sha256: str | None, shared_sha256: dict[str, str],
                  manifest_sha256: str | None) -> bool:
        """Whether this task ended well on the same template and the same inputs, and its outputs are
        still what it wrote (their MANIFEST's digest): then running the batch again skips it."""
        return (self.status == OK and self.sha256 == template_sha256 and self.input_sha256 is not None
                and self.input_sha256 == input_sha256 and self.shared_sha256 == shared_sha256
                and self.manifest_sha256 is not None and self.manifest_sha256 == manifest_sha256)


@dataclass
class BatchRecord:
    """The whole record, tasks in the order they were given (those of earlier batches kept)."""

    image: str
    sha256: str  # the template's, when this batch started
    command: list[str]
    shared: list[str]
    engine: str
    jobs: int
    started: str
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    updated: str | None = None
    interrupted: bool = False
    skipped: int = 0  # tasks this batch found done and did not run

    @classmethod
    def new(cls, plan: BatchPlan, now: float) -> BatchRecord:
        record = cls(image=plan.image, sha256=plan.template_sha256, command=list(plan.command),
                     shared=[str(p) for p in plan.shared], engine=plan.engine, jobs=plan.jobs, started=utc(now))
        for task in plan.tasks:
            record.tasks[task.name] = TaskEntry(task.name, str(task.input))
        return record

    def counts(self, names: list[str] | None = None) -> dict[str, int]:
        chosen = [self.tasks[n] for n in names] if names is not None else list(self.tasks.values())
        return {status: sum(1 for e in chosen if e.status == status) for status in STATUSES}

    def as_dict(self) -> dict[str, Any]:
        return {"schema": BATCH_SCHEMA, "vmiso": __version__, "image": self.image, "sha256": self.sha256,
                "command": self.command, "shared": self.shared, "engine": self.engine, "jobs": self.jobs,
                "started": self.started, "updated": self.updated, "interrupted": self.interrupted,
                "skipped": self.skipped, "counts": self.counts(),
                "tasks": [e.as_dict() for e in self.tasks.values()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchRecord:
        if data.get("schema") != BATCH_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, not {BATCH_SCHEMA}")
        record = cls(image=data["image"], sha256=data["sha256"], command=list(data["command"]),
                     shared=list(data.get("shared") or []), engine=data.get("engine") or "local",
                     jobs=int(data.get("jobs") or 1), started=data["started"], updated=data.get("updated"),
                     interrupted=bool(data.get("interrupted")))
        for item in data["tasks"]:
            entry = TaskEntry.from_dict(item)
            record.tasks[entry.name] = entry
        return record


def read(root_fd: int, shown: str) -> BatchRecord | None:
    """The record in the batch's directory (``root_fd``), None when it has none; VmisoError for a file
    there that is not a batch's record."""
    try:
        fd = os.open(RECORD_NAME, tree.OPEN_FILE, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise VmisoError(f"cannot read {shown}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            return BatchRecord.from_dict(json.loads(f.read(64 * 1024**2)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise VmisoError(f"{shown} is not the record of a vmiso batch ({err})",
                         "name a new --output directory, or the one of the batch to resume") from None


def write(root_fd: int, record: BatchRecord, now: float) -> None:
    """The record written to a new file in the batch's directory, then renamed over ``batch.json``:
    whoever reads it (or a batch killed meanwhile) sees the old record or the new, whole."""
    record.updated = utc(now)
    data = (json.dumps(record.as_dict(), indent=2) + "\n").encode()
    temporary = f".{RECORD_NAME}.{os.getpid()}.tmp"
    try:
        os.unlink(temporary, dir_fd=root_fd)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=root_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, RECORD_NAME, src_dir_fd=root_fd, dst_dir_fd=root_fd)
