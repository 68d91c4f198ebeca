"""A minimal initramfs for run clones: busybox, a handful of modules, one script.

Debian's own initrd (~35 MB compressed, ~130 MB unpacked, udev and a dozen
hooks) costs a clone seconds under emulation just to be unpacked.  A clone only
needs its disk, its shares and its SSH port, so its initramfs holds the modules
for those (resolved with modules.dep), a static busybox (the layer's, or the
host's for a cloud image) and images/guest/initramfs-init, packed as an
uncompressed "newc" cpio archive.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import ToolError
from ..resources import images_dir

# What a clone loads, by module name; their dependencies come from modules.dep.
# The boot group is needed to mount the root (and /in); the late group (9p, for
# /out) loads in the background meanwhile.
BOOT_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4",
    # /in.  Here, not in the late group: it needs libcrc32c, whose init asks the crypto
    # API for crc32c, which crc32c_generic (above) must have registered by then.
    "erofs",
    # Without it the kernel's RNG takes seconds to initialize, and sshd waits for it.
    "virtio-rng",
)
LATE_MODULES = ("9pnet_virtio", "9p")
_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".ko": lambda data: data, ".ko.xz": lzma.decompress, ".ko.gz": gzip.decompress}
BUSYBOX_APPLETS = ("sh", "mount", "insmod", "switch_root", "mkdir", "sleep", "echo", "hostname", "ip",
                   "poweroff", "grep", "tr", "cat", "stat", "chown", "dd", "xargs", "umount")


class MissingModule(ToolError):
    """The kernel lacks a module a clone needs, and does not have it built in."""

    def __init__(self, module: str) -> None:
        super().__init__(f"the kernel has no module {module} (and it is not built in)")
        self.module = module


def module_order(modules_dir: Path, wanted: tuple[str, ...] = BOOT_MODULES,
                 loaded: tuple[str, ...] = ()) -> list[str]:
    """Module paths (relative to ``modules_dir``) in an order that loads dependencies first.

    Paths in ``loaded`` (an earlier group) are left out.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0]
        by_name[name] = path
        by_name[name.replace("-", "_")] = path
    builtin = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.exists():
        builtin = {Path(p).name.split(".ko")[0].replace("-", "_") for p in builtin_file.read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order or path in loaded:
            return
        for dep in reversed(deps.get(path, [])):  # modprobe loads the last one first
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        found = by_name.get(name) or by_name.get(key)
        if found is None:
            raise MissingModule(name)
        visit(found)
    for path in order:
        if not path.endswith(tuple(_DECOMPRESS)):
            raise ToolError(f"the kernel's module {path} is compressed in a way vmiso cannot unpack "
                            f"(it reads {', '.join(_DECOMPRESS)})")
    return order


def module_bytes(path: Path) -> bytes:
    """A module file as the kernel loads it: busybox insmod hands it over as it is,
    so xz- and gzip-compressed modules (Debian 13 ships .ko.xz) are unpacked here."""
    for suffix, unpack in _DECOMPRESS.items():
        if path.name.endswith(suffix):
            return unpack(path.read_bytes())
    raise ToolError(f"{path} is not a kernel module vmiso can load")


def module_groups(modules_dir: Path) -> tuple[list[str], list[str]]:
    """The boot group and the late (9p) group, as paths relative to ``modules_dir``.

    Only modules.dep and modules.builtin are read, so a caller can fetch the
    listed files afterwards.
    """
    boot = module_order(modules_dir, BOOT_MODULES)
    return boot, module_order(modules_dir, LATE_MODULES, loaded=tuple(boot))


class _Newc:
    """Writer of the cpio "newc" format that the kernel unpacks."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, 0, 0,
                  len(encoded), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.buffer.write(header + encoded)
        self.buffer.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buffer.write(data)
        self.buffer.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buffer.getvalue()


def build(modules_dir: Path, busybox: Path) -> bytes:
    """The initramfs from a kernel's modules directory and a static busybox."""
    archive = _Newc()
    for directory in ("bin", "dev", "proc", "sys", "root", "lib", "lib/modules"):
        archive.directory(directory)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    boot, late = module_groups(modules_dir)
    archive.directory("lib/modules/late")
    for group, order in (("lib/modules", boot), ("lib/modules/late", late)):
        for index, relative in enumerate(order):
            name = Path(relative).name.split(".ko")[0]
            archive.file(f"{group}/{index:02d}-{name}.ko", module_bytes(modules_dir / relative))
    archive.file("init", (images_dir() / "guest" / "initramfs-init").read_bytes(), 0o755)
    return archive.finish()
