"""hypervisor.py and the reaper against libvirt's own test:///default driver, which boots nothing.

The test driver keeps its domains in this process; each test uses names of its own
and removes what it made.
"""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmiso.domain import METADATA_NS, NAME_PREFIX
from vmiso.errors import HypervisorError
from vmiso.host import reaper, workdir
from vmiso.hypervisor import Libvirt, connected, open_hypervisor


@pytest.fixture
def hv():
    with connected("test:///default") as hv:
        yield hv


def fake_domain_xml(name: str, metadata: dict[str, str] | None = None) -> str:
    root = ET.Element("domain", type="test")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory").text = "1024"
    ET.SubElement(ET.SubElement(root, "os"), "type").text = "hvm"
    if metadata:
        inner = ET.SubElement(ET.SubElement(root, "metadata"), f"{{{METADATA_NS}}}vm")
        for key, value in metadata.items():
            ET.SubElement(inner, f"{{{METADATA_NS}}}{key}").text = value
    return ET.tostring(root, encoding="unicode")




def new_name() -> str:
    return f"{NAME_PREFIX}test-{secrets.token_hex(4)}"


def test_start_query_and_destroy(hv: Libvirt):
    name = new_name()
    assert not hv.is_running(name)
    hv.start_transient(name, fake_domain_xml(name), autodestroy=False)
    assert hv.is_running(name)
    assert hv.destroy(name)
    assert not hv.is_running(name)
    assert not hv.destroy(name)  # gone already: not an error


def test_shutdown_and_wait_stopped(hv: Libvirt):
    name = new_name()
    hv.shutdown(name)  # nothing to shut down: not an error
    hv.start_transient(name, fake_domain_xml(name), autodestroy=False)
    hv.shutdown(name)
    assert hv.wait_stopped(name, timeout=5, poll=0.01)
    hv.destroy(name)


def test_wait_stopped_gives_up_after_its_timeout(hv: Libvirt):
    name = new_name()
    hv.start_transient(name, fake_domain_xml(name), autodestroy=False)
    try:
        assert not hv.wait_stopped(name, timeout=0.05, poll=0.01)
    finally:
        hv.destroy(name)


def test_libvirt_errors_become_hypervisor_errors_that_name_the_vm(hv: Libvirt, tmp_path: Path):
    name = new_name()
    with pytest.raises(HypervisorError, match=f"libvirt could not start VM {name}: ") as err:
        hv.start_transient(name, "<domain/>")
    assert err.value.hint == "run 'vmiso doctor' to check the host"
    with pytest.raises(HypervisorError, match=f"VM {name} does not exist; nothing to save"):
        hv.save(name, tmp_path / "state")
    with pytest.raises(HypervisorError, match=f"libvirt cannot read the saved state {tmp_path}/missing"):
        hv.saved_xml(tmp_path / "missing")
    with pytest.raises(HypervisorError, match=f"libvirt could not restore VM {name} from "):
        hv.restore(name, tmp_path / "missing", fake_domain_xml(name))


def test_save_stops_the_domain_and_keeps_its_xml(hv: Libvirt, tmp_path: Path):
    name = new_name()
    hv.start_transient(name, fake_domain_xml(name), autodestroy=False)
    hv.save(name, tmp_path / "state.save")
    assert not hv.is_running(name)
    assert f"<name>{name}</name>" in hv.saved_xml(tmp_path / "state.save")


def test_version_names_libvirt_and_the_hypervisor(hv: Libvirt):
    assert hv.version().startswith("libvirt ") and ", QEMU " in hv.version()


def test_a_bad_uri_says_how_to_fix_it():
    with pytest.raises(HypervisorError, match="cannot connect to libvirt at nosuch:///x") as err:
        open_hypervisor("nosuch:///x")
    assert "libvirt_uri" in (err.value.hint or "")


def test_vmiso_domains_only_and_with_their_metadata(hv: Libvirt):
    mine, other = new_name(), f"other-{secrets.token_hex(4)}"
    hv.start_transient(mine, fake_domain_xml(mine, {"kind": "run", "run_dir": "/nowhere"}), autodestroy=False)
    hv.start_transient(other, fake_domain_xml(other), autodestroy=False)
    try:
        found = {d.name: d for d in hv.vmiso_domains()}
        assert other not in found
        assert found[mine].active and found[mine].metadata == {"kind": "run", "run_dir": "/nowhere"}
    finally:
        hv.destroy(mine)
        hv.destroy(other)


def test_the_reaper_destroys_vms_whose_owner_is_gone_and_keeps_live_ones(hv: Libvirt, tmp_path: Path):
    live_dir = tmp_path / "state" / "runs" / "live"
    live_dir.mkdir(parents=True)
    workdir.claim(live_dir)
    orphan, live = new_name(), new_name()
    hv.start_transient(orphan, fake_domain_xml(orphan, {"run_dir": str(tmp_path / "gone")}), autodestroy=False)
    hv.start_transient(live, fake_domain_xml(live, {"run_dir": str(live_dir)}), autodestroy=False)
    try:
        removed = reaper.collect(hv, tmp_path / "state")
        assert ("vm", orphan) in {(item.kind, item.name) for item in removed}
        assert live not in {item.name for item in removed}
        assert not hv.is_running(orphan) and hv.is_running(live)
    finally:
        hv.destroy(live)
