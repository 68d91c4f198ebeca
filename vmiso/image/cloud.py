"""The second kind of OS layer: an existing cloud image, a qcow2 file and its sha256.

The file is copied into the state directory and hashed on the way, so the bytes
that were checked are the bytes that boot, whatever happens to the user's file
later.  Everything vmiso needs from the image is read before any VM has touched
it, from the verified copy: the partition table (sfdisk), the kernel, its
initrd for the provisioning boot, and the modules of the clones' initramfs
(debugfs, read-only, no mount).  Nothing is read back from the disk after the
guest has run.

The image's kernel must have 9p (Debian's "generic" images do; "genericcloud"
ones do not), its root filesystem must be ext4, and its modules plain, xz or gzip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tools
from ..config import CloudImage
from ..errors import ConfigError, ImageError, ProvisionError, ToolError
from ..host import state
from ..host.workdir import remove_tree
from ..progress import Steps
from ..resources import images_dir
from . import initramfs
from .layer import HOST_FILES, Layer, building_layer

log = logging.getLogger(__name__)

# What a run clone needs that a cloud image may lack; provisioning installs them.
CLOUD_PACKAGES = ("openssh-server", "python3-venv", "tini")
# The clones' initramfs takes busybox from the host (busybox-static): a cloud
# image rarely has a static one, and this one is vetted by the host's packages.
HOST_BUSYBOX = Path("/bin/busybox")
SOURCE_FILE = "source.json"
DISK = "disk.qcow2"
_CHUNK = 1024 * 1024
# Names vmiso puts on debugfs request lines: the image is the user's choice,
# but its file names still must not be able to add a request.
_SAFE_PATH = re.compile(r"^/?[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")


@dataclass(frozen=True)
class Partition:
    """A filesystem on the image's disk; number None means the whole disk."""

    number: int | None
    offset: int

    @property
    def device(self) -> str:
        """Its device in a guest whose first disk is this image."""
        return "/dev/vda" if self.number is None else f"/dev/vda{self.number}"


def partitions(table: dict[str, Any] | None) -> list[Partition]:
    """The partitions of ``sfdisk --json`` output; a disk without a table is one filesystem."""
    if table is None:
        return [Partition(None, 0)]
    info = table["partitiontable"]
    sector = int(info.get("sectorsize", 512))
    found = []
    for entry in info.get("partitions", []):
        number = re.search(r"(\d+)$", entry["node"])
        if number:
            found.append(Partition(int(number.group(1)), int(entry["start"]) * sector))
    return found


def safe_path(path: str) -> str:
    if not _SAFE_PATH.match(path) or ".." in path.split("/"):
        raise ProvisionError("cloud-image", f"the image holds a file name vmiso will not read: {path!r}")
    return path


def listing_names(output: str) -> dict[str, list[str]]:
    """``debugfs -f`` output of ``ls -p DIR`` requests -> names in each directory."""
    names: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("debugfs: ls -p "):
            current = line.removeprefix("debugfs: ls -p ")
            names[current] = []
        elif current is not None and line.startswith("/"):
            fields = line.split("/")  # /inode/mode/uid/gid/name/size/
            if len(fields) == 8 and fields[5] not in (".", ".."):
                names[current].append(fields[5])
    return names


