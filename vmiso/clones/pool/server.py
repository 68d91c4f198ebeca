"""A pool's process: SIZE preloaded clones of one image, checked, refilled and handed out.

See vmiso.clones.pool for what a clone is and how it changes hands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import accel, ssh, tools
from ...config import Config
from ...domain import Hypervisor
from ...errors import ImageError, PoolError, VmisoError
from ...host import state
from ...host.workdir import OWNER_FILE, bounded_share_size, check_room, flocked, private_dir, remove_tree
from ...image.store import MANIFEST, Image, get_image, verified_sha256
from ...plan import RunRequest, plan_run
from ...progress import Steps
from .. import warm, watchdog
from ..clone import CloneDir, copy_boot_files, make_clone_dir, make_inputs_slot
from .protocol import ANSWER_SECONDS, CLONE_PREFIX, TAKE_WAIT, PoolKey, receive, same_user, send

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
# After a hand-out, while other clones are still ready, the refill waits this long: a
# restore competes for the host's cores with the job that just started.
REFILL_DELAY = 2.0
HOLD_SECONDS = 30 * 24 * 3600  # a pool clone's watchdog deadline: the pool's life, in practice
RETRY_SECONDS = (0.5, 30.0)  # after a clone could not be made: the first wait, the longest


def qemu_identity() -> str:
    """The QEMU binary as installed now: a package update that keeps the version changes this."""
    try:
        st = os.stat(tools.which("qemu-system-x86_64"))
    except (OSError, VmisoError):
        return "unknown"
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def current_key(config: Config, hv: Hypervisor, image: Image, accel_name: str) -> PoolKey:
    """The key a run of ``config`` without flags would ask for now (memory, CPUs and scratch
    from the config): its plan's, as the run computes it."""
    plan = plan_run(config, RunRequest(image=image.name))
    return PoolKey.for_plan(plan, warm.key_for(plan, template_sha256=verified_sha256(image),
                                               hypervisor=hv.version(), accel=accel_name))


def stale_reason(made_for: PoolKey, now: PoolKey | None, qemu_then: str, qemu_now: str) -> str | None:
    """Why a clone made for ``made_for`` may no longer be handed out (None: it may)."""
    if now is None:
        return "the image was removed"
    if qemu_then != qemu_now:
        return "QEMU was updated"
    if made_for.warm.template_sha256 != now.warm.template_sha256:
        return "the image was provisioned again"
    differs = [k for k, v in dataclasses.asdict(now.warm).items() if dataclasses.asdict(made_for.warm)[k] != v]
    if made_for.output_max_bytes != now.output_max_bytes or made_for.output_max_files != now.output_max_files:
        differs.append("output limits")
    if made_for.libvirt_uri != now.libvirt_uri:
        differs.append("libvirt connection")
    return f"the {', '.join(differs)} changed" if differs else None


@dataclass
class Preloaded:
    """One idle clone: the pool's until a run takes it."""

    clone: CloneDir
    name: str
    key: PoolKey
    qemu: str
    dog: watchdog.Watchdog
    holds: ExitStack  # the warm slot's lock
    lock_fd: int
    link: socket.socket | None = None
    made_at: float = field(default_factory=time.monotonic)


@dataclass
class Status:
    image: str
    size: int
    pid: int = field(default_factory=os.getpid)
    ready: int = 0
    served: int = 0
    dropped: int = 0
    problem: str = ""


