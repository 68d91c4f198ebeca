"""A VM never outlives its vmiso: a small process of its own destroys the run's VM when vmiso dies.

libvirt's auto-destroy ends a cold clone with vmiso's connection, but a restored
warm clone cannot have it, and neither holds the job's timeout once vmiso is gone.
So once a run's domain exists, vmiso starts this watchdog in a session of its own
(a closed terminal's SIGHUP and Ctrl-C's SIGINT reach vmiso, not it), with a pipe
on its stdin.  vmiso writes RELEASE and closes the pipe when it tears the VM down
itself.  If the pipe closes without RELEASE (vmiso was killed, however) or the
run's time is up first (vmiso hangs), the watchdog destroys the domain,
provided it still belongs to that run.

The process is ``python -m vmiso _watchdog URI NAME RUN_DIR SECONDS`` (a hidden
command; SECONDS: how long from its start it waits at most, a duration), which
calls ``main``.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass

from .. import tools

RELEASE = b"\x01"  # vmiso tears the VM down itself
STARTED = b"\x02"  # the domain exists now
APPEAR_SECONDS = 30


@dataclass
class Watchdog:
    process: tools.Detached

    def started(self) -> None:
        """The domain exists: if vmiso dies from now on, it is there to destroy at once."""
        tools.tell_detached(self.process, STARTED)

    def release(self) -> None:
        """vmiso tears the VM down itself: the watchdog exits without touching it."""
        tools.finish_detached(self.process, RELEASE)


def start(uri: str, name: str, run_dir: str, seconds: float) -> Watchdog:
    """Watch ``name`` until released, for at most ``seconds`` from now."""
    return Watchdog(tools.start_detached(tools.watchdog_argv(uri, name, run_dir, seconds)))


def wait_for_release(fd: int, deadline: float) -> tuple[bool, bool]:
    """(released, started): released is False when vmiso died or ``deadline`` (monotonic)
    passed; started says whether vmiso had said that the domain exists."""
    started = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, started
        readable, _, _ = select.select([fd], [], [], min(left, 60))
        if readable:
            data = os.read(fd, 1)
            if data == STARTED:
                started = True
                continue
            return data == RELEASE, started  # b"": the pipe closed without it


def main(uri: str, name: str, run_dir: str, seconds: float) -> int:
    """Wait on stdin (the pipe from vmiso); destroy the run's VM unless released.  The exit status.

    A vmiso killed while libvirt was still creating or restoring the domain leaves
    it to appear a moment later: then the watchdog looks for it for APPEAR_SECONDS
    before it concludes that there is nothing to destroy.
    """
    released, started = wait_for_release(0, time.monotonic() + seconds)
    if released:
        return 0
    from ..hypervisor import connected  # only now: a released watchdog never loads libvirt

    give_up = time.monotonic() + (5 if started else APPEAR_SECONDS)
    while True:
        try:
            with connected(uri) as hv:
                if hv.destroy_run(name, run_dir) != "absent" or started:
                    return 0
        except Exception:  # nobody is left to report to: try again until giving up
            pass
        if time.monotonic() >= give_up:
            return 1
        time.sleep(0.5)
