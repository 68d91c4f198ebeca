import json
import os
import subprocess
import sys

import pytest

from vmiso import accel, gc
from vmiso.errors import AccelError


def test_owner_alive_for_this_process_and_dead_for_an_ended_one(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    gc.claim(mine)
    assert gc.owner_alive(mine)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / gc.OWNER_FILE).write_text(json.dumps({"pid": int(ended.stdout), "start": 1}))
    assert not gc.owner_alive(dead)
    # A reused pid with another start time is not the owner.
    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / gc.OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": 1}))
    assert not gc.owner_alive(reused)
    assert not gc.owner_alive(tmp_path / "missing")


def test_find_and_collect_orphaned_directories_without_libvirt(tmp_path):
    state = tmp_path / "state"
    for path in (state / "runs" / "live", state / "runs" / "orphan", state / "images" / ".building-x-1"):
        path.mkdir(parents=True)
    gc.claim(state / "runs" / "live")
    found = {(i.kind, i.name) for i in gc.find(None, state)}
    assert found == {("run directory", "orphan"), ("image build", ".building-x-1")}
    gc.collect(None, state)
    assert sorted(p.name for p in (state / "runs").iterdir()) == ["live"]
    assert list((state / "images").iterdir()) == []


def test_accel_tcg_is_explicit_and_warns(caplog):
    assert accel.resolve("tcg", kvm_check=lambda: None) == "tcg"
    assert "not treat TCG as a security boundary" in caplog.text


def test_accel_auto_uses_kvm_only_when_it_works():
    assert accel.resolve("auto", kvm_check=lambda: None) == "kvm"
    with pytest.raises(AccelError) as err:
        accel.resolve("auto", kvm_check=lambda: "kvm_pvm cannot run a normal guest kernel")
    assert "kvm_pvm" in str(err.value) and "accel: tcg" in str(err.value)
    with pytest.raises(AccelError):
        accel.resolve("kvm", kvm_check=lambda: "/dev/kvm does not exist")


def test_kvm_problem_reads_the_host(tmp_path):
    modules = tmp_path / "module"
    (modules / "kvm_pvm").mkdir(parents=True)
    assert "kvm_pvm" in accel.kvm_problem(tmp_path / "kvm", modules)
    (modules / "kvm_pvm").rmdir()
    assert "does not exist" in accel.kvm_problem(tmp_path / "kvm", modules)
