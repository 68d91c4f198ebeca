"""vmiso provision without a VM: its line of steps against a fake hypervisor whose "guest" goes
through provision.sh's steps on its console and writes its report (the VM tests provision real images).

What is real: the build directory, the keys (ssh-keygen), the gateway and its record, the
report share, the seed image, the overlay and the flattened template (qemu-img), the
manifest, the store, the warm states.  What is fake: libvirt and the guest, the OS layer
(a blank disk), the SSH link to the guest's gateway port, and the two readers of the
template's filesystem (sealcheck and inventory have tests of their own).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmiso import config as config_mod
from vmiso.clones import warm
from vmiso.config import CloudImage
from vmiso.errors import ConfigError, ImageError, ProvisionError
from vmiso.host import reaper
from vmiso.image import inventory, provision, sealcheck
from vmiso.image.layer import Layer
from vmiso.image.provision import GUEST_STEPS, new_console_log
from vmiso.image.store import get_image, sha256_file, verify
from vmiso.network import allow
from vmiso.progress import Steps

from fakes import FakeHypervisor, fake_host_config


def test_two_provisionings_of_one_name_in_one_second_get_a_console_log_each(tmp_path):
    first, second = new_console_log(tmp_path, "it"), new_console_log(tmp_path, "it")
    assert first != second and first.name.startswith("provision-it-") and second.name.startswith("provision-it-")
    assert [stat.S_IMODE(p.stat().st_mode) for p in (first, second)] == [0o600, 0o600]


GUEST_PAUSE = 0.2  # four of the host's polls (FOLLOW_POLL, as the tests set it)


class ProvisioningGuest(FakeHypervisor):
    """A provisioning VM that goes through provision.sh's steps on its console, each step's log in the
    report share, and writes its report; clones booted to be saved as warm states say they are ready."""

    def __init__(self, fail: str | None = None, stop: str | None = None,
                 report: dict[str, bytes | Path] | None = None) -> None:
        super().__init__()
        self.fail = fail  # the step it reports failed
        self.stop = stop  # the step in which it powers off, reporting nothing
        self.report = report or {}  # what it writes in its report besides (a Path: a link to it)

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
            time.sleep(GUEST_PAUSE)  # a poll of the host's sees it
            if self.stop == "boot":  # it never got as far as provision.sh
                self.running.discard(name)
                return
            for step in GUEST_STEPS:
                (report / f"{step}.log").write_text(f"Collecting {step}-package\n")
                out.write(f"VMISO-STEP {step}\n".encode())
                if step == self.fail:
                    (report / f"{step}.log").write_text("ERROR: No matching distribution found for nothing\n")
                    out.write(f"VMISO-FAIL {step}\n".encode())
                    break
                if step == self.stop:
                    self.running.discard(name)
                    return
                time.sleep(GUEST_PAUSE if step == "pip" else 0.01)
        if self.fail is None:
            (report / "python.txt").write_text("Python 3.11.2\n")
            (report / "pip-freeze.txt").write_text("tabulate==0.9.0\n")
            (report / "dpkg.txt").write_text("python3\t3.11.2-1+b1\n")
            for file, content in self.report.items():
                (report / file).unlink(missing_ok=True)
                if isinstance(content, Path):
                    (report / file).symlink_to(content)
                else:
                    (report / file).write_bytes(content)
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
    monkeypatch.setattr(provision, "FOLLOW_POLL", 0.05)  # the fake guest's pauses are a few of these

    def serve_way(build, domain, keys, way, link):
        seen["gateway"] += 1
        seen["routes"] = sorted(way.gateway.routes())
        for request in seen.get("requests", ()):  # what install-time code asks the gateway for
            guest, host_end = socket.socketpair()
            with guest:
                guest.settimeout(10)
                worker = threading.Thread(target=way.gateway.routes()[allow.GUEST_PORT], args=(host_end,))
                worker.start()
                guest.sendall(request)
                seen.setdefault("answers", []).append(guest.recv(65536))
                worker.join(10)
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


def nothing_left(state: Path, hv: FakeHypervisor) -> bool:
    """No image, no build directory, no VM running, nothing a collector would find."""
    images = state / "images"
    return not hv.running and reaper.find(None, state) == [] and (not images.exists() or not any(images.iterdir()))


@pytest.mark.parametrize("stop", ["boot", "venv"])
def test_a_guest_that_powers_off_half_way_names_the_step_it_was_in(config, state, fake_world, stop):
    hv = ProvisioningGuest(stop=stop)
    with pytest.raises(ProvisionError) as err:
        provision.provision(config, hv, name="it")
    assert err.value.step == stop
    assert "the VM stopped before provisioning finished" in err.value.message
    assert err.value.log_path is not None and Path(err.value.log_path).is_file()  # kept, and named
    assert nothing_left(state, hv)


def test_ca_certificates_come_from_the_host_or_a_list_and_what_is_not_one_is_named(tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    host = tmp_path / "host"
    (host / "corp").mkdir(parents=True)
    (host / "corp" / "b.crt").write_text(pem.replace("MIIB", "B") + "\n\n")
    (host / "a.crt").write_text(pem.replace("MIIB", "A"))
    (host / "README").write_text("not a certificate, not read")
    assert provision.load_ca_certificates("none", host) == ()
    assert provision.load_ca_certificates("host", host) == (pem.replace("MIIB", "A") + "\n",
                                                            pem.replace("MIIB", "B") + "\n")
    assert provision.load_ca_certificates("host", tmp_path / "no such directory") == ()
    assert provision.load_ca_certificates((host / "corp" / "b.crt",), host) == (pem.replace("MIIB", "B") + "\n",)
    with pytest.raises(ConfigError, match=f"provision.ca_certificates: cannot read {tmp_path}/missing.pem"):
        provision.load_ca_certificates((tmp_path / "missing.pem",))
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=f"provision.ca_certificates: {tmp_path}/key.pem holds no PEM certificate"):
        provision.load_ca_certificates((tmp_path / "key.pem",))
    (tmp_path / "latin1.crt").write_bytes(pem.encode() + b"\xe9")
    with pytest.raises(ConfigError, match="cannot read .*latin1.crt: 'ascii' codec can't decode"):
        provision.load_ca_certificates((tmp_path / "latin1.crt",))


def test_too_little_space_for_an_os_layer_is_refused_before_one_is_built(state, monkeypatch):
    config = fake_host_config(state, **{"provision.ca_certificates": "none"})
    state.mkdir()
    monkeypatch.setattr(provision, "SPACE_WITH_LAYER", shutil.disk_usage(state).free + 64 * provision.GIB)
    monkeypatch.setattr(provision, "ensure_layer", lambda *args: pytest.fail("an OS layer was built"))
    hv = FakeHypervisor()
    with pytest.raises(ImageError) as err:
        provision.provision(config, hv, name="it")
    assert re.search(r"too little disk space in \S+: [0-9.]+ GiB free, provisioning needs about [0-9]+ GiB",
                     err.value.message)
    assert err.value.hint == "free some space, remove unused images (vmiso images rm), or set state_dir elsewhere"
    assert not hv.started and nothing_left(state, hv)


def test_a_cloud_image_that_is_not_there_is_refused_before_anything_is_made(state, tmp_path):
    missing = tmp_path / "debian-12-genericcloud.qcow2"
    config = fake_host_config(state, **{"image.cloud_image": CloudImage(missing, "0" * 64)})
    hv = FakeHypervisor()
    with pytest.raises(ConfigError) as err:
        provision.provision(config, hv, name="it")
    assert err.value.message == f"image.cloud_image.path: {missing} is not a file"
    assert err.value.hint == "give the path of a qcow2 cloud image"
    assert not hv.started and not (state / "images").exists()


def test_what_the_guest_reports_is_never_read_through_a_link(config, state, fake_world, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("root:$6$secret-hash\n")
    hv = ProvisioningGuest(report={"python.txt": secret, "pip-freeze.txt": secret})
    image = provision.provision(config, hv, name="it")
    manifest = image.manifest()
    assert manifest["python"] == "" and manifest["pip"] == []
    assert "secret-hash" not in (image.path / "manifest.json").read_text()


def test_a_report_larger_than_its_bound_fails_the_manifest_step_and_leaves_nothing(config, state, fake_world):
    hv = ProvisioningGuest(report={"pip-freeze.txt": b"x==1\n" * (provision.REPORT_MAX_BYTES // 5 + 1)})
    with pytest.raises(ProvisionError) as err:
        provision.provision(config, hv, name="it")
    assert err.value.step == "manifest"
    assert f"the guest's pip-freeze.txt is larger than {provision.REPORT_MAX_BYTES} bytes" in err.value.message
    assert nothing_left(state, hv)


def test_replace_rebuilds_an_image_and_keeps_only_the_new_one(config, state, fake_world):
    hv = ProvisioningGuest()
    old = provision.provision(config, hv, name="it").manifest()
    image = provision.provision(config, hv, name="it", replace=True)
    new = image.manifest()
    assert new["host_key"] != old["host_key"]  # new keys: the old image's went with it
    assert (image.path / "host_key.pub").read_text() == new["host_key"] + "\n"
    assert verify(get_image(state, "it")) == new["sha256"]
    assert [p.name for p in (state / "images").iterdir()] == ["it"]
    assert not hv.running and reaper.find(None, state) == []


REFUSED = b"CONNECT telemetry.example.net:443 HTTP/1.1\r\nHost: telemetry.example.net:443\r\n\r\n"


def test_a_host_the_gateway_refused_is_named_after_provisioning(config, state, fake_world, caplog):
    caplog.set_level(logging.WARNING, logger="vmiso")
    fake_world["requests"] = [REFUSED]  # install-time code that phones home
    image = provision.provision(config, ProvisioningGuest(), name="it")
    assert fake_world["answers"][0].startswith(b"HTTP/1.1 403 ")
    assert image.manifest()["gateway"]["refused"] == ["telemetry.example.net:443"]
    assert ("the gateway refused connections to telemetry.example.net:443 during provisioning: install-time code "
            "tried to reach hosts outside the allow-list (see 'vmiso images show it'; provision.allow_hosts allows "
            "a host)") in caplog.text


def test_a_failed_provisioning_names_the_hosts_the_gateway_refused(config, state, fake_world):
    fake_world["requests"] = [REFUSED]
    hv = ProvisioningGuest(fail="pip")
    with pytest.raises(ProvisionError) as err:
        provision.provision(config, hv, name="it")
    assert err.value.step == "pip"
    assert err.value.hint == ("the gateway refused telemetry.example.net:443: a host not in the allow-list; "
                              "if the image needs it, add it to provision.allow_hosts")
    assert nothing_left(state, hv)


def test_requirements_that_are_not_hash_pinned_are_recorded_so_and_warned_about(state, fake_world, tmp_path,
                                                                                   caplog):
    caplog.set_level(logging.WARNING, logger="vmiso")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tabulate==0.9.0\n")
    config = fake_host_config(state, **{"provision.ca_certificates": "none", "provision.requirements": requirements})
    image = provision.provision(config, ProvisioningGuest(), name="it")
    assert image.manifest()["requirements"] == {"file": str(requirements), "sha256": sha256_file(requirements),
                                                "hashed": False}
    assert "image it: its requirements are not hash-pinned" in caplog.text


class ClonesThatStop(ProvisioningGuest):
    """Provisions as ProvisioningGuest does; the clones booted to be saved as warm states stop at once."""

    def start_transient(self, name: str, xml: str, *, autodestroy: bool = True) -> None:
        if "-provision-" in name:
            super().start_transient(name, xml, autodestroy=autodestroy)
        else:
            self.started[name] = xml  # and never running


def test_an_image_without_a_warm_state_is_still_an_image_and_says_runs_boot_cold(config, state, fake_world,
                                                                                   caplog):
    caplog.set_level(logging.WARNING, logger="vmiso")
    hv = ClonesThatStop()
    image = provision.provision(config, hv, name="it")
    assert verify(get_image(state, "it")) == image.manifest()["sha256"]
    assert warm.slots(image) == []
    assert ("image it: no warm state (the clone stopped before it was ready to be saved); runs will boot cold"
            in caplog.text)
    assert not hv.running and reaper.find(None, state) == []


def test_a_layer_removed_under_the_provisioning_is_made_again_once(config, state, fake_world, tmp_path, monkeypatch):
    layer = provision._ensure_source(config, Steps())  # the fake world's
    gone = Layer("g" * 16, tmp_path / "gone")  # renamed away by 'vmiso gc --layers' just now
    handed: list[Layer] = []

    def ensure_source(config, steps):
        handed.append(gone if not handed else layer)
        return handed[-1]
    monkeypatch.setattr(provision, "_ensure_source", ensure_source)
    image = provision.provision(config, ProvisioningGuest(), name="it")
    assert handed == [gone, layer] and image.manifest()["source"]["layer"] == layer.key

    monkeypatch.setattr(provision, "_ensure_source", lambda config, steps: gone)
    hv = ProvisioningGuest()
    with pytest.raises(ImageError) as err:
        provision.provision(config, hv, name="other")
    assert err.value.message == f"the OS layer {'g' * 16} keeps disappearing"
    assert err.value.hint == "do not run 'vmiso gc --layers' while provisioning"
    assert not hv.started and [p.name for p in (state / "images").iterdir()] == ["it"]


def test_the_image_carries_a_lock_of_what_pip_downloaded_matched_with_the_gateways_record(state, fake_world,
                                                                                          tmp_path, caplog):
    import tomllib

    from test_lock import WHEEL, _archive, _install, report

    caplog.set_level(logging.WARNING, logger="vmiso")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tabulate==0.9.0\n")
    config = fake_host_config(state, **{"provision.ca_certificates": "none", "provision.requirements": requirements})
    pip_report = report(_install("tabulate", "0.9.0", _archive(WHEEL, "a" * 64)),
                        _install("mine", "1.0", {"url": "file:///src/mine", "dir_info": {}}))
    image = provision.provision(config, ProvisioningGuest(report={"pip-report.json": pip_report.encode()}), name="it")
    entry = image.manifest()["lock"]
    assert entry["sha256"] == sha256_file(image.path / "pylock.toml")
    assert (entry["distributions"], entry["sdists"]) == (1, [])
    assert entry["not_locked"] == ["mine==1.0: a local directory, which a lock cannot pin"]
    locked = tomllib.loads((image.path / "pylock.toml").read_text())
    assert locked["packages"] == [{"name": "tabulate", "version": "0.9.0",
                                   "wheels": [{"url": WHEEL, "hashes": {"sha256": "a" * 64}}]}]
    # This gateway forwarded nothing: pip's account of a download is not the host's, and it says so.
    assert entry["unexplained_downloads"] == [WHEEL]
    assert f"pip reports a download from {WHEEL}, a host the gateway never connected to" in caplog.text
    from click.testing import CliRunner

    from vmiso import cli

    shown = CliRunner().invoke(cli.cli, ["images", "--state-dir", str(state), "show", "it"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "lock: pylock.toml, 1 distribution(s) pinned by sha256 (0 built in the VM from sdists)" in shown.stdout
    assert "not locked: mine==1.0: a local directory" in shown.stdout
    assert f"downloads the gateway never saw: {WHEEL}" in shown.stdout
    # images verify covers the lock and the gateway's record beside the template, as it covers the template.
    assert verify(image) == image.manifest()["sha256"]
    lock_file = image.path / "pylock.toml"
    os.chmod(lock_file, 0o644)
    lock_file.write_text(lock_file.read_text().replace("a" * 64, "b" * 64))
    with pytest.raises(ImageError, match="pylock.toml"):
        verify(image)
