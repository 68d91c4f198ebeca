"""The image store: sealed templates under ``STATE_DIR/images/NAME`` with their manifests.

An image directory exists under its final name only once it is complete:
provisioning builds under ``.building-*`` and renames at the end.

The store is shared: where scripts/setup-host made it (group vmiso, setgid and
sticky), every member reads every image, and only an image's owner (its
directory's) or root removes or replaces it.  What a member checks of another's
image (sha256 of the template) is cached in their own directory.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import logging
import os
import pwd
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import check_name
from ..errors import ImageError
from ..host import reaper, state

MANIFEST = "manifest.json"
# What the image's guest files speak (its ssh-link and initramfs), recorded in the manifest.
# 3: /in is the inputs disk (serial vmiso-in), mounted at GO; before, a 9p share.
# 4: and files of 1 MiB or more over the read-only share vmiso-in-large, bound over their names.
GUEST_PROTOCOL = 4
_SHA_CACHE = ".sha256-cache.json"
log = logging.getLogger(__name__)


# What a provisioning, an 'images rm' or a --replace that was killed half-way leaves in the
# store (vmiso.host.reaper collects it): a build, or a whole template on its way out.
reaper.register("image build", state.IMAGES, f"{state.BUILDING}*")
reaper.register("image removal", state.IMAGES, f"{state.REMOVING}*", reaper.remover_gone)
reaper.register("replaced image", state.IMAGES, f"{state.REPLACED}*", reaper.remover_gone)


@dataclass(frozen=True)
class Image:
    name: str
    path: Path

    @property
    def template(self) -> Path:
        return self.path / "template.qcow2"

    @property
    def state_dir(self) -> Path:
        """The state directory whose store holds the image."""
        return self.path.parent.parent

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.img"

    @property
    def client_key(self) -> Path:
        return self.path / "client_key"

    @property
    def host_key(self) -> Path:
        return self.path / "host_key.pub"

    @property
    def root_device(self) -> str:
        """The clone's root filesystem: the whole disk, or a cloud image's partition."""
        return str(self.manifest().get("root_device", "/dev/vda"))

    def read(self, name: str) -> str:
        """One of the image's own files, never through a symbolic link: another member's
        image is theirs to shape, and root's vmiso reads it too."""
        return read_no_link(self.path / name).decode()

    def manifest(self) -> dict[str, Any]:
        try:
            manifest: dict[str, Any] = json.loads(self.read(MANIFEST))
            return manifest
        except (OSError, ValueError) as err:
            raise ImageError(f"image {self.name}: manifest unreadable ({err})",
                             f"provision it again: vmiso provision --name {self.name} --replace") from None


def prepare_root(state_dir: Path) -> Path:
    """The store; made, when missing, with modes that let QEMU (another user) reach files
    but not list them.  One that exists keeps its modes (scripts/setup-host's shared store)."""
    for directory in (state_dir, state.images(state_dir)):
        try:
            directory.mkdir(mode=0o711)
            os.chmod(directory, 0o711)
        except FileExistsError:
            pass
    return state.images(state_dir)


def is_shared(state_dir: Path) -> bool:
    """Whether the store is a group's (scripts/setup-host): its images are the group's to read."""
    try:
        st = state.images(state_dir).stat()
    except FileNotFoundError:
        return False
    return st.st_gid != 0 and bool(st.st_mode & stat.S_ISGID)


def owner_of(image: Image) -> int:
    return image.path.stat().st_uid


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_owner(image: Image, doing: str) -> None:
    """Only an image's owner (or root) removes or replaces it."""
    uid, owner = os.geteuid(), owner_of(image)
    if uid not in (0, owner):
        who = _user_name(owner)
        raise ImageError(f"image {image.name} is {who}'s: only {who} or root may {doing} it",
                         "provision one of your own under another name (vmiso provision --name NAME)")


