"""vmiso provision without a VM: its line of steps against a fake hypervisor whose "guest" goes
through provision.sh's steps on its console and writes its report (the VM tests provision real images).

What is real: the build directory, the keys (ssh-keygen), the gateway and its record, the
report share, the seed image, the overlay and the flattened template (qemu-img), the
manifest, the store, the warm states.  What is fake: libvirt and the guest, the OS layer
(a blank disk), the SSH link to the guest's gateway port, and the two readers of the
template's filesystem (sealcheck and inventory have tests of their own).
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmiso import config as config_mod
from vmiso.clones import warm
from vmiso.errors import ImageError, ProvisionError
from vmiso.host import reaper
from vmiso.image import inventory, provision, sealcheck
from vmiso.image.layer import Layer
from vmiso.image.provision import GUEST_STEPS, new_console_log
from vmiso.image.store import get_image, verify
from vmiso.progress import Steps

from fakes import FakeHypervisor, fake_host_config


def test_two_provisionings_of_one_name_in_one_second_get_a_console_log_each(tmp_path):
    first, second = new_console_log(tmp_path, "it"), new_console_log(tmp_path, "it")
    assert first != second and first.name.startswith("provision-it-") and second.name.startswith("provision-it-")
    assert [stat.S_IMODE(p.stat().st_mode) for p in (first, second)] == [0o600, 0o600]


class ProvisioningGuest(FakeHypervisor):
    """A provisioning VM that goes through provision.sh's steps on its console, each step's log in the
    report share, and writes its report; clones booted to be saved as warm states say they are ready."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.fail = fail

    def start_transient(self, name: str, xml: str, *, autodestroy: bool = True) -> None:
        if "-provision-" not in name:
            self.console = b"vmiso-ssh-link: waiting protocol=2\n"
            super().start_transient(name, xml, autodestroy=autodestroy)
            return
        self.started[name] = xml
        self.running.add(name)
        devices = ET.fromstring(xml).find("devices")
        assert devices is not None and devices.find("interface") is None  # no network device
        console = Path(devices.find("serial/source").get("path"))
        report = Path(devices.find("filesystem/source").get("dir"))
        threading.Thread(target=self._guest, args=(name, console, report), daemon=True).start()

    def _guest(self, name: str, console: Path, report: Path) -> None:
        with open(console, "ab", buffering=0) as out:
            out.write(b"[  OK  ] Starting \x1b[0;1;39mcloud-init.service\x1b[0m...\n")
            time.sleep(0.7)  # a poll of the host's sees it
            for step in GUEST_STEPS:
                (report / f"{step}.log").write_text(f"Collecting {step}-package\n")
                out.write(f"VMISO-STEP {step}\n".encode())
                if step == self.fail:
                    (report / f"{step}.log").write_text("ERROR: No matching distribution found for nothing\n")
                    out.write(f"VMISO-FAIL {step}\n".encode())
                    break
                time.sleep(0.7 if step == "pip" else 0.05)
        if self.fail is None:
            (report / "python.txt").write_text("Python 3.11.2\n")
            (report / "pip-freeze.txt").write_text("tabulate==0.9.0\n")
            (report / "dpkg.txt").write_text("python3\t3.11.2-1+b1\n")
            (report / "status").write_text("ok\n")
            self.running.discard(name)  # it powers off


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def config(state: Path) -> config_mod.Config:
    return fake_host_config(state, **{"provision.ca_certificates": "none"})


