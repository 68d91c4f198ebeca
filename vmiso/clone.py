"""One clone of a template: its host directory and its domain spec.

Runs and warm states are both clones, made by the same two functions, so that a
warm state's saved devices match a run's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import gc, tools
from .domain import Disk, DomainSpec, KernelBoot, Share
from .image.store import Image
from .workdir import private_dir, share_dir

# The clone's PID 1 is the initramfs's /init (images/guest/initramfs-init); it mounts /dev/vda itself.
# panic=-1: a guest whose init dies reboots at once, which on_reboot turns into its end.
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
# Asks ssh-link to pre-load what sessions run, in a clone about to be saved as a warm state.
PREWARM = "vmiso.prewarm"
SHARE_IN = "vmiso-in"
SHARE_OUT = "vmiso-out"


@dataclass(frozen=True)
class CloneDir:
    """Everything of one clone on the host, in one directory that is removed with it."""

    path: Path

    @property
    def overlay(self) -> Path:
        return self.path / "overlay.qcow2"

    @property
    def inputs(self) -> Path:
        return self.path / "in"

    @property
    def outputs(self) -> Path:
        return self.path / "out"

    @property
    def ssh_socket(self) -> Path:
        return self.path / "ssh.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def shares(self) -> dict[str, Path]:
        return {SHARE_IN: self.inputs, SHARE_OUT: self.outputs}


def make_clone_dir(path: Path) -> CloneDir:
    """Create the directory (owned by this process, for gc) with its two share directories."""
    private_dir(path.parent)
    private_dir(path)
    gc.claim(path)
    clone = CloneDir(path)
    share_dir(clone.inputs, writable=False)
    share_dir(clone.outputs, writable=True)
    return clone


def make_overlay(clone: CloneDir, backing: Path) -> None:
    tools.run(tools.qemu_img_overlay_argv(backing, clone.overlay))


def clone_spec(*, name: str, image: Image, clone: CloneDir, accel: str, memory_mib: int, cpus: int,
               metadata: dict[str, str], prewarm: bool = False) -> DomainSpec:
    cmdline = KERNEL_CMDLINE
    if image.root_device != "/dev/vda":  # a partition of a cloud image; initramfs-init reads it
        cmdline += f" vmiso.root={image.root_device}"
    if prewarm:
        cmdline += f" {PREWARM}"
    return DomainSpec(
        name=name,
        memory_mib=memory_mib,
        cpus=cpus,
        accel=accel,
        disks=(Disk(clone.overlay, cache="unsafe"),),
        console_log=clone.console_log,
        boot=KernelBoot(image.kernel, image.initramfs, cmdline),
        shares=(Share(clone.inputs, SHARE_IN, readonly=True), Share(clone.outputs, SHARE_OUT, readonly=False)),
        ssh_socket=clone.ssh_socket,
        metadata=metadata,
    )