def read_no_link(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _is_image_dir(path: Path) -> bool:
    """A directory in the store, not a symbolic link to one elsewhere (a member could plant it)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode) and (path / MANIFEST).is_file()
    except OSError:
        return False


def list_images(state_dir: Path) -> list[Image]:
    root = state.images(state_dir)
    if not root.is_dir():
        return []
    return [Image(p.name, p) for p in sorted(root.iterdir()) if not p.name.startswith(".") and _is_image_dir(p)]


def get_image(state_dir: Path, name: str) -> Image:
    check_name(name)
    image = Image(name, state.image(state_dir, name))
    if not _is_image_dir(image.path) or not image.template.is_file():
        names = [i.name for i in list_images(state_dir)]
        close = difflib.get_close_matches(name, names, n=1)
        hint = (f"did you mean {close[0]!r}?" if close
                else f"build it with 'vmiso provision' (image.name {name!r} in its config)")
        raise ImageError(f"no image named {name!r} in {state.images(state_dir)} "
                         f"(images: {', '.join(names) or 'none'})", hint)
    return image


def remove_image(state_dir: Path, name: str) -> None:
    image = get_image(state_dir, name)
    check_owner(image, "remove")
    trash = state.removing(image.path, str(os.getpid()))
    os.rename(image.path, trash)  # gone from the store at once, whatever happens next
    shutil.rmtree(trash)


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _identity(path: Path) -> list[int]:
    return _identity_of(path.stat())


def _identity_of(st: os.stat_result) -> list[int]:
    # ctime too: a write, chmod or chown changes it, and unlike mtime no user can set it back.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_paths(path: Path) -> list[Path]:
    """Where ``path``'s checked sha256 is cached: beside it, in its image's directory;
    for a member using another's image, in their own directory too (written there)."""
    beside = path.with_name(_SHA_CACHE)
    if path.parent.lstat().st_uid == os.geteuid():  # never write in a directory another user shapes
        return [beside]
    image = Image(path.parent.name, path.parent)
    return [beside, state.home(image.state_dir).sha256 / f"{image.name}{_SHA_CACHE}"]


def _read_cache(cache_path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(read_no_link(cache_path))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def root_only(path: Path) -> None:
    """Check that a file vmiso boots from is a regular file of its directory's owner's (root's,
    or the analyst's who made it) and unwritable, as it was made; the owner puts it right.

    libvirt used to hand whole backing chains to QEMU's user and never give them
    back; such a file stays writable by any QEMU until put right here.  Through
    one descriptor, never a symbolic link, and only by the owner (root too leaves
    another's files alone: it would otherwise chown what a member's link points at).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageError(f"{path} is a symbolic link, which vmiso never follows in an image",
                             f"remove the image and provision it again (vmiso images rm {path.parent.name})") from None
        raise
    try:
        st = os.fstat(fd)
        directory = path.parent.lstat()
        owner = directory.st_uid
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path} is not a regular file", f"vmiso images rm {path.parent.name}")
        if st.st_uid == owner and st.st_gid == directory.st_gid and not st.st_mode & 0o222:
            return
        what = f"{path} was not its owner's and read-only (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
        if os.geteuid() != owner:
            raise ImageError(what, f"ask the image's owner ({_user_name(owner)}) to run: vmiso images verify "
                             f"{path.parent.name}")
        log.warning("%s: made so again", what)
        if (st.st_uid, st.st_gid) != (owner, directory.st_gid):
            os.fchown(fd, owner, directory.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o222)
    finally:
        os.close(fd)


def _hash_stable(path: Path) -> tuple[str, list[int]]:
    """(sha256, identity) of one open file, ImageError if it changed while being read."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        before = _identity_of(os.fstat(f.fileno()))
        digest = hashlib.sha256()
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
        if _identity_of(os.fstat(f.fileno())) != before:
            raise ImageError(f"{path} changed while vmiso was checking it", "try again")
    return digest.hexdigest(), before


def remember(path: Path) -> str:
    """Record ``path``'s sha256 and identity in the cache beside it; the sha256."""
    sha256, identity = _hash_stable(path)
    _store(path, sha256, identity)
    return sha256


def _store(path: Path, sha256: str, identity: list[int]) -> None:
    cache_path = _cache_paths(path)[-1]
    cache_path.parent.mkdir(mode=0o700, exist_ok=True)
    cache = _read_cache(cache_path)
    cache[path.name] = {"identity": identity, "sha256": sha256, "checked": time.time()}
    fd, tmp = tempfile.mkstemp(prefix=_SHA_CACHE, dir=cache_path.parent)  # O_EXCL: no link followed
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(cache))
    os.chmod(tmp, 0o644)
    os.replace(tmp, cache_path)


def check_file(path: Path, expected: str | None, *, what: str, fix: str) -> str:
    """``path``'s sha256 if it is ``expected``, re-hashing only when the file's identity
    changed since it last matched (a cache beside it, root's like the file); else ImageError.

    The file is made root's and read-only first (``root_only``)."""
    if not expected:
        raise ImageError(f"{what} has no recorded sha256, so it cannot be verified", fix)
    try:
        root_only(path)
        for cache_path in _cache_paths(path):
            entry = _read_cache(cache_path).get(path.name)
            if (isinstance(entry, dict) and entry.get("identity") == _identity(path)
                    and entry.get("sha256") == expected):
                return expected
        actual, identity = _hash_stable(path)
    except FileNotFoundError:
        raise ImageError(f"{what} is missing", fix) from None
    if actual != expected:
        raise ImageError(f"{what} was changed: its sha256 is {actual}, not the recorded {expected}", fix)
    _store(path, actual, identity)
    return actual


def check_guest(image: Image) -> None:
    """ImageError for an image whose guest files an older vmiso installed: its clones would
    look for their inputs where this vmiso no longer puts them."""
    if image.manifest().get("guest_protocol", 2) < GUEST_PROTOCOL:
        raise ImageError(f"image {image.name} was provisioned by an older vmiso: its guest does not read /in "
                         "the way this one gives the inputs (a disk, and large files over a share)",
                         f"provision it again: vmiso provision --replace (image.name {image.name})")


def reprovision_hint(image: Image) -> str:
    return f"it was changed; remove the image and provision it again (vmiso images rm {image.name})"


def verify(image: Image) -> str:
    """Re-hash the template, kernel and initramfs; the template's sha256, or ImageError."""
    _forget(image)
    for path, expected in {**boot_files(image), **pinned_files(image)}.items():
        check_file(path, expected, what=f"image {image.name}: {path.name}", fix=reprovision_hint(image))
    return verified_sha256(image)


def pinned_files(image: Image) -> dict[Path, str]:
    """The records beside the template that the manifest pins by sha256: the gateway's record of the
    provisioning's connections and the lock of what pip installed (an older image has fewer)."""
    manifest = image.manifest()
    pinned = {}
    for key in ("gateway", "lock"):
        entry = manifest.get(key) or {}
        name, digest = entry.get("record") or entry.get("file"), entry.get("sha256")
        plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
        if plain and isinstance(digest, str):
            pinned[image.path / str(name)] = digest
    return pinned


def _forget(image: Image) -> None:
    for cache_path in _cache_paths(image.template):
        try:
            os.unlink(cache_path)
        except (FileNotFoundError, PermissionError):  # another's cache: not ours to trust or forget
            pass


def verified_sha256(image: Image) -> str:
    """The template's checked sha256 (the kernel and initramfs are checked as they are
    copied for each boot: ``copy_verified``)."""
    return check_file(image.template, image.manifest().get("sha256"), what=f"image {image.name}: template",
                      fix=reprovision_hint(image))


def boot_files(image: Image) -> dict[Path, str]:
    """The kernel and initramfs with the sha256 each must have; ImageError for an image made
    before vmiso recorded them."""
    manifest = image.manifest()
    wanted = {image.kernel: manifest.get("kernel_sha256"), image.initramfs: manifest.get("initramfs_sha256")}
    if not all(wanted.values()):
        raise ImageError(f"image {image.name} records no sha256 for its kernel and initramfs, "
                         "so what boots cannot be verified",
                         f"provision it again: vmiso provision --name {image.name} --replace")
    return {path: str(digest) for path, digest in wanted.items()}


def copy_verified(source: Path, target: Path, expected: str, *, what: str, fix: str) -> None:
    """Copy ``source`` to a new ``target``, hashing what is copied: the copy is exactly what
    was checked, whatever happens to ``source`` meanwhile.  ImageError (and no target) on a mismatch."""
    digest = hashlib.sha256()
    with os.fdopen(os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as src, \
            open(target, "xb") as dst:
        while block := src.read(4 * 1024 * 1024):
            digest.update(block)
            dst.write(block)
    if digest.hexdigest() != expected:
        target.unlink()
        raise ImageError(f"{what} was changed: its sha256 is {digest.hexdigest()}, not the recorded {expected}", fix)


def summary(image: Image) -> dict[str, Any]:
    manifest = image.manifest()
    return {
        "name": image.name,
        "size": image.template.stat().st_size,
        "created": manifest.get("created"),
        "sha256": manifest.get("sha256"),
        "packages": manifest.get("pip", []),
        # Whether the requirements were hash-pinned (None: none given, or provisioned before vmiso said).
        "hashed": (manifest.get("requirements") or {}).get("hashed") if (manifest.get("requirements") or {}).get("file")
        else None,
        "startup": manifest.get("startup"),  # image.inventory: what runs at every Python start
        "lock": manifest.get("lock"),  # image.lock: pylock.toml, what pip downloaded, matched with the gateway
        "audit": manifest.get("audit"),  # image.audit at provisioning: what was known then, and when
        "source": manifest.get("source", {}),
        "path": str(image.path),
        "owner": _user_name(owner_of(image)),  # who may remove or replace it (and root)
    }
