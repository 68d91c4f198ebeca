"""One clone of a template: its host directory and its domain spec.

Runs and warm states are both clones, made by the same two functions, so that a
warm state's saved devices match a run's exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import tools
from ..domain import Disk, DomainSpec, KernelBoot, Share
from ..host import reaper, state
from ..host.workdir import bounded_share, console_file, let_qemu_read, link_dir, private_dir, share_dir
from ..image.store import Image, boot_files, copy_verified, reprovision_hint

# The clone's PID 1 is the initramfs's /init (images/guest/initramfs-init); it mounts /dev/vda itself.
# panic=-1: a guest whose init dies reboots at once, which on_reboot turns into its end.
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
# Asks ssh-link to pre-load what sessions run, in a clone about to be saved as a warm state.
PREWARM = "vmiso.prewarm"
SHARE_OUT = "vmiso-out"
SHARE_IN_LARGE = "vmiso-in-large"  # the inputs' large files, bound over their names in /in
INPUTS_SERIAL = "vmiso-in"  # the inputs disk, as the guest finds it (/sys/block/vdX/serial)


# A run's clone (or a pool's) whose vmiso died (vmiso.host.reaper collects it).
reaper.register("run directory", state.RUNS, "*")


@dataclass(frozen=True)
class CloneDir:
    """Everything of one clone on the host, in one directory that is removed with it."""

    path: Path

    @property
    def overlay(self) -> Path:
        return self.path / "overlay.qcow2"

    @property
    def scratch(self) -> Path:
        """The job's /tmp: a raw, sparse ext4 image of the run's scratch size."""
        return self.path / "scratch.img"

    @property
    def kernel(self) -> Path:
        """The clone's own verified copy of the image's kernel (store.copy_verified)."""
        return self.path / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.img"

    @property
    def inputs(self) -> Path:
        """Where the inputs are staged, before their image is built (then removed)."""
        return self.path / "in"

    @property
    def inputs_large(self) -> Path:
        """The inputs' large files (inputs.LARGE_FILE_BYTES), shared read-only over 9p; the guest
        binds each over the empty file of its name in /in."""
        return self.path / "in-large"

    @property
    def inputs_disk(self) -> Path:
        """The guest's /in: an erofs image of the staged inputs, on a read-only disk."""
        return self.path / "inputs.img"

    @property
    def inputs_image(self) -> Path:
        """A preloaded clone's inputs image, built here and then copied onto its inputs disk."""
        return self.path / "inputs.build"

    @property
    def outputs(self) -> Path:
        return self.path / "out"

    @property
    def link(self) -> Path:
        """What libvirt makes for the clone's SSH link (workdir.link_dir)."""
        return self.path / "link"

    @property
    def ssh_socket(self) -> Path:
        return self.link / "ssh.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def shares(self) -> dict[str, Path]:
        return {SHARE_OUT: self.outputs, SHARE_IN_LARGE: self.inputs_large}


def make_clone_dir(path: Path, *, output_limits: tuple[int, int] | None = None) -> CloneDir:
    """Create the directory (owned by this process, for the reaper) with /out's share and the
    directory the inputs are staged in.

    ``output_limits`` (bytes, files and directories): /out on a filesystem of that
    size (workdir.bounded_share), mounted until the directory is removed
    (workdir.remove_tree unmounts first).  Without it, a plain directory: a clone
    made to be saved as a warm state never mounts its shares.
    """
    private_dir(path.parent)
    state.claimed_dir(path)
    clone = CloneDir(path)
    link_dir(clone.link)
    console_file(clone.console_log)
    share_dir(clone.inputs)
    share_dir(clone.inputs_large)
    if output_limits is None:
        share_dir(clone.outputs)
    else:
        bounded_share(clone.outputs, max_bytes=output_limits[0], max_files=output_limits[1])
    return clone


