"""What runs at every Python start in a sealed template, read on the host without booting it.

The supply-chain attacks of 2026 ran their payloads at start-up or import, not in
``pip install``: ``.pth`` files whose ``import`` lines run on every start of the
interpreter, ``sitecustomize``, native extensions no wheel listed, files planted
beside the packages.  pip never checks installed files against the wheels' RECORDs.
So after sealing, the venv (and the system's site directories) are copied out of a
raw copy of the template with debugfs, as sealcheck reads it, and walked here by
descriptor: every byte is the guest's, so names are kept as text only for the
record, nothing is followed, executed or imported, and files are read within bounds.

The inventory goes into the manifest, so ``vmiso images verify`` (which checks the
template it was read from) covers it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tools
from ..errors import ImageError, ToolError
from ..host.tree import DirPath, walk
from ..host.workdir import remove_tree
from .cloud import DebugfsDisk, root_partition, safe_path

VENV = "/opt/vmiso/venv"  # cloud-init/provision.sh
# Where the system's Python looks for .pth files and sitecustomize on Debian.
SYSTEM_SITE = ("/usr/lib/python3/dist-packages", "/usr/local/lib")
PTH_MAX_BYTES = 1024 * 1024  # a .pth file larger than this is reported, not read
RECORD_MAX_BYTES = 64 * 1024 * 1024
# An unlisted file that pip's RECORD names without a hash: the wheel carried it, its RECORD did not list it.
HASHLESS = " (in RECORD without a hash: the wheel did not list it)"
# What python3 -m venv itself writes: no distribution's RECORD lists these.
VENV_SCAFFOLD = {"pyvenv.cfg", "lib64", "bin/python", "bin/python3", "bin/activate", "bin/activate.csh",
                 "bin/activate.fish", "bin/Activate.ps1"}
STARTUP_MODULES = ("sitecustomize", "usercustomize")
SHOWN_LINE = 200  # characters of a .pth line kept in the record


@dataclass
class Inventory:
    pth: list[dict[str, Any]] = field(default_factory=list)  # {"path", "sha256", "executes": [lines]}
    # sitecustomize/usercustomize: {"path", "sha256"}
    startup_modules: list[dict[str, Any]] = field(default_factory=list)
    native: list[dict[str, Any]] = field(default_factory=list)  # {"path", "sha256", "size", "distribution"}
    unlisted: list[str] = field(default_factory=list)  # venv files no RECORD lists
    tampered: list[dict[str, Any]] = field(default_factory=list)  # {"path", "distribution", "why"}
    # console scripts: {"name", "target", "distribution"}
    entry_points: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # what could not be read from the copy
    # SBOMs the wheels carried (PEP 770, .dist-info/sboms/): {"path", "sha256", "size", "distribution"}
    sboms: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"pth": self.pth, "startup_modules": self.startup_modules, "native": self.native,
                "unlisted": self.unlisted, "tampered": self.tampered, "entry_points": self.entry_points,
                "unreadable": self.unreadable, "sboms": self.sboms}


def _sha256_fd(fd: int, limit: int | None = None) -> tuple[str, bytes | None, int]:
    """(sha256, the bytes if at most ``limit`` of them were wanted and there were no more, size)."""
    digest = hashlib.sha256()
    kept: list[bytes] | None = [] if limit is not None else None
    size = 0
    while block := os.read(fd, 1024 * 1024):
        digest.update(block)
        size += len(block)
        if kept is not None:
            if size > (limit or 0):
                kept = None
            else:
                kept.append(block)
    return digest.hexdigest(), (b"".join(kept) if kept is not None else None), size


def _record_hash(value: str) -> str | None:
    """A RECORD hash (``sha256=<urlsafe base64, unpadded>``) as hex; None for another algorithm."""
    algorithm, _, encoded = value.partition("=")
    if algorithm != "sha256" or not encoded:
        return None
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    except ValueError:
        return ""


def executed_lines(text: bytes) -> list[str]:
    """The lines of a .pth file that Python's site module executes: those starting with 'import'."""
    lines = []
    for raw in text.splitlines():
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line.startswith(("import ", "import\t")):
            lines.append(line[:SHOWN_LINE])
    return lines


