"""Warm states: booted clones saved to disk, restored by runs instead of booting.

A warm state is a clone of the template booted until ssh-link waits for the
host, then saved by libvirt (memory and device state) beside its disk.  A warm
run restores it onto a fresh overlay over that disk, so it is as disposable as a
cold one: nothing a run writes reaches the saved disk or another run, and the
template is never written.  The guest reseeds its kernel RNG with randomness the
host sends before SSH starts (libvirt 9 refuses a restore with a new VM
generation ID, which would otherwise do it).  The shares are mounted only after
the restore (QEMU refuses to save a VM with a mounted 9p share).

libvirt refuses two running domains with one name or UUID, and a restored
domain keeps both as saved (libvirt 9 refuses to change them on restore), so an
image has several slots, each its own saved clone, used by one run at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .clone import CloneDir, clone_spec, make_clone_dir, make_overlay
from .domain import NAME_PREFIX, Retarget, domain_name, domain_xml, retarget
from .errors import GuestError, ImageError
from .hypervisor import Hypervisor
from .image.store import Image
from .workdir import flocked, install_dir
from .progress import Steps

log = logging.getLogger(__name__)

SLOTS = 2
READY = b"vmiso-ssh-link: waiting"
INFO = "warm.json"


@dataclass(frozen=True)
class WarmKey:
    """What a warm state must match to be used: anything else means a cold boot."""

    template_sha256: str
    hypervisor: str
    accel: str
    memory_mib: int
    cpus: int
    vmiso: str = __version__


@dataclass(frozen=True)
class Slot:
    clone: CloneDir

    @property
    def state(self) -> Path:
        return self.clone.path / "state.save"

    @property
    def info(self) -> Path:
        return self.clone.path / INFO

    @property
    def lock(self) -> Path:
        return self.clone.path.with_name(self.clone.path.name + ".lock")


def warm_root(image: Image) -> Path:
    return image.path / "warm"


def slots(image: Image) -> list[Slot]:
    root = warm_root(image)
    if not root.is_dir():
        return []
    return [Slot(CloneDir(p)) for p in sorted(root.glob("slot-*")) if p.is_dir()]


def _wait_ready(console_log: Path, deadline: float, alive) -> None:
    while time.monotonic() < deadline:
        try:
            if READY in console_log.read_bytes():
                return
        except FileNotFoundError:
            pass
        if not alive():
            raise GuestError("the clone stopped before it was ready to be saved")
        time.sleep(0.1)
    raise GuestError("the clone was not ready to be saved in time")


def _build_slot(hv: Hypervisor, image: Image, key: WarmKey, index: int, boot_timeout: int) -> None:
    root = warm_root(image)
    final = root / f"slot-{index}"
    with ExitStack() as undo:
        clone = make_clone_dir(root / f".building-slot-{index}-{secrets.token_hex(3)}")
        undo.callback(shutil.rmtree, clone.path, ignore_errors=True)
        make_overlay(clone, image.template)
        name = f"{NAME_PREFIX}warm-{image.name}-{index}-{secrets.token_hex(3)}"
        spec = clone_spec(name=name, image=image, clone=clone, accel=key.accel, memory_mib=key.memory_mib,
                          cpus=key.cpus, metadata={"kind": "warm", "run_dir": str(clone.path)}, prewarm=True)
        hv.start_transient(name, domain_xml(spec))
        undo.callback(hv.destroy, name)
        _wait_ready(clone.console_log, time.monotonic() + boot_timeout, lambda: hv.is_running(name))
        slot = Slot(clone)
        hv.save(name, slot.state)
        slot.info.write_text(json.dumps({**dataclasses.asdict(key), "created": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")}, indent=2) + "\n")
        os.chmod(clone.overlay, 0o444)  # the backing file of every run restored from this slot
        os.chmod(slot.state, 0o400)
        for leftover in (clone.ssh_socket, clone.path / "owner.json"):
            leftover.unlink(missing_ok=True)
        install_dir(clone.path, final)


def build(hv: Hypervisor, image: Image, key: WarmKey, steps: Steps, *, count: int = SLOTS,
          boot_timeout: int = 300) -> None:
    """(Re)make the image's warm slots; a run that holds a slot keeps its own files open."""
    root = warm_root(image)
    root.mkdir(exist_ok=True)
    os.chmod(root, 0o711)
    for index in range(count):
        with steps.step("warm", f"boot and save warm slot {index + 1} of {count}"):
            with flocked(Slot(CloneDir(root / f"slot-{index}")).lock):
                _build_slot(hv, image, key, index, boot_timeout)


def acquire(image: Image, key: WarmKey, stack: ExitStack) -> tuple[Slot | None, str]:
    """A free slot that matches ``key`` (locked until ``stack`` closes), or None and why not."""
    found = slots(image)
    if not found:
        return None, f"image {image.name} has no warm state (make one: vmiso images warm {image.name})"
    reasons = []
    for slot in found:
        try:
            info = json.loads(slot.info.read_text())
        except (OSError, ValueError):
            reasons.append(f"{slot.clone.path.name} is unreadable")
            continue
        wanted = dataclasses.asdict(key)
        differs = [k for k in wanted if info.get(k) != wanted[k]]
        if differs:
            reasons.append(f"{slot.clone.path.name} was made for another {', '.join(differs)}")
            continue
        try:
            stack.enter_context(flocked(slot.lock, wait=False))
        except BlockingIOError:
            reasons.append(f"{slot.clone.path.name} is in use")
            continue
        return slot, ""
    return None, "no usable warm state: " + "; ".join(reasons)


def restore_xml(hv: Hypervisor, slot: Slot, *, clone: CloneDir, metadata: dict[str, str]) -> tuple[str, str]:
    """(domain name, XML) for restoring ``slot`` as the run in ``clone``; the name is the saved one."""
    try:
        saved = hv.saved_xml(slot.state)
        return domain_name(saved), retarget(saved, Retarget(
            disk=clone.overlay, console_log=clone.console_log, ssh_socket=clone.ssh_socket,
            shares=clone.shares, metadata=metadata))
    except ValueError as err:
        raise ImageError(f"warm state {slot.clone.path} does not fit a run: {err}",
                         "remake it: vmiso images warm NAME") from None
