"""Leftovers of vmiso processes that died: their VMs, run directories and half-built images.

Every run directory and image build directory holds an ``owner.json`` naming the
vmiso process that made it (``workdir.claim``: pid and start time, so a reused
pid is not mistaken for the owner).  Whatever belongs to a process that no
longer exists is removed.  A run's VM is transient and auto-destroyed by
libvirt when its vmiso's connection closes, so usually only files are left; a
VM is destroyed here too when one remains.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VmisoError
from ..image.store import MANIFEST, images_root
from .tree import Failure
from .workdir import own_dir, owner_alive, remove_tree

if TYPE_CHECKING:  # the connection is passed in: importing this module needs no libvirt
    from ..hypervisor import Hypervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    kind: str  # "vm", "run directory", "image build", ...
    name: str
    path: Path | None = None


def _orphan_dirs(parent: Path, pattern: str) -> list[Path]:
    """This user's directories in ``parent`` whose vmiso is gone.

    This user's own only, root included: the shared image store holds other
    members' builds, theirs to clean, and an entry there may be a member's
    symbolic link to anywhere, which removing (and unmounting below) must never follow.
    """
    if not parent.is_dir():
        return []
    uid = os.geteuid()
    found = []
    for p in sorted(parent.glob(pattern)):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not owner_alive(p):
            found.append(p)
    return found


def find(hv: Hypervisor | None, state_dir: Path) -> list[Leftover]:
    """What dead vmiso processes of this user left (root's: all of root's, and any VM)."""
    found = []
    home = own_dir(state_dir)
    for run_dir in _orphan_dirs(home / "runs", "*"):
        found.append(Leftover("run directory", run_dir.name, run_dir))
    for build in _orphan_dirs(state_dir / "images", ".building-*"):
        found.append(Leftover("image build", build.name, build))
    for build in _orphan_dirs(home / "layers", ".building-*"):
        found.append(Leftover("OS layer build", build.name, build))
    for doomed in _orphan_dirs(home / "layers", ".removing-*"):  # a removal that was cut short
        found.append(Leftover("OS layer removal", doomed.name, doomed))
    for build in _orphan_dirs(home / "warm", "*/.building-*"):
        found.append(Leftover("warm state build", build.name, build))
    for states in _warm_states_of_removed_images(state_dir, home):
        found.append(Leftover("warm states of removed image", states.name, states))
    if hv is not None:
        for dom in hv.vmiso_domains():
            where = dom.metadata.get("run_dir") or dom.metadata.get("workdir")
            if home != state_dir and not (where and _below(Path(where), home)):
                continue  # another analyst's VM: never this user's to judge
            if where and Path(where).is_dir() and owner_alive(Path(where)):
                continue
            # The run directory it was found with: a warm slot's name is reused by the next
            # restore of that slot (a run's, a pool's), which is never this leftover's to destroy.
            found.append(Leftover("vm", dom.name, Path(where) if where else None))
    return found


def _warm_states_of_removed_images(state_dir: Path, home: Path) -> list[Path]:
    """This user's warm states (warm.warm_root) of images no longer in the store: removed,
    by this user or by their owner."""
    warm = home / "warm"
    if not warm.is_dir():
        return []
    return [p for p in sorted(warm.iterdir())
            if p.is_dir() and not (images_root(state_dir) / p.name / MANIFEST).is_file()]


def _below(path: Path, directory: Path) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(directory) + os.sep)


@dataclass(frozen=True)
class Cleaned:
    removed: list[Leftover]
    failed: list[tuple[Leftover, str]]  # (what, why it is still there)


def clean(hv: Hypervisor | None, state_dir: Path) -> Cleaned:
    """Remove what ``find`` reports, each on its own: one that cannot go does not stop the others.

    VMs first, so that no QEMU holds the files.
    """
    removed, failed = [], []
    for item in sorted(find(hv, state_dir), key=lambda i: i.kind != "vm"):
        try:
            if item.kind == "vm" and hv is not None:
                if item.path is None:
                    hv.destroy(item.name)
                elif hv.destroy_run(item.name, str(item.path)) == "another run's":
                    continue  # its name was taken on by a live VM: not a leftover any more
            elif item.path is not None and (failures := remove_tree(item.path)):
                failed.append((item, _failures_text(failures)))
                continue
        except (VmisoError, OSError) as err:
            failed.append((item, str(err)))
            continue
        removed.append(item)
        log.info("removed %s %s", item.kind, item.name)
    return Cleaned(removed, failed)


def collect(hv: Hypervisor | None, state_dir: Path) -> list[Leftover]:
    """``clean``, for callers that go on regardless: what was removed; what could not be is logged
    as a warning ("could not remove ..."), and removal is tried again next time."""
    cleaned = clean(hv, state_dir)
    for item, reason in cleaned.failed:
        log.warning("could not remove %s %s: %s", item.kind, item.name, reason)
    return cleaned.removed


def remove(path: Path) -> bool:
    """Remove a directory this process made (a run's), never raising for what the guest left in it.

    What cannot be removed is logged; once this process has ended, ``collect`` tries again.
    """
    try:
        failures = remove_tree(path)
    except (VmisoError, OSError) as err:
        log.warning("could not remove %s: %s", path, err)
        return False
    if failures:
        log.warning("could not remove %s: %s", path, _failures_text(failures))
    return not failures


def _failures_text(failures: list[Failure], shown: int = 3) -> str:
    text = "; ".join(f"{f.path}: {f.reason}" for f in failures[:shown])
    return text + (f"; and {len(failures) - shown} more" if len(failures) > shown else "")
