"""A pool's process without a VM: the fake hypervisor restores clones whose "sshd" greets on their link.

What is real: the warm slots, the clones' directories with their bounded /out, the
watchdog processes (on test:///default), the pool's socket and its messages, the
descriptors handed over.  What is fake: libvirt (FakeHypervisor) and the guest's
sshd, which reads the host's hello and greets.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import select
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmiso import config as config_mod, run
from vmiso.clones import warm
from vmiso.clones.pool import client, protocol, server
from vmiso.errors import PoolError
from vmiso.host import reaper, state as layout, workdir
from vmiso.image.store import Image
from vmiso.plan import RunRequest, plan_run
from vmiso.progress import Steps
from vmiso.ssh import JobExit

from fakes import FakeConnect, FakeHypervisor, fake_host_config, guest_inputs, make_image
from vmharness import make_state_root, remove_tree, wait_for

HELLO = warm.SEED_BYTES + warm.CLOCK.size


class GreetingGuests(FakeHypervisor):
    """Clones that say they are ready to be saved, and, once restored, say they are ready on
    their SSH link after the host's hello, as ssh-link does (which then waits for GO)."""

    def __init__(self) -> None:
        super().__init__()
        self.console = b"vmiso-ssh-link: waiting protocol=4\n"
        self.hellos: list[bytes] = []
        self._links: dict[str, list[socket.socket]] = {}

    def restore(self, name: str, path: Path, xml: str) -> None:
        super().restore(name, path, xml)
        source = ET.fromstring(xml).find("devices/channel/source")
        assert source is not None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(source.get("path", ""))
        listener.listen(4)
        listener.settimeout(0.1)
        self._links[name] = [listener]
        threading.Thread(target=self._sshd, args=(name, listener), daemon=True).start()

    def _sshd(self, name: str, listener: socket.socket) -> None:
        while name in self.running:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            hello = b""
            while len(hello) < HELLO and (chunk := conn.recv(HELLO - len(hello))):
                hello += chunk
            self.hellos.append(hello)
            conn.sendall(warm.READY_LINE)
            self._links[name].append(conn)  # open until the VM is gone

    def destroy(self, name: str) -> bool:
        for sock in self._links.pop(name, []):
            sock.close()
        return super().destroy(name)


@pytest.fixture
def state() -> Iterator[Path]:
    # Short, as /var/lib/vmiso is: a clone's link socket is below it, and a socket's path has at most
    # 107 bytes (pytest's own directories, under -n, are longer).
    root = make_state_root("vmiso-pool-")
    yield root / "state"
    remove_tree(root)


@pytest.fixture
def config(state: Path) -> config_mod.Config:
    return fake_host_config(state)


@pytest.fixture
def image(state: Path) -> Image:
    return make_image(state)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(server, "REFILL_DELAY", 0.0)
    monkeypatch.setattr(server, "CHECK_SECONDS", 0.2)


@dataclasses.dataclass
class Served:
    thread: threading.Thread
    stop: threading.Event
    ready: threading.Event
    outcome: dict


@contextmanager
def pool_of(config: config_mod.Config, hv: FakeHypervisor, image: Image, size: int = 1) -> Iterator[Served]:
    """``server.serve`` in a thread of this process, stopped (and its clones gone) at the end."""
    stop, ready, outcome = threading.Event(), threading.Event(), {}

    def serve() -> None:
        try:
            outcome["status"] = server.serve(config, hv, image, size, Steps(), on_ready=lambda s: ready.set(),
                                             stop=stop)
        except Exception as err:
            outcome["error"] = err
            ready.set()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Served(thread, stop, ready, outcome)
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive()


def status(state: Path) -> dict:
    answer = client.request(state, "x", "status")
    assert answer is not None
    return answer


def runs(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "runs").iterdir()) if (state / "runs").is_dir() else []


