"""After sealing: the system files every clone runs must be the host's, read without booting the template.

Install-time code runs as an unprivileged build user, so it should not have been
able to change them; this checks it.  The template is converted to a raw file
and read with debugfs (read-only, no mount, nothing executed), as cloud images
are.  vmiso's guest files are compared with this vmiso's copies; sshd and tini
with the OS layer's copies where the layer has them (a recipe's), else with the
checksums dpkg recorded when apt, as root and before any requirement's code ran,
installed them (a cloud image's).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import tools
from ..errors import ImageError, ToolError
from ..host.workdir import remove_tree
from .cloud import DebugfsDisk, Partition, root_partition, safe_path
from .layer import Layer, guest_files

# Programs every clone runs, and the package that ships each.
PROGRAMS = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/tini": "tini"}


def _dump(raw: Path, part: Partition, files: dict[str, str], into: Path) -> dict[str, bytes | None]:
    """Read ``files`` (path in the image -> name in ``into``) with debugfs; None for a missing one."""
    into.mkdir(parents=True, exist_ok=True)
    DebugfsDisk(raw, into).requests(part, [f"dump {safe_path(inside)} {safe_path(name)}"
                                           for inside, name in files.items()])
    return {inside: (into / name).read_bytes() if (into / name).is_file() else None
            for inside, name in files.items()}


def _dpkg_md5(md5sums: bytes | None, path: str) -> str | None:
    for line in (md5sums or b"").decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if "/" + name.strip() == path:
            return digest
    return None


def differences(template: Path, layer: Layer, work: Path) -> list[str]:
    """The system files of ``template`` that are not what the host put there, with why."""
    check = work / "sealcheck"
    check.mkdir()
    try:
        raw = check / "template.raw"
        tools.run(tools.qemu_img_convert_argv(template, "qcow2", raw, target_format="raw"))
        expected_guest = {path: text.encode() for path, text, _mode in guest_files()}
        wanted = {path: f"f{i}" for i, path in enumerate([*expected_guest, *PROGRAMS])}
        wanted.update({f"/var/lib/dpkg/info/{package}.md5sums": f"m{i}"
                       for i, package in enumerate(PROGRAMS.values())})
        found = _dump(raw, root_partition(raw, layer.root_device), wanted, check / "template")
        raw.unlink()
        reference: dict[str, bytes | None] = {}
        if layer.rootfs_format == "raw":  # a recipe's layer: a bare ext4 filesystem
            reference = _dump(layer.rootfs, Partition(None, 0), {p: f"r{i}" for i, p in enumerate(PROGRAMS)},
                              check / "layer")
        problems = []
        for path, text in expected_guest.items():
            if found[path] != text:
                problems.append(f"{path} is not vmiso's" if found[path] is not None else f"{path} is missing")
        for path, package in PROGRAMS.items():
            data = found[path]
            if data is None:
                problems.append(f"{path} is missing")
            elif reference.get(path) is not None:
                if data != reference[path]:
                    problems.append(f"{path} differs from the OS layer's")
            else:
                recorded = _dpkg_md5(found[f"/var/lib/dpkg/info/{package}.md5sums"], path)
                if recorded is None:
                    problems.append(f"{path}: no checksum of {package} to compare with")
                elif hashlib.md5(data, usedforsecurity=False).hexdigest() != recorded:
                    problems.append(f"{path} differs from what {package} installed")
        return problems
    except ToolError as err:
        return [f"the template could not be read: {err.message}"]
    finally:
        remove_tree(check)


def check_template(template: Path, layer: Layer, work: Path) -> None:
    problems = differences(template, layer, work)
    if problems:
        raise ImageError(
            "the sealed template's system files are not the host's: " + "; ".join(problems),
            "install-time code may have changed what every clone runs; the image was not kept",
        )
