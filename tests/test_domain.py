import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmiso.domain import Disk, DomainSpec, KernelBoot, Share, domain_xml, guest_cpu, metadata_of

GOLDEN = Path(__file__).parent / "golden"


def run_spec(**changes) -> DomainSpec:
    values = dict(
        name="vmiso-run-abc",
        memory_mib=512,
        cpus=2,
        accel="tcg",
        disks=(Disk(Path("/state/runs/abc/overlay.qcow2"), cache="unsafe", error_policy="report",
                    backing=((Path("/state/images/x/template.qcow2"), "qcow2"),)),
               Disk(Path("/state/runs/abc/scratch.img"), format="raw", cache="unsafe", error_policy="report")),
        console_log=Path("/state/runs/abc/console.log"),
        boot=KernelBoot(Path("/state/images/x/vmlinuz"), Path("/state/images/x/initrd.img"),
                        "root=/dev/vda rw console=ttyS0"),
        shares=(Share(Path("/state/runs/abc/in"), "vmiso-in", True),
                Share(Path("/state/runs/abc/out"), "vmiso-out", False)),
        ssh_socket=Path("/state/runs/abc/ssh.sock"),
        metadata={"kind": "run", "run_dir": "/state/runs/abc"},
    )
    values.update(changes)
    return DomainSpec(**values)