class Pool:
    """The process that owns SIZE preloaded clones of one image (``serve`` runs it)."""

    def __init__(self, config: Config, hv: Hypervisor, image: Image, size: int, accel_name: str,
                 stop: threading.Event) -> None:
        self.config, self.hv, self.image, self.size, self.accel = config, hv, image, size, accel_name
        self.ready: list[Preloaded] = []
        self.making = 0
        self.status = Status(image.name, size)
        self.key: PoolKey | None = current_key(config, hv, image, accel_name)
        self.qemu = qemu_identity()
        self.stopping = stop
        self.changed = threading.Condition()
        self.runs = state.home(config.state_dir).runs
        self.stoppers: list[socket.socket] = []  # told "stopping", closed once the clones are gone
        self.failures = 0
        self.handed_at = 0.0

    # -- making, checking and dropping clones

    def prepare(self, steps: Steps) -> None:
        """Enough warm slots that SIZE clones can wait while as many runs use theirs."""
        assert self.key is not None
        warm.ensure(self.hv, self.image, self.key.warm, steps, count=2 * self.size,
                    boot_timeout=self.config.run.boot_timeout)

    def _make(self, key: PoolKey) -> Preloaded:
        holds = ExitStack()
        with ExitStack() as undo:
            undo.callback(holds.close)
            slot, why = warm.acquire(self.image, key.warm, holds)
            if slot is None or slot.lock_fd is None:
                raise PoolError(f"no warm slot to restore: {why}")
            limits = (key.output_max_bytes, key.output_max_files)
            check_room(private_dir(self.runs), key.warm.scratch_bytes, bounded_share_size(*limits))
            path = self.runs / f"{CLONE_PREFIX}{secrets.token_hex(6)}"
            undo.callback(remove_tree, path)
            clone = make_clone_dir(path, output_limits=limits)
            copy_boot_files(clone, self.image)
            warm.clone_disks(slot, clone)
            make_inputs_slot(clone, key.warm.inputs_bytes)  # the run that takes it fills it

            def guard(name: str) -> watchdog.Watchdog:
                dog = watchdog.start(self.config.libvirt_uri, name, str(path), HOLD_SECONDS)
                undo.callback(dog.release)
                return dog
            name, dog = warm.restore(self.hv, slot, clone=clone, template=self.image.template,
                                     metadata={"kind": "run", "run_dir": str(path), "image": self.image.name},
                                     stack=undo, watch=guard)
            made = Preloaded(clone, name, key, self.qemu, dog, holds, slot.lock_fd)
            self._open_link(made)
            undo.pop_all()
        return made

    def _open_link(self, made: Preloaded) -> None:
        if made.link is not None:
            made.link.close()
            made.link = None
        made.link = ssh.open_link(made.clone.ssh_socket, name=made.name, hello=warm.HELLO,
                                  deadline=time.monotonic() + self.config.run.boot_timeout)

    def _drop(self, made: Preloaded, why: str) -> None:
        """Destroy an idle clone and remove its directory.  One that libvirt would not destroy
        is left to its watchdog, which acts once its pipe closes (now, or with the pool)."""
        log.info("dropped clone %s: %s", made.clone.path.name, why)
        try:
            self.hv.destroy(made.name)
            made.dog.release()
        except VmisoError as err:
            log.warning("could not destroy clone %s: %s; its watchdog will", made.clone.path.name, err)
        if made.link is not None:
            made.link.close()
        made.holds.close()
        remove_tree(made.clone.path)
        self.status.dropped += 1

    def _check(self) -> None:
        """Drop the clones that no longer fit; stop the pool when its image is gone."""
        ended = f"image {self.image.name} was removed"
        if not (state.image(self.config.state_dir, self.image.name) / MANIFEST).is_file():
            now = None
        else:
            try:
                now = current_key(self.config, self.hv, get_image(self.config.state_dir, self.image.name),
                                  self.accel)
            except ImageError as err:  # damaged, or changed under the pool: nothing of it is handed out
                now, ended = None, f"image {self.image.name} failed its check: {err.message}"
        qemu = qemu_identity()
        with self.changed:
            doomed = [(m, why) for m in self.ready if (why := stale_reason(m.key, now, m.qemu, qemu))]
            self.ready = [m for m in self.ready if m not in [d for d, _ in doomed]]
            self.key, self.qemu = now, qemu
        for made, why in doomed:
            self._drop(made, why)
        if now is None:
            log.warning("%s: the pool ends", ended)
            self.status.problem = ended
            self.stopping.set()

    def fill(self) -> None:
        """The filling thread: check the clones, refill, until the pool stops."""
        checked = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - checked >= CHECK_SECONDS:
                try:
                    self._check()
                except Exception as err:  # libvirt gone a moment, say: nothing is handed out meanwhile
                    self.status.problem = f"cannot check the clones: {err}"
                    log.warning("%s", self.status.problem)
                    with self.changed:
                        self.key = None
                checked = time.monotonic()
                if self.stopping.is_set():
                    break
            with self.changed:
                key = self.key if len(self.ready) + self.making < self.size else None
                if key is not None and self.ready and time.monotonic() - self.handed_at < REFILL_DELAY:
                    key = None
                if key is not None:
                    self.making += 1
            if key is None:
                with self.changed:
                    self.changed.wait(min(0.5, CHECK_SECONDS))  # a handover or a stop wakes it sooner
                continue
            try:
                if warm.ensure(self.hv, self.image, key.warm, Steps(), count=2 * self.size,
                               boot_timeout=self.config.run.boot_timeout, wait=False):
                    log.info("made warm slots for the image as it is now")
                made = self._make(key)
            except Exception as err:  # the filler must live on: say why, try again later
                self.status.problem = err.message if isinstance(err, VmisoError) else f"{type(err).__name__}: {err}"
                log.warning("could not preload a clone: %s", self.status.problem)
                with self.changed:
                    self.making -= 1
                    self.changed.notify_all()
                self.failures += 1
                self.stopping.wait(min(RETRY_SECONDS[1], RETRY_SECONDS[0] * 2 ** min(self.failures, 10)))
                continue
            with self.changed:
                self.making -= 1
                kept = self.key == key and not self.stopping.is_set()
                if kept:
                    self.ready.append(made)
                    self.status.problem = ""
                    self.failures = 0
                self.changed.notify_all()
            if not kept:
                self._drop(made, "stale before it was ready")

    def _take(self, wanted: dict[str, Any]) -> Preloaded | str:
        """An idle clone for a run whose key is ``wanted``, or why there is none."""
        deadline = time.monotonic() + TAKE_WAIT
        with self.changed:
            while True:
                if self.key is None:  # its last check failed, or found the image gone
                    return (f"the pool gives no clone: {self.status.problem}" if self.status.problem
                            else "the pool gives no clone: it could not check them")
                if self.key.as_dict() != wanted:
                    return "the pool's clones were made for another image, QEMU or configuration"
                if self.ready:
                    made = self.ready.pop(0)
                    if made.key.as_dict() == wanted:
                        return made
                    self.ready.insert(0, made)  # the next check drops it; never handed out
                    return "the pool's clones were made for another image, QEMU or configuration"
                if self.making == 0 or time.monotonic() >= deadline or self.stopping.is_set():
                    return "no clone is ready"
                self.changed.wait(deadline - time.monotonic())

    def hand_out(self, conn: socket.socket, wanted: dict[str, Any]) -> None:
        """Give one clone to the run at ``conn`` (see the module's three steps)."""
        made = self._take(wanted)
        if isinstance(made, str):
            send(conn, {"none": made})
            return
        try:
            running = self.hv.is_running(made.name)
        except VmisoError:
            running = False
        if made.qemu != qemu_identity() or not running:
            self._drop(made, "QEMU was updated, or the clone stopped while it waited")
            send(conn, {"none": "the clone no longer fits"})
            return
        with self.changed:
            self.handed_at = time.monotonic()
            self.changed.notify_all()  # the filler makes the next one meanwhile
        fds = (made.lock_fd,) if made.link is None else (made.lock_fd, made.link.fileno())
        try:
            send(conn, {"clone": str(made.clone.path), "name": made.name}, fds)
            conn.settimeout(ANSWER_SECONDS)
            answer, _ = receive(conn)
            taken = answer.get("taken") is True
        except (OSError, EOFError, ValueError):
            taken = False
        if not taken:  # the run gave up or died: its watchdog, or this destroy, ends the VM
            log.info("clone %s was not taken: destroyed", made.clone.path.name)
            with suppress(VmisoError):
                self.hv.destroy(made.name)
            made.dog.release()
            if made.link is not None:
                made.link.close()
            made.holds.close()
            if _owner_pid(made.clone.path) == os.getpid():  # the run never claimed it: remove it now
                remove_tree(made.clone.path)
            self.status.dropped += 1
            return
        made.dog.release()  # the run's watchdog guards it now
        if made.link is not None:
            made.link.close()
        made.holds.close()  # the run's descriptor holds the slot's lock
        self.status.served += 1
        with suppress(OSError):
            send(conn, {"yours": True})

    def shut_down(self) -> None:
        with self.changed:
            idle, self.ready = self.ready, []
        for made in idle:
            self._drop(made, "the pool stopped")

    def status_dict(self) -> dict[str, Any]:
        with self.changed:
            self.status.ready = len(self.ready)
        return {**dataclasses.asdict(self.status), "making": self.making}


