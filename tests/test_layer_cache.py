"""The cache of OS layers: what 'vmiso gc --layers' removes, and what it must leave."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack

import pytest
import yaml

from vmiso.host import reaper
from vmiso.image.layer import (
    Layer,
    building_layer,
    cached_layers,
    hold_layer,
    publish_layer,
    remove_cached_layers,
)


def fake_layer(state, key, size=4096):
    path = state / "layers" / key
    path.mkdir(parents=True)
    (path / "rootfs.img").write_bytes(b"x" * size)
    return Layer(key, path)


def test_layers_in_use_are_kept_and_the_others_removed(tmp_path):
    used, unused = fake_layer(tmp_path, "aaaa"), fake_layer(tmp_path, "bbbb", 1 << 20)
    assert [(c.key, c.size >= 1 << 20) for c in cached_layers(tmp_path)] == [("aaaa", False), ("bbbb", True)]
    with ExitStack() as held:
        assert hold_layer(used, held)
        removed, kept = remove_cached_layers(tmp_path)
        assert [c.key for c in removed] == ["bbbb"] and [c.key for c in kept] == ["aaaa"]
        assert used.rootfs.exists() and not unused.path.exists()
    # Once the provisioning is done, the layer can go; a later hold sees that it went.
    removed, kept = remove_cached_layers(tmp_path)
    assert [c.key for c in removed] == ["aaaa"] and kept == []
    with ExitStack() as held:
        assert not hold_layer(used, held)
    assert list((tmp_path / "layers").iterdir()) == []


def test_a_cut_short_removal_is_a_leftover(tmp_path):
    doomed = tmp_path / "layers" / ".removing-cccc"
    doomed.mkdir(parents=True)
    (doomed / "rootfs.img").write_bytes(b"x")
    assert [(i.kind, i.name) for i in reaper.find(None, tmp_path)] == [("OS layer removal", ".removing-cccc")]
    reaper.collect(None, tmp_path)
    assert not doomed.exists()


@pytest.mark.root(reason="vmiso, in processes of its own, keeps its state as root's")
@pytest.mark.hostsetup(reason="vmiso gc connects to libvirtd")
def test_cli_gc_layers(tmp_path):
    fake_layer(tmp_path / "state", "dddd", 3 * 1024**2)
    config = tmp_path / "vmiso.yaml"
    config.write_text(yaml.safe_dump({"accel": "tcg", "state_dir": str(tmp_path / "state")}))
    vmiso = [sys.executable, "-m", "vmiso"]
    doctor = subprocess.run([*vmiso, "doctor", "-c", str(config)], capture_output=True, text=True)
    assert "layer cache: 1 cached OS layer(s)" in doctor.stdout and "vmiso gc --layers" in doctor.stdout
    plain = subprocess.run([*vmiso, "gc", "-c", str(config)], capture_output=True, text=True, check=True)
    assert "nothing to remove" in plain.stdout and (tmp_path / "state/layers/dddd").exists()
    done = subprocess.run([*vmiso, "gc", "--layers", "-c", str(config)], capture_output=True, text=True,
                          check=True)
    assert "removed OS layer dddd (3 MiB)" in done.stdout
    assert not (tmp_path / "state/layers/dddd").exists()


def test_a_concurrent_build_of_the_same_layer_keeps_the_first(tmp_path):
    first, second, final = tmp_path / ".building-1", tmp_path / ".building-2", tmp_path / "key"
    for work, text in ((first, "first"), (second, "second")):
        work.mkdir()
        (work / "rootfs.img").write_text(text)
    publish_layer(first, final)
    publish_layer(second, final)  # rename(2) refuses a non-empty target: the first stays
    assert (final / "rootfs.img").read_text() == "first"
    assert not first.exists() and not second.exists()


def test_a_layer_build_is_private_until_published(tmp_path):
    with building_layer(tmp_path / "layers", "eeee") as work:
        assert work.stat().st_mode & 0o777 == 0o700
        (work / "rootfs.img").write_bytes(b"x")
    assert (tmp_path / "layers/eeee").stat().st_mode & 0o777 == 0o755
