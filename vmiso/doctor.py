"""``vmiso doctor``: what the host has, what it lacks, and how to fix each."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import accel, tools
from .config import Config
from .errors import VmisoError
from .host import reaper, state
from .host.workdir import GROUP, SHARE_HELPER, check_share_helper, qemu_ids
from .hypervisor import Libvirt, open_hypervisor
from .image.layer import cached_layers
from .resources import data_dirs

GIB = 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # works, but the user should know


def _programs() -> list[Check]:
    checks = []
    # sfdisk, debugfs and busybox serve cloud images: their partitions, kernel and the clones' initramfs.
    # mount: each run's /out is a loop-mounted filesystem of its own; mkfs.erofs builds each run's /in.
    for program in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "genisoimage", "mkfs.ext4", "mkfs.erofs",
                    "ssh-keygen", "sfdisk", "debugfs", "busybox", "mount"):
        try:
            checks.append(Check(program, True, tools.which(program)))
        except VmisoError as err:
            hint = err.hint or ""
            checks.append(Check(program, False, err.message, hint))
    return checks


def _data() -> Check:
    """vmiso's own files (image recipes, guest files, cloud-init templates), wherever it was installed."""
    try:
        images, cloud_init = data_dirs()
    except VmisoError as err:
        return Check("data", False, err.message, err.hint or "")
    return Check("data", True, f"{images}, {cloud_init}")


def _accel(config: Config) -> Check:
    problem = accel.kvm_problem()
    if problem is None:
        return Check("accel", True, f"KVM usable (configured: {config.accel})")
    if config.accel == "tcg":
        return Check("accel", True, f"TCG, as configured; KVM: {problem}", warning=True,
                     fix="TCG is not a security boundary; use a host where KVM works for real isolation")
    return Check("accel", False, f"KVM cannot be used: {problem}",
                 "set 'accel: tcg' (or VMISO_ACCEL=tcg) to accept software emulation")


def _kvm_device() -> Check | None:
    # libvirt re-probes QEMU on every call (seconds each) when it sees KVM as
    # enabled but /dev/kvm is not accessible to the QEMU user.
    dev = Path("/dev/kvm")
    if not dev.exists():
        return None
    st = dev.stat()
    _uid, gid = qemu_ids()
    if st.st_mode & 0o006 == 0o006 or (st.st_gid == gid and st.st_mode & 0o060 == 0o060):
        return Check("/dev/kvm", True, "accessible to the QEMU user")
    return Check("/dev/kvm", False, "not accessible to the QEMU user: every VM start takes tens of seconds",
                 "chgrp kvm /dev/kvm && chmod 660 /dev/kvm (as Debian's udev rules do; scripts/setup-host does)")


def _space(state_dir: Path) -> Check:
    probe = state_dir if state_dir.exists() else state_dir.parent
    free = shutil.disk_usage(probe).free
    ok = free >= 6 * GIB
    return Check("disk space", ok, f"{free / GIB:.1f} GiB free in {probe}",
                 "" if ok else "provisioning needs about 6 GiB; free space or set state_dir")


def _layer_cache(state_dir: Path) -> Check:
    layers = cached_layers(state_dir)
    size = sum(layer.size for layer in layers)
    detail = f"{len(layers)} cached OS layer(s), {size / GIB:.1f} GiB"
    if layers:
        detail += " ('vmiso gc --layers' removes them; provisioning rebuilds them when needed)"
    return Check("layer cache", True, detail)


def _state_dir(state_dir: Path) -> list[Check]:
    if state_dir.exists() and state_dir.stat().st_mode & 0o001 == 0:
        return [Check("permissions", False, f"{state_dir} is not traversable by the QEMU user",
                      f"chmod 711 {state_dir}")]
    if os.geteuid() == 0:
        return [Check("permissions", True, f"root; {state_dir} usable")]
    return _analyst(state_dir)


def _analyst(state_dir: Path, group_name: str = GROUP) -> list[Check]:
    """What a user who is not root needs: the group, their own directory, the share helper."""
    name = pwd.getpwuid(os.geteuid()).pw_name
    setup = f"as root: scripts/setup-host --user {name}"
    try:
        group = grp.getgrnam(group_name)
    except KeyError:
        return [Check("group", False, f"this host has no group {group_name}, whose members run vmiso "
                      "without root", setup)]
    if group.gr_gid not in os.getgroups():
        if name in group.gr_mem:
            return [Check("group", False, f"{name} joined group {group_name} after this login session began",
                          f"log in again (or start a shell in the group: newgrp {group_name})")]
        return [Check("group", False, f"{name} is not a member of group {group_name}: its members run vmiso "
                      "without root (membership grants qemu:///system, which is root-equivalent, and the "
                      "share helper)", f"{setup}, then log in again")]
    checks = [Check("group", True, f"{name} is a member of {group_name}")]
    try:
        checks.append(Check("own directory", True, str(state.home(state_dir).path)))
    except VmisoError as err:
        checks.append(Check("own directory", False, err.message, err.hint or ""))
    try:
        check_share_helper()
        tools.run(tools.sudo_argv(SHARE_HELPER, "check"))
        checks.append(Check("share helper", True, f"sudo runs {SHARE_HELPER}: each run's /out gets a "
                            "filesystem of its own"))
    except VmisoError as err:
        checks.append(Check("share helper", False, err.message, err.hint or setup))
    return checks


def _loop_devices(control: Path = Path("/dev/loop-control")) -> Check:
    """Each run's /out is an ext4 on a loop device (workdir.bounded_share)."""
    if control.exists():
        return Check("loop", True, f"{control}: each run's /out gets a filesystem of its own")
    return Check("loop", False, f"{control} is missing: runs cannot bound /out",
                 "load the loop module (modprobe loop), or give the container loop devices")


def run_checks(config: Config, connect: Callable[[str], Libvirt] = open_hypervisor) -> list[Check]:
    checks = _programs()
    checks.append(_loop_devices())
    checks.append(_data())
    checks.append(_accel(config))
    kvm = _kvm_device()
    if kvm:
        checks.append(kvm)
    hv = None
    try:
        hv = connect(config.libvirt_uri)
        checks.append(Check("libvirt", True, f"{config.libvirt_uri}: {hv.version()}"))
    except VmisoError as err:
        hint = err.hint or ""
        if os.geteuid() != 0:
            hint = "a member of group vmiso reaches it (see 'group' below)"
        checks.append(Check("libvirt", False, err.message, hint))
    checks.append(_space(config.state_dir))
    checks.extend(_state_dir(config.state_dir))
    try:
        checks.append(_layer_cache(state.home(config.state_dir).path))
    except VmisoError:
        pass  # _state_dir said why this user has no directory
    try:
        leftovers = reaper.find(hv, config.state_dir)
    except VmisoError:
        leftovers = None  # no directory of this user's: _state_dir said why
    if leftovers:
        names = ", ".join(f"{item.kind} {item.name}" for item in leftovers)
        checks.append(Check("leftovers", False, names, "remove them with 'vmiso gc'"))
    elif leftovers is not None:
        checks.append(Check("leftovers", True, "none"))
    if hv is not None:
        hv.close()
    return checks
