"""A VM never outlives its vmiso: a small process of its own destroys the run's VM when vmiso dies.

libvirt's auto-destroy ends a cold clone with vmiso's connection, but a restored
warm clone cannot have it, and neither holds the job's timeout once vmiso is gone.
So once a run's domain exists, vmiso starts this watchdog in a session of its own
(a closed terminal's SIGHUP and Ctrl-C's SIGINT reach vmiso, not it), with a pipe
on its stdin.  vmiso writes RELEASE and closes the pipe when it tears the VM down
itself.  If the pipe closes without RELEASE (vmiso was killed, however) or the
run's deadline passes first (vmiso hangs), the watchdog destroys the domain,
provided it still belongs to that run.

The process is ``python -m vmiso _watchdog URI NAME RUN_DIR DEADLINE`` (a hidden
command; DEADLINE in epoch seconds), which calls ``main``.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass

from . import tools

RELEASE = b"\x01"


@dataclass
class Watchdog:
    process: tools.Detached

    def release(self) -> None:
        """vmiso tears the VM down itself: the watchdog exits without touching it."""
        tools.finish_detached(self.process, RELEASE)


def start(uri: str, name: str, run_dir: str, deadline: float) -> Watchdog:
    """Watch ``name`` until released; ``deadline`` is wall-clock (time.time()) seconds."""
    return Watchdog(tools.start_detached(tools.watchdog_argv(uri, name, run_dir, deadline)))


def wait_for_release(fd: int, deadline: float) -> bool:
    """True when vmiso released the VM; False when it died or the deadline passed."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            return False
        readable, _, _ = select.select([fd], [], [], min(left, 60))
        if readable:
            data = os.read(fd, 1)
            return data == RELEASE  # b"": the pipe closed without it


def main(uri: str, name: str, run_dir: str, deadline: float) -> int:
    """Wait on stdin (the pipe from vmiso); destroy the run's VM unless released.  The exit status."""
    if wait_for_release(0, deadline):
        return 0
    from .hypervisor import connected  # only now: a released watchdog never loads libvirt

    for attempt in range(3):
        try:
            with connected(uri) as hv:
                hv.destroy_run(name, run_dir)
            return 0
        except Exception:  # nobody is left to report to; try again, then give up
            time.sleep(1 + attempt)
    return 1
