"""Small hand-written fakes shared by the fast tests, declared as what they stand in for.

``FakeHypervisor`` is a vmiso.domain.Hypervisor and ``FakeSession`` a vmiso.ssh.Session:
mypy checks both against those Protocols (pyproject's mypy files list this module), so
a fake cannot drift from the seam it fakes.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal

from vmiso import config as config_mod
from vmiso.clones.clone import CloneDir
from vmiso.domain import DomainInfo, Hypervisor
from vmiso.errors import HypervisorError
from vmiso.host.inputs import LARGE_INDEX
from vmiso.image.store import GUEST_PROTOCOL, Image, sha256_file
from vmiso.ssh import JobExit, Session, Terminal

VERSION = "libvirt 9.0, QEMU 7.2"


class FakeHypervisor(Hypervisor):
    """The hypervisor a run, a pool or a provisioning uses; domains are names in a set."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.started: dict[str, str] = {}  # name -> domain XML
        self.restored: dict[str, str] = {}
        self.destroyed: list[str] = []
        self.saved: dict[Path, str] = {}  # saved state -> its XML
        self.fail_restore = False
        self.console: bytes | None = None

    def version(self) -> str:
        return VERSION

    def vmiso_domains(self) -> list[DomainInfo]:
        return []

    def start_transient(self, name: str, xml: str, *, autodestroy: bool = True) -> None:
        self.started[name] = xml
        self.running.add(name)
        if self.console is not None:  # what the guest prints on its serial console
            console = ET.fromstring(xml).find("devices/serial/source")
            assert console is not None
            Path(console.get("path", "")).write_bytes(self.console)

    def save(self, name: str, path: Path) -> None:
        assert name in self.running
        self.running.discard(name)
        path.write_bytes(b"saved " + name.encode())

    def saved_xml(self, path: Path) -> str:
        if path in self.saved:
            return self.saved[path]
        return self.started[path.read_bytes().decode().removeprefix("saved ")]  # moved since save()

    def restore(self, name: str, path: Path, xml: str) -> None:
        if self.fail_restore:
            raise HypervisorError(f"libvirt could not restore VM {name} from {path}: broken")
        self.restored[name] = xml
        self.running.add(name)

    def is_running(self, name: str) -> bool:
        return name in self.running

    def destroy(self, name: str) -> bool:
        self.destroyed.append(name)
        if name not in self.running:
            return False
        self.running.discard(name)
        return True

    def destroy_run(self, name: str, run_dir: str) -> Literal["destroyed", "absent", "another run's"]:
        return "destroyed" if self.destroy(name) else "absent"


# A job as a fake session runs it: (the session, its stdout, its stderr) -> how it ended.
Job = Callable[["FakeSession", BinaryIO, BinaryIO], "JobExit | None"]


class FakePorts:
    """Guest ports a fake session serves (or a port it published), until closed."""

    closed = False

    def close(self) -> None:
        self.closed = True


class FakePublished(FakePorts):
    def __init__(self, guest_port: int) -> None:
        self.guest_port, self.host, self.host_port = guest_port, "127.0.0.2", 40000 + guest_port


class FakeSession(Session):
    """The guest's sshd, played by ``job``: it runs when the run executes its command."""

    def __init__(self, clone: CloneDir, job: Job) -> None:
        self.clone, self.job = clone, job
        self.commands: list[str] = []
        self.closed = False
        self.stdin: BinaryIO | None = None
        self.should_stop: Callable[[], bool] = lambda: False
        self.signals: Callable[[], Any] = lambda: None
        self.routes: Mapping[int, Callable[[Any], None]] = {}

    def execute(self, command: str, stdout: BinaryIO, stderr: BinaryIO, *, stdin: BinaryIO | None = None,
                deadline: float | None = None, should_stop: Callable[[], bool] = lambda: False,
                signals: Callable[[], Any] = lambda: None, terminal: Terminal | None = None,
                on_start: Callable[[], None] = lambda: None) -> JobExit | None:
        on_start()
        self.commands.append(command)
        self.stdin = stdin
        self.should_stop = should_stop
        self.signals = signals
        return self.job(self, stdout, stderr)

    def publish(self, guest_port: int) -> FakePublished:
        return FakePublished(guest_port)

    def serve_guest_ports(self, routes: Mapping[int, Callable[[Any], None]],
                          on_busy: Callable[[int], None] = lambda port: None) -> FakePorts:
        """As the guest's sshd would: each route is called with a connection from the guest."""
        self.routes = routes
        return FakePorts()

    def close(self) -> None:
        self.closed = True


class FakeConnect:
    """Stands in for ssh.connect: the guest "answers" with a FakeSession running ``job``."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.calls: list[dict[str, Any]] = []
        self.sessions: list[FakeSession] = []

    def __call__(self, socket_path: Path, **kwargs: Any) -> FakeSession:
        self.calls.append(kwargs)
        assert kwargs["alive"]()  # the VM runs while vmiso connects
        session = FakeSession(CloneDir(socket_path.parent.parent), self.job)  # run/link/ssh.sock
        self.sessions.append(session)
        return session


def guest_inputs(clone: CloneDir, into: Path) -> Path:
    """What the guest sees as /in: the clone's inputs disk, unpacked by erofs-utils' own checker,
    with each large file from the share put over its name as the guest binds it (ssh-link)."""
    subprocess.run(["fsck.erofs", f"--extract={into}", str(clone.inputs_disk)], check=True, capture_output=True)
    index = clone.inputs_large / LARGE_INDEX
    fields = index.read_bytes().split(b"\0")[:-1] if index.exists() else []
    for number, below in zip(fields[::2], fields[1::2], strict=True):
        placeholder = into / os.fsdecode(below)
        assert placeholder.stat().st_size == 0
        placeholder.write_bytes((clone.inputs_large / os.fsdecode(number)).read_bytes())
    return into


def exits(code: int, out: bytes = b"") -> Job:
    """A job that writes ``out`` and exits with ``code``."""
    def job(session: FakeSession, stdout: BinaryIO, stderr: BinaryIO) -> JobExit:
        stdout.write(out)
        return JobExit(code=code)
    return job


def fake_host_config(state: Path, **changes: Any) -> config_mod.Config:
    """The configuration of a test that drives vmiso against these fakes: TCG, the test's own state
    directory, test:///default (a watchdog looks there and finds nothing to destroy), the smallest
    scratch disk; ``changes`` as config_mod.override takes them."""
    cfg = config_mod.load(None, env={"VMISO_ACCEL": "tcg"})
    return config_mod.override(cfg, state_dir=state, libvirt_uri="test:///default",  # and no audit: no network
                               **{"run.scratch": config_mod.MIN_SCRATCH, "provision.audit": "none", **changes})


def make_image(state: Path, name: str = "x") -> Image:
    """An image as provisioning leaves it in ``state``, with a tiny (empty) template."""
    path = state / "images" / name
    path.mkdir(parents=True)
    template = path / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "16M"], check=True)
    (path / "client_key").write_bytes(b"")
    (path / "vmlinuz").write_bytes(b"a kernel")
    (path / "initramfs.img").write_bytes(b"an initramfs")
    (path / "manifest.json").write_text(json.dumps({
        "name": name, "sha256": sha256_file(template), "guest_protocol": GUEST_PROTOCOL,
        "kernel_sha256": sha256_file(path / "vmlinuz"), "initramfs_sha256": sha256_file(path / "initramfs.img")}))
    (path / "host_key.pub").write_text("ssh-ed25519 AAAA pinned\n")
    return Image(name, path)
