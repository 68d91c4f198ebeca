"""A VM described as data, turned into libvirt domain XML with ElementTree; and what vmiso asks of
the hypervisor that runs it (``Hypervisor``, a Protocol: vmiso.hypervisor's libvirt connection is
the real one, tests/fakes.py's the fake).

No libvirt import here: the XML is a pure function of the spec, so it is tested
against golden files that a reviewer can read.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

METADATA_NS = "urn:vmiso:domain:1"
NAME_PREFIX = "vmiso-"
SSH_CHANNEL = "org.vmiso.ssh"


@dataclass(frozen=True)
class DomainInfo:
    """A domain the hypervisor runs (or holds), as vmiso's reaper sees it."""

    name: str
    active: bool
    metadata: dict[str, str]


class Hypervisor(Protocol):
    """What vmiso asks of the hypervisor: the seam between its core and libvirt.

    Every domain is named, its XML built here; a failure raises HypervisorError
    saying what failed, with the VM's name.
    """

    def version(self) -> str:
        """The hypervisor's and QEMU's versions, as a warm state's key records them."""
        ...

    def start_transient(self, name: str, xml: str, *, autodestroy: bool = True) -> None:
        """Create and start a domain that exists only while it runs (and, with ``autodestroy``,
        only while this connection is open)."""
        ...

    def is_running(self, name: str) -> bool: ...

    def destroy(self, name: str) -> bool:
        """Stop ``name`` at once and forget it; False when it did not exist."""
        ...

    def destroy_run(self, name: str, run_dir: str) -> Literal["destroyed", "absent", "another run's"]:
        """Destroy ``name`` only while it is still the VM of ``run_dir`` (its metadata says so)."""
        ...

    def save(self, name: str, path: Path) -> None:
        """Save a running domain's memory and device state to ``path``; the domain stops."""
        ...

    def saved_xml(self, path: Path) -> str: ...

    def restore(self, name: str, path: Path, xml: str) -> None:
        """Start ``name`` from a saved state, with ``xml`` (the saved one retargeted)."""
        ...

    def vmiso_domains(self) -> list[DomainInfo]:
        """Every domain whose name marks it as vmiso's, with its metadata."""
        ...


@dataclass(frozen=True)
class Disk:
    path: Path
    format: str = "qcow2"
    readonly: bool = False
    # "unsafe" drops the guest's flushes: right for a disposable overlay, wrong
    # for an image that must survive (provisioning uses "writeback").
    cache: str = "writeback"
    # "report": a failed write (the host's disk is full) is an I/O error in the
    # guest, not a paused VM that waits out its timeout.  None: QEMU's default.
    error_policy: str | None = None
    # The images below ``path``, top first, with their formats: QEMU reads them, and
    # libvirt neither probes them nor hands them to QEMU's user (see _backing_store).
    backing: tuple[tuple[Path, str], ...] = ()
    serial: str | None = None  # what the guest reads in /sys/block/vdX/serial, to find the disk
    # False: libvirt leaves the file's owner alone (QEMU must be able to open it already,
    # as an ACL lets it); True: libvirt gives it to QEMU's user while the VM runs.
    relabel: bool = True


@dataclass(frozen=True)
class Share:
    """A host directory exported over virtio-9p under ``tag``."""

    source: Path
    tag: str
    readonly: bool


