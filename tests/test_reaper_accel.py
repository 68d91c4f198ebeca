import json
import os
import subprocess
import sys

import pytest

from vmiso import accel
from vmiso.errors import AccelError
from vmiso.host import reaper, state as state_dirs, workdir

from fakes import FakeHypervisor


def test_owner_alive_for_this_process_and_dead_for_an_ended_one(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    workdir.claim(mine)
    assert workdir.owner_alive(mine)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / workdir.OWNER_FILE).write_text(json.dumps({"pid": int(ended.stdout), "start": 1}))
    assert not workdir.owner_alive(dead)
    # A reused pid with another start time is not the owner.
    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / workdir.OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": 1}))
    assert not workdir.owner_alive(reused)
    assert not workdir.owner_alive(tmp_path / "missing")


def test_find_and_collect_orphaned_directories_without_libvirt(tmp_path):
    state = tmp_path / "state"
    for path in (state / "runs" / "live", state / "runs" / "orphan", state / "images" / ".building-x-1"):
        path.mkdir(parents=True)
    workdir.claim(state / "runs" / "live")
    found = {(i.kind, i.name) for i in reaper.find(None, state)}
    assert found == {("run directory", "orphan"), ("image build", ".building-x-1")}
    reaper.collect(None, state)
    assert sorted(p.name for p in (state / "runs").iterdir()) == ["live"]
    assert list((state / "images").iterdir()) == []


# Another vmiso's reaper, as every vmiso run starts with one: what it finds and removes in a state directory
# (the user's own part of it being the state directory itself, as root's is: conftest's stand-in for others).
_OTHER_REAPER = ("import sys; from pathlib import Path; from vmiso.host import reaper, state; "
                 "state.home = state.Home; "
                 "print(' '.join(i.name for i in reaper.collect(None, Path(sys.argv[1]))))")