def _version_key(release: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", release)]


@dataclass(frozen=True)
class Kernel:
    release: str
    kernel: tuple[Partition, str]
    initrd: tuple[Partition, str]
    modules: tuple[Partition, str]


def find_kernel(listings: dict[Partition, dict[str, list[str]]]) -> Kernel:
    """The newest kernel that has an initrd and a modules directory, from the listings of
    /, /boot, /usr/lib/modules and /lib/modules of each partition."""
    boot_files: dict[str, tuple[Partition, str]] = {}
    modules: dict[str, tuple[Partition, str]] = {}
    for part, dirs in listings.items():
        for directory in ("/boot", "/"):  # "/" of a separate /boot partition
            for name in dirs.get(directory, []):
                boot_files.setdefault(name, (part, directory.rstrip("/") + "/" + name))
        for directory in ("/usr/lib/modules", "/lib/modules"):
            for name in dirs.get(directory, []):
                modules.setdefault(name, (part, f"{directory}/{name}"))
    releases = sorted((name.removeprefix("vmlinuz-") for name in boot_files if name.startswith("vmlinuz-")),
                      key=_version_key)
    for release in reversed(releases):
        if f"initrd.img-{release}" in boot_files and release in modules:
            return Kernel(release, boot_files[f"vmlinuz-{release}"], boot_files[f"initrd.img-{release}"],
                          modules[release])
    raise ProvisionError(
        "cloud-image",
        "found no Linux kernel with its initrd and modules in the image (looked for /boot/vmlinuz-*, "
        "/boot/initrd.img-* and /usr/lib/modules/* on every ext4 filesystem)",
        hint="vmiso boots images whose root filesystem is ext4, such as Debian's or Ubuntu's cloud images",
    )


class DebugfsDisk:
    """A raw copy of the image, read with debugfs one filesystem at a time."""

    def __init__(self, raw: Path, work: Path) -> None:
        self.raw = raw
        self.work = work

    def requests(self, part: Partition, lines: list[str]) -> str:
        request_file = self.work / "debugfs.requests"
        request_file.write_text("".join(line + "\n" for line in lines))
        # Relative targets: debugfs splits requests on blanks, and the state directory may have some.
        return tools.run(tools.debugfs_argv(self.raw, part.offset, request_file), cwd=self.work)

    def listings(self, part: Partition) -> dict[str, list[str]]:
        dirs = ("/", "/boot", "/usr/lib/modules", "/lib/modules")
        return listing_names(self.requests(part, [f"ls -p {d}" for d in dirs]))

    def dump(self, part: Partition, files: list[tuple[str, str]]) -> None:
        """Copy (path in image, path relative to work) pairs out; each must arrive."""
        for _, target in files:
            (self.work / target).parent.mkdir(parents=True, exist_ok=True)
        self.requests(part, [f"dump {safe_path(inside)} {safe_path(target)}" for inside, target in files])
        for inside, target in files:
            if not (self.work / target).is_file():
                raise ProvisionError("cloud-image", f"could not read {inside} from the image")


def _check_busybox(busybox: Path) -> None:
    fix = "install the static one: apt-get install busybox-static"
    if not busybox.is_file():
        raise ToolError(f"{busybox} is missing: vmiso puts it into the clones' initramfs", fix)
    try:
        tools.run(tools.ldd_argv(busybox))
    except ToolError:
        return  # not a dynamic executable
    raise ToolError(f"{busybox} is dynamically linked; the clones' initramfs has no libraries for it", fix)


def cloud_key(cloud: CloudImage, busybox: Path = HOST_BUSYBOX) -> str:
    """The cache key: the image, and what vmiso adds to it (its init, the host's busybox)."""
    _check_busybox(busybox)
    digest = hashlib.sha256(cloud.sha256.encode())
    for name in HOST_FILES:
        digest.update((images_dir() / "guest" / name).read_bytes())
    digest.update(busybox.read_bytes())
    return "cloud-" + digest.hexdigest()[:16]


def copy_verified(source: Path, target: Path, sha256: str) -> None:
    """Copy ``source`` to ``target``, hashing the bytes copied; refuse them if the hash differs."""
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise ConfigError(f"image.cloud_image.path: {source} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"image.cloud_image.path: {source} is a directory, not a qcow2 file") from None
    except PermissionError as err:
        raise ConfigError(f"image.cloud_image.path: cannot read {source} ({err.strerror})") from None
    if digest.hexdigest() != sha256:
        raise ImageError(
            f"{source} has sha256 {digest.hexdigest()}, not the {sha256} that image.cloud_image.sha256 expects",
            "check that the file is the image you meant (compare with the publisher's checksum list) "
            "and set image.cloud_image.sha256 to its checksum",
        )


def check_qcow2(disk: Path, source: Path) -> None:
    """A standalone qcow2: no backing file or external data file (either would read another host file)."""
    info = tools.qemu_img_info(disk)
    if info.get("format") != "qcow2":
        raise ConfigError(f"image.cloud_image.path: {source} is a {info.get('format')} image, not qcow2",
                          f"convert it: qemu-img convert -O qcow2 {source} IMAGE.qcow2")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if info.get("backing-filename") or data_file:
        raise ConfigError(f"image.cloud_image.path: {source} depends on another file "
                          f"({info.get('backing-filename') or data_file})",
                          f"flatten it first: qemu-img convert -O qcow2 {source} IMAGE.qcow2")


def _extract(disk: DebugfsDisk, steps: Steps) -> tuple[Kernel, Partition]:
    try:
        table = json.loads(tools.run(tools.sfdisk_json_argv(disk.raw)))
    except ToolError:
        table = None  # no partition table: a filesystem on the whole disk
    listings: dict[Partition, dict[str, list[str]]] = {}
    for part in partitions(table):
        try:
            listings[part] = disk.listings(part)
        except ToolError:
            continue  # not an ext4 filesystem (an EFI or BIOS boot partition)
    kernel = find_kernel(listings)
    root = kernel.modules[0]
    steps.note("cloud-image", f"kernel {kernel.release}, root filesystem {root.device}")
    disk.dump(kernel.kernel[0], [(kernel.kernel[1], "vmlinuz")])
    disk.dump(kernel.initrd[0], [(kernel.initrd[1], "initrd.img")])
    modules_dir = kernel.modules[1]
    disk.dump(root, [(f"{modules_dir}/modules.dep", "modules/modules.dep"),
                     (f"{modules_dir}/modules.builtin", "modules/modules.builtin")])
    try:
        boot, late = initramfs.module_groups(disk.work / "modules")
    except ToolError as err:
        hint = None
        if isinstance(err, initramfs.MissingModule) and err.module in initramfs.LATE_MODULES:
            hint = ("vmiso moves data over virtio-9p; use an image whose kernel has it, e.g. Debian's "
                    "'generic' image rather than 'genericcloud', or the recipe source (image.recipe)")
        raise ProvisionError("cloud-image", f"kernel {kernel.release}: {err.message}", hint=hint) from None
    disk.dump(root, [(f"{modules_dir}/{relative}", f"modules/{safe_path(relative)}") for relative in boot + late])
    return kernel, root


def _load(path: Path, key: str) -> Layer:
    source = json.loads((path / SOURCE_FILE).read_text())
    return Layer(key, path, root_device=source["root_device"], rootfs_name=DISK, rootfs_format="qcow2")


def ensure_cloud_layer(state_dir: Path, cloud: CloudImage, steps: Steps) -> Layer:
    """Return the cached layer made from this cloud image, making it when missing."""
    key = cloud_key(cloud)
    layers = state.Home(state_dir).layers
    path = layers / key
    if (path / SOURCE_FILE).exists():
        steps.note("cloud-image", f"reusing cached layer {key} of {cloud.path}")
        return _load(path, key)
    with steps.step("cloud-image", f"verify {cloud.path}, read its kernel and modules"), \
            building_layer(layers, key) as work:
        copy_verified(cloud.path, work / DISK, cloud.sha256)
        check_qcow2(work / DISK, cloud.path)
        raw = work / "disk.raw"
        tools.run(tools.qemu_img_convert_argv(work / DISK, "qcow2", raw, target_format="raw"))
        kernel, root = _extract(DebugfsDisk(raw, work), steps)
        (work / "initramfs.img").write_bytes(initramfs.build(work / "modules", HOST_BUSYBOX))
        for leftover in (raw, work / "debugfs.requests"):
            leftover.unlink()
        remove_tree(work / "modules")
        (work / "kernel-release").write_text(kernel.release + "\n")
        (work / SOURCE_FILE).write_text(json.dumps(
            {"key": key, "cloud_image": {"path": str(cloud.path), "sha256": cloud.sha256},
             "root_device": root.device, "kernel": kernel.release}, indent=2) + "\n")
    return _load(path, key)


def apt_source_urls(texts: list[str]) -> list[str]:
    """The http(s) URIs of apt sources, one-line (``deb [opts] URI ...``) or deb822 (``URIs: ...``)."""
    found = []
    for text in texts:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            words = line.split()
            if not words:
                continue
            if words[0] in ("deb", "deb-src"):
                rest = words[1:]
                if rest and rest[0].startswith("["):
                    while rest and not rest[0].endswith("]"):
                        rest = rest[1:]
                    rest = rest[1:]
                found += rest[:1]
            elif words[0].lower() == "uris:":
                found += words[1:]
    return [url for url in dict.fromkeys(found) if url.startswith(("http://", "https://"))]


def root_partition(raw: Path, root_device: str) -> Partition:
    """Where the root filesystem ``root_device`` (/dev/vda, or /dev/vdaN) is in the raw disk ``raw``."""
    if root_device == "/dev/vda":
        return Partition(None, 0)
    number = int(root_device.removeprefix("/dev/vda"))
    table = json.loads(tools.run(tools.sfdisk_json_argv(raw)))
    for part in partitions(table):
        if part.number == number:
            return part
    raise ImageError(f"the disk has no partition {number} (its root, {root_device})")


def read_apt_sources(layer: Layer, work: Path) -> list[str]:
    """A cloud image's apt source URIs, read from its verified copy with debugfs (no boot, no mount)."""
    check = work / "apt-sources"
    check.mkdir()
    try:
        raw = check / "disk.raw"
        tools.run(tools.qemu_img_convert_argv(layer.rootfs, layer.rootfs_format, raw, target_format="raw"))
        root = root_partition(raw, layer.root_device)
        disk = DebugfsDisk(raw, check)
        names = listing_names(disk.requests(root, ["ls -p /etc/apt/sources.list.d"]))
        wanted = ["etc/apt/sources.list"] + [f"etc/apt/sources.list.d/{n}"
                                             for n in names.get("/etc/apt/sources.list.d", [])
                                             if n.endswith((".list", ".sources")) and _SAFE_PATH.match(n)]
        disk.requests(root, [f"dump /{path} f{i}" for i, path in enumerate(wanted)])
        texts = [(check / f"f{i}").read_text(errors="replace") for i in range(len(wanted))
                 if (check / f"f{i}").is_file()]
        return apt_source_urls(texts)
    finally:
        remove_tree(check)
