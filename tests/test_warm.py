import dataclasses
import json
import struct
import time
from contextlib import ExitStack

from vmiso import warm
from vmiso.image.store import Image

KEY = warm.WarmKey.make(template_sha256="a" * 64, hypervisor="libvirt 9.0, QEMU 7.2", accel="tcg",
                        memory_mib=512, cpus=2, scratch_bytes=2 * 1024**3)


def make_slot(image: Image, index: int, key: warm.WarmKey = KEY) -> None:
    slot = warm.warm_root(image) / f"slot-{index}"
    slot.mkdir(parents=True)
    (slot / warm.INFO).write_text(json.dumps(dataclasses.asdict(key)))


def test_no_warm_state_says_how_to_make_one(tmp_path):
    image = Image("x", tmp_path)
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None and "vmiso images warm x" in why


def test_slots_are_exclusive_and_freed(tmp_path):
    image = Image("x", tmp_path)
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
    image = Image("x", tmp_path)
    make_slot(image, 0, dataclasses.replace(KEY, template_sha256="b" * 64, hypervisor="libvirt 9.0, QEMU 8.0"))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None
    assert "another template_sha256, hypervisor" in why


def test_other_memory_size_falls_back(tmp_path):
    image = Image("x", tmp_path)
    make_slot(image, 0)
    with ExitStack() as stack:
        slot, why = warm.acquire(image, dataclasses.replace(KEY, memory_mib=1024), stack)
    assert slot is None and "memory_mib" in why


def test_another_cpu_model_falls_back_and_names_both(tmp_path):
    # A state saved before the CPU was chosen on purpose (no model recorded) or for
    # another one must not be restored onto this CPU.
    image = Image("x", tmp_path)
    make_slot(image, 0, dataclasses.replace(KEY, cpu="host-passthrough"))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, KEY, stack)
    assert slot is None and "another cpu (cpu host-passthrough, not maximum)" in why
    assert KEY.cpu == "maximum"


def test_other_scratch_size_or_old_link_falls_back(tmp_path):
    image = Image("x", tmp_path)
    make_slot(image, 0, dataclasses.replace(KEY, link=1))
    with ExitStack() as stack:
        slot, why = warm.acquire(image, dataclasses.replace(KEY, scratch_bytes=4 * 1024**3), stack)
    assert slot is None and "scratch_bytes" in why and "link 1, not 2" in why


def test_hello_carries_fresh_randomness_and_the_host_clock():
    before = time.time()
    first, second = warm.hello(), warm.hello()
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
    from vmiso import config

    image = Image("x", tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"sha256": "a" * 64, "accel": "kvm"}))
    built = []
    monkeypatch.setattr(warm, "build", lambda hv, image, key, steps, boot_timeout: built.append(key))
    warm.make_warm_state(config.load(None, env={"VMISO_ACCEL": "tcg"}), VersionOnly(), image, None)
    assert built[0].accel == "tcg" and built[0].cpu == "maximum"
    assert built[0] == dataclasses.replace(KEY, memory_mib=512, cpus=2)
