"""Which accelerator a VM runs under: KVM when it can really run the guest, TCG only when asked.

QEMU's security policy does not treat TCG (software emulation) as a security
boundary, so vmiso never falls back to it silently: ``auto`` refuses where KVM
cannot be used, and names ``tcg`` as the explicit choice.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .domain import TCG_WITHHELD
from .errors import AccelError

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
TCG_WARNING = ("running under TCG (software emulation): QEMU does not treat TCG as a security "
               "boundary, so the guest is less isolated than under KVM")


def kvm_problem(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> str | None:
    """None when KVM can run a normal guest kernel here; else why not."""
    if (sys_module / "kvm_pvm").exists():
        return ("the host's KVM is the paravirtual kvm_pvm module, which cannot run a "
                "normal guest kernel")
    if not dev.exists():
        return f"{dev} does not exist (no hardware virtualization, or the kvm module is not loaded)"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"cannot open {dev}: {err.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return f"{dev} does not answer KVM_GET_API_VERSION: {err.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{dev} speaks KVM API {version}, not {KVM_API_VERSION}"
    if not any((sys_module / m).exists() for m in ("kvm_intel", "kvm_amd")):
        return "neither kvm_intel nor kvm_amd is loaded"
    return None


def resolve(requested: str, kvm_check: Callable[[], str | None] = kvm_problem, *,
            tcg_cpu_features: tuple[str, ...] = ()) -> str:
    """``auto``/``kvm``/``tcg`` -> ``kvm`` or ``tcg``, or an AccelError saying what to do.

    ``tcg_cpu_features``: the withheld CPU features the config offers anyway (warned about).
    """
    if requested == "tcg":
        log.warning(TCG_WARNING)
        for name in tcg_cpu_features:
            log.warning("vm.tcg_cpu_features offers %s to the guest, though %s",
                        name, TCG_WITHHELD.get(name, "vmiso withholds it"))
        return "tcg"
    problem = kvm_check()
    if problem is None:
        return "kvm"
    raise AccelError(
        f"KVM cannot be used: {problem}",
        "to run under software emulation instead, set 'accel: tcg' in vmiso.yaml or "
        "VMISO_ACCEL=tcg; QEMU does not treat TCG as a security boundary",
    )


def host_cpu_id(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A short digest of the host CPU's model and flags: what host-passthrough shows a guest.

    A warm state saved on one CPU (or before a microcode or kernel change hid a
    feature) must not be restored where its code could meet a missing instruction.
    """
    wanted = []
    try:
        for line in cpuinfo.read_text().splitlines():
            key = line.partition(":")[0].strip()
            if key in ("vendor_id", "model name", "flags") and line not in wanted:
                wanted.append(line)
            if not line.strip() and wanted:
                break  # the first processor is enough
    except OSError:
        return "unknown"
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]
