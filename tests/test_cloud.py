"""The cloud-image source, up to the boot: verification, partitions, kernel and modules.

These build small real disks (sfdisk, mkfs.ext4, qemu-img) and read them with the
same tools vmiso uses; tests/test_vm.py boots one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vmiso.config import CloudImage
from vmiso.errors import ConfigError, ImageError, ProvisionError, ToolError
from vmiso.image import cloud
from vmiso.progress import Steps

from diskimage import ROOT_PARTITION, make_cloud_image, make_filesystem
from test_initramfs import DEPS, fake_root, read_newc

RELEASE = "6.1.0-test"


def cloud_root(tmp_path, deps=DEPS):
    """A root filesystem tree with a kernel, its initrd and its modules."""
    root, modules = fake_root(tmp_path / "root", deps)  # modules in usr/lib/modules/RELEASE
    assert modules.name == RELEASE
    (root / "bin/busybox").unlink()  # the host's busybox is the one used
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{RELEASE}").write_bytes(b"MZkernel")
    (root / "boot" / f"initrd.img-{RELEASE}").write_bytes(b"initrd")
    (root / "boot" / "vmlinuz-5.10.0-old").write_bytes(b"MZold")  # no modules: never chosen
    return root


@pytest.fixture
def image(tmp_path):
    filesystem = make_filesystem(cloud_root(tmp_path), tmp_path / "root.ext4")
    qcow2 = tmp_path / "cloud.qcow2"
    return CloudImage(qcow2, make_cloud_image(filesystem, qcow2))


def test_layer_holds_the_kernel_initrd_and_an_initramfs_of_its_modules(tmp_path, image):
    state = tmp_path / "state"
    layer = cloud.ensure_cloud_layer(state, image, Steps())
    assert layer.root_device == f"/dev/vda{ROOT_PARTITION}" and layer.rootfs_format == "qcow2"
    assert layer.kernel.read_bytes() == b"MZkernel" and layer.initrd.read_bytes() == b"initrd"
    assert (layer.path / "kernel-release").read_text() == RELEASE + "\n"
    assert layer.rootfs.read_bytes() == image.path.read_bytes()
    entries = read_newc(layer.initramfs.read_bytes())
    assert entries["bin/busybox"][1] == cloud.HOST_BUSYBOX.read_bytes()
    assert sum(name.endswith(".ko") for name in entries) == len(DEPS)
    assert sorted(p.name for p in layer.path.iterdir()) == [
        "disk.qcow2", "initramfs.img", "initrd.img", "kernel-release", "source.json", "vmlinuz"]
    # A second provisioning reuses it; nothing is left of the build.
    assert cloud.ensure_cloud_layer(state, image, Steps()) == layer
    assert [p.name for p in (state / "layers").iterdir()] == [layer.key]


def test_a_changed_file_is_refused_and_nothing_is_kept(tmp_path, image):
    with open(image.path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ImageError, match=f"not the {image.sha256}"):
        cloud.ensure_cloud_layer(tmp_path / "state", image, Steps())
    assert list((tmp_path / "state" / "layers").iterdir()) == []


def test_a_missing_file_names_the_key(tmp_path):
    missing = CloudImage(tmp_path / "nope.qcow2", "0" * 64)
    with pytest.raises(ConfigError, match="image.cloud_image.path: .*nope.qcow2 does not exist"):
        cloud.ensure_cloud_layer(tmp_path / "state", missing, Steps())


def test_a_qcow2_with_a_backing_file_is_refused(tmp_path, image):
    # It would make QEMU read another file of the host's.
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.path),
                    str(overlay)], check=True)
    sha = subprocess.run(["sha256sum", str(overlay)], capture_output=True, text=True).stdout.split()[0]
    with pytest.raises(ConfigError, match="depends on another file"):
        cloud.ensure_cloud_layer(tmp_path / "state", CloudImage(overlay, sha), Steps())


def test_a_raw_file_is_refused_with_the_conversion_to_run(tmp_path):
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 65536)
    sha = subprocess.run(["sha256sum", str(raw)], capture_output=True, text=True).stdout.split()[0]
    with pytest.raises(ConfigError, match="is a raw image, not qcow2.*qemu-img convert"):
        cloud.ensure_cloud_layer(tmp_path / "state", CloudImage(raw, sha), Steps())


def test_a_kernel_without_9p_is_refused_with_the_way_out(tmp_path):
    deps = [line for line in DEPS if "9p" not in line]
    filesystem = make_filesystem(cloud_root(tmp_path, deps), tmp_path / "root.ext4")
    qcow2 = tmp_path / "cloud.qcow2"
    source = CloudImage(qcow2, make_cloud_image(filesystem, qcow2))
    with pytest.raises(ProvisionError, match="no module 9pnet_virtio.*'generic' image rather than 'genericcloud'"):
        cloud.ensure_cloud_layer(tmp_path / "state", source, Steps())
    assert list((tmp_path / "state" / "layers").iterdir()) == []


def test_no_kernel_found_says_where_it_looked(tmp_path):
    root = tmp_path / "empty"
    (root / "etc").mkdir(parents=True)
    filesystem = make_filesystem(root, tmp_path / "root.ext4")
    qcow2 = tmp_path / "cloud.qcow2"
    source = CloudImage(qcow2, make_cloud_image(filesystem, qcow2))
    with pytest.raises(ProvisionError, match="found no Linux kernel.*ext4"):
        cloud.ensure_cloud_layer(tmp_path / "state", source, Steps())


def test_partitions_from_sfdisk_json_and_a_bare_filesystem():
    table = {"partitiontable": {"device": "d.raw", "sectorsize": 512, "partitions": [
        {"node": "d.raw1", "start": 227328}, {"node": "d.raw14", "start": 2048}, {"node": "d.raw15", "start": 6144}]}}
    found = cloud.partitions(table)
    assert [(p.device, p.offset) for p in found] == [
        ("/dev/vda1", 227328 * 512), ("/dev/vda14", 2048 * 512), ("/dev/vda15", 6144 * 512)]
    assert [(p.device, p.offset) for p in cloud.partitions(None)] == [("/dev/vda", 0)]


def test_kernel_choice_prefers_the_newest_complete_one_and_a_separate_boot_partition():
    root, boot = cloud.Partition(1, 0), cloud.Partition(16, 4096)
    listings = {
        root: {"/": ["etc", "usr"], "/boot": [], "/usr/lib/modules": ["6.8.0-10", "6.9.0-1"], "/lib/modules": []},
        boot: {"/": ["vmlinuz-6.8.0-10", "initrd.img-6.8.0-10", "vmlinuz-6.10.0-2"], "/boot": []},
    }
    kernel = cloud.find_kernel(listings)
    assert kernel.release == "6.8.0-10"  # 6.10 has no modules, 6.9 no kernel
    assert kernel.kernel == (boot, "/vmlinuz-6.8.0-10") and kernel.modules == (root, "/usr/lib/modules/6.8.0-10")


def test_listing_parser_and_path_guard():
    output = ("debugfs: ls -p /boot\n/13/040755/0/0/.//\n/2/040755/0/0/..//\n"
              "/17/100644/0/0/vmlinuz-6.1.0-50-amd64/8222656/\n\ndebugfs: ls -p /nosuch\n")
    assert cloud.listing_names(output) == {"/boot": ["vmlinuz-6.1.0-50-amd64"], "/nosuch": []}
    assert cloud.safe_path("/usr/lib/modules/6.1.0/kernel/fs/9p/9p.ko")
    for bad in ("/boot/x y", "/boot/../../etc/shadow", "/boot/x\nwrite /a /b", "a;b"):
        with pytest.raises(ProvisionError, match="will not read"):
            cloud.safe_path(bad)


@pytest.mark.root(reason="vmiso provision, in a process of its own, keeps its state as root's")
@pytest.mark.hostsetup(reason="vmiso provision connects to libvirtd")
def test_provision_with_a_wrong_sha256_stops_before_anything_is_built(tmp_path, image):
    state = tmp_path / "state"
    config = tmp_path / "vmiso.yaml"
    config.write_text(yaml.safe_dump({
        "accel": "tcg", "state_dir": str(state),
        "image": {"name": "c", "cloud_image": {"path": str(image.path), "sha256": "f" * 64}}}))
    done = subprocess.run([sys.executable, "-m", "vmiso", "provision", "-c", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 125
    assert f"has sha256 {image.sha256}, not the {'f' * 64}" in done.stderr
    assert "Traceback" not in done.stderr
    assert list((state / "images").iterdir()) == [] and list((state / "layers").iterdir()) == []


def test_the_host_busybox_must_be_there_and_static(tmp_path):
    source = CloudImage(tmp_path / "x.qcow2", "0" * 64)
    for busybox, problem in ((tmp_path / "nope", "is missing"), (Path("/bin/ls"), "is dynamically linked")):
        with pytest.raises(ToolError, match=f"{problem}.*apt-get install busybox-static"):
            cloud.cloud_key(source, busybox)
    assert cloud.cloud_key(source).startswith("cloud-")


def test_a_packed_9p_module_is_refused_for_its_packing_not_as_a_missing_9p(tmp_path):
    # The hint about 'generic' images is for a kernel without 9p; a .ko.zst 9p module
    # has 9p in its name but another problem.
    deps = [line.replace("9p.ko:", "9p.ko.zst:") for line in DEPS]
    filesystem = make_filesystem(cloud_root(tmp_path, deps), tmp_path / "root.ext4")
    qcow2 = tmp_path / "cloud.qcow2"
    source = CloudImage(qcow2, make_cloud_image(filesystem, qcow2))
    with pytest.raises(ProvisionError) as err:
        cloud.ensure_cloud_layer(tmp_path / "state", source, Steps())
    assert "9p.ko.zst is compressed" in str(err.value) and "genericcloud" not in str(err.value)


def test_apt_sources_of_both_formats_become_urls():
    one_line = ("deb http://deb.debian.org/debian bookworm main\n"
                "deb [signed-by=/usr/share/keyrings/x.gpg arch=amd64] https://mirror.example/debian bookworm main\n"
                "# deb http://commented.example/debian bookworm main\n"
                "deb cdrom:[Debian]/ bookworm main\n")
    deb822 = "Types: deb\nURIs: http://deb.debian.org/debian http://security.example/debian-security\n"
    assert cloud.apt_source_urls([one_line, deb822]) == [
        "http://deb.debian.org/debian", "https://mirror.example/debian", "http://security.example/debian-security"]


def test_a_cloud_images_apt_sources_are_read_without_booting_it(tmp_path):
    root = cloud_root(tmp_path)
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/apt/sources.list").write_text("deb http://ftp.example.org/debian bookworm main\n")
    (root / "etc/apt/sources.list.d/debian.sources").write_text("Types: deb\nURIs: https://sec.example/debian\n")
    (root / "etc/apt/sources.list.d/ignored.txt").write_text("deb http://not-a-source.example/ x y\n")
    filesystem = make_filesystem(root, tmp_path / "root.ext4")
    image = CloudImage(tmp_path / "cloud.qcow2", make_cloud_image(filesystem, tmp_path / "cloud.qcow2"))
    layer = cloud.ensure_cloud_layer(tmp_path / "state", image, Steps())
    work = tmp_path / "work"
    work.mkdir()
    assert cloud.read_apt_sources(layer, work) == ["http://ftp.example.org/debian", "https://sec.example/debian"]
    assert list(work.iterdir()) == []
