import dataclasses
import io
import json
import struct
import time
from contextlib import ExitStack

import pytest

from vmiso import config as config_mod, run
from vmiso.clones import warm
from vmiso.clones.clone import CloneDir
from vmiso.errors import GuestError, ImageError
from vmiso.host import inputs
from vmiso.host.inputs import InputLimits
from vmiso.image.store import Image
from vmiso.plan import RunRequest, plan_run
from vmiso.progress import Steps

from fakes import FakeConnect, FakeHypervisor, exits, make_image

KEY = warm.WarmKey.make(template_sha256="a" * 64, hypervisor="libvirt 9.0, QEMU 7.2", accel="tcg",
                        memory_mib=512, cpus=2, scratch_bytes=2 * 1024**3)


def make_slot(image: Image, index: int, key: warm.WarmKey = KEY) -> None:
    slot = warm.warm_root(image) / f"slot-{index}"
    slot.mkdir(parents=True)
    (slot / warm.INFO).write_text(json.dumps(dataclasses.asdict(key)))


def test_no_warm_state_says_how_to_make_one(tmp_path):
    image = Image("x", tmp_path / "images" / "x")
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None and "vmiso images warm x" in why


def test_slots_are_exclusive_and_freed(tmp_path):
    image = Image("x", tmp_path / "images" / "x")
    make_slot(image, 0)
    make_slot(image, 1)
    with ExitStack() as first, ExitStack() as second, ExitStack() as third:
        a, _ = warm.acquire(image, KEY, first)
        b, _ = warm.acquire(image, KEY, second)
        c, why = warm.acquire(image, KEY, third)
        assert a and b and a.clone.path != b.clone.path
        assert c is None and "in use" in why
        first.close()
        d, _ = warm.acquire(image, KEY, third)
        assert d == a


def test_stale_state_is_not_used_and_the_reason_is_named(tmp_path):
    image = Image("x", tmp_path / "images" / "x")
    make_slot(image, 0, dataclasses.replace(KEY, template_sha256="b" * 64, hypervisor="libvirt 9.0, QEMU 8.0"))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None
    assert "another template_sha256, hypervisor" in why


def test_other_memory_size_falls_back(tmp_path):
    image = Image("x", tmp_path / "images" / "x")
    make_slot(image, 0)
    with ExitStack() as stack:
        slot, why = warm.acquire(image, dataclasses.replace(KEY, memory_mib=1024), stack)
    assert slot is None and "memory_mib" in why


def test_another_cpu_model_falls_back_and_names_both(tmp_path):
    # A state saved before the CPU was chosen on purpose (no model recorded) or for
    # another one must not be restored onto this CPU.
    image = Image("x", tmp_path / "images" / "x")
    make_slot(image, 0, dataclasses.replace(KEY, cpu="host-passthrough"))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None and "another cpu (cpu host-passthrough, not maximum -avx2 -bmi2)" in why
    assert KEY.cpu == "maximum -avx2 -bmi2"


def test_a_state_saved_with_avx2_offered_is_not_restored_onto_the_cpu_without_it(tmp_path):
    # Warm states made before AVX2 was withheld under TCG recorded plain "maximum".
    image = Image("x", tmp_path / "images" / "x")
    make_slot(image, 0, dataclasses.replace(KEY, cpu="maximum"))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None and "another cpu (cpu maximum, not maximum -avx2 -bmi2)" in why
    offered = warm.WarmKey.make(template_sha256="a" * 64, hypervisor="libvirt 9.0, QEMU 7.2", accel="tcg",
                                memory_mib=512, cpus=2, scratch_bytes=2 * 1024**3, tcg_cpu_features=("bmi2", "avx2"))
    assert offered.cpu == "maximum" and offered.tcg_cpu_features == ("avx2", "bmi2")
    assert KEY.tcg_cpu_features == ()
    with ExitStack() as stack:
        slot, why = warm.acquire(image, offered, stack)
    assert slot is not None, why


def test_other_scratch_size_or_old_link_falls_back(tmp_path):
    image = Image("x", tmp_path / "images" / "x")
    make_slot(image, 0, dataclasses.replace(KEY, link=1))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, dataclasses.replace(KEY, scratch_bytes=4 * 1024**3), stack)
    assert slot is None and "scratch_bytes" in why and "link 1, not 4" in why


def test_hello_carries_fresh_randomness_and_the_host_clock():
    before = time.time()
    first, second = warm.HELLO.greeting(), warm.HELLO.greeting()
    assert len(first) == warm.SEED_BYTES + warm.CLOCK.size
    assert first[:warm.SEED_BYTES] != second[:warm.SEED_BYTES]
    seconds, nanoseconds = warm.CLOCK.unpack(first[warm.SEED_BYTES:])
    assert before - 1 <= seconds + nanoseconds / 1e9 <= time.time()
    assert struct.calcsize("!qq") == warm.CLOCK.size


