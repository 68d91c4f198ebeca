"""The image store: sealed templates under ``STATE_DIR/images/NAME`` with their manifests.

An image directory exists under its final name only once it is complete:
provisioning builds under ``.building-*`` and renames at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import check_name
from ..errors import ImageError

MANIFEST = "manifest.json"
_SHA_CACHE = ".sha256-cache.json"


@dataclass(frozen=True)
class Image:
    name: str
    path: Path

    @property
    def template(self) -> Path:
        return self.path / "template.qcow2"

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
        return self.manifest().get("root_device", "/dev/vda")

    def manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ImageError(f"image {self.name}: manifest unreadable ({err})",
                             f"provision it again: vmiso provision --name {self.name} --replace") from None


def images_root(state_dir: Path) -> Path:
    return state_dir / "images"


def prepare_root(state_dir: Path) -> Path:
    """Create the store with modes that let QEMU (another user) reach files but not list them."""
    for directory in (state_dir, images_root(state_dir)):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o711)
    return images_root(state_dir)


def list_images(state_dir: Path) -> list[Image]:
    root = images_root(state_dir)
    if not root.is_dir():
        return []
    return [Image(p.name, p) for p in sorted(root.iterdir())
            if not p.name.startswith(".") and (p / MANIFEST).is_file()]


def get_image(state_dir: Path, name: str) -> Image:
    check_name(name)
    image = Image(name, images_root(state_dir) / name)
    if not (image.path / MANIFEST).is_file() or not image.template.is_file():
        known = ", ".join(i.name for i in list_images(state_dir)) or "none"
        raise ImageError(f"no image named {name!r} in {images_root(state_dir)} (images: {known})",
                         "build it with 'vmiso provision'")
    return image


def remove_image(state_dir: Path, name: str) -> None:
    image = get_image(state_dir, name)
    trash = image.path.with_name(f".removing-{name}-{os.getpid()}")
    os.rename(image.path, trash)  # gone from the store at once, whatever happens next
    shutil.rmtree(trash)


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def verify(image: Image) -> str:
    """Re-hash the template and compare with the manifest; return the sha256 or raise."""
    expected = image.manifest().get("sha256")
    actual = sha256_file(image.template)
    if actual != expected:
        raise ImageError(
            f"image {image.name}: template sha256 {actual} does not match its manifest ({expected})",
            f"the template was changed; remove it and provision again (vmiso images rm {image.name})",
        )
    _write_cache(image, actual)
    return actual


def verified_sha256(image: Image) -> str:
    """The template's checked sha256, re-hashing only when its file identity changed."""
    try:
        cached = json.loads((image.path / _SHA_CACHE).read_text())
        if cached.get("identity") == _identity(image.template) and \
                cached.get("sha256") == image.manifest().get("sha256"):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    return verify(image)


def _write_cache(image: Image, sha256: str) -> None:
    tmp = image.path / f"{_SHA_CACHE}.{os.getpid()}"
    tmp.write_text(json.dumps({"identity": _identity(image.template), "sha256": sha256,
                               "checked": time.time()}))
    os.replace(tmp, image.path / _SHA_CACHE)


def summary(image: Image) -> dict:
    manifest = image.manifest()
    return {
        "name": image.name,
        "size": image.template.stat().st_size,
        "created": manifest.get("created"),
        "sha256": manifest.get("sha256"),
        "packages": manifest.get("pip", []),
        "source": manifest.get("source", {}),
        "path": str(image.path),
    }