@dataclass
class _File:
    path: str  # relative to the walked root, '/'-separated
    sha256: str
    size: int
    data: bytes | None  # kept for small files that matter (.pth, RECORD, entry_points.txt)


def _files(root: Path, keep: Callable[[str], int | None]) -> tuple[dict[str, _File], list[str], list[str]]:
    """Every regular file below ``root`` by descriptor; (files, symbolic links, unreadable)."""
    files: dict[str, _File] = {}
    links: list[str] = []
    unreadable: list[str] = []
    if not root.is_dir():
        return files, links, unreadable

    def failed(where: DirPath, name: str | None, err: OSError) -> None:
        unreadable.append(where.path(name) if name is not None else (where.path() or "."))

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for entry in walk(fd, sort=True, on_error=failed):
            if entry.is_dir:
                continue
            path = entry.path()
            if stat.S_ISLNK(entry.st.st_mode):
                links.append(path)
                continue
            if not stat.S_ISREG(entry.st.st_mode):
                continue
            try:
                digest, data, size = _sha256_fd(entry.open(), keep(path))
            except OSError:
                unreadable.append(path)
                continue
            files[path] = _File(path, digest, size, data)
    finally:
        os.close(fd)
    return files, links, unreadable


def _site_packages(files: dict[str, _File]) -> str | None:
    """``lib/python3.X/site-packages`` of the venv, from the files found."""
    tops = sorted({"/".join(p.split("/")[:3]) for p in files if p.startswith("lib/python3")
                   and p.split("/")[2:3] == ["site-packages"]})
    return tops[0] if tops else None


