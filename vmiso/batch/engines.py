"""Where a batch's tasks run: the seam, and its engines.

An ``Engine`` is handed tasks (each the argv of one ``vmiso run``, vmiso.batch.plan)
and runs every one, telling its listener when each starts and ends; the batch
(vmiso.batch.runner) decides what to run, reads what each run recorded and
keeps the batch's record.  ``Local`` runs up to N of them at once as processes
of this host; ``Slurm`` (vmiso.batch.slurm) submits the same argv as the elements
of one job array, each on its node.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .. import tools
from ..errors import ConfigError
from .plan import BatchPlan, Task

# After a stop request, the running tasks get SIGTERM (a vmiso run passes the first to its job, which may
# end as it chooses within vmiso run's own grace); a second request, or ESCALATE seconds, sends another
# (a vmiso run then destroys its VM and cleans up at once); past 3 x ESCALATE, SIGKILL (its watchdog
# destroys the VM, the next vmiso gc removes what is left).
ESCALATE = 15.0


class Stop:
    """Requests to stop a batch (Ctrl-C, SIGTERM, SIGHUP): counted by a signal handler, which may
    interrupt anything, so they are only counted here, with no lock; the engine reads them."""

    def __init__(self) -> None:
        self.requests = 0
        self.first: float | None = None

    def request(self) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.requests += 1

    @property
    def requested(self) -> bool:
        return self.requests > 0

    def level(self) -> int:
        """0: go on; 1: ask the tasks to stop; 2: insist; 3: kill them."""
        if self.first is None:
            return 0
        waited = int((time.monotonic() - self.first) // ESCALATE)
        return min(3, max(self.requests, 1) + waited)


@dataclass(frozen=True)
class Ended:
    """A task's vmiso run ended: its exit status (negative: killed by that signal), where and when."""

    task: Task
    exit_code: int
    host: str
    start: float  # time.time()
    end: float


class Listener(Protocol):
    def prepare(self, task: Task) -> bool:
        """``task`` is about to be handed to the engine (which starts it later, as a queue does): its
        place made ready, as ``starting`` would.  False when it must not run (the listener says why)."""
        ...

    def starting(self, task: Task, host: str) -> bool:
        """``task`` is about to start on ``host`` (or, once prepared, has started there): False when it
        must not (the listener says why)."""
        ...

    def ended(self, ended: Ended) -> None:
        """``ended.task`` ended; its run record and outputs are where its argv put them."""
        ...


class Engine(Protocol):
    """A place that runs a batch's tasks."""

    def run(self, tasks: Sequence[Task], listener: Listener, stop: Stop) -> None:
        """Run every task of ``tasks`` and return when all have ended.  Once ``stop`` is requested no
        task starts, and the running ones are stopped so that they clean up (their vmiso run does)."""
        ...


@dataclass
class _Running:
    task: Task
    process: tools.Detached
    log_fd: int
    start: float
    signalled: int = 0


class Local(Engine):
    """Up to ``jobs`` tasks at once, each a process of this host (vmiso run takes a pool's clone
    when a pool for the image runs, as any run does); with ``host``, each process's run is on that
    node, through the link (vmiso --host)."""

    def __init__(self, jobs: int, *, poll: float = 0.2, host: str | None = None) -> None:
        self.jobs = jobs
        self.poll = poll
        self.host = host or socket.gethostname()

    def run(self, tasks: Sequence[Task], listener: Listener, stop: Stop) -> None:
        pending = list(tasks)
        running: list[_Running] = []
        while pending or running:
            while pending and len(running) < self.jobs and not stop.requested:
                task = pending.pop(0)
                if listener.starting(task, self.host):
                    running.append(self._start(task))
            if stop.requested:
                pending.clear()
                for item in running:
                    self._stop(item, stop.level())
            for item in list(running):
                code = item.process.poll()
                if code is None:
                    continue
                os.close(item.log_fd)
                running.remove(item)
                listener.ended(Ended(item.task, code, self.host, item.start, time.time()))
            if running:
                time.sleep(self.poll)

    def _start(self, task: Task) -> _Running:
        log_fd = os.open(task.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            return _Running(task, tools.start_task(task.argv, log_fd), log_fd, time.time())
        except BaseException:
            os.close(log_fd)
            raise

    @staticmethod
    def _stop(item: _Running, level: int) -> None:
        while item.signalled < level:
            item.signalled += 1
            sig = signal.SIGKILL if item.signalled >= 3 else signal.SIGTERM
            try:
                item.process.send_signal(sig)
            except ProcessLookupError:
                pass


def _slurm(plan: BatchPlan) -> Engine:
    from .slurm import Slurm  # which imports this module's seam

    return Slurm.connect(plan)


ENGINES: dict[str, Callable[[BatchPlan], Engine]] = {"local": lambda plan: Local(plan.jobs, host=plan.host),
                                                     "slurm": _slurm}


def engine_for(name: str, plan: BatchPlan) -> Engine:
    """The engine called ``name`` for ``plan``, once it can run; ConfigError for one vmiso does not
    have, or one that cannot run from here (no Slurm controller answers)."""
    make = ENGINES.get(name)
    if make is None:
        raise ConfigError(f"--on {name}: vmiso has no such engine", "engines: " + ", ".join(sorted(ENGINES)))
    return make(plan)
