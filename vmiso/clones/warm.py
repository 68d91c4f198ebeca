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
import re
import secrets
import struct
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__, accel, ssh
from ..accel import host_cpu_id
from ..config import Config
from ..domain import NAME_PREFIX, TCG_WITHHELD, Hypervisor, Retarget, domain_name, domain_xml, guest_cpu, retarget
from ..errors import GuestError, HypervisorError, ImageError
from ..host import inputs, reaper, state
from ..host.console import GuestLog
from ..host.workdir import OWNER_FILE, flocked, install_dir, private_dir, remove_tree
from ..image.store import GUEST_PROTOCOL, MANIFEST, Image, check_file, remember
from ..plan import RunPlan, RunRequest, plan_run
from ..progress import Steps
from .base import Booted, CloneJob
from .clone import (
    CloneDir,
    clone_spec,
    copy_boot_files,
    make_clone_dir,
    make_inputs_slot,
    make_overlay,
    make_scratch,
    size_inputs_disk,
)
from .watchdog import Watchdog

log = logging.getLogger(__name__)

SLOTS = 2
READY = b"vmiso-ssh-link: waiting"
INFO = "warm.json"
# What the host sends a restored clone's ssh-link before SSH starts.  1: SEED_BYTES
# of randomness.  2: the same, then the host's wall clock (struct "!qq": seconds,
# nanoseconds).  3: the same; the guest answers READY_LINE once /tmp and /out are
# mounted, and waits for GO (the run's inputs are on their disk) before it mounts
# /in and starts sshd.  The guest announces its version when it is ready to be saved.
LINK_PROTOCOL = GUEST_PROTOCOL
READY_LINE = b"vmiso-ssh-link: ready\n"
GO = b"\x01"
_PROTOCOL_RE = re.compile(rb"vmiso-ssh-link: waiting protocol=(\d{1,4})\b")
CLOCK = struct.Struct("!qq")
# Restored clones share the saved RNG state: each reseeds its kernel RNG with these
# bytes from the host before SSH starts.  (A cold clone seeds from virtio-rng at boot.)
SEED_BYTES = 64


def _image_removed(path: Path, state_dir: Path) -> bool:
    """``warm/IMAGE`` of an image no longer in the store: removed, by this user or by its owner."""
    return not (state.image(state_dir, path.name) / MANIFEST).is_file()


# What a killed warm build or replacement leaves, and the states of removed images (vmiso.host.reaper).
reaper.register("warm state build", state.WARM, f"*/{state.BUILDING}*")
reaper.register("warm states of removed image", state.WARM, "*", _image_removed)
reaper.register("replaced warm state", state.WARM, f"*/{state.REPLACED}*", reaper.remover_gone)


@dataclass(frozen=True)
class WarmKey:
    """What a warm state must match to be used: anything else means a cold boot."""

    template_sha256: str
    hypervisor: str
    accel: str
    memory_mib: int
    cpus: int
    scratch_bytes: int  # the scratch disk's size is part of the saved device state
    inputs_bytes: int = 0  # so is the inputs disk's (inputs.disk_bytes)
    cpu: str = ""  # the guest CPU model; saved CPU state only restores onto the same model
    link: int = LINK_PROTOCOL  # the guest's ssh-link protocol (recorded from the guest)
    vmiso: str = __version__

    @classmethod
    def make(cls, *, template_sha256: str, hypervisor: str, accel: str, memory_mib: int, cpus: int,
             scratch_bytes: int, inputs_bytes: int = 0, tcg_cpu_features: tuple[str, ...] = ()) -> WarmKey:
        offered = tuple(sorted(tcg_cpu_features)) if accel == "tcg" else ()
        return cls(template_sha256=template_sha256, hypervisor=hypervisor, accel=accel, memory_mib=memory_mib,
                   cpus=cpus, scratch_bytes=scratch_bytes, inputs_bytes=inputs_bytes,
                   # under KVM the guest sees the host's CPU: the key names which one
                   cpu=guest_cpu(accel, offered).describe() + (f" {host_cpu_id()}" if accel == "kvm" else ""))

    @property
    def tcg_cpu_features(self) -> tuple[str, ...]:
        """The withheld features this key's guests are offered: those its CPU does not take away."""
        if self.accel != "tcg":
            return ()
        taken = {word[1:] for word in self.cpu.split() if word.startswith("-")}
        return tuple(name for name in TCG_WITHHELD if name not in taken)


