"""What a run and ``vmiso pool stop|status`` ask a pool (see vmiso.clones.pool).

A run asks for a clone (``ask``), owns it from "taken" on, and uses it only once
the pool said "yours" (``confirm``).
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import PoolError
from ...host import reaper, state
from ...host.workdir import claim
from ..base import Booted, CloneJob
from ..clone import CloneDir
from .protocol import ANSWER_SECONDS, CLONE_PREFIX, TAKE_WAIT, PoolKey, receive, same_user, send

log = logging.getLogger(__name__)


@dataclass
class Offer:
    """A clone the pool has handed out, not yet confirmed (``confirm``)."""

    conn: socket.socket
    clone: CloneDir
    name: str
    lock_fd: int
    link: socket.socket | None  # None: the run opens its own (hello, then SSH)


def ask(state_dir: Path, image: str, key: PoolKey) -> Offer | str:
    """A clone from this user's pool for ``image``, or why there is none (no pool: "")."""
    path = state.home(state_dir).pool_socket(image)
    if not path.exists():
        return ""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(TAKE_WAIT + ANSWER_SECONDS)
        conn.connect(str(path))
        if not same_user(conn):
            conn.close()
            return "the pool's socket is another user's"
        send(conn, {"op": "take", "key": key.as_dict()})
        answer, fds = receive(conn, max_fds=2)
    except (OSError, EOFError, ValueError) as err:
        conn.close()
        return "" if isinstance(err, (ConnectionRefusedError, FileNotFoundError)) else f"the pool did not answer: {err}"
    for fd in fds:
        os.set_inheritable(fd, False)
    if "clone" not in answer or len(fds) not in (1, 2):
        for fd in fds:
            os.close(fd)
        conn.close()
        return str(answer.get("none") or "the pool gave no clone")
    clone_dir = Path(str(answer["clone"]))
    runs = state.home(state_dir).runs
    name = str(answer.get("name", ""))
    if (os.path.realpath(clone_dir.parent) != os.path.realpath(runs) or not clone_dir.name.startswith(CLONE_PREFIX)
            or not name):
        for fd in fds:
            os.close(fd)
        conn.close()
        return "the pool offered a clone outside this user's runs"
    try:
        link = socket.socket(fileno=fds[1]) if len(fds) == 2 else None
    except OSError:
        for fd in fds:
            os.close(fd)
        conn.close()
        return "the pool offered a link that is not a socket"
    return Offer(conn, CloneDir(clone_dir), name, fds[0], link)


def confirm(offer: Offer) -> None:
    """Say "taken" (the run owns the clone now) and wait for "yours"; PoolError when the
    pool ended first (its watchdog destroys the clone)."""
    try:
        send(offer.conn, {"taken": True})
        answer, _ = receive(offer.conn)
    except (OSError, EOFError, ValueError) as err:
        raise PoolError(f"the pool did not hand over clone {offer.clone.path.name}: {err or 'it ended'}") \
            from None
    finally:
        offer.conn.close()
    if answer.get("yours") is not True:
        raise PoolError(f"the pool did not hand over clone {offer.clone.path.name}")


def request(state_dir: Path, image: str, op: str, timeout: float = 10) -> dict[str, Any] | None:
    """Ask a running pool ``op`` ("status", "stop"); None when no pool for ``image`` runs."""
    path = state.home(state_dir).pool_socket(image)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(str(path))
        if not same_user(conn):
            return None
        send(conn, {"op": op})
        answer, _ = receive(conn)
        if op == "stop":
            conn.settimeout(None)
            with suppress(OSError):
                while conn.recv(1):  # the pool closes the connection once its clones are gone
                    pass
        return answer
    except (OSError, EOFError, ValueError):
        return None
    finally:
        conn.close()


def running(state_dir: Path) -> list[str]:
    """The images this user has a pool socket for (the pool may have died: ask it)."""
    home = state.home(state_dir)
    if not home.pools.is_dir():
        return []
    return sorted(p.name for p in home.pools.iterdir() if home.pool_socket(p.name).exists())


class Preloaded:
    """A clone from this user's pool for the image, now the run's (see vmiso.clones.pool: its three
    steps).  None when no pool runs, or it has none that fits (saying why, when one runs)."""

    def bring_up(self, job: CloneJob) -> Booted | None:
        plan, image = job.plan, job.image
        if not state.home(plan.state_dir).pool_socket(image.name).exists():
            return None
        with job.steps.step("take", "a preloaded clone from the pool"):
            offer = ask(plan.state_dir, image.name, PoolKey.for_plan(plan, job.key))
            if isinstance(offer, str):
                if offer:
                    log.warning("no preloaded clone: %s", offer)
                return None
            with ExitStack() as attempt:
                attempt.callback(os.close, offer.lock_fd)  # last: the warm slot is free once its VM is gone
                attempt.callback(reaper.remove, offer.clone.path)
                if offer.link is not None:
                    attempt.callback(offer.link.close)
                claim(offer.clone.path)  # this run's from now on, for the reaper
                dog = job.watch(offer.clone, attempt)(offer.name)
                attempt.callback(job.hv.destroy, offer.name)
                dog.started()
                try:
                    confirm(offer)
                except PoolError as err:
                    log.warning("no preloaded clone: %s", err)
                    return None
                job.cleanup.push(attempt.pop_all())
        # Its inputs go on its inputs disk now that it is the run's; the guest mounts them at GO.
        return Booted(offer.clone, offer.name, "preloaded", offer.link, inputs_staged=False)