def test_ready_line_gives_the_guest_link_protocol(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"boot noise\nvmiso-ssh-link: waiting protocol=2\n")
    assert warm._wait_ready(log, time.monotonic() + 5, lambda: True) == 2
    log.write_bytes(b"vmiso-ssh-link: waiting\n")  # an image provisioned by an older vmiso
    assert warm._wait_ready(log, time.monotonic() + 5, lambda: True) == 1


class VersionOnly:
    def version(self) -> str:
        return "libvirt 9.0, QEMU 7.2"


def test_a_warm_state_is_made_for_the_accelerator_runs_resolve(tmp_path, monkeypatch):
    # The manifest records the accelerator of the provisioning; 'images warm' under
    # another one must make states that runs under it can use.

    image = Image("x", tmp_path / "images" / "x")
    image.path.mkdir(parents=True)
    (image.path / "manifest.json").write_text(json.dumps({"sha256": "a" * 64, "accel": "kvm"}))
    built = []
    monkeypatch.setattr(warm, "build", lambda hv, image, key, steps, boot_timeout: built.append(key))
    warm.make_warm_state(config_mod.load(None, env={"VMISO_ACCEL": "tcg"}), VersionOnly(), image, None)
    assert built[0].accel == "tcg" and built[0].cpu == "maximum -avx2 -bmi2"
    default_limits = InputLimits(config_mod.RunConfig.input_max_bytes, config_mod.RunConfig.input_max_files)
    assert built[0] == dataclasses.replace(KEY, memory_mib=512, cpus=2, inputs_bytes=inputs.disk_bytes(default_limits))


def test_build_saves_slots_that_a_run_then_restores(tmp_path):

    from vmiso.progress import Steps


    state = tmp_path / "state"
    image = make_image(state)
    cfg = config_mod.override(config_mod.load(None, env={"VMISO_ACCEL": "tcg"}), state_dir=state,
                              libvirt_uri="test:///default", **{"run.scratch": config_mod.MIN_SCRATCH})
    hv = FakeHypervisor()
    hv.console = b"[ 1.0] boot\nvmiso-ssh-link: waiting protocol=4\n"
    warm.make_warm_state(cfg, hv, image, Steps())
    found = warm.slots(image)
    assert [s.clone.path.name for s in found] == ["slot-0", "slot-1"]
    for slot in found:
        info = json.loads(slot.info.read_text())
        assert info["accel"] == "tcg" and info["link"] == 4 and info["scratch_bytes"] == cfg.run.scratch
        assert info["inputs_bytes"] >= cfg.run.input_max_bytes
        assert not slot.clone.inputs_disk.exists()  # each run restores with its own
        assert slot.clone.overlay.stat().st_mode & 0o777 == 0o444
        assert slot.state.stat().st_mode & 0o777 == 0o400
        assert not (slot.clone.path / "owner.json").exists() and not slot.clone.ssh_socket.exists()
    assert not hv.running and len(hv.destroyed) == 2
    assert not list(warm.warm_root(image).glob(".building-*"))

    result = run.run(plan_run(cfg, RunRequest(command=("true",), image="x")), hv, io.BytesIO(), io.BytesIO(),
                     connect=FakeConnect(exits(0)))
    assert result.boot == "warm" and len(hv.restored) == 1


def test_a_clone_that_stops_before_it_is_ready_leaves_nothing(tmp_path):
    from vmiso.progress import Steps


    image = make_image(tmp_path / "state")
    hv = FakeHypervisor()
    hv.console = b"Kernel panic\n"
    hv.start_transient = lambda name, xml, autodestroy=True: None  # it never runs
    with pytest.raises(GuestError, match="stopped before it was ready"):
        warm.build(hv, image, KEY, Steps(), count=1)
    assert warm.slots(image) == [] and not list(warm.warm_root(image).glob(".building-*"))


def test_an_old_ssh_link_is_saved_with_a_warning(tmp_path, caplog):


    image = make_image(tmp_path / "state")
    hv = FakeHypervisor()
    hv.console = b"vmiso-ssh-link: waiting\n"
    warm.build(hv, image, dataclasses.replace(KEY, scratch_bytes=64 * 1024**2), Steps(), count=1)
    assert "speaks protocol 1, this vmiso 4" in caplog.text
    assert json.loads(warm.slots(image)[0].info.read_text())["link"] == 1


def test_the_ready_wait_ends_at_its_deadline(tmp_path):

    with pytest.raises(GuestError, match="not ready to be saved in time"):
        warm._wait_ready(tmp_path / "missing.log", time.monotonic() + 0.15, lambda: True)


def test_an_unreadable_or_unfit_slot_is_not_used(tmp_path):

    image = Image("x", tmp_path / "images" / "x")
    (warm.warm_root(image) / "slot-0").mkdir(parents=True)  # no warm.json
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None and "slot-0 is unreadable" in why

    class SavedXml:
        def saved_xml(self, path):
            return "<domain><name>vmiso-warm-x-0</name></domain>"
    with pytest.raises(ImageError, match="does not fit a run"):
        warm.restore_xml(SavedXml(), warm.Slot(CloneDir(tmp_path / "slot-0")), clone=CloneDir(tmp_path / "run"),
                         template=tmp_path / "template.qcow2", metadata={})
