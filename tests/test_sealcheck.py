"""The check after sealing: a template's sshd, its config, vmiso's files and tini against the host's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vmiso import tools
from vmiso.errors import ImageError
from vmiso.image import sealcheck
from vmiso.image.layer import Layer, guest_files

SSHD = b"\x7fELF the real sshd"
TINI = b"\x7fELF the real tini"


def _tree(root: Path, sshd: bytes = SSHD, tini: bytes = TINI, changes: dict[str, bytes] | None = None) -> Path:
    files = {"/usr/sbin/sshd": sshd, "/usr/bin/tini": tini}
    files.update({path: text.encode() for path, text, _ in guest_files()})
    files["/var/lib/dpkg/info/openssh-server.md5sums"] = \
        f"{hashlib.md5(SSHD).hexdigest()}  usr/sbin/sshd\n".encode()
    files["/var/lib/dpkg/info/tini.md5sums"] = f"{hashlib.md5(TINI).hexdigest()}  usr/bin/tini\n".encode()
    files.update(changes or {})
    for path, data in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def _ext4(source: Path, image: Path) -> Path:
    tools.run(tools.mkfs_ext4_argv(source_dir=source, image=image, size_bytes=16 * 1024**2, label="t"))
    return image


def _template(tmp_path: Path, **tree) -> Path:
    raw = _ext4(_tree(tmp_path / "template-root", **tree), tmp_path / "template.raw")
    template = tmp_path / "template.qcow2"
    tools.run(tools.qemu_img_convert_argv(raw, "raw", template))
    return template


@pytest.fixture
def recipe_layer(tmp_path: Path) -> Layer:
    (tmp_path / "layer").mkdir()
    _ext4(_tree(tmp_path / "layer-root"), tmp_path / "layer" / "rootfs.img")
    return Layer("k", tmp_path / "layer")


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return work


def test_an_untouched_template_passes(tmp_path, recipe_layer):
    sealcheck.check_template(_template(tmp_path), recipe_layer, _work(tmp_path))
    assert list(_work(tmp_path).iterdir()) == []  # nothing left behind


def test_a_replaced_sshd_is_refused(tmp_path, recipe_layer):
    template = _template(tmp_path, sshd=b"\x7fELF a backdoored sshd")
    with pytest.raises(ImageError, match="/usr/sbin/sshd differs from the OS layer's"):
        sealcheck.check_template(template, recipe_layer, _work(tmp_path))


def test_a_changed_sshd_config_and_a_missing_guest_file_are_refused(tmp_path, recipe_layer):
    template = _template(tmp_path, changes={"/etc/ssh/sshd_config.vmiso": b"PermitRootLogin yes\n"})
    problems = sealcheck.differences(template, recipe_layer, _work(tmp_path))
    assert problems == ["/etc/ssh/sshd_config.vmiso is not vmiso's"]


def test_a_cloud_image_is_checked_against_dpkgs_checksums(tmp_path):
    # A cloud image's layer is qcow2 and gets sshd and tini from apt during provisioning.
    cloud_layer = Layer("k", tmp_path, rootfs_name="disk.qcow2", rootfs_format="qcow2")
    assert sealcheck.differences(_template(tmp_path), cloud_layer, _work(tmp_path)) == []
    template = _template(tmp_path, tini=b"\x7fELF another tini")
    assert sealcheck.differences(template, cloud_layer, _work(tmp_path)) == [
        "/usr/bin/tini differs from what tini installed"]
