"""The OS layer: a Debian root filesystem built from a recipe in images/.

mmdebstrap fills a directory, vmiso adds its guest files, and ``mkfs.ext4 -d``
packs the directory into a raw ext4 image: no loop mount, no partition table,
no bootloader (the kernel and initrd are copied out for direct kernel boot).
A layer is cached under a hash of everything that went into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import tools
from ..config import from_mapping, load_yaml
from ..errors import ConfigError, ProvisionError, ToolError
from ..progress import Steps
from ..resources import images_dir
from ..workdir import OWNER_FILE, claim, flocked, remove_tree
from . import initramfs

log = logging.getLogger(__name__)

# Files vmiso puts into every layer: source under images/guest -> (path in guest, mode).
GUEST_FILES = {
    "ssh-link": ("usr/local/lib/vmiso/ssh-link", 0o755),
    "ssh-serve": ("usr/local/lib/vmiso/ssh-serve", 0o755),
    "sshd_config.vmiso": ("etc/ssh/sshd_config.vmiso", 0o644),
}
# Read on the host to build the clones' initramfs; part of the layer's hash.
HOST_FILES = ("initramfs-init",)


@dataclass(frozen=True)
class Recipe:
    suite: str
    variant: str = "minbase"
    kernel_package: str = "linux-image-amd64"
    packages: tuple[str, ...] = ()
    filesystem_size: int = 4 * 1024**3


@dataclass(frozen=True)
class Layer:
    """What a provisioning boot starts from: a disk, its kernel, and the clones' initramfs.

    A recipe's layer is a bare ext4 filesystem (raw, root on /dev/vda); a cloud
    image's is the verified qcow2 with its partition table (root on /dev/vdaN).
    """

    key: str
    path: Path
    root_device: str = "/dev/vda"
    rootfs_name: str = "rootfs.img"
    rootfs_format: str = "raw"

    @property
    def rootfs(self) -> Path:
        return self.path / self.rootfs_name

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def initramfs(self) -> Path:
        """The small initramfs of run clones (Debian's initrd serves provisioning)."""
        return self.path / "initramfs.img"


def recipe_path(recipe: str) -> Path:
    """A recipe name (``debian-12``) from images/, or a path to a recipe file."""
    if "/" in recipe or recipe.endswith((".yaml", ".yml")):
        return Path(recipe)
    path = images_dir() / f"{recipe}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in images_dir().glob("*.yaml"))
        raise ConfigError(f"image.recipe: no recipe named {recipe!r}", "known recipes: " + ", ".join(known))
    return path


def load_recipe(recipe: str) -> Recipe:
    path = recipe_path(recipe)
    try:
        return from_mapping(Recipe, load_yaml(path), "recipe", path.parent)
    except ConfigError as err:
        if err.message.startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {err.message}", err.hint) from None


def layer_key(recipe: Recipe, mirror: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": dataclasses.asdict(recipe), "mirror": mirror},
                             sort_keys=True).encode())
    guest = images_dir() / "guest"
    for name in sorted((*GUEST_FILES, *HOST_FILES)):
        digest.update(name.encode() + b"\0" + (guest / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def guest_files() -> tuple[tuple[str, str, int], ...]:
    """(absolute path in the guest, text, mode) of each guest file, for images vmiso did not build."""
    guest = images_dir() / "guest"
    return tuple(("/" + inside, (guest / name).read_text(encoding="utf-8"), mode)
                 for name, (inside, mode) in GUEST_FILES.items())


def _install_guest_files(root: Path) -> None:
    guest = images_dir() / "guest"
    for name, (inside, mode) in GUEST_FILES.items():
        target = root / inside
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(guest / name, target)
        os.chmod(target, mode)
    # The OS layer must not carry host keys made by the package's postinst: each
    # image gets its own, generated on the host and pinned.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()


def _copy_boot_files(root: Path, dest: Path) -> None:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ToolError(f"expected one kernel and one initrd in the layer's /boot, found {kernels} {initrds}")
    shutil.copyfile(kernels[0], dest / "vmlinuz")
    shutil.copyfile(initrds[0], dest / "initrd.img")
    release = kernels[0].name.removeprefix("vmlinuz-")
    (dest / "kernel-release").write_text(release + "\n")
    busybox = next((p for p in (root / "usr/bin/busybox", root / "bin/busybox") if p.exists()), None)
    if busybox is None:
        raise ToolError("the layer has no /bin/busybox; add busybox-static to the recipe's packages")
    (dest / "initramfs.img").write_bytes(initramfs.build(root / "usr/lib/modules" / release, busybox))


@contextmanager
def building_layer(layers: Path, key: str) -> Iterator[Path]:
    """A work directory for layer ``key``, claimed by this process until it is done.

    When the block ends, what it put into the directory is made read-only and the
    directory is moved into place as ``layers/key``; when it fails, it is removed.
    """
    layers.mkdir(parents=True, exist_ok=True)
    os.chmod(layers, 0o711)
    work = layers / f".building-{key}-{os.getpid()}"
    remove_tree(work)
    work.mkdir()
    claim(work)
    try:
        yield work
        (work / OWNER_FILE).unlink()
        for path in work.iterdir():
            os.chmod(path, 0o444)
        os.chmod(work, 0o755)
        publish_layer(work, layers / key)
    except BaseException:
        remove_tree(work)
        raise


def publish_layer(work: Path, final: Path) -> None:
    """Move a finished layer into place; when a concurrent provisioning of the same
    source got there first, keep that one (the two are equivalent) and drop this."""
    try:
        os.rename(work, final)
    except OSError:
        if not final.is_dir():
            raise
        remove_tree(work)


def layer_failure(err: ToolError, recipe: Recipe, mirror: str, log_path: Path) -> ProvisionError:
    hint = None
    if err.program == "mmdebstrap":
        hint = f"check that the mirror {mirror} is reachable and carries {recipe.suite}"
    return ProvisionError("os-layer", err.message, str(log_path), hint)


def ensure_layer(state_dir: Path, recipe_name: str, mirror: str, steps: Steps) -> Layer:
    """Return the cached layer for this recipe and mirror, building it when missing."""
    recipe = load_recipe(recipe_name)
    key = layer_key(recipe, mirror)
    layers = state_dir / "layers"
    layer = Layer(key, layers / key)
    if layer.rootfs.exists():
        steps.note("os-layer", f"reusing cached layer {key}")
        return layer
    log_path = state_dir / "logs" / f"layer-{key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    with steps.step("os-layer", f"mmdebstrap {recipe.suite} from {mirror} (log: {log_path})"), \
            building_layer(layers, key) as work:
        root = work / "root"
        packages = [recipe.kernel_package, *recipe.packages]
        try:
            tools.run(tools.mmdebstrap_argv(suite=recipe.suite, mirror=mirror, target=root,
                                            packages=packages, variant=recipe.variant),
                      log_path=log_path)
            _install_guest_files(root)
            _copy_boot_files(root, work)
            tools.run(tools.mkfs_ext4_argv(source_dir=root, image=work / "rootfs.img",
                                           size_bytes=recipe.filesystem_size, label="vmiso-root"),
                      log_path=log_path)
        except ToolError as err:
            raise layer_failure(err, recipe, mirror, log_path) from None
        remove_tree(root)
        (work / "recipe.json").write_text(json.dumps(
            {"key": key, "mirror": mirror, "recipe": dataclasses.asdict(recipe)}, indent=2) + "\n")
    return layer


# --- the cache of layers --------------------------------------------------------------
# A layer is only a cache: templates are flattened and keep their own kernel and
# initramfs, so removing layers costs only a rebuild at the next provisioning.
# A provisioning share-locks the layer it builds on; removal takes the lock
# exclusively, so a layer in use is never pulled from under it.


@dataclass(frozen=True)
class CachedLayer:
    key: str
    path: Path
    size: int  # bytes on disk (the raw layers are sparse)


def cached_layers(state_dir: Path) -> list[CachedLayer]:
    layers = state_dir / "layers"
    if not layers.is_dir():
        return []
    found = []
    for path in sorted(layers.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        size = sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())
        found.append(CachedLayer(path.name, path, size))
    return found


def hold_layer(layer: Layer, stack: ExitStack) -> bool:
    """Share-lock ``layer`` until ``stack`` closes; False when it was removed meanwhile."""
    try:
        fd = stack.enter_context(flocked(layer.path, shared=True, directory=True))
    except FileNotFoundError:
        return False
    try:
        same = os.stat(layer.path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
    return same and layer.rootfs.exists()


def remove_cached_layers(state_dir: Path) -> tuple[list[CachedLayer], list[CachedLayer]]:
    """Remove every cached layer no provisioning uses; return (removed, kept because in use)."""
    removed, kept = [], []
    for layer in cached_layers(state_dir):
        doomed = layer.path.with_name(f".removing-{layer.key}")
        try:
            with flocked(layer.path, wait=False, directory=True):
                # Renamed under the lock: a provisioning that waits for it then finds it gone.
                os.rename(layer.path, doomed)
        except BlockingIOError:
            kept.append(layer)
            continue
        remove_tree(doomed)
        removed.append(layer)
    return removed, kept
