"""Where a run executes: the seam, and the one place so far, this host.

A run's plan says where it executes (``RunPlan.where``) and ``execution_for`` gives
the ``Execution`` for that place.  ``ThisHost`` opens this host's libvirt
connection and runs the plan's steps (vmiso.run).  ``SshNode`` (vmiso.node.client)
is the other, beside it: the same plan, run by the vmiso of a node reached with the
analyst's ssh, the job's streams and its checked outputs carried back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from . import run
from .errors import ConfigError
from .hypervisor import connected
from .node import openssh
from .plan import LOCAL, RunPlan
from .progress import Steps
from .run import Interruption, RunResult
from .ssh import Terminal


@dataclass(frozen=True)
class JobIO:
    """This process's side of the job: the streams it reads and writes, its terminal, and who is
    told where each published port is."""

    stdout: BinaryIO
    stderr: BinaryIO
    stdin: BinaryIO | None = None  # None: the job reads end of file
    terminal: Terminal | None = None  # a pseudo-terminal for the job (vmiso shell, run -t)
    on_published: Callable[[int, str], None] = lambda guest_port, where: None


class Execution(Protocol):
    """A place a run executes."""

    def execute(self, plan: RunPlan, io: JobIO, steps: Steps, interruption: Interruption) -> RunResult:
        """Run ``plan`` there: the job's exit code, or an error saying why it has none."""
        ...


class ThisHost(Execution):
    """The run's clone on this host, through libvirt at ``plan.libvirt_uri``."""

    def execute(self, plan: RunPlan, io: JobIO, steps: Steps, interruption: Interruption) -> RunResult:
        with connected(plan.libvirt_uri) as hv:
            return run.run(plan, hv, io.stdout, io.stderr, steps, io.stdin, interruption=interruption,
                           terminal=io.terminal, on_published=io.on_published)


PLACES: dict[str, Callable[[], Execution]] = {LOCAL: ThisHost}


def execution_for(plan: RunPlan) -> Execution:
    """Where ``plan`` executes; ConfigError for a place vmiso does not know."""
    if plan.where.startswith(openssh.SCHEME):
        from .node.client import SshNode  # it imports this module (JobIO) when type-checked

        return SshNode(openssh.parse_target(plan.where), plan.remote_vmiso)
    place = PLACES.get(plan.where)
    if place is None:
        raise ConfigError(f"a run cannot execute on {plan.where!r}",
                          f"runs execute on this host ({LOCAL!r}) or on a node ({openssh.SCHEME}[USER@]NODE[:PORT])")
    return place()
