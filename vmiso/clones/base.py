"""The seam of this wing: one way a clone comes to run, and what every way is given.

A way (preloaded from a pool, restored warm, booted cold) either brings a clone
up for the run, registering on the run's ExitStack how to undo it, or returns
None, having said why when the reason is news (a pool that gives none, a warm
state that does not fit); the next way is then tried.  The cold way always
brings one up or raises.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..domain import Hypervisor
from . import watchdog
from .clone import CloneDir, copy_boot_files

if TYPE_CHECKING:
    from ..image.store import Image
    from ..plan import RunPlan
    from ..progress import Steps
    from .warm import WarmKey


@dataclass(frozen=True)
class Booted:
    """A running clone of the run's: its directory, its domain's name (a restored one keeps
    the name it was saved with) and how it came to run."""

    clone: CloneDir
    name: str
    boot: str  # "preloaded", "warm" or "cold"
    link: socket.socket | None = None  # a preloaded clone's link, its sshd waiting
    inputs_staged: bool = True  # False: a preloaded clone's inputs disk is filled by the run, before GO


@dataclass
class CloneJob:
    """What every way is given: the run's plan and image, the key a clone must match, the name a
    booted clone takes, where progress goes, and the ExitStack that undoes what is made."""

    hv: Hypervisor
    plan: RunPlan
    image: Image
    key: WarmKey
    name: str
    steps: Steps
    cleanup: ExitStack
    stage: Callable[[], CloneDir]  # the run's own directory, its inputs copied in
    _own: CloneDir | None = field(default=None, repr=False)

    def own_clone(self) -> CloneDir:
        """The run's own directory with verified copies of the kernel and initramfs: made by the
        first way that needs it, and handed to the next one as it is."""
        if self._own is None:
            clone = self.stage()
            with self.steps.step("kernel", "verified copies of the kernel and initramfs"):
                copy_boot_files(clone, self.image)
            self._own = clone
        return self._own

    def metadata(self, clone: CloneDir) -> dict[str, str]:
        """The domain's metadata: whose run it is (the reaper and the watchdog read it)."""
        return {"kind": "run", "run_dir": str(clone.path), "image": self.image.name}

    def watch(self, clone: CloneDir, stack: ExitStack | None = None) -> Callable[[str], watchdog.Watchdog]:
        """What a way calls once it knows its domain's name: from then on the VM dies with this
        process, and by the run's deadline even if this process hangs (see watchdog.py); the
        watchdog is released when ``stack`` (the run's cleanup) closes."""
        def guard(domain: str) -> watchdog.Watchdog:
            dog = watchdog.start(self.plan.libvirt_uri, domain, str(clone.path), self.plan.watchdog_seconds)
            (stack or self.cleanup).callback(dog.release)
            return dog
        return guard


class Way(Protocol):
    """One way a clone comes to run."""

    def bring_up(self, job: CloneJob) -> Booted | None:
        """A running clone for ``job``, its undoing on ``job.cleanup``; None when this way has none."""
        ...
