"""The OS layer: a Debian root filesystem built from a recipe in images/.

mmdebstrap writes a tarball of the root filesystem, which is unpacked into a
directory under fakeroot; vmiso adds its guest files, and ``mkfs.ext4 -d``
packs the directory into a raw ext4 image: no loop mount, no partition table,
no bootloader (the kernel and initrd are copied out for direct kernel boot).
Root and an analyst who is not root build it the same way (tools.py says how);
the analyst needs subordinate ids (/etc/subuid, /etc/subgid) and newuidmap.
A layer is cached under a hash of everything that went into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pwd
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import tools
from ..config import from_mapping, load_yaml
from ..errors import ConfigError, ProvisionError, ToolError
from ..host import reaper, state
from ..host.workdir import OWNER_FILE, flocked, remove_tree
from ..progress import Steps
from ..resources import images_dir
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
        recipe_: Recipe = from_mapping(Recipe, load_yaml(path), "recipe", path.parent)
        return recipe_
    except ConfigError as err:
        if err.message.startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {err.message}", err.hint) from None


def layer_key(recipe: Recipe, mirror: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": dataclasses.asdict(recipe), "mirror": mirror},
                             sort_keys=True).encode())
    # The clones' initramfs is built with the layer: what it loads is part of it.
    digest.update(repr((initramfs.BOOT_MODULES, initramfs.LATE_MODULES, initramfs.BUSYBOX_APPLETS)).encode())
    guest = images_dir() / "guest"
    for name in sorted((*GUEST_FILES, *HOST_FILES)):
        digest.update(name.encode() + b"\0" + (guest / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def guest_files() -> tuple[tuple[str, str, int], ...]:
    """(absolute path in the guest, text, mode) of each guest file, for images vmiso did not build."""
    guest = images_dir() / "guest"
    return tuple(("/" + inside, (guest / name).read_text(encoding="utf-8"), mode)
                 for name, (inside, mode) in GUEST_FILES.items())


def _guest_file_sources() -> list[tuple[Path, str, int]]:
    """(file on the host, path in the layer, mode) of each guest file."""
    guest = images_dir() / "guest"
    return [(guest / name, inside, mode) for name, (inside, mode) in GUEST_FILES.items()]


def subordinate_start(path: Path, user: str, uid: int) -> int | None:
    """The first id of ``user``'s first range in ``path`` (/etc/subuid or /etc/subgid)
    that is long enough for a layer's user namespace, or None."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if count >= tools.LAYER_IDS:
            return start
    return None


def namespace_ids(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> tuple[int, int] | None:
    """None for root; for anyone else, the first subordinate uid and gid that their
    layer builds map (ProvisionError, saying how to set them up, when there are none)."""
    uid = os.geteuid()
    if uid == 0:
        return None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    hint = f"run scripts/setup-host --user {user} as root"
    for program in ("newuidmap", "newgidmap"):
        try:
            tools.which(program)
        except ToolError:
            raise ProvisionError("os-layer", f"{program} is not installed: building an OS layer as a user "
                                 "other than root needs it (package uidmap)", hint=hint) from None
    starts = []
    for path in (subuid, subgid):
        start = subordinate_start(path, user, uid)
        if start is None:
            raise ProvisionError("os-layer", f"{user} has no range of {tools.LAYER_IDS} subordinate ids in {path}: "
                                 "building an OS layer as a user other than root needs one", hint=hint)
        starts.append(start)
    return starts[0], starts[1]


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
    work = state.building(layers, key, str(os.getpid()))
    remove_tree(work)
    # Private until published: the unpacked tree holds setuid programs, the builder's own.
    state.claimed_dir(work, lambda path: path.mkdir(mode=0o700))
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
    layers = state.Home(state_dir).layers
    layer = Layer(key, layers / key)
    if layer.rootfs.exists():
        steps.note("os-layer", f"reusing cached layer {key}")
        return layer
    ids = namespace_ids()
    # Named before anything is made: inside a namespace, a missing program is only "not found".
    for program in ("mmdebstrap", "fakeroot", "unshare", "setpriv"):
        tools.which(program)
    log_path = state.Home(state_dir).logs / f"layer-{key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    with steps.step("os-layer", f"mmdebstrap {recipe.suite} from {mirror} (log: {log_path})"), \
            building_layer(layers, key) as work:
        tarball, root = work / "root.tar", work / "root"
        packages = [recipe.kernel_package, *recipe.packages]
        mmdebstrap = tools.mmdebstrap_argv(suite=recipe.suite, mirror=mirror, target=tarball,
                                           packages=packages, variant=recipe.variant)
        mkfs = tools.mkfs_ext4_argv(source_dir=root, image=work / "rootfs.img",
                                    size_bytes=recipe.filesystem_size, label="vmiso-root")
        try:
            tools.run(tools.layer_namespace_argv(mmdebstrap, sub_ids=ids), log_path=log_path, name="mmdebstrap")
            root.mkdir()
            tools.run(tools.pack_layer_argv(tarball=tarball, root=root, files=_guest_file_sources(), mkfs=mkfs,
                                            user_namespace=ids is not None),
                      log_path=log_path, name="fakeroot")
            tarball.unlink()
            _copy_boot_files(root, work)
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


# What a killed layer build or removal leaves (vmiso.host.reaper collects it).
reaper.register("OS layer build", state.LAYERS, f"{state.BUILDING}*")
reaper.register("OS layer removal", state.LAYERS, f"{state.REMOVING}*")


@dataclass(frozen=True)
class CachedLayer:
    key: str
    path: Path
    size: int  # bytes on disk (the raw layers are sparse)


def cached_layers(state_dir: Path) -> list[CachedLayer]:
    layers = state.Home(state_dir).layers
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
        doomed = state.removing(layer.path)
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
