"""How a clone comes to run: taken from a pool, restored warm, or booted cold, with its watchdog.

The ways stand beside each other behind one interface (``base.Way``), tried in
order by ``bring_up``:

    pool/     preloaded: a clone a pool of this user restored and linked before the run asked
              (protocol: the messages; server: the pool's process; client: the run's side)
    warm.py   restored: a saved clone (a warm state) restored onto a fresh overlay
    cold.py   booted: a fresh overlay over the template, its kernel booted

``clone.py`` is what every way makes (a clone's directory and domain spec) and
``watchdog.py`` the process that keeps a clone from outliving its vmiso.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Booted, CloneJob, Way
from .cold import Cold
from .pool.client import Preloaded
from .warm import Warm

if TYPE_CHECKING:
    from ..plan import RunPlan

__all__ = ["Booted", "CloneJob", "Cold", "Preloaded", "Warm", "Way", "bring_up", "ways_for"]


def ways_for(plan: RunPlan) -> tuple[Way, ...]:
    """The ways a run of ``plan`` may come to its clone, in the order they are tried."""
    return (Preloaded(), Warm(), Cold()) if plan.warm else (Cold(),)


def bring_up(ways: Sequence[Way], job: CloneJob) -> Booted:
    """The first clone one of ``ways`` brings up (the last must bring one up or raise)."""
    for way in ways:
        booted = way.bring_up(job)
        if booted is not None:
            return booted
    raise AssertionError("the last way must bring a clone up or raise")  # a bug: ways_for ends with Cold
