"""Small hand-written fakes shared by the fast tests."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from vmiso.errors import HypervisorError
from vmiso.image.store import Image, sha256_file

VERSION = "libvirt 9.0, QEMU 7.2"


class FakeHypervisor:
    """The few Hypervisor methods a run uses; domains are names in a set."""

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

    def vmiso_domains(self) -> list:
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
        "name": name, "sha256": sha256_file(template),
        "kernel_sha256": sha256_file(path / "vmlinuz"), "initramfs_sha256": sha256_file(path / "initramfs.img")}))
    (path / "host_key.pub").write_text("ssh-ed25519 AAAA pinned\n")
    return Image(name, path)