def key_for(plan: RunPlan, *, template_sha256: str, hypervisor: str, accel: str) -> WarmKey:
    """What a clone for a run of ``plan`` must match, on this hypervisor and accelerator."""
    return WarmKey.make(template_sha256=template_sha256, hypervisor=hypervisor, accel=accel,
                        memory_mib=plan.memory_mib, cpus=plan.cpus, scratch_bytes=plan.scratch_bytes,
                        inputs_bytes=inputs.disk_bytes(plan.input_limits),
                        tcg_cpu_features=plan.tcg_cpu_features)


@dataclass(frozen=True)
class Slot:
    clone: CloneDir
    lock_fd: int | None = None  # the descriptor that holds its lock, once acquired

    @property
    def state(self) -> Path:
        return self.clone.path / "state.save"

    @property
    def info(self) -> Path:
        return self.clone.path / INFO

    @property
    def scratch(self) -> Path:
        """The pristine scratch image the saved clone booted with; each run gets a copy."""
        return self.clone.scratch

    @property
    def lock(self) -> Path:
        return self.clone.path.with_name(self.clone.path.name + ".lock")


def warm_root(image: Image) -> Path:
    """This user's warm states of ``image``: their own, never shared (a saved guest's memory
    is a boot like any other; no analyst restores one that another made)."""
    return state.home(image.state_dir).warm_of(image.name)


def slots(image: Image) -> list[Slot]:
    root = warm_root(image)
    if not root.is_dir():
        return []
    return [Slot(CloneDir(p)) for p in sorted(root.glob("slot-*")) if p.is_dir()]


def _wait_ready(console_log: Path, deadline: float, alive: Callable[[], bool]) -> int:
    """Wait for ssh-link's ready line on the console; the link protocol it announces (1 if none)."""
    console = GuestLog(console_log)
    while time.monotonic() < deadline:
        for line in (*console.lines(), console.partial):
            if READY in line:
                found = _PROTOCOL_RE.search(line)
                return int(found.group(1)) if found else 1
        if not alive():
            raise GuestError("the clone stopped before it was ready to be saved")
        time.sleep(0.1)
    raise GuestError("the clone was not ready to be saved in time")


