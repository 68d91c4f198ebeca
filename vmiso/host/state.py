"""The state directory (``state_dir``, /var/lib/vmiso): its one owner.  Every path in it is spelled here.

    STATE_DIR/images/NAME          the image store, shared by the group's members (vmiso.image.store)
    STATE_DIR/users/USER           an analyst's own directory (scripts/setup-host makes it)
    HOME/runs/ID, HOME/runs/pool-ID  a run's clone, a pool's clone (vmiso.clones)
    HOME/warm/IMAGE/slot-N         warm states (vmiso.clones.warm)
    HOME/pools/IMAGE               a pool's socket, lock and log (vmiso.clones.pool)
    HOME/layers/KEY                cached OS layers (vmiso.image.layer, vmiso.image.cloud)
    HOME/logs                      the console logs of provisionings, the logs of layer builds
    HOME/sha256                    digests of other members' images this user has checked (vmiso.image.store)

HOME is a user's own directory: the state directory itself for root,
``STATE_DIR/users/USER`` for an analyst.  Images are the one thing shared.

What is being made, removed or replaced has a name that says so, beside where it
ends up (``.building-*``, ``.removing-*``, ``.replaced-*``); a directory that a
process owns gets its owner record before it gets its name (``claimed_dir``).  The module that owns a
folder (``OWNERS``) describes to the reaper (vmiso.host.reaper) what a process
that died leaves there, and ``vmiso gc`` collects it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmisoError
from .workdir import claim, private_dir, remove_tree

IMAGES = "images"
USERS = "users"
RUNS = "runs"
WARM = "warm"
POOLS = "pools"
LAYERS = "layers"
LOGS = "logs"
SHA256 = "sha256"
# Who owns each folder, in the order the reaper reports their leftovers: each describes its
# own (vmiso.host.reaper.register) when it is imported.
OWNERS = {
    RUNS: "vmiso.clones.clone",
    IMAGES: "vmiso.image.store",
    LAYERS: "vmiso.image.layer",
    WARM: "vmiso.clones.warm",
}

BUILDING = ".building-"  # made under this name, renamed into place when complete
REMOVING = ".removing-"  # renamed out of the way first, then removed
REPLACED = ".replaced-"  # the older one, while a new one takes its name
CLAIMING = ".claiming-"  # then its maker's pid: a new directory, until its owner record is in it


def images(state_dir: Path) -> Path:
    """The image store, shared by every user of the state directory."""
    return state_dir / IMAGES


def image(state_dir: Path, name: str) -> Path:
    return images(state_dir) / name


@dataclass(frozen=True)
class Home:
    """One user's own part of the state directory."""

    path: Path

    @property
    def runs(self) -> Path:
        return self.path / RUNS

    @property
    def warm(self) -> Path:
        return self.path / WARM

    def warm_of(self, image_name: str) -> Path:
        """This user's warm states of one image: their own, never shared."""
        return self.warm / image_name

    @property
    def pools(self) -> Path:
        return self.path / POOLS

    def pool(self, image_name: str) -> Path:
        return self.pools / image_name

    def pool_socket(self, image_name: str) -> Path:
        return self.pool(image_name) / "pool.sock"

    def pool_lock(self, image_name: str) -> Path:
        return self.pool(image_name) / "pool.lock"

    def pool_log(self, image_name: str) -> Path:
        return self.pool(image_name) / "pool.log"

    @property
    def layers(self) -> Path:
        return self.path / LAYERS

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def sha256(self) -> Path:
        return self.path / SHA256

    def folder(self, name: str) -> Path:
        """One of the folders above by its name (RUNS, WARM, ...)."""
        return self.path / name


def home(state_dir: Path) -> Home:
    """This user's own directory: ``state_dir`` itself for root; for an analyst,
    ``state_dir/users/NAME``, made by scripts/setup-host (VmisoError when it is missing
    or not theirs)."""
    uid = os.geteuid()
    if uid == 0:
        return Home(state_dir)
    name = pwd.getpwuid(uid).pw_name
    path = state_dir / USERS / name
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or st.st_uid != uid:
        raise VmisoError(f"{path}, your directory for vmiso's state, is missing or not yours",
                         f"as root: scripts/setup-host --user {name} (vmiso doctor says more)")
    return Home(private_dir(path))  # QEMU passes through it to each run's files


def root_home(state_dir: Path) -> Home:
    """Root's own directory: its cached OS layers serve every user (root built them)."""
    return Home(state_dir)


def folder(state_dir: Path, name: str) -> Path:
    """A folder by its name: the shared store's, or this user's own."""
    return images(state_dir) if name == IMAGES else home(state_dir).folder(name)


def building(parent: Path, name: str, tag: str) -> Path:
    """Where ``name`` is made before it is renamed into place in ``parent``."""
    return parent / f"{BUILDING}{name}-{tag}"


def removing(target: Path, tag: str | None = None) -> Path:
    """Where ``target`` goes to be removed, out of its users' way at once."""
    return target.with_name(f"{REMOVING}{target.name}" + (f"-{tag}" if tag is not None else ""))


def replaced(target: Path) -> Path:
    """Where the older ``target`` goes while a new one takes its name (this process's)."""
    return target.with_name(f"{REPLACED}{target.name}-{os.getpid()}")


def claimed_dir(path: Path, make: Callable[[Path], object] = private_dir) -> Path:
    """``path``, a new directory made by ``make``, that nobody ever sees without this process's owner record.

    The reaper of any other vmiso takes a directory without a record for one whose
    maker died before writing it, so the directory is made and claimed as
    ``NAME.claiming-PID`` and only then renamed to ``path``; what a maker killed
    meanwhile leaves is abandoned once that pid has ended (vmiso.host.reaper).
    """
    temporary = path.with_name(f"{path.name}{CLAIMING}{os.getpid()}")
    try:
        remove_tree(temporary)  # an earlier process's with this pid
        make(temporary)
        claim(temporary)
        os.rename(temporary, path)
    except BaseException:
        remove_tree(temporary)
        raise
    return path


def claiming(path: Path) -> bool:
    """``path`` is a directory ``claimed_dir`` is making (or its maker died making)."""
    return CLAIMING in path.name


def pid_in_name(path: Path) -> int | None:
    """The pid a ``removing``/``replaced``/``claiming`` name ends with, or None."""
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None
