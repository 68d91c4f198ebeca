import dataclasses
import json
from contextlib import ExitStack

from vmiso import warm
from vmiso.image.store import Image

KEY = warm.WarmKey(template_sha256="a" * 64, hypervisor="libvirt 9.0, QEMU 7.2", accel="tcg",
                   memory_mib=512, cpus=2)


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