def _build_slot(hv: Hypervisor, image: Image, key: WarmKey, index: int, boot_timeout: int) -> None:
    root = warm_root(image)
    final = root / f"slot-{index}"
    with ExitStack() as undo:
        clone = make_clone_dir(state.building(root, f"slot-{index}", secrets.token_hex(3)))
        undo.callback(remove_tree, clone.path)  # the template's guest wrote in its share
        make_overlay(clone, image.template)
        make_scratch(clone, key.scratch_bytes)
        make_inputs_slot(clone, key.inputs_bytes)
        copy_boot_files(clone, image)
        name = f"{NAME_PREFIX}warm-{image.name}-{index}-{secrets.token_hex(3)}"
        spec = clone_spec(name=name, image=image, clone=clone, accel=key.accel, memory_mib=key.memory_mib,
                          cpus=key.cpus, tcg_cpu_features=key.tcg_cpu_features,
                          metadata={"kind": "warm", "run_dir": str(clone.path)}, prewarm=True)
        hv.start_transient(name, domain_xml(spec))
        undo.callback(hv.destroy, name)
        link = _wait_ready(clone.console_log, time.monotonic() + boot_timeout, lambda: hv.is_running(name))
        if link != key.link:
            log.warning("image %s: its ssh-link speaks protocol %d, this vmiso %d; runs will boot cold "
                        "until the image is provisioned again", image.name, link, key.link)
        slot = Slot(clone)
        # Made here first, so that it is this user's: libvirt writes into it as root.
        os.close(os.open(slot.state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        hv.save(name, slot.state)
        for made in (clone.overlay, clone.scratch, slot.state):  # libvirt gave the disks to QEMU's user
            os.chown(made, os.geteuid(), os.getegid())
        os.chmod(clone.overlay, 0o444)  # the backing file of every run restored from this slot
        os.chmod(clone.scratch, 0o444)  # copied, byte for byte, for every run
        os.chmod(slot.state, 0o400)
        slot.info.write_text(json.dumps({
            **dataclasses.asdict(key), "link": link,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            # What a run restores is checked against these (verify): a slot is a boot like any other.
            "sha256": {path.name: remember(path) for path in (clone.overlay, clone.scratch, slot.state)},
        }, indent=2) + "\n")
        # Each run restores with an inputs disk of its own (its inputs' image, this size).
        for leftover in (clone.ssh_socket, clone.path / OWNER_FILE, clone.inputs_disk):
            leftover.unlink(missing_ok=True)
        # A run restores with shares of its own: the slot's (one QEMU's) are not kept.
        for share in (clone.inputs, clone.inputs_large, clone.outputs):
            if failures := remove_tree(share):
                raise ImageError(f"cannot remove {share / failures[0].path}: {failures[0].reason}")
        install_dir(clone.path, final, state.replaced(final))


def build(hv: Hypervisor, image: Image, key: WarmKey, steps: Steps, *, count: int = SLOTS,
          boot_timeout: int = 300) -> None:
    """(Re)make the image's warm slots; a run that holds a slot keeps its own files open."""
    root = private_dir(warm_root(image))
    for index in range(count):
        with steps.step("warm", f"boot and save warm slot {index + 1} of {count}"):
            with flocked(Slot(CloneDir(root / f"slot-{index}")).lock):
                _build_slot(hv, image, key, index, boot_timeout)


def make_warm_state(config: Config, hv: Hypervisor, image: Image, steps: Steps,
                    accel_name: str | None = None) -> None:
    """Save booted clones of ``image`` for runs of ``config`` to restore; raises what went wrong."""
    # The accelerator runs resolve, not the one the manifest recorded: a state made
    # for another accelerator would never match a run.
    plan = plan_run(config, RunRequest(image=image.name))  # what a run without flags asks for
    key = key_for(plan, template_sha256=image.manifest()["sha256"], hypervisor=hv.version(),
                  accel=accel_name or accel.resolve(config.accel))
    build(hv, image, key, steps, boot_timeout=plan.boot_timeout)


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
        differs = _differs(info, key)
        wanted = dataclasses.asdict(key)
        if differs:
            reasons.append(f"{slot.clone.path.name} was made for another {', '.join(differs)} ("
                           + ", ".join(f"{k} {_short(info.get(k))}, not {_short(wanted[k])}" for k in differs)
                           + ")")
            continue
        try:
            fd = stack.enter_context(flocked(slot.lock, wait=False))
        except BlockingIOError:
            reasons.append(f"{slot.clone.path.name} is in use")
            continue
        return dataclasses.replace(slot, lock_fd=fd), ""
    return None, "no usable warm state: " + "; ".join(reasons)


def _differs(info: dict[str, Any], key: WarmKey) -> list[str]:
    wanted = dataclasses.asdict(key)
    return [k for k in wanted if info.get(k) != wanted[k]]


def ensure(hv: Hypervisor, image: Image, key: WarmKey, steps: Steps, *, count: int, boot_timeout: int,
           wait: bool = True) -> int:
    """At least ``count`` slots that fit ``key``: those missing or made for another key are
    (re)made, each under its lock (a slot in use is waited for; without ``wait``, left for
    later).  How many were made."""
    root = private_dir(warm_root(image))
    made = 0
    for index in range(count):
        slot = Slot(CloneDir(root / f"slot-{index}"))
        try:
            if not _differs(json.loads(slot.info.read_text()), key):
                continue
        except (OSError, ValueError, AttributeError):
            pass
        try:
            with flocked(slot.lock, wait=wait):
                with steps.step("warm", f"boot and save warm slot {index + 1} of {count}"):
                    _build_slot(hv, image, key, index, boot_timeout)
        except BlockingIOError:
            continue
        made += 1
    return made


def _short(value: object) -> str:
    text = "none" if value is None else str(value)
    return text[:12] + "..." if len(text) > 24 else text


def greeting() -> bytes:
    """What the host sends a restored clone first: fresh randomness, then its wall clock."""
    now = time.time_ns()
    return os.urandom(SEED_BYTES) + CLOCK.pack(now // 1_000_000_000, now % 1_000_000_000)


# GO carries how many bytes of the inputs disk the guest reads ahead (inputs.prefetch_bytes).
PREFETCH = struct.Struct("!Q")


def hello_for(prefetch: int) -> ssh.Hello:
    """A restored clone's link for a run: the greeting, its answer, and GO once the run's inputs
    are on their disk, with what of it to read ahead."""
    return ssh.Hello(greeting, READY_LINE, GO + PREFETCH.pack(prefetch))


# What a pool says on a clone's link: the greeting, and the answer it waits for (the run says GO).
HELLO = hello_for(0)


def verify(slot: Slot) -> None:
    """ImageError unless the slot's disk, scratch image and saved state are as it recorded them."""
    try:
        recorded = json.loads(slot.info.read_text()).get("sha256") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    fix = f"remake it: vmiso images warm {slot.clone.path.parent.parent.name}"
    for path in (slot.clone.overlay, slot.clone.scratch, slot.state):
        check_file(path, recorded.get(path.name), what=f"warm state {slot.clone.path.name}: {path.name}", fix=fix)


def clone_disks(slot: Slot, clone: CloneDir) -> None:
    """``clone``'s disks over the verified slot's: a fresh overlay over its disk, and a copy of
    its pristine scratch image."""
    verify(slot)
    make_overlay(clone, slot.clone.overlay)
    make_scratch(clone, 0, like=slot.scratch)


def restore(hv: Hypervisor, slot: Slot, *, clone: CloneDir, template: Path, metadata: dict[str, str],
            stack: ExitStack, watch: Callable[[str], Watchdog]) -> tuple[str, Watchdog]:
    """Restore ``slot`` as the clone in ``clone``: (the domain's name, which is the saved one,
    and its watchdog).  The domain is destroyed when ``stack`` closes, and at once when the
    restore fails half-way; ``watch(name)`` starts the watchdog before the restore."""
    name, xml = restore_xml(hv, slot, clone=clone, template=template, metadata=metadata)
    dog = watch(name)  # released after the destroy below (an ExitStack unwinds in reverse)
    stack.callback(hv.destroy, name)
    try:
        hv.restore(name, slot.state, xml)
    except HypervisorError:
        hv.destroy(name)
        raise
    dog.started()
    return name, dog


def restore_xml(hv: Hypervisor, slot: Slot, *, clone: CloneDir, template: Path,
                metadata: dict[str, str]) -> tuple[str, str]:
    """(domain name, XML) for restoring ``slot`` as the run in ``clone``; the name is the saved one."""
    try:
        saved = hv.saved_xml(slot.state)
        return domain_name(saved), retarget(saved, Retarget(
            disks={"vda": clone.overlay, "vdb": clone.scratch, "vdc": clone.inputs_disk},
            backing={"vda": ((slot.clone.overlay, "qcow2"), (template, "qcow2"))},
            kernel=clone.kernel, initrd=clone.initramfs, console_log=clone.console_log,
            ssh_socket=clone.ssh_socket, shares=clone.shares, metadata=metadata))
    except ValueError as err:
        raise ImageError(f"warm state {slot.clone.path} does not fit a run: {err}",
                         "remake it: vmiso images warm NAME") from None


class Warm:
    """A warm state restored onto a fresh overlay: the way of a run whose key one fits."""

    def bring_up(self, job: CloneJob) -> Booted | None:
        clone = job.own_clone()
        slot, why_cold = acquire(job.image, job.key, job.cleanup)
        if slot is not None and not size_inputs_disk(clone, job.key.inputs_bytes):
            slot, why_cold = None, "the inputs' image is larger than a warm state's inputs disk"
        if slot is not None:
            try:
                with job.steps.step("overlay", "copy-on-write clone of the warm disk, scratch disk"):
                    clone_disks(slot, clone)
                with job.steps.step("start", "restore the saved clone"):
                    name, _ = restore(job.hv, slot, clone=clone, template=job.image.template,
                                      metadata=job.metadata(clone), stack=job.cleanup, watch=job.watch(clone))
                return Booted(clone, name, "warm")  # the domain keeps the name it was saved with
            except (HypervisorError, ImageError) as err:
                why_cold = f"the warm state {slot.clone.path.name} could not be restored: {err}"
                clone.overlay.unlink(missing_ok=True)
                clone.scratch.unlink(missing_ok=True)
        log.warning("cold boot: %s", why_cold)  # the way after this one
        return None