@dataclass(frozen=True)
class KernelBoot:
    kernel: Path
    initrd: Path
    cmdline: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    memory_mib: int
    cpus: int
    accel: str  # "kvm" or "tcg"
    disks: tuple[Disk, ...]
    console_log: Path
    boot: KernelBoot | None = None  # None: boot the first disk's bootloader
    shares: tuple[Share, ...] = ()
    ssh_socket: Path | None = None  # host end of the SSH link (a virtio-serial port)
    genid: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    # Under TCG, features of TCG_WITHHELD offered anyway (vm.tcg_cpu_features).
    tcg_cpu_features: tuple[str, ...] = ()


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _os(spec: DomainSpec) -> ET.Element:
    os_el = ET.Element("os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    if spec.boot is None:
        _sub(os_el, "boot", dev="hd")
    else:
        _sub(os_el, "kernel", str(spec.boot.kernel))
        _sub(os_el, "initrd", str(spec.boot.initrd))
        _sub(os_el, "cmdline", spec.boot.cmdline)
    return os_el


def _disk(disk: Disk, index: int) -> ET.Element:
    el = ET.Element("disk", type="file", device="disk")
    driver = _sub(el, "driver", name="qemu", type=disk.format, cache=disk.cache, discard="unmap")
    if disk.error_policy is not None:
        driver.set("error_policy", disk.error_policy)
    source = _sub(el, "source", file=str(disk.path))
    if not disk.relabel:
        _sub(source, "seclabel", model="dac", relabel="no")
    if disk.backing:
        el.append(backing_store(disk.backing))
    _sub(el, "target", dev="vd" + "abcdefghijklmnopqrstuvwxyz"[index], bus="virtio")
    if disk.serial is not None:
        _sub(el, "serial", disk.serial)
    if disk.readonly:
        _sub(el, "readonly")
    return el


def backing_store(chain: tuple[tuple[Path, str], ...]) -> ET.Element:
    """The backing chain as given, ended by an empty <backingStore/>, each layer with DAC relabelling off.

    libvirt otherwise chowns every image of the chain to QEMU's user while the VM
    runs (DAC has no read-only label), so a QEMU that the guest took over could
    chmod and rewrite the template every later clone boots.  Left root's (0444),
    the layers stay readable and unwritable for QEMU.
    """
    top = ET.Element("backingStore")
    current = top
    for path, fmt in chain:
        current.set("type", "file")
        _sub(current, "format", type=fmt)
        source = _sub(current, "source", file=str(path))
        _sub(source, "seclabel", model="dac", relabel="no")
        current = _sub(current, "backingStore")
    return top


# The host modes QEMU gives what the guest creates in a writable share (the guest's
# own modes go to xattrs).  Group bits, which a POSIX ACL reads as its mask, let
# the share's ACL (sharemount.py) give the analyst who ran vmiso read access.
WRITABLE_SHARE_MODES = {"fmode": "0640", "dmode": "0750"}


def _share(share: Share) -> ET.Element:
    # "mapped": the guest's owners and modes live in xattrs on the host, so guest
    # root cannot create host files owned by anyone but the QEMU user.
    el = ET.Element("filesystem", type="mount", accessmode="mapped")
    _sub(el, "driver", type="path")
    _sub(el, "source", dir=str(share.source))
    _sub(el, "target", dir=share.tag)
    if share.readonly:
        _sub(el, "readonly")
    else:
        el.attrib.update(WRITABLE_SHARE_MODES)
    return el


def _ssh_channel(socket_path: Path) -> ET.Element:
    el = ET.Element("channel", type="unix")
    _sub(el, "source", mode="bind", path=str(socket_path))
    _sub(el, "target", type="virtio", name=SSH_CHANNEL)
    return el


def _console_source(log_path: Path) -> ET.Element:
    # The log is a file vmiso made (workdir.console_file): appended to, not replaced,
    # and not handed to QEMU's user, libvirt passes QEMU a descriptor and the file
    # stays the user's, for vmiso to read while the VM runs.
    source = ET.Element("source", path=str(log_path), append="on")
    _sub(source, "seclabel", model="dac", relabel="no")
    return source


def _console(log_path: Path) -> list[ET.Element]:
    serial = ET.Element("serial", type="file")
    serial.append(_console_source(log_path))
    _sub(serial, "target", port="0")
    console = ET.Element("console", type="file")
    console.append(_console_source(log_path))
    _sub(console, "target", type="serial", port="0")
    return [serial, console]


def _rng() -> ET.Element:
    el = ET.Element("rng", model="virtio")
    _sub(el, "backend", "/dev/urandom", model="random")
    return el


def _metadata(values: dict[str, str]) -> ET.Element:
    metadata = ET.Element("metadata")
    ET.register_namespace("vmiso", METADATA_NS)
    inner = ET.SubElement(metadata, f"{{{METADATA_NS}}}vm")
    for key in sorted(values):
        ET.SubElement(inner, f"{{{METADATA_NS}}}{key}").text = values[key]
    return metadata


def _devices(spec: DomainSpec) -> ET.Element:
    devices = ET.Element("devices")
    for index, disk in enumerate(spec.disks):
        devices.append(_disk(disk, index))
    for share in spec.shares:
        devices.append(_share(share))
    if spec.ssh_socket is not None:
        devices.append(_ssh_channel(spec.ssh_socket))
    devices.extend(_console(spec.console_log))
    devices.append(_rng())
    # Nothing the job could use to reach out or be reached: no USB, no balloon,
    # no graphics or sound (none are added), and no NIC at all: not even provisioning
    # has one (its gateway is reached over the SSH link; see vmiso.network).
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    return devices


# Features of QEMU's "max" CPU that a TCG guest is not offered, each with the measurement
# behind it.  A wrong number with exit code 0 is worse than a crash: a program that needs
# one of these dies with SIGILL instead (vmiso names it), and vm.tcg_cpu_features offers
# one anyway for those who accept the risk.
TCG_WITHHELD: dict[str, str] = {
    # QEMU 7.2's TCG decodes a gather's vector index register 4 (xmm4/ymm4) as "no index",
    # as plain SIB does for rsp: all eight VPGATHER*/VGATHER* forms then read every lane from
    # the base address (the other 15 index registers are right).  NumPy's AVX2 loops for
    # strided data use gathers: numpy.linalg's own TestCond gave 11.9 for 21.0, or crashed.
    # AVX, FMA3, F16C, BMI1/2, LZCNT and AVX2's other instructions gave the host's results
    # bit for bit; but a gather is AVX2, and AVX2 is offered whole or not at all.
    "avx2": "its gathers read the wrong memory under QEMU 7.2's TCG when the index is xmm4/ymm4: "
            "results computed with it may be wrong",
    # Withheld with AVX2 because no real CPU has BMI2 without it, and code that finds BMI2
    # takes AVX2 as given: libgcrypt 1.10's SHA-1 for "AVX + BMI2" runs VPBROADCASTD (AVX2),
    # so apt's http method (it hashes what it fetches) died with SIGILL in a guest offered
    # max less AVX2.  Less both, the guest looks like a CPU that exists (AMD's Piledriver
    # also has AVX, FMA3, F16C and BMI1 without AVX2 and BMI2).
    "bmi2": "no real CPU has BMI2 without AVX2, and code that finds it may run AVX2 "
            "instructions (libgcrypt's SHA-1 does): a job may die of SIGILL unless avx2 is offered too",
}


@dataclass(frozen=True)
class GuestCpu:
    """The CPU a guest sees: a libvirt ``<cpu mode>`` and the features taken from it."""

    mode: str  # "host-passthrough" (KVM) or "maximum" (TCG: QEMU's "max" model)
    disabled: tuple[str, ...] = ()

    def describe(self) -> str:
        return " ".join([self.mode, *(f"-{name}" for name in self.disabled)])


def guest_cpu(accel: str, offered: tuple[str, ...] = ()) -> GuestCpu:
    """The guest CPU for an accelerator, chosen on purpose.

    KVM: the host's own CPU.  TCG: QEMU's "max" model (libvirt's ``maximum``), every
    feature TCG emulates less those it emulates wrongly (TCG_WITHHELD) that are not in
    ``offered``.  Without a <cpu> element TCG gives ``qemu64``, which lacks SSSE3,
    SSE4.1/4.2 and POPCNT (below x86-64-v2), so NumPy 2 and the wheels built on it
    die with SIGILL at import.
    """
    if accel == "kvm":
        return GuestCpu("host-passthrough")
    return GuestCpu("maximum", tuple(name for name in TCG_WITHHELD if name not in offered))


def _cpu(spec: DomainSpec) -> ET.Element:
    cpu = guest_cpu(spec.accel, spec.tcg_cpu_features)
    el = ET.Element("cpu", mode=cpu.mode)
    for name in cpu.disabled:
        _sub(el, "feature", policy="disable", name=name)
    return el


def domain_xml(spec: DomainSpec) -> str:
    root = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(root, "name", spec.name)
    if spec.genid:
        _sub(root, "genid")
    if spec.metadata:
        root.append(_metadata(spec.metadata))
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.cpus), placement="static")
    root.append(_os(spec))
    features = _sub(root, "features")
    _sub(features, "acpi")
    root.append(_cpu(spec))
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, event, "destroy")
    root.append(_devices(spec))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def domain_name(xml: str) -> str:
    return ET.fromstring(xml).findtext("name") or ""