def make_overlay(clone: CloneDir, backing: Path) -> None:
    tools.run(tools.qemu_img_overlay_argv(backing, clone.overlay))


def copy_boot_files(clone: CloneDir, image: Image) -> None:
    """The clone's kernel and initramfs: copies checked against the manifest as they are made.

    Copies, because libvirt gives the files it boots to QEMU's user while the VM
    runs (store.boot_files); the image's own stay root's and unchanged.
    """
    for source, expected in boot_files(image).items():
        copy_verified(source, clone.path / source.name, expected, what=f"image {image.name}: {source.name}",
                      fix=reprovision_hint(image))


def make_scratch(clone: CloneDir, size_bytes: int, *, like: Path | None = None) -> None:
    """The clone's scratch disk: a new sparse file, never larger on the host than ``size_bytes``.

    ``like``: copy that pristine scratch image instead of making a filesystem (a
    restored clone's kernel has read the saved one's first blocks, so the copy must
    match them byte for byte).
    """
    if like is not None:
        tools.run(tools.cp_sparse_argv(like, clone.scratch))
        os.chmod(clone.scratch, 0o600)
        return
    fd = os.open(clone.scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    tools.run(tools.mkfs_scratch_argv(clone.scratch))


def make_inputs_slot(clone: CloneDir, size_bytes: int) -> None:
    """An empty inputs disk of ``size_bytes`` (sparse): a clone saved as a warm state has one,
    and a preloaded clone's is filled by the run that takes it (inputs.fill_disk).  It stays
    this user's, readable by QEMU (never relabelled: see clone_spec)."""
    fd = os.open(clone.inputs_disk, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
        let_qemu_read(fd)
    finally:
        os.close(fd)


def size_inputs_disk(clone: CloneDir, size_bytes: int) -> bool:
    """Give a built inputs disk the size a warm state was saved with (sparse); False if its
    image does not fit in that size."""
    if os.stat(clone.inputs_disk).st_size > size_bytes:
        return False
    os.truncate(clone.inputs_disk, size_bytes)
    return True


def clone_spec(*, name: str, image: Image, clone: CloneDir, accel: str, memory_mib: int, cpus: int,
               metadata: dict[str, str], prewarm: bool = False, prefetch_bytes: int = 0,
               tcg_cpu_features: tuple[str, ...] = ()) -> DomainSpec:
    """``prefetch_bytes``: of the inputs disk, what a cold clone reads ahead as it mounts it
    (inputs.prefetch_bytes; a restored one is told over its link)."""
    cmdline = KERNEL_CMDLINE
    if image.root_device != "/dev/vda":  # a partition of a cloud image; initramfs-init reads it
        cmdline += f" vmiso.root={image.root_device}"
    if prewarm:
        cmdline += f" {PREWARM}"
    if prefetch_bytes:
        cmdline += f" vmiso.prefetch={prefetch_bytes}"
    return DomainSpec(
        name=name,
        memory_mib=memory_mib,
        cpus=cpus,
        accel=accel,
        disks=(Disk(clone.overlay, cache="unsafe", error_policy="report", backing=((image.template, "qcow2"),)),
               Disk(clone.scratch, format="raw", cache="unsafe", error_policy="report"),
               # Not relabelled: the inputs stay the run's, and QEMU reads them through an ACL
               # (workdir.let_qemu_read), so a QEMU taken over can neither change nor chmod them.
               Disk(clone.inputs_disk, format="raw", readonly=True, serial=INPUTS_SERIAL, relabel=False)),
        console_log=clone.console_log,
        boot=KernelBoot(clone.kernel, clone.initramfs, cmdline),
        shares=(Share(clone.outputs, SHARE_OUT, readonly=False),
                Share(clone.inputs_large, SHARE_IN_LARGE, readonly=True)),
        ssh_socket=clone.ssh_socket,
        metadata=metadata,
        tcg_cpu_features=tcg_cpu_features,
    )
