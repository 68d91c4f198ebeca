"""Booted cold: a fresh copy-on-write overlay over the template, its kernel booted from the start.

Always possible and the slowest way: the guest boots to its sshd (seconds under
KVM, several under TCG).  A run that asks for --cold, or finds no warm state that
fits, comes here.
"""

from __future__ import annotations

from ..domain import domain_xml
from ..host.inputs import prefetch_bytes
from .base import Booted, CloneJob
from .clone import clone_spec, make_overlay, make_scratch


class Cold:
    """The last way: it brings a clone up or raises."""

    def bring_up(self, job: CloneJob) -> Booted:
        clone = job.own_clone()
        with job.steps.step("overlay", "copy-on-write clone of the template, scratch disk"):
            make_overlay(clone, job.image.template)
            make_scratch(clone, job.key.scratch_bytes)
        spec = clone_spec(name=job.name, image=job.image, clone=clone, accel=job.key.accel,
                          memory_mib=job.key.memory_mib, cpus=job.key.cpus,
                          prefetch_bytes=prefetch_bytes(clone.inputs_disk),
                          tcg_cpu_features=job.key.tcg_cpu_features, metadata=job.metadata(clone))
        with job.steps.step("start", "transient domain, cold boot"):
            dog = job.watch(clone)(job.name)  # released after the destroy below (an ExitStack unwinds in reverse)
            job.cleanup.callback(job.hv.destroy, job.name)
            job.hv.start_transient(job.name, domain_xml(spec))
            dog.started()
        return Booted(clone, job.name, "cold")