def test_a_pool_hands_a_clone_over_in_three_steps_and_refills_behind_it(config, image, state):
    hv = GreetingGuests()
    with pool_of(config, hv, image) as served:
        assert served.ready.wait(60) and "error" not in served.outcome
        assert status(state) | {"pid": 0} == {"image": "x", "size": 1, "pid": 0, "ready": 1, "served": 0,
                                              "dropped": 0, "problem": "", "making": 0}
        assert [len(h) for h in hv.hellos] == [HELLO]  # the pool's hello reached the clone's sshd
        offer = client.ask(state, "x", server.current_key(config, hv, image, "tcg"))
        assert isinstance(offer, client.Offer)
        assert offer.clone.path.parent == state / "runs" and offer.clone.path.name.startswith(protocol.CLONE_PREFIX)
        assert offer.link is not None  # the guest said it was ready, and waits for GO
        assert select.select([offer.link], [], [], 0)[0] == []
        workdir.claim(offer.clone.path)  # 2: the run owns it ...
        client.confirm(offer)  # ... and 3: the pool said "yours"
        assert offer.name in hv.running and workdir.owner_alive(offer.clone.path)
        wait_for(lambda: status(state)["served"] == 1 and status(state)["ready"] == 1, 30, "the pool to refill")
        # The run's own cleanup, as run.run's ExitStack does it.
        hv.destroy(offer.name)
        offer.link.close()
        os.close(offer.lock_fd)
        assert reaper.remove(offer.clone.path)
        assert client.request(state, "x", "stop") == {"stopping": True}
        served.thread.join(30)
        final = served.outcome["status"]
    assert (final.served, final.dropped, final.problem) == (1, 1, "")  # the idle clone was dropped at the stop
    assert not hv.running and runs(state) == []
    assert not layout.home(state).pool_socket("x").exists()
    assert client.request(state, "x", "status") is None and client.running(state) == []


def test_a_run_that_asks_for_another_clone_gets_none_and_one_that_goes_away_leaves_nothing(config, image, state):
    hv = GreetingGuests()
    with pool_of(config, hv, image) as served:
        assert served.ready.wait(60)
        key = server.current_key(config, hv, image, "tcg")
        other = client.ask(state, "x", dataclasses.replace(key, output_max_files=1))
        assert other == "the pool's clones were made for another image, QEMU or configuration"
        assert client.running(state) == ["x"]
        offer = client.ask(state, "x", key)
        assert isinstance(offer, client.Offer)
        offer.conn.close()  # the run died before it said "taken"
        os.close(offer.lock_fd)
        if offer.link is not None:
            offer.link.close()
        wait_for(lambda: status(state)["dropped"] == 1, 30, "the pool to drop the clone")
        assert offer.name not in hv.running and not offer.clone.path.exists()
        wait_for(lambda: status(state)["ready"] == 1, 30, "the pool to refill")
    assert not hv.running and runs(state) == []


def test_a_clone_that_stopped_or_a_qemu_that_changed_is_never_handed_out(config, image, state, monkeypatch):
    hv = GreetingGuests()
    with pool_of(config, hv, image) as served:
        assert served.ready.wait(60)
        key = server.current_key(config, hv, image, "tcg")
        (waiting,) = hv.running
        hv.running.discard(waiting)  # it died while it waited
        assert client.ask(state, "x", key) == "the clone no longer fits"
        wait_for(lambda: status(state)["ready"] == 1, 30, "the pool to refill")
        monkeypatch.setattr(server, "qemu_identity", lambda: "another build")
        wait_for(lambda: status(state)["dropped"] >= 2, 30, "the check to drop the clone made before the update")
        wait_for(lambda: status(state)["ready"] == 1, 30, "a clone made after the update")
        offer = client.ask(state, "x", key)
        assert isinstance(offer, client.Offer)
        workdir.claim(offer.clone.path)
        client.confirm(offer)
        hv.destroy(offer.name)
        for fd in (offer.lock_fd, *([offer.link.detach()] if offer.link else [])):
            os.close(fd)
        reaper.remove(offer.clone.path)
    assert not hv.running and runs(state) == []