def metadata_of(xml: str) -> dict[str, str]:
    """Read back what ``_metadata`` wrote (for the reaper); {} when there is none."""
    root = ET.fromstring(xml)
    inner = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if inner is None:
        return {}
    prefix = f"{{{METADATA_NS}}}"
    return {child.tag.removeprefix(prefix): child.text or "" for child in inner}


@dataclass(frozen=True)
class Retarget:
    """The host-side paths a restored copy of a saved domain takes on."""

    disks: dict[str, Path]  # target device (vda, vdb) -> host file
    backing: dict[str, tuple[tuple[Path, str], ...]]  # target device -> its chain below (Disk.backing)
    kernel: Path
    initrd: Path
    console_log: Path
    ssh_socket: Path
    shares: dict[str, Path]  # tag -> host directory
    metadata: dict[str, str] = field(default_factory=dict)


def _child(element: ET.Element, path: str) -> ET.Element:
    """``element.find(path)``, or ValueError naming what the saved domain lacks."""
    found = element.find(path)
    if found is None:
        raise ValueError(f"the saved domain's <{element.tag}> has no <{path}>")
    return found


def retarget(saved_xml: str, to: Retarget) -> str:
    """Point a saved domain's XML at another run's files, keeping everything the guest sees.

    Device models, addresses, the machine type, the name, the UUID and the VM
    generation ID stay exactly as saved: libvirt 9 refuses a restore that changes
    any of them.  Only host paths and the metadata change.  (The guest's RNG is
    reseeded over the SSH link instead; see warm.greeting.)
    """
    root = ET.fromstring(saved_xml)
    disks = {_child(d, "target").get("dev", ""): d for d in root.findall("devices/disk[@device='disk']")}
    if set(disks) != set(to.disks):
        raise ValueError(f"the saved domain has disks {sorted(disks)}, a run has {sorted(to.disks)}")
    for dev, disk in disks.items():
        _child(disk, "source").set("file", str(to.disks[dev]))
        # The saved chain ends at the old disk; the run's overlay adds a layer.
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
        if to.backing.get(dev):
            disk.insert(list(disk).index(_child(disk, "source")) + 1, backing_store(to.backing[dev]))
    _child(root, "os/kernel").text = str(to.kernel)
    _child(root, "os/initrd").text = str(to.initrd)
    for serial in root.findall("devices/serial") + root.findall("devices/console"):
        source = serial.find("source")
        if source is not None and source.get("path"):  # a state saved before _console_source: made so
            serial.insert(list(serial).index(source), _console_source(to.console_log))
            serial.remove(source)
    channel = root.find(f"devices/channel/target[@name='{SSH_CHANNEL}']/..")
    if channel is None:
        raise ValueError("the saved domain has no SSH channel")
    _child(channel, "source").set("path", str(to.ssh_socket))
    saved_tags = set()
    for fs in root.findall("devices/filesystem"):
        tag = _child(fs, "target").get("dir")
        if tag is None or tag not in to.shares:
            raise ValueError(f"the saved domain shares {tag!r}, which the run does not provide")
        saved_tags.add(tag)
        _child(fs, "source").set("dir", str(to.shares[tag]))
        if fs.find("readonly") is None:  # a state saved before the share had its modes
            fs.attrib.update(WRITABLE_SHARE_MODES)
    if missing := sorted(to.shares.keys() - saved_tags):  # its guest would wait for them in vain
        raise ValueError(f"the saved domain lacks the share(s) {', '.join(missing)}")
    old = root.find("metadata")
    if old is not None:
        root.remove(old)
    if to.metadata:
        root.insert(list(root).index(_child(root, "name")) + 1, _metadata(to.metadata))
    return ET.tostring(root, encoding="unicode")