def _keep(path: str) -> int | None:
    """How many bytes of a file to keep for reading: .pth files, RECORDs and entry points only."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".pth"):
        return PTH_MAX_BYTES
    if name in ("RECORD", "entry_points.txt") and ".dist-info/" in path:
        return RECORD_MAX_BYTES
    return None


def _is_native(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".so") or ".so." in name or name.endswith(".pyd")


def _is_own_bytecode(path: str, files: dict[str, _File]) -> bool:
    """A .pyc in __pycache__ beside its source: Python writes these; one without source would run as code."""
    directory, _, name = path.rpartition("/")
    if not directory.endswith("__pycache__") or not name.endswith(".pyc"):
        return False
    source = name.split(".", 1)[0] + ".py"
    parent = directory[: -len("__pycache__")]
    return parent + source in files


def _startup_in(files: dict[str, _File], links: list[str], base: str, shown_prefix: str,
                inventory: Inventory) -> None:
    """The .pth files and sitecustomize/usercustomize directly in the site directory ``base``."""
    prefix = base + "/" if base else ""
    for path in [*files, *links]:
        if not path.startswith(prefix) or "/" in path[len(prefix):]:
            continue
        name = path[len(prefix):]
        shown = shown_prefix + path
        if name.endswith(".pth"):
            found = files.get(path)
            if found is None:
                inventory.pth.append({"path": shown, "sha256": None, "executes": ["(a symbolic link: not read)"]})
            elif found.data is None:
                inventory.pth.append({"path": shown, "sha256": found.sha256,
                                      "executes": [f"(larger than {PTH_MAX_BYTES} bytes: not read)"]})
            else:
                inventory.pth.append({"path": shown, "sha256": found.sha256, "executes": executed_lines(found.data)})
        stem = name.split(".", 1)[0]
        if stem in STARTUP_MODULES:
            found = files.get(path)
            inventory.startup_modules.append({"path": shown, "sha256": found.sha256 if found else None})
    for path in files:  # a package directory of that name imports as well
        parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
        if len(parts) == 2 and parts[0] in STARTUP_MODULES and parts[1] == "__init__.py":
            inventory.startup_modules.append({"path": shown_prefix + path, "sha256": files[path].sha256})


def _records(files: dict[str, _File], site: str, inventory: Inventory) -> tuple[dict[str, str], set[str]]:
    """Check every RECORD against the files: the owning distribution of each path listed with a hash,
    and the paths listed without one that may not be (pip lists without a hash every file it
    installed that the wheel's RECORD did not list: a file the wheel carried unlisted).

    Only RECORD itself and its signatures go unhashed by the wheel spec; bytecode pip compiled
    (a .pyc beside its source) is left to _is_own_bytecode, as anywhere in the venv.
    """
    owner: dict[str, str] = {}
    hashless: set[str] = set()
    for path, found in sorted(files.items()):
        if not (path.startswith(site + "/") and path.endswith(".dist-info/RECORD")):
            continue
        dist_info = path[len(site) + 1:].split("/")[0]
        if "/" in path[len(site) + 1 + len(dist_info) + 1:]:
            continue  # a RECORD nested deeper is not a distribution's
        distribution = dist_info.removesuffix(".dist-info")
        if found.data is None:
            inventory.tampered.append({"path": path, "distribution": distribution, "why": "RECORD too large to read"})
            continue
        rows = csv.reader(io.StringIO(found.data.decode("utf-8", errors="replace")))
        for row in rows:
            if not row or not row[0]:
                continue
            listed = os.path.normpath(f"{site}/{row[0]}")
            if listed.startswith("../") or listed.startswith("/"):
                continue  # outside the venv: nothing here to check it against
            expected = _record_hash(row[1]) if len(row) > 1 and row[1] else None
            on_disk = files.get(listed)
            if expected is None:
                if listed in (path, path + ".jws", path + ".p7s"):
                    owner[listed] = distribution
                elif on_disk is not None:
                    hashless.add(listed)
                continue
            owner[listed] = distribution
            if on_disk is None:
                inventory.tampered.append({"path": listed, "distribution": distribution,
                                           "why": "listed in RECORD, missing"})
            elif on_disk.sha256 != expected:
                inventory.tampered.append({"path": listed, "distribution": distribution,
                                           "why": "its sha256 differs from RECORD's"})
    return owner, hashless


def _entry_points(files: dict[str, _File], site: str, inventory: Inventory) -> None:
    for path, found in sorted(files.items()):
        if not (path.startswith(site + "/") and path.endswith(".dist-info/entry_points.txt")) or found.data is None:
            continue
        distribution = path[len(site) + 1:].split("/")[0].removesuffix(".dist-info")
        section = ""
        for line in found.data.decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section in ("console_scripts", "gui_scripts") and "=" in line:
                name, _, target = line.partition("=")
                inventory.entry_points.append({"name": name.strip()[:SHOWN_LINE], "target": target.strip()[:SHOWN_LINE],
                                               "distribution": distribution})


def _carried_sboms(files: dict[str, _File], site: str, inventory: Inventory) -> None:
    """The SBOM files a distribution carries in its .dist-info/sboms/ (PEP 770), by digest."""
    for path, found in sorted(files.items()):
        parts = path[len(site) + 1:].split("/") if path.startswith(site + "/") else []
        if len(parts) == 3 and parts[0].endswith(".dist-info") and parts[1] == "sboms":
            inventory.sboms.append({"path": f"{VENV}/{path}", "sha256": found.sha256, "size": found.size,
                                    "distribution": parts[0].removesuffix(".dist-info")})


def inventory_of(venv: Path, system: dict[str, Path]) -> Inventory:
    """The inventory of a venv copied to ``venv`` and system site directories (guest path -> copy)."""
    inventory = Inventory()
    files, links, unreadable = _files(venv, _keep)
    inventory.unreadable.extend(f"{VENV}/{p}" for p in unreadable)
    site = _site_packages(files)
    owner: dict[str, str] = {}
    hashless: set[str] = set()
    if site is not None:
        _startup_in(files, links, site, VENV + "/", inventory)
        owner, hashless = _records(files, site, inventory)
        _entry_points(files, site, inventory)
        _carried_sboms(files, site, inventory)
    for path, found in sorted(files.items()):
        if _is_native(path):
            inventory.native.append({"path": f"{VENV}/{path}", "sha256": found.sha256, "size": found.size,
                                     "distribution": owner.get(path)})
        if path not in owner and path not in VENV_SCAFFOLD and not _is_own_bytecode(path, files):
            inventory.unlisted.append(f"{VENV}/{path}" + (HASHLESS if path in hashless else ""))
    inventory.unlisted.extend(f"{VENV}/{p} (a symbolic link)" for p in links
                              if p not in VENV_SCAFFOLD and p not in owner and not p.startswith("bin/python"))
    for guest_dir, copy in system.items():
        sys_files, sys_links, sys_unreadable = _files(copy, _keep)
        inventory.unreadable.extend(f"{guest_dir}/{p}" for p in sys_unreadable)
        for base in sorted({p.rsplit("/", 1)[0] if "/" in p else "" for p in [*sys_files, *sys_links]}):
            # Debian's system site directories: dist-packages (and /usr/local/lib/python3.X/dist-packages)
            if base == "" or base.endswith("dist-packages") or base.endswith("site-packages"):
                _startup_in(sys_files, sys_links, base, guest_dir + "/", inventory)
    return inventory


def read_template(template: Path, root_device: str, work: Path) -> Inventory:
    """Copy the venv and system site directories out of ``template`` and take their inventory."""
    check = work / "inventory"
    check.mkdir()
    try:
        raw = check / "template.raw"
        tools.run(tools.qemu_img_convert_argv(template, "qcow2", raw, target_format="raw"))
        part = root_partition(raw, root_device)
        copies = {VENV: "venv", **{d: f"system{i}" for i, d in enumerate(SYSTEM_SITE)}}
        for target in copies.values():
            (check / target).mkdir()
        # rdump SOURCE DEST puts SOURCE's last component inside DEST.
        DebugfsDisk(raw, check).requests(part, [f"rdump {safe_path(inside)} {safe_path(target)}"
                                                for inside, target in copies.items()])
        raw.unlink()
        venv = check / "venv" / Path(VENV).name
        system = {d: check / f"system{i}" / Path(d).name for i, d in enumerate(SYSTEM_SITE)}
        return inventory_of(venv, system)
    except (ToolError, ImageError) as err:
        return Inventory(unreadable=[f"the template could not be read: {err.message}"])
    finally:
        remove_tree(check)


def summary_lines(inventory: dict[str, Any]) -> list[str]:
    """What an analyst reads first about a template, one line each."""
    lines = []
    running = [p for p in inventory.get("pth", []) if p["executes"]]
    if running:
        shown = "; ".join(f"{p['path'].rsplit('/', 1)[-1]} ({', '.join(p['executes'])})" for p in running)
        lines.append(f"{len(running)} .pth file(s) run code at every Python start: {shown}")
    else:
        lines.append("no .pth file runs code at Python start")
    if modules := inventory.get("startup_modules"):
        lines.append("start-up modules: " + ", ".join(m["path"] for m in modules))
    unlisted = inventory.get("unlisted", [])
    lines.append(f"{len(unlisted)} file(s) in the venv belong to no package" + (
        ": " + ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "") if unlisted else ""))
    tampered = inventory.get("tampered", [])
    lines.append(f"{len(tampered)} installed file(s) differ from their RECORD" + (
        ": " + ", ".join(f"{t['path']} ({t['why']})" for t in tampered[:5]) + (" ..." if len(tampered) > 5 else "")
        if tampered else ""))
    native = inventory.get("native", [])
    lines.append(f"{len(native)} native extension(s), "
                 f"{sum(1 for n in native if n.get('distribution') is None)} of them in no package's RECORD")
    if unreadable := inventory.get("unreadable"):
        lines.append("could not read: " + ", ".join(unreadable[:5]))
    return lines
