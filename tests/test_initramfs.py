import gzip
import lzma
import stat

import pytest

from vmiso.errors import ToolError
from vmiso.image import initramfs


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """A reader written from the format's description, to check the writer."""
    entries, offset = {}, 0
    while True:
        header = data[offset:offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        offset += 110
        name = data[offset:offset + namesize - 1].decode()
        offset += namesize
        offset += -offset % 4
        body = data[offset:offset + size]
        offset += size
        offset += -offset % 4
        if name == "TRAILER!!!":
            assert offset == len(data)
            return entries
        entries[name] = (mode, body)


def fake_root(tmp_path, dep_lines, builtin=""):
    modules = tmp_path / "usr/lib/modules/6.1.0-test"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    (modules / "modules.builtin").write_text(builtin)
    for line in dep_lines:
        path = modules / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF" + path.name.encode())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_bytes(b"\x7fELFbusybox")
    return tmp_path, modules


DEPS = [
    "kernel/drivers/virtio/virtio.ko:",
    "kernel/drivers/virtio/virtio_ring.ko:",
    "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko",
    "kernel/crypto/crc32c_generic.ko:",
    "kernel/lib/crc16.ko:",
    "kernel/fs/mbcache.ko:",
    "kernel/fs/jbd2/jbd2.ko:",
    "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko",
    "kernel/net/9p/9pnet.ko:",
    "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko "
    "kernel/drivers/virtio/virtio.ko",
    "kernel/fs/netfs/netfs.ko:",
    "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko",
    "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko",
    "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko "
    "kernel/drivers/virtio/virtio.ko",
    "kernel/lib/libcrc32c.ko:",
    "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko",  # as Debian 12's 6.1 kernel has it
]


def test_module_order_loads_dependencies_first(tmp_path):
    _, modules = fake_root(tmp_path, DEPS)
    order = [p.rsplit("/", 1)[1] for p in initramfs.module_order(modules)]
    assert len(order) == len(set(order))
    for module, needs in (("ext4.ko", "jbd2.ko"), ("virtio_pci.ko", "virtio.ko")):
        assert order.index(needs) < order.index(module)
    assert "9p.ko" not in order
    assert "virtio-rng.ko" in order
    late = [p.rsplit("/", 1)[1] for p in initramfs.module_order(modules, initramfs.LATE_MODULES,
                                                                loaded=tuple(initramfs.module_order(modules)))]
    assert late == ["9pnet.ko", "9pnet_virtio.ko", "netfs.ko", "fscache.ko", "9p.ko"]
    # erofs needs libcrc32c, whose init needs crc32c_generic loaded: all three in order, at boot.
    assert order.index("crc32c_generic.ko") < order.index("libcrc32c.ko") < order.index("erofs.ko")


def test_builtin_modules_are_skipped_and_missing_ones_named(tmp_path):
    _, modules = fake_root(tmp_path, DEPS, builtin="kernel/fs/ext4/ext4.ko\n")
    assert not any(p.endswith("/ext4.ko") for p in initramfs.module_order(modules))
    with pytest.raises(ToolError, match="no module nosuch"):
        initramfs.module_order(modules, ("nosuch",))


def test_archive_holds_busybox_modules_and_init(tmp_path):
    root, modules = fake_root(tmp_path, DEPS)
    entries = read_newc(initramfs.build(modules, root / "bin/busybox"))
    mode, body = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and body.startswith(b"#!/bin/sh")
    assert entries["bin/busybox"][1] == b"\x7fELFbusybox"
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    loaded = sorted(name for name in entries if name.startswith("lib/modules/") and name.endswith(".ko"))
    assert loaded[0].startswith("lib/modules/00-") and len(loaded) == len(DEPS)
    assert sum(name.startswith("lib/modules/late/") for name in loaded) == 5


def test_module_groups_split_boot_and_late(tmp_path):
    _, modules = fake_root(tmp_path, DEPS)
    boot, late = initramfs.module_groups(modules)
    assert set(boot) | set(late) == {line.split(":")[0] for line in DEPS}
    assert not set(boot) & set(late)


def test_xz_and_gzip_modules_are_unpacked_for_busybox_insmod(tmp_path):
    deps = [line.replace("ext4.ko:", "ext4.ko.xz:").replace("9p.ko:", "9p.ko.gz:") for line in DEPS]
    root, modules = fake_root(tmp_path, deps)
    for name, pack in (("kernel/fs/ext4/ext4.ko.xz", lzma.compress), ("kernel/fs/9p/9p.ko.gz", gzip.compress)):
        (modules / name).write_bytes(pack(b"\x7fELFunpacked"))
    entries = read_newc(initramfs.build(modules, root / "bin/busybox"))
    (ext4,) = [name for name in entries if name.endswith("-ext4.ko")]
    (ninep,) = [name for name in entries if name.endswith("-9p.ko")]
    assert entries[ext4][1] == entries[ninep][1] == b"\x7fELFunpacked"


def test_zstd_modules_are_refused_by_name(tmp_path):
    # busybox insmod would hand them to the kernel packed; refuse at build time, not at boot.
    _, modules = fake_root(tmp_path, [line.replace("ext4.ko:", "ext4.ko.zst:") for line in DEPS])
    with pytest.raises(ToolError, match=r"ext4\.ko\.zst is compressed in a way vmiso cannot unpack"):
        initramfs.module_groups(modules)


def test_a_missing_module_is_a_typed_error_that_names_it(tmp_path):
    _, modules = fake_root(tmp_path, [line for line in DEPS if "9p" not in line])
    with pytest.raises(initramfs.MissingModule) as err:
        initramfs.module_groups(modules)
    assert err.value.module == "9pnet_virtio"
