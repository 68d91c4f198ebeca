"""Cloud-image-like disks for the tests: a GPT whose root ext4 filesystem is not partition 1.

No cloud image can be downloaded in CI, so tests lay out their own the way
Debian's are laid out (a BIOS boot partition and an EFI partition beside the
root), from an ext4 filesystem image, with sfdisk and qemu-img on plain files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

MIB = 1024 * 1024
BIOS_BOOT = "21686148-6449-6F70-6E61-6863696F6E6F"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ROOT_PARTITION = 3


def make_filesystem(root: Path, image: Path, size_mib: int = 32) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(image), f"{size_mib}M"], check=True)
    return image


def make_cloud_image(filesystem: Path, qcow2: Path) -> str:
    """Write ``filesystem`` as partition 3 of a GPT disk, convert to qcow2; return its sha256."""
    raw = qcow2.with_suffix(".raw")
    fs_mib = -(-filesystem.stat().st_size // MIB)
    with open(raw, "wb") as disk:
        disk.truncate((fs_mib + 8) * MIB)
    table = (f"label: gpt\nsize=1MiB, type={BIOS_BOOT}\nsize=2MiB, type={EFI_SYSTEM}\n"
             f"size={fs_mib}MiB, type={LINUX}\n")
    subprocess.run(["sfdisk", "-q", str(raw)], input=table, text=True, check=True)
    out = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True).stdout
    start = json.loads(out)["partitiontable"]["partitions"][ROOT_PARTITION - 1]["start"]
    subprocess.run(["dd", f"if={filesystem}", f"of={raw}", "bs=1M", f"seek={start * 512}", "oflag=seek_bytes",
                    "conv=notrunc,sparse", "status=none"], check=True)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    digest = hashlib.sha256()
    with open(qcow2, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def remove_files(filesystem: Path, paths: list[str]) -> None:
    """Delete files from an ext4 image without mounting it."""
    requests = "".join(f"rm {path}\n" for path in paths)
    done = subprocess.run(["debugfs", "-w", "-f", "-", str(filesystem)], input=requests, text=True,
                          capture_output=True, check=True)
    assert "not found" not in done.stderr, done.stderr