def test_a_removed_image_ends_its_pool(config, image, state):
    hv = GreetingGuests()
    with pool_of(config, hv, image) as served:
        assert served.ready.wait(60)
        (image.path / "manifest.json").unlink()
        served.thread.join(30)
        assert not served.thread.is_alive()
        final = served.outcome["status"]
    assert final.problem == "image x was removed" and final.dropped == 1
    assert not hv.running and runs(state) == []


def test_a_pool_that_cannot_make_a_clone_says_why_and_a_second_pool_is_refused(config, image, state):
    hv = GreetingGuests()
    hv.fail_restore = True
    with pool_of(config, hv, image) as served:
        assert served.ready.wait(60)
        err = served.outcome["error"]
    assert isinstance(err, PoolError)
    assert err.message.startswith("could not preload a clone of image x: libvirt could not restore VM")
    assert not hv.running and runs(state) == []
    hv.fail_restore = False
    with pool_of(config, hv, image) as first:
        assert first.ready.wait(60) and "error" not in first.outcome
        with pytest.raises(PoolError, match="a pool for image x is running already"):
            server.serve(config, hv, image, 1, Steps())
    assert not hv.running and runs(state) == []


@contextmanager
def cli_logging() -> Iterator[None]:
    """The CLI sets up logging for its process (the root logger's handler among it): given back after."""
    import logging

    root = logging.getLogger()
    saved = [(lg, lg.level, lg.handlers[:]) for lg in (root, *map(logging.getLogger, ("vmiso", "paramiko",
                                                                                       "vmiso.accel")))]
    try:
        yield
    finally:
        for lg, level, handlers in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers


def test_vmiso_pool_status_and_stop_reach_a_running_pool(config, image, state):
    from click.testing import CliRunner

    from vmiso import cli

    def vmiso(*args: str):
        return CliRunner().invoke(cli.cli, [*args, "--state-dir", str(state)], catch_exceptions=False)
    hv = GreetingGuests()
    with cli_logging(), pool_of(config, hv, image) as served:
        assert served.ready.wait(60) and "error" not in served.outcome
        assert vmiso("pool", "status").stdout == f"x: 1 of 1 ready, 0 served, 0 dropped (pid {os.getpid()})\n"
        (row,) = json.loads(vmiso("pool", "status", "--json").stdout)
        assert (row["image"], row["size"], row["ready"], row["pid"]) == ("x", 1, 1, os.getpid())
        assert vmiso("pool", "stop").stdout == "pool for x stopped\n"  # once its idle clone is gone
        assert not hv.running
        served.thread.join(30)
        assert served.outcome["status"].dropped == 1
    assert runs(state) == [] and vmiso("pool", "stop").stdout == "no pool is running\n"


def test_a_run_takes_a_preloaded_clone_and_puts_its_inputs_on_its_disk_before_go(config, image, state, tmp_path):
    hv = GreetingGuests()
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    seen: dict = {}

    def job(session, stdout, stderr):
        # on the clone's inputs disk before the run said GO (the fake connect is where it says it)
        seen["in"] = (guest_inputs(session.clone, tmp_path / "seen") / "data.csv").read_text()
        return JobExit(code=0)
    connect = FakeConnect(job)
    with pool_of(config, hv, image) as served:
        assert served.ready.wait(60)
        plan = plan_run(config, RunRequest(command=("true",), image="x", inputs=(data,)))
        result = run.run(plan, hv, io.BytesIO(), io.BytesIO(), connect=connect)
        assert result.boot == "preloaded" and result.exit_code == 0
        assert list(result.timings) == ["verify", "take", "stage", "connect", "exec", "teardown", "cleanup"]
        assert seen["in"] == "a,b\n" and connect.calls[0]["link"] is not None
        hello = connect.calls[0]["hello"]
        assert hello.ready == warm.READY_LINE and hello.go[:1] == warm.GO
        assert connect.sessions[0].clone.path.name.startswith("pool-")
        wait_for(lambda: status(state)["served"] == 1 and status(state)["ready"] == 1, 30, "the pool to refill")
        assert [name for name in runs(state) if not name.startswith(protocol.CLONE_PREFIX)] == []
    assert not hv.running and runs(state) == []