def _other_reaper(state_dir):
    done = subprocess.run([sys.executable, "-c", _OTHER_REAPER, str(state_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_directory_being_made_is_never_another_vmisos_leftover(tmp_path):
    """vmiso batch -j 2 starts two runs at once: one's reaper ran while the other's run directory
    existed without its owner record, took it for a dead run's and removed it (that run failed, 125)."""
    state = tmp_path / "state"
    runs = state / "runs"
    runs.mkdir(parents=True)
    collected = []

    def make(path):
        path.mkdir()
        collected.extend(_other_reaper(state))  # while the directory has no owner record yet

    made = state_dirs.claimed_dir(runs / "run1", make)
    assert collected == [] and made.is_dir() and workdir.owner_alive(made)
    assert sorted(p.name for p in runs.iterdir()) == ["run1"]
    assert _other_reaper(state) == []  # and once it has its name
    # Made the old way, the same directory without its record is a dead run's: removed.
    plain = runs / "run2"
    plain.mkdir()
    assert _other_reaper(state) == ["run2"] and not plain.exists()


def test_what_a_maker_killed_mid_claim_leaves_is_collected_and_a_failed_make_leaves_nothing(tmp_path):
    state = tmp_path / "state"
    runs = state / "runs"
    runs.mkdir(parents=True)
    killed = subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                             "from vmiso.host import state; "
                             "state.claimed_dir(Path(sys.argv[1]), lambda p: (p.mkdir(), os._exit(9)))",
                             str(runs / "run1")], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    left = [p.name for p in runs.iterdir()]
    assert len(left) == 1 and left[0].startswith("run1" + state_dirs.CLAIMING)
    assert [(i.kind, i.name) for i in reaper.find(None, state)] == [("run directory", left[0])]
    assert _other_reaper(state) == left and list(runs.iterdir()) == []

    def failing(path):
        path.mkdir()
        (path / "half").write_text("made")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        state_dirs.claimed_dir(runs / "run2", failing)
    assert list(runs.iterdir()) == []


def test_accel_tcg_is_explicit_and_warns(caplog):
    assert accel.resolve("tcg", kvm_check=lambda: None) == "tcg"
    assert "not treat TCG as a security boundary" in caplog.text
    assert "avx2" not in caplog.text


def test_offering_a_withheld_cpu_feature_warns_that_results_may_be_wrong(caplog):
    assert accel.resolve("tcg", kvm_check=lambda: None, tcg_cpu_features=("avx2",)) == "tcg"
    assert "offers avx2 to the guest, though its gathers read the wrong memory" in caplog.text
    assert "results computed with it may be wrong" in caplog.text
    caplog.clear()
    assert accel.resolve("tcg", kvm_check=lambda: None, tcg_cpu_features=("bmi2",)) == "tcg"
    assert "offers bmi2 to the guest, though no real CPU has BMI2 without AVX2" in caplog.text
    caplog.clear()
    assert accel.resolve("auto", kvm_check=lambda: None, tcg_cpu_features=("avx2",)) == "kvm"
    assert "avx2" not in caplog.text  # KVM passes the host's CPU through: nothing is withheld


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


def test_orphaned_warm_builds_are_found(tmp_path):
    state = tmp_path / "state"
    (state / "warm" / "x" / ".building-slot-0-abc").mkdir(parents=True)
    (state / "warm" / "x" / "slot-0").mkdir()
    (state / "images" / "x").mkdir(parents=True)
    (state / "images" / "x" / "manifest.json").write_text("{}")
    found = [(i.kind, i.name) for i in reaper.find(None, state)]
    assert found == [("warm state build", ".building-slot-0-abc")]


def test_mounts_below_deepest_first(tmp_path):
    from vmiso.host.workdir import mounts_below

    mounts = tmp_path / "mounts"
    base = tmp_path / "build"
    mounts.write_text(
        f"proc {base}/root/proc proc rw 0 0\n"
        f"sysfs {base}/root/sys sysfs rw 0 0\n"
        f"devpts {base}/root/dev/pts devpts rw 0 0\n"
        f"tmpfs {tmp_path}/build-other tmpfs rw 0 0\n"
        f"tmpfs {base}/with\\040space tmpfs rw 0 0\n"
        "/dev/vda / ext4 rw 0 0\n")
    found = mounts_below(base, mounts)
    assert found[0] == base / "root/dev/pts"
    assert set(found) == {base / "root/proc", base / "root/sys", base / "root/dev/pts", base / "with space"}


def test_install_dir_replaces_only_when_complete(tmp_path):
    from vmiso.host.state import replaced
    from vmiso.host.workdir import install_dir

    final = tmp_path / "image"
    first = tmp_path / ".building-1"
    first.mkdir()
    (first / "v").write_text("1")
    install_dir(first, final, replaced(final))
    second = tmp_path / ".building-2"
    second.mkdir()
    (second / "v").write_text("2")
    install_dir(second, final, replaced(final))
    assert (final / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]


def test_mounts_below_a_non_ascii_directory(tmp_path):
    # /proc/mounts holds the path's UTF-8 bytes as they are and escapes only
    # space, tab, newline and backslash as octal.
    from vmiso.host.workdir import mounts_below

    base = tmp_path / "état" / "build"
    mounts = tmp_path / "mounts"
    mounts.write_bytes(f"proc {base}/root/proc proc rw 0 0\n".encode()
                       + f"tmpfs {base}/a\\134b\\011c tmpfs rw 0 0\n".encode())
    assert set(mounts_below(base, mounts)) == {base / "root/proc", base / "a\\b\tc"}


def test_a_leftover_deeper_than_the_recursion_limit_does_not_stop_gc(tmp_path, deep_tree):
    out = tmp_path / "state" / "runs" / "dead" / "out"
    out.mkdir(parents=True)
    deep_tree(out, 3000, "d" * 30, file_every=10)  # what a job may leave in its share
    removed = reaper.collect(None, tmp_path / "state")
    assert [(i.kind, i.name) for i in removed] == [("run directory", "dead")]
    assert list((tmp_path / "state" / "runs").iterdir()) == []


def test_gc_goes_on_past_what_it_cannot_remove_and_says_so(tmp_path, monkeypatch, caplog):
    runs = tmp_path / "state" / "runs"
    (runs / "a-stuck" / "out" / "locked").mkdir(parents=True)
    (runs / "a-stuck" / "out" / "locked" / "file").write_text("x")
    (runs / "b-fine" / "out").mkdir(parents=True)
    locked = runs / "a-stuck" / "out" / "locked"
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        real_unlink = os.unlink  # no chattr here: a fake that refuses as an immutable directory does

        def unlink(name, *, dir_fd=None):
            if name == "file":
                raise PermissionError(1, os.strerror(1))
            real_unlink(name, dir_fd=dir_fd)
        monkeypatch.setattr(os, "unlink", unlink)
    try:
        cleaned = reaper.clean(None, tmp_path / "state")
        assert [i.name for i in cleaned.removed] == ["b-fine"]
        assert [(i.name, why) for i, why in cleaned.failed] == [
            ("a-stuck", "a-stuck/out/locked/file: Operation not permitted")]
        assert reaper.collect(None, tmp_path / "state") == []
        assert "could not remove run directory a-stuck: a-stuck/out/locked/file" in caplog.text
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    assert sorted(p.name for p in runs.iterdir()) == ["a-stuck"]


def test_a_run_directory_is_removed_whatever_its_guest_left(tmp_path, deep_tree):
    run_dir = tmp_path / "runs" / "mine"
    (run_dir / "out").mkdir(parents=True)
    deep_tree(run_dir / "out", 2000, "r" * 255)  # 512,000 bytes of path
    (run_dir / "out" / "link").symlink_to(tmp_path / "runs")
    assert reaper.remove(run_dir)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_killed_owner_not_yet_reaped_is_dead(tmp_path):
    # A vmiso killed with SIGKILL stays a zombie until its parent (or a slow PID 1) reaps it:
    # gc must not take that for a live owner.
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; from vmiso.host import workdir; from pathlib import Path; "
                              "workdir.claim(Path(sys.argv[1])); print('claimed', flush=True); time.sleep(60)",
                              str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "claimed\n"
    assert workdir.owner_alive(tmp_path)
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, and left unreaped
    assert not workdir.owner_alive(tmp_path)
    child.wait()


def test_warm_states_of_a_removed_image_are_leftovers(tmp_path):
    state = tmp_path / "state"
    (state / "warm" / "gone" / "slot-0").mkdir(parents=True)
    (state / "warm" / "kept" / "slot-0").mkdir(parents=True)
    (state / "images" / "kept").mkdir(parents=True)
    (state / "images" / "kept" / "manifest.json").write_text("{}")
    found = [(i.kind, i.name) for i in reaper.find(None, state)]
    assert found == [("warm states of removed image", "gone")]
    reaper.clean(None, state)
    assert sorted(p.name for p in (state / "warm").iterdir()) == ["kept"]


def test_a_leftover_vm_whose_name_was_reused_is_left_alone(tmp_path):
    # A killed run's restored clone keeps its warm slot's name; the next restore of that
    # slot (another run's, a pool's) takes the name on.  The reaper destroys only while the
    # domain is still the dead run's (Hypervisor.destroy_run), never by name alone.
    from vmiso.domain import DomainInfo

    dead = tmp_path / "runs" / "gone"
    dead.mkdir(parents=True)

    class Reused(FakeHypervisor):
        asked: list[tuple[str, str]]

        def vmiso_domains(self) -> list:
            return [DomainInfo("vmiso-warm-x-0-abc", True, {"run_dir": str(dead)})]

        def destroy_run(self, name: str, run_dir: str) -> str:
            self.asked.append((name, run_dir))
            return "another run's"

    hv = Reused()
    hv.asked = []
    cleaned = reaper.clean(hv, tmp_path)
    assert hv.asked == [("vmiso-warm-x-0-abc", str(dead))]
    assert hv.destroyed == []
    assert [i.kind for i in cleaned.removed] == ["run directory"]


def test_an_interrupted_images_rm_or_replace_is_collected_by_gc_and_listed_by_doctor(tmp_path):
    # 'images rm' renames the image out of the store, then removes it; a replacement puts the
    # older image (or warm slot) aside, then removes it: a template's size each, if killed.
    from vmiso import config as config_mod, doctor
    from vmiso.errors import HypervisorError

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead, alive = int(ended.stdout), os.getpid()
    state = tmp_path / "state"
    images = state / "images"
    for name in (f".removing-old-{dead}", f".replaced-new-{dead}", f".removing-busy-{alive}"):
        (images / name).mkdir(parents=True)
        (images / name / "template.qcow2").write_bytes(b"\0" * 4096)
    (images / "new").mkdir()
    (images / "new" / "manifest.json").write_text("{}")
    (state / "warm" / "new" / f".replaced-slot-0-{dead}").mkdir(parents=True)
    (state / "warm" / "new" / f".replaced-slot-1-{alive}").mkdir()
    found = [(i.kind, i.name) for i in reaper.find(None, state)]
    assert found == [("image removal", f".removing-old-{dead}"), ("replaced image", f".replaced-new-{dead}"),
                     ("replaced warm state", f".replaced-slot-0-{dead}")]

    def no_libvirt(uri: str):
        raise HypervisorError(f"cannot connect to libvirt at {uri}")
    config = config_mod.override(config_mod.load(None, env={}), state_dir=state)
    (leftovers,) = [c for c in doctor.run_checks(config, connect=no_libvirt) if c.name == "leftovers"]
    assert not leftovers.ok and leftovers.fix == "remove them with 'vmiso gc'"
    assert leftovers.detail == (f"image removal .removing-old-{dead}, replaced image .replaced-new-{dead}, "
                                f"replaced warm state .replaced-slot-0-{dead}")
    cleaned = reaper.clean(None, state)
    assert len(cleaned.removed) == 3 and cleaned.failed == []
    # What a live vmiso is removing or replacing is its own to finish.
    assert sorted(p.name for p in images.iterdir()) == [f".removing-busy-{alive}", "new"]
    assert [p.name for p in (state / "warm" / "new").iterdir()] == [f".replaced-slot-1-{alive}"]
