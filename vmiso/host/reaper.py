"""Leftovers of vmiso processes that died: their VMs, and what their owners say they leave on disk.

Every run directory and build directory holds an ``owner.json`` naming the vmiso
process that made it (``workdir.claim``: pid and start time, so a reused pid is
not mistaken for the owner); what is being removed or replaced carries its
remover's pid in its name (vmiso.host.state).  The module that owns a folder of
the state directory registers what its leftovers look like (``register``: a
kind, a folder, a name pattern and how to tell one is abandoned); ``find`` looks
for every registered kind, and for VMs whose run is gone.  A run's VM is
transient and auto-destroyed by libvirt when its vmiso's connection closes, so
usually only files are left; a VM is destroyed here too when one remains.
"""

from __future__ import annotations

import importlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..domain import Hypervisor
from ..errors import VmisoError
from . import state
from .tree import Failure
from .workdir import owner_alive, pid_alive, remove_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    kind: str  # "vm", "run directory", "image build", ...
    name: str
    path: Path | None = None


def owner_gone(path: Path, state_dir: Path) -> bool:
    """The process its owner record names has ended, or it has no record: it never got one, unless
    it is still being made (``state.claimed_dir``: then its maker's pid ends its name)."""
    if owner_alive(path):
        return False
    return remover_gone(path, state_dir) if state.claiming(path) else True


def remover_gone(path: Path, state_dir: Path) -> bool:
    """The process whose pid its name ends with has ended (``state.removing``, ``state.replaced``)."""
    pid = state.pid_in_name(path)
    return pid is None or not pid_alive(pid)


@dataclass(frozen=True)
class Kind:
    """What one kind of leftover looks like, as its owner describes it."""

    name: str  # how it is shown: "removed {name} {entry}"
    folder: str  # state.RUNS, state.IMAGES, ...
    pattern: str  # a glob in that folder
    abandoned: Callable[[Path, Path], bool] = owner_gone  # (its path, state_dir): nothing will finish it


_KINDS: list[Kind] = []


def register(name: str, folder: str, pattern: str, abandoned: Callable[[Path, Path], bool] = owner_gone) -> Kind:
    """Describe a kind of leftover (an owner calls this as it is imported)."""
    kind = Kind(name, folder, pattern, abandoned)
    if kind not in _KINDS:
        _KINDS.append(kind)
    return kind


def kinds() -> list[Kind]:
    """Every kind the state directory's owners describe, their folders in ``state.OWNERS``' order."""
    for module in dict.fromkeys(state.OWNERS.values()):
        importlib.import_module(module)  # each registers its own kinds
    order = list(state.OWNERS)
    return sorted(_KINDS, key=lambda kind: order.index(kind.folder) if kind.folder in order else len(order))


def _abandoned(parent: Path, kind: Kind, state_dir: Path) -> list[Path]:
    """This user's directories of ``kind`` in ``parent`` that nothing will finish.

    This user's own only, root included: the shared image store holds other
    members' builds, theirs to clean, and an entry there may be a member's
    symbolic link to anywhere, which removing (and unmounting below) must never follow.
    """
    if not parent.is_dir():
        return []
    uid = os.geteuid()
    found = []
    for p in sorted(parent.glob(kind.pattern)):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and kind.abandoned(p, state_dir):
            found.append(p)
    return found


def find(hv: Hypervisor | None, state_dir: Path) -> list[Leftover]:
    """What dead vmiso processes of this user left (root's: all of root's, and any VM)."""
    home = state.home(state_dir).path
    found = []
    for kind in kinds():
        for path in _abandoned(state.folder(state_dir, kind.folder), kind, state_dir):
            found.append(Leftover(kind.name, path.name, path))
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
