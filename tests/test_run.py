"""run.run without a VM: a small fake hypervisor and a fake SSH session play the guest.

What is real: the run directory, the inputs' staging, the overlay and scratch disks
(qemu-img, mkfs.ext4), the warm slots and their locks, the domain XML, the output
watch and the output checks.  What is fake: libvirt (FakeHypervisor records what it
was asked) and the guest's sshd (FakeSession runs a Python function as "the job").
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmiso import config as config_mod, run
from vmiso.clones import warm
from vmiso.clones.clone import clone_spec, make_clone_dir
from vmiso.domain import domain_xml
from vmiso.errors import GuestError, HypervisorError, ImageError, OutputError, RunTimeout, VmisoError
from vmiso.host import inputs, sharemount, workdir
from vmiso.host.inputs import InputLimits
from vmiso.image.store import Image, remember
from vmiso.plan import RunRequest, plan_run
from vmiso.progress import Steps
from vmiso.ssh import JobExit

from fakes import VERSION, FakeConnect, FakeHypervisor, Job, exits, fake_host_config, guest_inputs, make_image

MiB = 1024**2

@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def config(state: Path) -> config_mod.Config:
    return fake_host_config(state)


@pytest.fixture
def image(state: Path) -> Image:
    return make_image(state)


def request(*command: str, **changes) -> RunRequest:
    return RunRequest(command=command or ("python", "job.py"), image="x", **changes)


def do_run(config, hv, req, connect, steps=None) -> tuple[run.RunResult, bytes, bytes]:
    stdout, stderr = io.BytesIO(), io.BytesIO()
    result = run.run(plan_run(config, req), hv, stdout, stderr, steps, connect=connect)
    return result, stdout.getvalue(), stderr.getvalue()


def leftovers(state: Path) -> list[str]:
    runs = state / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def test_a_cold_run_from_start_to_cleanup(config, image, state, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    hv, connect = FakeHypervisor(), FakeConnect(exits(0, b"done\n"))
    result, out, _ = do_run(config, hv, request(inputs=(data,)), connect)
    assert out == b"done\n"
    assert result.exit_code == 0 and result.signal is None and result.boot == "cold"
    assert result.image == "x" and result.memory_mib == 512 and result.scratch_bytes == config_mod.MIN_SCRATCH
    assert list(result.timings) == ["verify", "stage", "kernel", "overlay", "start", "connect", "exec", "teardown",
                                    "cleanup"]
    (name,) = hv.started
    assert "<interface" not in hv.started[name]  # no network device
    assert " vmiso.prefetch=4096<" in hv.started[name]  # its inputs' image, read ahead at boot
    assert hv.destroyed[0] == name and not hv.running
    assert connect.calls[0]["hello"] is None and connect.calls[0]["host_key"] == "ssh-ed25519 AAAA pinned\n"
    session = connect.sessions[0]
    assert session.closed
    assert session.commands[0].endswith("python job.py") and "VMISO_OUT=/out" in session.commands[0]
    assert leftovers(state) == []


def test_the_job_sees_its_inputs_and_its_outputs_are_collected(config, image, state, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")

    def job(session, stdout, stderr):
        assert (guest_inputs(session.clone, tmp_path / "seen") / "data.csv").read_text() == "a,b\n"
        (session.clone.outputs / "result.txt").write_text("42\n")
        return JobExit(code=0)
    result, _, _ = do_run(config, FakeHypervisor(), request(inputs=(data,), output=tmp_path / "out"),
                          FakeConnect(job))
    assert (tmp_path / "out" / "result.txt").read_text() == "42\n"
    assert [f["path"] for f in result.as_dict()["outputs"]["files"]] == ["result.txt"]
    assert "collect" in result.timings


def test_what_a_job_leaves_in_its_share_never_fails_its_run(config, image, state, tmp_path, deep_tree):
    def nest(session, stdout, stderr):  # past the recursion limit that shutil.rmtree hit, and PATH_MAX
        deep_tree(session.clone.outputs, 1500, "x" * 100)
        return JobExit(code=0)
    result, _, _ = do_run(config, FakeHypervisor(), request(output=tmp_path / "out"), FakeConnect(nest))
    assert result.exit_code == 0 and result.outputs.files == []
    assert leftovers(state) == []


def test_a_signal_gives_128_plus_its_number(config, image):
    result, _, _ = do_run(config, FakeHypervisor(), request(),
                          FakeConnect(lambda s, o, e: JobExit(signal=signal.SIGKILL)))
    assert result.exit_code == 137 and result.signal == "SIGKILL"
    assert result.signal_message() == ("the job was killed by SIGKILL", "most likely the guest's out-of-memory "
                                       "killer: raise --memory (this run had 512 MiB)")


@pytest.mark.parametrize(("ending", "message"), [
    (JobExit(unknown_signal=True), "a signal that vmiso does not know"),
    (JobExit(), "ended without an exit status"),
])
def test_a_job_without_a_usable_status_is_a_guest_error(config, image, state, ending, message):
    hv = FakeHypervisor()
    with pytest.raises(GuestError, match=message):
        do_run(config, hv, request(), FakeConnect(lambda s, o, e: ending))
    assert not hv.running and leftovers(state) == []


def test_a_timeout_destroys_the_vm_and_cleans_up(config, image, state):
    hv = FakeHypervisor()
    with pytest.raises(RunTimeout, match="longer than 7 s") as err:
        do_run(config, hv, request(timeout=7), FakeConnect(lambda s, o, e: None))  # deadline passed
    assert err.value.exit_code == 124
    assert not hv.running and leftovers(state) == []


@pytest.mark.parametrize("wrote, said", [(["partial.txt"], "1 file it had written, checked, is in"),
                                         (["a.txt", "b.txt"], "2 files it had written, checked, are in"),
                                         ([], "nothing it had written to /out was kept")])
def test_a_job_stopped_by_its_timeout_keeps_what_it_wrote(config, image, state, tmp_path, wrote, said):
    def job(session, stdout, stderr):
        for name in wrote:
            (session.clone.outputs / name).write_text("so far\n")
        (session.clone.outputs / "link").symlink_to("/etc/passwd")  # checked as any output is
        return None  # the deadline passed
    with pytest.raises(RunTimeout) as err:
        do_run(config, FakeHypervisor(), request(timeout=7, output=tmp_path / "out"), FakeConnect(job))
    assert said in str(err.value) and "longer than 7 s" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*wrote, "MANIFEST"])
    assert [f["path"] for f in err.value.record["outputs"]["files"]] == sorted(wrote)
    assert [r["path"] for r in err.value.record["outputs"]["refused"]] == ["link"]
    assert leftovers(state) == []


@pytest.mark.root(reason="mounts a run's bounded /out")
def test_the_kernel_bounds_what_a_job_writes_to_out(config, image, state, tmp_path, caplog):
    """However fast it writes, a job gets "no space" once /out holds its limit; vmiso says
    so, and the collector refuses more than the limit."""
    config = config_mod.override(config, **{"run.output_max_files": 3, "run.output_max_bytes": 2 * MiB})
    written = {}

    def flood(session, stdout, stderr):
        out = session.clone.outputs
        with pytest.raises(OSError) as full:
            for i in range(1000):
                (out / f"f{i}").write_text("x")
        written["files"] = i
        assert full.value.errno == errno.ENOSPC
        for f in out.iterdir():
            f.unlink()
        with pytest.raises(OSError) as full, open(out / "big", "wb") as f:
            for _ in range(100):
                f.write(b"y" * MiB)
                f.flush()
        assert full.value.errno == errno.ENOSPC
        written["bytes"] = (out / "big").stat().st_size
        return JobExit(code=0)
    hv = FakeHypervisor()
    with pytest.raises(OutputError, match="more than 2097152 bytes to /out"):
        do_run(config, hv, request(output=tmp_path / "got"), FakeConnect(flood))
    assert 3 < written["files"] <= 3 + 16  # ext4 rounds inodes up to fill a table block
    assert 2 * MiB <= written["bytes"] <= 4 * MiB
    assert "the job filled /out: it may hold 2097152 bytes (run.output_max_bytes)" in caplog.text
    assert not hv.running and leftovers(state) == [] and not os.path.exists(tmp_path / "got/big")


def test_a_broken_link_is_an_error_and_still_cleans_up(config, image, state):
    def broken(session, stdout, stderr):
        raise GuestError("the SSH link broke while the job ran")
    hv = FakeHypervisor()
    with pytest.raises(GuestError, match="link broke"):
        do_run(config, hv, request(), FakeConnect(broken))
    assert not hv.running and leftovers(state) == []


def test_an_interrupt_cleans_up(config, image, state):
    def interrupted(session, stdout, stderr):
        raise KeyboardInterrupt
    hv = FakeHypervisor()
    with pytest.raises(KeyboardInterrupt):
        do_run(config, hv, request(), FakeConnect(interrupted))
    assert not hv.running and leftovers(state) == []


def test_bad_requests_are_refused_before_anything_is_made(config, image, state, tmp_path):
    hv = FakeHypervisor()
    with pytest.raises(VmisoError, match="no command"):
        run.run(plan_run(config, RunRequest(command=(), image="x")), hv, io.BytesIO(), io.BytesIO())
    with pytest.raises(VmisoError, match="does not exist"):
        do_run(config, hv, request(inputs=(tmp_path / "missing",)), FakeConnect(exits(0)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(OutputError):
        do_run(config, hv, request(output=tmp_path / "full"), FakeConnect(exits(0)))
    with pytest.raises(VmisoError, match="no image named 'y'"):
        do_run(config, hv, dataclasses.replace(request(), image="y"), FakeConnect(exits(0)))
    assert not hv.started and leftovers(state) == []


def test_a_mistyped_image_name_gets_the_nearest_one_and_a_missing_one_how_to_build_it(config, state):
    make_image(state, "realimg")
    hv = FakeHypervisor()
    with pytest.raises(VmisoError) as err:
        do_run(config, hv, dataclasses.replace(request(), image="realimgg"), FakeConnect(exits(0)))
    assert "no image named 'realimgg'" in str(err.value) and "(images: realimg)" in str(err.value)
    assert "did you mean 'realimg'?" in str(err.value) and "vmiso provision" not in str(err.value)
    with pytest.raises(VmisoError) as err:
        do_run(config, hv, dataclasses.replace(request(), image="default"), FakeConnect(exits(0)))
    assert "build it with 'vmiso provision' (image.name 'default' in its config)" in str(err.value)
    assert not hv.started


def test_too_little_room_for_the_scratch_disk_is_refused(config, image, state):
    config = config_mod.override(config, **{"run.scratch": 1024**5})  # a pebibyte
    hv = FakeHypervisor()
    with pytest.raises(VmisoError, match="scratch space and /out need up to"):
        do_run(config, hv, request(), FakeConnect(exits(0)))
    assert not hv.started and leftovers(state) == []


def test_a_self_linking_input_and_a_shared_output_are_refused_before_anything_is_made(config, image, state,
                                                                                       tmp_path):
    hv = FakeHypervisor()
    tree = tmp_path / "pkg"
    tree.mkdir()
    (tree / "a").symlink_to(".")
    (tree / "b").symlink_to(".")
    with pytest.raises(VmisoError, match="pkg/a is a symbolic link"):
        do_run(config, hv, request(inputs=(tree,)), FakeConnect(exits(0)))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OutputError, match="writable by others"):
        do_run(config, hv, request(output=shared), FakeConnect(exits(0)))
    assert not hv.started and leftovers(state) == []


def make_warm_slot(hv: FakeHypervisor, image: Image, config: config_mod.Config, index: int = 0,
                   **key_changes) -> warm.Slot:
    """A warm slot as warm.build leaves one, its saved state known to ``hv``."""
    sha256 = image.manifest()["sha256"]
    key = warm.WarmKey.make(template_sha256=sha256, hypervisor=VERSION, accel="tcg",
                            memory_mib=config.vm.memory_mib, cpus=config.vm.cpus, scratch_bytes=config.run.scratch,
                            inputs_bytes=inputs.disk_bytes(InputLimits(config.run.input_max_bytes,
                                                                       config.run.input_max_files)))
    key = dataclasses.replace(key, **key_changes)
    clone = make_clone_dir(warm.warm_root(image) / f"slot-{index}")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.template), "-F", "qcow2",
                    str(clone.overlay)], check=True)
    clone.scratch.write_bytes(b"\0" * 4096)
    slot = warm.Slot(clone)
    slot.state.write_bytes(b"saved")
    slot.info.write_text(json.dumps({**dataclasses.asdict(key), "sha256": {
        path.name: remember(path) for path in (clone.overlay, clone.scratch, slot.state)}}))
    name = f"vmiso-warm-x-{index}-abc"
    hv.saved[slot.state] = domain_xml(clone_spec(name=name, image=image, clone=clone, accel="tcg",
                                                 memory_mib=key.memory_mib, cpus=key.cpus, metadata={}))
    return slot


def test_a_warm_run_restores_a_fitting_slot_onto_a_fresh_overlay(config, image, state):
    hv = FakeHypervisor()
    slot = make_warm_slot(hv, image, config)
    connect = FakeConnect(exits(0))
    result, _, _ = do_run(config, hv, request(), connect)
    assert result.boot == "warm" and not hv.started
    (name,) = hv.restored
    assert name == "vmiso-warm-x-0-abc"  # a restored domain keeps its saved name
    vda = ET.fromstring(hv.restored[name]).find("devices/disk/target[@dev='vda']/..")
    assert "/runs/" in vda.find("source").get("file")
    assert vda.find("backingStore/source").get("file") == str(slot.clone.overlay)  # read only, never relabelled
    assert vda.find("backingStore/source/seclabel").get("relabel") == "no"
    hello = connect.calls[0]["hello"]
    assert hello.ready == warm.READY_LINE and connect.calls[0]["name"] == name
    # GO, then how much of the inputs disk to read ahead: its erofs image of no inputs, one block.
    assert hello.go == warm.GO + warm.PREFETCH.pack(4096)
    vdc = ET.fromstring(hv.restored[name]).find("devices/disk/target[@dev='vdc']/..")
    assert vdc.find("source").get("file").endswith("/inputs.img")  # the run's own inputs disk
    assert vdc.find("readonly") is not None and vdc.find("serial").text == "vmiso-in"
    assert not hv.running and leftovers(state) == []
    assert slot.state.read_bytes() == b"saved"


def test_a_warm_state_for_another_accelerator_boots_cold_and_says_why(config, image, caplog):
    hv = FakeHypervisor()
    make_warm_slot(hv, image, config, accel="kvm", cpu="host-passthrough")
    result, _, _ = do_run(config, hv, request(), FakeConnect(exits(0)))
    assert result.boot == "cold"
    assert "cold boot: no usable warm state: slot-0 was made for another accel, cpu" in caplog.text


def test_a_changed_warm_state_is_not_restored(config, image, state, caplog):
    hv = FakeHypervisor()
    slot = make_warm_slot(hv, image, config)
    slot.state.chmod(0o600)
    slot.state.write_bytes(b"SAVED")  # same size
    result, _, _ = do_run(config, hv, request(), FakeConnect(exits(0)))
    assert result.boot == "cold" and not hv.restored
    assert "could not be restored: warm state slot-0: state.save was changed" in caplog.text
    assert leftovers(state) == []


def test_a_changed_kernel_is_never_booted(config, image, state):
    hv = FakeHypervisor()
    image.kernel.write_bytes(b"a kernal")
    with pytest.raises(ImageError, match="image x: vmlinuz was changed"):
        do_run(config, hv, request(), FakeConnect(exits(0)))
    assert not hv.started and not hv.restored and leftovers(state) == []


def test_runs_boot_their_own_copies_of_the_kernel_and_leave_the_images_files_root_s(config, image, state):
    hv = FakeHypervisor()
    do_run(config, hv, request(), FakeConnect(exits(0)))
    root = ET.fromstring(next(iter(hv.started.values())))
    assert "/runs/" in root.findtext("os/kernel") and "/runs/" in root.findtext("os/initrd")
    vda = root.find("devices/disk/target[@dev='vda']/..")
    assert vda.find("backingStore/source").get("file") == str(image.template)
    assert vda.find("backingStore/source/seclabel").attrib == {"model": "dac", "relabel": "no"}


def test_a_failed_restore_falls_back_to_a_cold_boot(config, image, state, caplog):
    hv = FakeHypervisor()
    hv.fail_restore = True
    make_warm_slot(hv, image, config)
    result, _, _ = do_run(config, hv, request(), FakeConnect(exits(5)))
    assert result.boot == "cold" and result.exit_code == 5
    assert "the warm state slot-0 could not be restored" in caplog.text
    assert "vmiso-warm-x-0-abc" in hv.destroyed  # the half-restored domain
    assert leftovers(state) == []


def test_cold_is_cold_without_a_word(config, image, caplog):
    hv = FakeHypervisor()
    make_warm_slot(hv, image, config)
    result, _, _ = do_run(config, hv, request(warm=False), FakeConnect(exits(0)))
    assert result.boot == "cold" and "cold boot" not in caplog.text


def test_two_runs_share_no_slot(config, image):
    hv = FakeHypervisor()
    make_warm_slot(hv, image, config)
    boots = []

    def nested(session, stdout, stderr):  # a second run while the first holds the only slot
        boots.append(do_run(config, hv, request(), FakeConnect(exits(0)))[0].boot)
        return JobExit(code=0)
    first, _, _ = do_run(config, hv, request(), FakeConnect(nested))
    assert (first.boot, boots) == ("warm", ["cold"])


def test_steps_are_reported_as_they_happen(config, image):
    events = []
    steps = Steps(lambda event, step, detail, elapsed: events.append((event, step)))
    do_run(config, FakeHypervisor(), request(), FakeConnect(exits(0)), steps)
    assert ("start", "exec") in events and ("done", "cleanup") in events


def test_stdin_and_variables_reach_the_job(config, image):
    connect = FakeConnect(exits(0))
    stdin = io.BytesIO(b"input")
    run.run(plan_run(config, request(env=(("GREETING", "hello world"),))), FakeHypervisor(), io.BytesIO(), io.BytesIO(),
            stdin=stdin, connect=connect)
    session = connect.sessions[0]
    assert session.stdin is stdin and "'GREETING=hello world' python job.py" in session.commands[0]
    with pytest.raises(VmisoError, match="'1BAD' is not a valid environment variable name"):
        do_run(config, FakeHypervisor(), request(env=(("1BAD", "x"),)), connect)


def test_an_exit_status_no_process_can_have_is_refused():
    # 256 would wrap to 0 as vmiso's own exit status: a hostile guest's "success".
    from vmiso import run as run_mod
    from vmiso.errors import GuestError
    from vmiso.ssh import JobExit

    assert run_mod._judge(JobExit(code=255)) == (255, None)
    with pytest.raises(GuestError, match="exit status 256"):
        run_mod._judge(JobExit(code=256))


def test_the_first_interrupt_is_the_jobs_and_the_second_vmisos():
    interruption = run.Interruption(grace=0.2)
    assert interruption.request(signal.SIGINT) is False  # before the job runs: stop now
    interruption.job_running = True
    assert interruption.request(signal.SIGTERM) is True
    assert interruption.take() == signal.SIGTERM and interruption.take() is None  # passed on once
    assert interruption.request(signal.SIGINT) is False  # the second: stop now
    assert not interruption.expired()
    time.sleep(0.3)
    assert interruption.expired()


def test_a_job_that_outlives_its_grace_is_destroyed(config, image, state):
    interruption = run.Interruption(grace=0.0)

    def stubborn(session, stdout, stderr):
        assert interruption.request(signal.SIGINT)  # Ctrl-C while the job runs
        assert session.signals() == signal.SIGINT  # passed on to the job
        time.sleep(0.01)
        assert session.should_stop()  # the grace is over: the run stops waiting
        return None

    hv = FakeHypervisor()
    with pytest.raises(run.Interrupted, match="did not end within 0 s of SIGINT") as err:
        run.run(plan_run(config, request()), hv, io.BytesIO(), io.BytesIO(), connect=FakeConnect(stubborn),
                interruption=interruption)
    assert err.value.exit_code == 130
    assert not hv.running and leftovers(state) == []


def says(code: int, err: bytes) -> Job:
    def job(session, stdout, stderr):
        stderr.write(err)
        return JobExit(code=code)
    return job


def test_a_failure_the_vms_rules_explain_gets_one_line_each_and_the_jobs_output_is_untouched(config, image):
    said = (b"Traceback (most recent call last):\n  File \"job.py\", line 1, in <module>\n"
            b"ModuleNotFoundError: No module named 'matplotlib.pyplot'\n"
            b"urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name resolution>\n"
            b"OSError: [Errno 30] Read-only file system: '/in/result.csv'\n")
    result, _, err = do_run(config, FakeHypervisor(), request(), FakeConnect(says(1, said)))
    assert err == said
    offline, module, read_only = result.hints
    assert offline.startswith("this run has no network, on purpose")
    assert module == ("the job's output says image x has no module 'matplotlib': see what it holds with "
                      "'vmiso images show x'; to add a package, name it in the requirements from a source "
                      "you trust and provision again")
    assert read_only.startswith("/in is read-only: write results to /out")
    # A job that succeeds, or fails for reasons of its own, gets no hint.
    assert do_run(config, FakeHypervisor(), request(), FakeConnect(says(0, said)))[0].hints == ()
    assert do_run(config, FakeHypervisor(), request(), FakeConnect(says(2, b"usage: job.py\n")))[0].hints == ()


def test_failure_hints_take_nothing_from_the_guest_but_what_their_patterns_admit():
    hostile = b"ModuleNotFoundError: No module named 'x\x1b]0;pwned\x07'\n"
    assert run.failure_hints(hostile, "img") == ()
    # Only the last 16 KiB are kept: a hint is about how the job ended.
    tail = run.Tail(io.BytesIO(), size=16)
    tail.write(b"Name or service not known" + b"." * 40)
    assert run.failure_hints(tail.kept, "img") == ()


def test_a_networked_run_gets_its_gateway_and_proxy_and_an_offline_one_neither(config, image):
    seen = {}

    def job(session, stdout, stderr):
        seen["routes"] = sorted(getattr(session, "routes", {}))
        if seen["routes"]:
            guest, host_end = socket.socketpair()  # the job asks for a place it was not given
            threading.Thread(target=session.routes[3128], args=(host_end,), daemon=True).start()
            guest.sendall(b"CONNECT telemetry.example.net:443 HTTP/1.1\r\n\r\n")
            seen["answer"] = guest.recv(4096)
            guest.close()
            # a connection the job leaves open is cut when the run ends
            held, held_end = socket.socketpair()
            threading.Thread(target=session.routes[3128], args=(held_end,), daemon=True).start()
            seen["held"] = held
        return JobExit(code=0)
    connect = FakeConnect(job)
    networked = request(allow_hosts=("api.example.org",), allow_tcp=("5432:db.example.org:5432",))
    result, _, _ = do_run(config, FakeHypervisor(), networked, connect)
    assert seen["routes"] == [3128, 5432]
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in connect.sessions[0].commands[0]
    assert seen["answer"].startswith(b"HTTP/1.1 403 ")
    seen["held"].settimeout(10)
    assert seen["held"].recv(16) == b""  # the gateway closed it with the run
    assert result.network is not None and result.as_dict()["network"]["allow_tcp"] == ["5432:db.example.org:5432"]
    assert [row["host"] for row in result.network["refused"]] == ["telemetry.example.net:443"]

    offline, _, _ = do_run(config, FakeHypervisor(), request(), connect := FakeConnect(job))
    assert seen["routes"] == [] and offline.network is None
    assert "PROXY" not in connect.sessions[0].commands[0]


def test_a_networked_run_that_times_out_keeps_its_record(config, image, state):
    def job(session, stdout, stderr):
        guest, host_end = socket.socketpair()
        threading.Thread(target=session.routes[3128], args=(host_end,), daemon=True).start()
        guest.sendall(b"CONNECT telemetry.example.net:443 HTTP/1.1\r\n\r\n")
        guest.recv(4096)
        return None  # the deadline passed
    with pytest.raises(RunTimeout) as err:
        do_run(config, FakeHypervisor(), request(timeout=7, allow_hosts=("api.example.org",)), FakeConnect(job))
    assert err.value.record is not None and err.value.record["network"] is not None
    assert [row["host"] for row in err.value.record["network"]["refused"]] == ["telemetry.example.net:443"]
    assert leftovers(state) == []


def _check_schema(record: dict) -> None:
    assert set(record) == set(run.RECORD_KEYS), set(record) ^ set(run.RECORD_KEYS)
    for key, types in run.RECORD_KEYS.items():
        assert isinstance(record[key], types), (key, record[key])
    assert record["schema"] == run.RECORD_SCHEMA
    assert all(round(v, 3) == v for v in record["timings"].values())
    json.dumps(record)  # what --json writes


class RefusingHypervisor(FakeHypervisor):
    def start_transient(self, name: str, xml: str, *, autodestroy: bool = True) -> None:
        raise HypervisorError("the hypervisor would not start it")


def _outcome(config, tmp_path, how: str) -> dict:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "b.csv").write_text("b\n")
    (data / "a.csv").write_text("a\n")
    jobs = {"exit 0": exits(0), "exit 3": exits(3), "timeout": lambda s, o, e: None}
    req = request(inputs=(data, data / "a.csv") if how != "refused input" else (tmp_path / "missing",),
                  output=tmp_path / "out", timeout=5)
    hv = RefusingHypervisor() if how == "vmiso's error" else FakeHypervisor()
    try:
        result, _, _ = do_run(config, hv, req, FakeConnect(jobs.get(how, exits(0))))
    except VmisoError as err:
        assert err.record is not None
        return err.record
    return result.as_dict()


@pytest.mark.parametrize("how", ["exit 0", "exit 3", "timeout", "vmiso's error", "refused input"])
def test_every_outcome_has_one_record_shape(config, image, state, tmp_path, how):
    record = _outcome(config, tmp_path, how)
    _check_schema(record)
    assert record["command"] == ["python", "job.py"] and record["image"] == "x" and record["run_id"]
    if how == "refused input":  # refused before anything was made
        assert record["exit_code"] == 125 and "does not exist" in record["error"] and record["sha256"] is None
        assert record["inputs"] == [] and record["boot"] is None
        return
    assert record["sha256"] == image.manifest()["sha256"] and record["accel"] == "tcg"
    # The inputs as staged, each with its digest: a file's content, a directory's sha256sum lines.
    data, a = record["inputs"]
    assert a == {"name": "a.csv", "kind": "file", "bytes": 2, "files": 1,
                 "sha256": hashlib.sha256(b"a\n").hexdigest()}
    lines = "".join(f"{hashlib.sha256(text).hexdigest()}  {path}\n"
                    for path, text in (("a.csv", b"a\n"), ("sub/b.csv", b"b\n")))
    assert data == {"name": "data", "kind": "directory", "bytes": 4, "files": 2,
                    "sha256": hashlib.sha256(lines.encode()).hexdigest()}
    expected = {"exit 0": (0, None), "exit 3": (3, None), "timeout": (124, "the job ran longer than 5 s"),
                "vmiso's error": (125, "the hypervisor would not start it")}[how]
    assert record["exit_code"] == expected[0]
    assert (record["error"] is None) if expected[1] is None else expected[1] in record["error"]
    if how != "vmiso's error":
        assert record["boot"] == "cold" and record["outputs"] is not None


def test_a_directorys_digest_is_what_sha256sum_over_its_sorted_files_gives(tmp_path):
    from vmiso.host.inputs import InputLimits, stage_inputs

    tree = tmp_path / "in"
    for rel, text in (("b", "1"), ("a-b/x", "2"), ("a/b", "3"), ("a/c d", "4")):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    staging = tmp_path / "staged"
    staging.mkdir()
    [staged] = stage_inputs((tree,), staging, InputLimits(1 << 20, 100))
    listed = subprocess.run("find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0r sha256sum | sha256sum",
                            shell=True, cwd=tree, capture_output=True, text=True, check=True).stdout.split()[0]
    assert staged.sha256 == listed and staged.files == 4 and staged.bytes == 4


@pytest.mark.root(reason="mounts a small tmpfs for the state directory")
def test_inputs_whose_copy_and_image_would_not_fit_are_refused_before_a_vm(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "vmiso-test", str(small)], check=True)
    try:
        state = small / "state"
        make_image(state)
        config = fake_host_config(state, **{"run.output_max_bytes": 16 * 1024**2})
        plan = plan_run(config, request())
        base = plan.scratch_bytes + workdir.bounded_share_size(*plan.output_limits)
        free = shutil.disk_usage(small).free - base
        data = tmp_path / "data.bin"  # fits once, not twice: the copy and its image are both counted
        data.write_bytes(b"\0" * (free // 2 + 1024**2))
        hv = FakeHypervisor()
        with pytest.raises(VmisoError, match=r"and its inputs \(a copy and its image\)") as caught:
            do_run(config, hv, request(inputs=(data,)), FakeConnect(exits(0)))
        assert "smaller inputs" in caught.value.hint
        assert not hv.started and leftovers(state) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("protocol", [None, 3])  # /in a share; /in a disk without the large files' share
def test_an_image_whose_guest_reads_in_otherwise_is_refused_with_the_way_out(config, image, state, tmp_path,
                                                                             protocol):
    manifest = json.loads((image.path / "manifest.json").read_text())
    manifest["guest_protocol"] = protocol  # as an older vmiso provisioned it
    if protocol is None:
        del manifest["guest_protocol"]
    (image.path / "manifest.json").write_text(json.dumps(manifest))
    hv = FakeHypervisor()
    with pytest.raises(ImageError, match="older vmiso: its guest does not read /in the way") as caught:
        do_run(config, hv, request(), FakeConnect(exits(0)))
    assert "vmiso provision --replace" in caught.value.hint
    assert not hv.started and leftovers(state) == []


def test_the_inputs_disk_stays_the_runs_and_qemu_may_only_read_it(config, image, state, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    seen = {}

    def job(session, stdout, stderr):
        disk = session.clone.inputs_disk
        st = disk.stat()
        seen["owner"], seen["mode"] = st.st_uid, st.st_mode & 0o777
        seen["acl"] = os.getxattr(disk, "system.posix_acl_access")
        return JobExit(code=0)
    hv = FakeHypervisor()
    do_run(config, hv, request(inputs=(data,)), FakeConnect(job))
    (name,) = hv.started
    vdc = ET.fromstring(hv.started[name]).find("devices/disk/target[@dev='vdc']/..")
    assert vdc.find("readonly") is not None
    assert vdc.find("source/seclabel").get("relabel") == "no"  # libvirt leaves its owner alone
    assert seen["owner"] == os.geteuid() and seen["mode"] == 0o640  # owner rw; the mask: QEMU's r
    assert seen["acl"] == sharemount.acl_blob(6, {workdir.qemu_ids()[0]: 4})
    # The large files' share: read-only to QEMU as well.
    large = ET.fromstring(hv.started[name]).find("devices/filesystem/target[@dir='vmiso-in-large']/..")
    assert large.find("readonly") is not None and large.find("source").get("dir").endswith("/in-large")