def serve(config: Config, hv: Hypervisor, image: Image, size: int, steps: Steps,
          on_ready: Callable[[Status], None] = lambda status: None, stop: threading.Event | None = None) -> Status:
    """Run a pool of ``size`` clones of ``image`` until asked to stop (``vmiso pool stop``, or
    ``stop`` set: the CLI sets it on SIGTERM and SIGINT) or its image is removed; the clones
    are destroyed before this returns.

    ``on_ready`` is called once, when the pool is first full.  PoolError when a
    pool of this user for that image runs already.
    """
    accel_name = accel.resolve(config.accel, tcg_cpu_features=config.vm.tcg_cpu_features)
    home = state.home(config.state_dir)
    private_dir(home.pool(image.name))
    with ExitStack() as stack:
        try:
            stack.enter_context(flocked(home.pool_lock(image.name), wait=False))
        except BlockingIOError:
            raise PoolError(f"a pool for image {image.name} is running already",
                            f"vmiso pool status; vmiso pool stop --image {image.name}") from None
        pool = Pool(config, hv, image, size, accel_name, stop or threading.Event())
        pool.prepare(steps)
        path = home.pool_socket(image.name)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stack.callback(listener.close)
        listener.bind(str(path))
        stack.callback(path.unlink, missing_ok=True)
        listener.listen(8)
        filler = threading.Thread(target=pool.fill, name="vmiso-pool-fill", daemon=True)
        filler.start()
        stack.callback(pool.shut_down)
        stack.callback(filler.join, 120)  # a restore or slot under way ends within its own limits
        stack.callback(pool.stopping.set)
        announced = False
        with steps.step("fill", f"restore {size} clone{'s' if size != 1 else ''} and open their links"):
            while not pool.stopping.is_set():
                with pool.changed:
                    full = len(pool.ready) >= size
                if full:
                    break
                if pool.status.problem and pool.failures:
                    raise PoolError(f"could not preload a clone of image {image.name}: {pool.status.problem}")
                _serve_one(pool, listener, 0.2)
        while not pool.stopping.is_set():
            if not announced:
                on_ready(pool.status)
                announced = True
            _serve_one(pool, listener, 1.0)
        stoppers = pool.stoppers
    for conn in stoppers:  # told "stopping"; the end of the connection says "stopped"
        conn.close()
    return pool.status


def _serve_one(pool: Pool, listener: socket.socket, wait: float) -> None:
    readable, _, _ = select.select([listener], [], [], wait)
    if not readable:
        return
    conn, _ = listener.accept()
    keep = False
    try:
        if not same_user(conn):
            return
        conn.settimeout(ANSWER_SECONDS)
        request, _ = receive(conn)
        op = request.get("op")
        if op == "take" and isinstance(request.get("key"), dict):
            pool.hand_out(conn, request["key"])
        elif op == "status":
            send(conn, pool.status_dict())
        elif op == "stop":
            send(conn, {"stopping": True})
            pool.stoppers.append(conn)
            keep = True
            pool.stopping.set()
    except (OSError, EOFError, ValueError) as err:
        log.debug("a request to the pool failed: %s", err)
    finally:
        if not keep:
            conn.close()


def _owner_pid(path: Path) -> int | None:
    try:
        return int(json.loads((path / OWNER_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