def check_golden(name: str, xml: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VMISO_UPDATE_GOLDEN"):
        path.write_text(xml)
    assert xml == path.read_text()


def test_run_domain_matches_golden():
    check_golden("run-domain.xml", domain_xml(run_spec()))


def test_provision_domain_matches_golden():
    spec = run_spec(
        name="vmiso-provision-x", shares=(), ssh_socket=Path("/state/images/.b/ssh.sock"), memory_mib=1024,
        disks=(Disk(Path("/state/images/.b/disk.qcow2"), backing=((Path("/state/layers/k/rootfs.img"), "raw"),)),
               Disk(Path("/state/images/.b/seed/seed.iso"), format="raw", readonly=True)),
        metadata={"kind": "provision"})
    check_golden("provision-domain.xml", domain_xml(spec))


def test_run_domain_has_no_network_and_no_stray_devices():
    root = ET.fromstring(domain_xml(run_spec()))
    devices = root.find("devices")
    assert devices.findall("interface") == []
    for tag in ("graphics", "sound", "video", "input", "hostdev", "redirdev", "smartcard"):
        assert devices.find(tag) is None, tag
    assert devices.find("controller[@type='usb']").get("model") == "none"
    assert devices.find("memballoon").get("model") == "none"
    assert root.findtext("on_reboot") == "destroy"
    assert root.findtext("on_crash") == "destroy"
    assert root.get("type") == "qemu"


def test_shares_readonly_flags_and_mapped_mode():
    root = ET.fromstring(domain_xml(run_spec()))
    shares = {fs.find("target").get("dir"): fs for fs in root.iter("filesystem")}
    assert shares["vmiso-in"].find("readonly") is not None
    assert shares["vmiso-out"].find("readonly") is None
    assert {fs.get("accessmode") for fs in shares.values()} == {"mapped"}


def test_kvm_domain_type():
    root = ET.fromstring(domain_xml(run_spec(accel="kvm")))
    assert root.get("type") == "kvm"


def test_cloud_boot_without_kernel():
    root = ET.fromstring(domain_xml(run_spec(boot=None)))
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"


def test_metadata_round_trip_and_escaping():
    xml = domain_xml(run_spec(metadata={"run_dir": "/a/<b>&c"}))
    assert metadata_of(xml) == {"run_dir": "/a/<b>&c"}


def test_hostile_strings_stay_data():
    # A path with XML metacharacters must not change the document's structure.
    spec = run_spec(console_log=Path("/tmp/x'/><evil/>.log"))
    root = ET.fromstring(domain_xml(spec))
    assert root.find(".//evil") is None
    assert root.find("devices/serial/source").get("path") == "/tmp/x'/><evil/>.log"


SAVED = """<domain type='qemu'>
  <name>vmiso-warm-x-0-abc</name>
  <uuid>8d5f3c4e-1111-2222-3333-444455556666</uuid>
  <genid>0b0b0b0b-1111-2222-3333-444455556666</genid>
  <metadata><vmiso:vm xmlns:vmiso="urn:vmiso:domain:1"><vmiso:kind>warm</vmiso:kind></vmiso:vm></metadata>
  <os><type>hvm</type><kernel>/s/images/x/warm/.building-slot-0/vmlinuz</kernel>
    <initrd>/s/images/x/warm/.building-slot-0/initramfs.img</initrd></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/s/images/x/warm/.building-slot-0/overlay.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/s/images/x/template.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/s/images/x/warm/.building-slot-0/scratch.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <filesystem type='mount' accessmode='mapped'>
      <source dir='/s/images/x/warm/.building-slot-0/in'/><target dir='vmiso-in'/><readonly/>
    </filesystem>
    <filesystem type='mount' accessmode='mapped'>
      <source dir='/s/images/x/warm/.building-slot-0/out'/><target dir='vmiso-out'/>
    </filesystem>
    <serial type='file'><source path='/s/old/console.log'/><target port='0'/></serial>
    <console type='file'><source path='/s/old/console.log'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='/s/old/ssh.sock'/>
      <target type='virtio' name='org.vmiso.ssh'/>
    </channel>
  </devices>
</domain>"""


def test_retarget_changes_host_paths_only():
    from vmiso.domain import Retarget, retarget

    xml = retarget(SAVED, Retarget(
        disks={"vda": Path("/r/overlay.qcow2"), "vdb": Path("/r/scratch.img")},
        backing={"vda": ((Path("/s/slot-0/overlay.qcow2"), "qcow2"), (Path("/s/template.qcow2"), "qcow2"))},
        kernel=Path("/r/vmlinuz"), initrd=Path("/r/initramfs.img"), console_log=Path("/r/console.log"),
        ssh_socket=Path("/r/ssh.sock"), shares={"vmiso-in": Path("/r/in"), "vmiso-out": Path("/r/out")},
        metadata={"kind": "run", "run_dir": "/r"}))
    root = ET.fromstring(xml)
    assert root.findtext("name") == "vmiso-warm-x-0-abc"  # libvirt refuses another name
    assert root.findtext("uuid") == "8d5f3c4e-1111-2222-3333-444455556666"  # guest-visible: kept
    assert root.findtext("genid") == "0b0b0b0b-1111-2222-3333-444455556666"  # libvirt checks it too
    disk = root.find("devices/disk/target[@dev='vda']/..")
    assert disk.find("source").get("file") == "/r/overlay.qcow2"
    assert root.find("devices/disk/target[@dev='vdb']/../source").get("file") == "/r/scratch.img"
    # The run's chain, given rather than probed, and no layer of it handed to QEMU's user.
    chain, layer = [], disk.find("backingStore")
    while layer is not None and layer.find("source") is not None:
        assert layer.find("source/seclabel").attrib == {"model": "dac", "relabel": "no"}
        chain.append((layer.find("source").get("file"), layer.find("format").get("type")))
        layer = layer.find("backingStore")
    assert chain == [("/s/slot-0/overlay.qcow2", "qcow2"), ("/s/template.qcow2", "qcow2")]
    assert layer is not None and len(layer) == 0  # an empty <backingStore/> ends it
    assert (root.findtext("os/kernel"), root.findtext("os/initrd")) == ("/r/vmlinuz", "/r/initramfs.img")
    assert disk.find("address").get("bus") == "0x04"  # the guest's view stays as saved
    shares = {fs.find("target").get("dir"): fs.find("source").get("dir") for fs in root.iter("filesystem")}
    assert shares == {"vmiso-in": "/r/in", "vmiso-out": "/r/out"}
    assert {s.get("path") for s in root.iter("source") if s.get("path")} == {"/r/console.log", "/r/ssh.sock"}
    assert metadata_of(xml) == {"kind": "run", "run_dir": "/r"}


def test_retarget_refuses_a_saved_domain_with_other_disks():
    from vmiso.domain import Retarget, retarget

    with pytest.raises(ValueError, match=r"disks \['vda', 'vdb'\], a run has \['vda'\]"):
        retarget(SAVED, Retarget(
            disks={"vda": Path("/r/overlay.qcow2")}, backing={}, kernel=Path("/r/vmlinuz"),
            initrd=Path("/r/initramfs.img"), console_log=Path("/r/console.log"),
            ssh_socket=Path("/r/ssh.sock"), shares={"vmiso-in": Path("/r/in"), "vmiso-out": Path("/r/out")}))


def test_retarget_refuses_a_saved_domain_without_a_share_the_run_gives():
    # A state saved by an older vmiso, without the large inputs' share: its guest would wait for
    # the share until the boot timeout; refused, the run boots cold instead.
    from vmiso.domain import Retarget, retarget

    with pytest.raises(ValueError, match=r"lacks the share\(s\) vmiso-in-large"):
        retarget(SAVED, Retarget(
            disks={"vda": Path("/r/overlay.qcow2"), "vdb": Path("/r/scratch.img")}, backing={},
            kernel=Path("/r/vmlinuz"), initrd=Path("/r/initramfs.img"), console_log=Path("/r/console.log"),
            ssh_socket=Path("/r/ssh.sock"),
            shares={"vmiso-in": Path("/r/in"), "vmiso-out": Path("/r/out"), "vmiso-in-large": Path("/r/large")}))


def test_guest_cpu_is_chosen_for_each_accelerator():
    # TCG's default (qemu64) lacks SSE4.2/POPCNT: NumPy 2 dies with SIGILL on it.
    tcg = ET.fromstring(domain_xml(run_spec(accel="tcg"))).find("cpu")
    assert tcg.get("mode") == "maximum"
    # ... and QEMU 7.2's TCG gets AVX2 gathers wrong: NumPy computed wrong answers with it;
    # BMI2 goes with it, or libgcrypt's SHA-1 runs AVX2 on finding BMI2 and apt dies of SIGILL.
    assert [(f.get("policy"), f.get("name")) for f in tcg.findall("feature")] == [("disable", "avx2"),
                                                                                  ("disable", "bmi2")]
    kvm = ET.fromstring(domain_xml(run_spec(accel="kvm"))).find("cpu")
    assert kvm.get("mode") == "host-passthrough" and kvm.findall("feature") == []


def test_a_withheld_feature_is_offered_only_when_asked_and_only_under_tcg():
    offered = ET.fromstring(domain_xml(run_spec(accel="tcg", tcg_cpu_features=("avx2", "bmi2")))).find("cpu")
    assert offered.get("mode") == "maximum" and offered.findall("feature") == []
    some = ET.fromstring(domain_xml(run_spec(accel="tcg", tcg_cpu_features=("avx2",)))).find("cpu")
    assert [f.get("name") for f in some.findall("feature")] == ["bmi2"]
    kvm = ET.fromstring(domain_xml(run_spec(accel="kvm", tcg_cpu_features=("avx2",)))).find("cpu")
    assert kvm.get("mode") == "host-passthrough" and kvm.findall("feature") == []
    assert guest_cpu("tcg").describe() == "maximum -avx2 -bmi2"
    assert guest_cpu("tcg", ("avx2",)).describe() == "maximum -bmi2"
    assert guest_cpu("tcg", ("bmi2", "avx2")).describe() == "maximum"
    assert guest_cpu("kvm").describe() == "host-passthrough"