@pytest.fixture
def fake_world(tmp_path, monkeypatch) -> dict:
    """An OS layer (a blank disk and boot files), the guest's gateway port and the template's readers."""
    layer = Layer("k" * 16, tmp_path / "layer")
    layer.path.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(layer.rootfs), "16M"], check=True)
    os.chmod(layer.rootfs, 0o444)
    for name in ("vmlinuz", "initrd.img", "initramfs.img"):
        (layer.path / name).write_bytes(f"a {name}".encode())
    (layer.path / "kernel-release").write_text("6.1.0-test-amd64\n")
    seen: dict = {"gateway": 0}
    monkeypatch.setattr(provision, "_ensure_source", lambda config, steps: layer)

    def serve_way(build, domain, keys, way, link):
        seen["gateway"] += 1
        seen["routes"] = sorted(way.gateway.routes())
    monkeypatch.setattr(provision, "_serve_way", serve_way)
    monkeypatch.setattr(sealcheck, "check_template", lambda template, layer, work: seen.setdefault("checked", template))

    class Startup:
        def as_dict(self) -> dict:
            return {"pth": [], "startup_modules": [], "native": []}
    monkeypatch.setattr(inventory, "read_template", lambda template, root_device, work: Startup())
    return seen


def test_provisioning_is_a_line_of_named_steps_that_ends_with_an_image_in_the_store(config, state, fake_world):
    events: list[tuple[str, str, str]] = []
    hv = ProvisioningGuest()
    image = provision.provision(config, hv, name="it",
                                steps=Steps(lambda event, step, detail, elapsed: events.append((event, step, detail))))
    started = [step for event, step, _ in events if event == "start"]
    assert started == ["keys", "proxy", "boot", *GUEST_STEPS, "template", "check", "inventory", "hash",
                       "warm", "warm"]
    assert ("status", "boot", "starting cloud-init.service") in events  # what the guest does, live
    assert ("status", "pip", "collecting pip-package") in events
    assert fake_world["gateway"] == 1 and fake_world["routes"] == [3128]  # opened when the guest asked
    manifest = image.manifest()
    assert manifest["name"] == "it" and manifest["sha256"] == verify(get_image(state, "it"))
    assert manifest["pip"] == [{"name": "tabulate", "version": "0.9.0"}]
    assert manifest["apt"] == [{"name": "python3", "version": "3.11.2-1+b1"}]
    assert manifest["python"] == "Python 3.11.2" and manifest["kernel"] == "6.1.0-test-amd64"
    assert manifest["source"] == {"recipe": "debian-12", "mirror": "http://deb.debian.org/debian",
                                  "layer": "k" * 16}
    assert manifest["gateway"]["allow_list"] == ["http://deb.debian.org:80", "files.pythonhosted.org:443",
                                                 "pypi.org:443"] and manifest["gateway"]["refused"] == []
    assert manifest["accel"] == "tcg" and manifest["host_key"].startswith("ssh-ed25519 ")
    assert (image.path / "host_key.pub").read_text() == manifest["host_key"] + "\n"
    assert "VMISO-STEP poweroff" in (image.path / "provision.log").read_text()
    assert sorted(p.name for p in image.path.iterdir() if not p.name.startswith(".")) == [
        "client_key", "gateway.json", "host_key.pub", "initramfs.img", "manifest.json", "provision.log",
        "template.qcow2", "vmlinuz"]
    assert [s.clone.path.name for s in warm.slots(image)] == ["slot-0", "slot-1"]
    assert not hv.running and reaper.find(None, state) == []
    assert [p.name for p in (state / "images").iterdir()] == ["it"]
    with pytest.raises(ImageError, match="an image named 'it' exists already"):
        provision.provision(config, hv, name="it")


def test_a_step_the_guest_fails_is_named_and_nothing_is_left(config, state, fake_world):
    hv = ProvisioningGuest(fail="pip")
    with pytest.raises(ProvisionError) as err:
        provision.provision(config, hv, name="it")
    assert err.value.step == "pip"
    assert "the guest reported a failure: ERROR: No matching distribution found for nothing" in err.value.message
    assert err.value.log_path is not None and Path(err.value.log_path).name.startswith("provision-it-")
    assert hv.destroyed and not hv.running  # the VM, destroyed by the undoing
    assert list((state / "images").iterdir()) == [] and reaper.find(None, state) == []
    assert "VMISO-FAIL pip" in Path(err.value.log_path).read_text()  # the console's log is kept
