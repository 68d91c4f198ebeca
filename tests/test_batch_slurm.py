"""vmiso batch --on slurm: the element's files and refusals (fast), and real batches through the
private one-node Slurm of tests/slurmharness.py, with real VMs (never a fake of Slurm)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmiso import tools
from vmiso.batch import slurm as batch_slurm
from vmiso.batch.engines import Stop
from vmiso.batch.plan import BatchRequest, Resources, plan_batch
from vmiso.batch.runner import run_batch
from vmiso.errors import ConfigError

from vmharness import VMISO, vmiso, vmiso_domains

FAKE = (sys.executable, str(Path(__file__).with_name("batchfake.py")))
TEMPLATE = "f" * 64


def planned(tmp_path: Path, names: list[str], text: str = "fine\n", **resources: int | None):
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in names:
        (data / name).write_text(text)
    request = BatchRequest(command=("sh", "-c", "cat /in/{}"), each=tuple(data / n for n in names),
                           output=tmp_path / "out", state_dir=tmp_path / "state")
    (tmp_path / "out" / ".batch").mkdir(parents=True, exist_ok=True)
    return plan_batch(request, image="it", template_sha256=TEMPLATE, jobs=2, vmiso=FAKE,
                      resources=Resources(**resources))


# --- fast: what is submitted, and what an element does on its node ---------------------------------

def test_each_element_asks_slurm_for_the_runs_cpus_memory_with_qemus_share_and_a_time_from_the_timeout():
    argv = tools.sbatch_argv(Path("/d/element.sh"), "/usr/bin/python3", "/d", array="0-7%2", cpus=2,
                             memory_mib=512 + batch_slurm.QEMU_OVERHEAD_MIB,
                             minutes=batch_slurm.minutes_for(Resources(512, 2, timeout=60, boot_timeout=300)),
                             workdir=Path("/d"), name="vmiso-batch")
    assert argv == ["sbatch", "--parsable", "--array=0-7%2", "--job-name=vmiso-batch", "--cpus-per-task=2",
                    "--mem=768M", "--time=11", "--chdir=/d", "--output=%a.out", "--no-requeue",
                    "/d/element.sh", "/usr/bin/python3", "/d"]
    assert batch_slurm.minutes_for(Resources(512, 1, timeout=None)) is None


def test_the_script_is_fixed_text_and_every_name_travels_in_the_elements_json(tmp_path):
    hostile = "a b;$(touch x)`id`'\".csv"
    plan = planned(tmp_path, [hostile])
    task = plan.tasks[0]
    item = batch_slurm.Element.of(task, plan, tmp_path / "out/.batch/slurm/1", 0)
    path = tmp_path / "0.json"
    path.write_text(json.dumps(item.__dict__))
    again = batch_slurm.Element.read(path)
    assert again == item and again.argv == task.argv and again.command == ("sh", "-c", f"cat /in/{hostile}")
    assert again.state_dir == str(tmp_path / "state") and again.template_sha256 == TEMPLATE
    # The script names nothing of the batch's: its arguments and the element's file do.
    assert batch_slurm.SCRIPT == (
        "#!/bin/sh\n"
        "# vmiso batch --on slurm: one element of the job array.  Its task is in the JSON file named\n"
        "# by its index in this directory; $1 is the Python that runs vmiso, $2 this directory.\n"
        'exec "$1" -P -m vmiso _slurm_element "$2/$SLURM_ARRAY_TASK_ID.json"\n')


def fake_image(state: Path, template: bytes = b"template") -> str:
    image = state / "images" / "it"
    image.mkdir(parents=True)
    (image / "template.qcow2").write_bytes(template)
    (image / "template.qcow2").chmod(0o444)
    digest = hashlib.sha256(template).hexdigest()
    (image / "manifest.json").write_text(json.dumps({"sha256": digest}))
    return digest


def element_file(tmp_path: Path, name: str, template_sha256: str = TEMPLATE,
                 text: str = "fine\n") -> tuple[Path, batch_slurm.Element]:
    plan = planned(tmp_path, [name], text)
    directory = tmp_path / "out/.batch/slurm/1"
    directory.mkdir(parents=True, exist_ok=True)
    item = batch_slurm.Element.of(plan.tasks[0], plan, directory, 0)
    item = batch_slurm.Element(**{**item.__dict__, "template_sha256": template_sha256})
    path = directory / "0.json"
    path.write_text(json.dumps(item.__dict__))
    return path, item


@pytest.mark.parametrize("image", ["missing", "another"])
def test_a_node_without_the_batchs_image_fails_its_task_with_125_naming_node_digests_and_fix(tmp_path, monkeypatch,
                                                                                             image):
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    if image == "another":
        other = fake_image(tmp_path / "state", b"another template")
    path, item = element_file(tmp_path, "a.csv")

    assert batch_slurm.element(path) == 125

    run = json.loads(Path(item.record).read_text())
    assert run["exit_code"] == 125 and run["image"] == "it" and run["command"] == ["sh", "-c", "cat /in/a.csv"]
    assert run["error"].startswith("node node7: ") and TEMPLATE in run["error"]
    if image == "another":
        assert f"image it has sha256 {other}, not the batch's {TEMPLATE}" in run["error"]
    else:
        assert "no image named 'it'" in run["error"]
    assert "provision image it on node7" in run["error"] and "vmiso images verify it" in run["error"]
    result = json.loads(Path(item.result).read_text())
    assert (result["exit_code"], result["node"]) == (125, "node7")
    assert json.loads(Path(item.started).read_text())["node"] == "node7"
    assert run["error"] in Path(item.log).read_text()  # the task's log says it too
    assert not Path(item.argv[-1]).exists()  # nothing ran


def test_an_element_runs_its_task_and_reports_its_exit_and_a_signal_passed_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    digest = fake_image(tmp_path / "state")
    path, item = element_file(tmp_path, "fail.csv", digest, "exit 3\n")
    assert batch_slurm.element(path, poll=0.02) == 3
    assert json.loads(Path(item.result).read_text())["exit_code"] == 3
    assert json.loads(Path(item.record).read_text())["exit_code"] == 3

    # Slurm's SIGTERM (scancel, --time) reaches the task's run, which ends (batchfake: 143).
    fake_image(tmp_path / "again" / "state")
    path, item = element_file(tmp_path / "again", "slow.csv", digest, "sleep 60\n")
    element = subprocess.Popen([*VMISO, "_slurm_element", str(path)], env=dict(os.environ, PYTHONPATH=str(
        Path(__file__).resolve().parent.parent)))
    deadline = time.monotonic() + 20
    while not Path(item.started).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    element.send_signal(signal.SIGTERM)
    assert element.wait(20) == 143
    assert json.loads(Path(item.result).read_text())["exit_code"] == 143


def test_no_slurm_configuration_is_refused_at_once_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "none.conf"))
    with pytest.raises(ConfigError) as caught:
        batch_slurm.check_slurm()
    assert "SLURM_CONF names" in str(caught.value) and "--on local" in caught.value.hint


# --- a real Slurm ---------------------------------------------------------------------------------------

@pytest.mark.root(reason="the private Slurm's daemons")
@pytest.mark.hostsetup(reason="Slurm and munge")
def test_a_slurm_controller_that_does_not_answer_is_refused_with_the_fix(slurm, tmp_path, monkeypatch):
    from slurmharness import free_loopback_port

    text = slurm.conf.read_text()
    port = next(line for line in text.splitlines() if line.startswith("SlurmctldPort="))
    dead = tmp_path / "slurm.conf"
    dead.write_text(text.replace(port, f"SlurmctldPort={free_loopback_port()}"))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    with pytest.raises(ConfigError) as caught:
        batch_slurm.check_slurm()
    assert "no Slurm controller answers" in str(caught.value), caught.value
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    batch_slurm.check_slurm()  # the live one does


@pytest.mark.root(reason="the private Slurm's daemons")
@pytest.mark.hostsetup(reason="Slurm and munge")
def test_the_submitter_follows_a_real_array_and_records_an_element_slurm_cancelled(slurm, tmp_path, monkeypatch):
    # The real Slurm, with batchfake.py standing in for vmiso run (no VM): each element runs on the
    # node, reports its start, node and exit; one is cancelled while it runs, one before it starts.
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))  # the element's vmiso: this one
    digest = fake_image(tmp_path / "state")
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("a", "fine"), ("b", "exit 3"), ("c", "sleep 60"), ("d", "fine")):
        (data / name).write_text(text + "\n")
    request = BatchRequest(command=("job", "{}"), each=tuple(sorted(data.iterdir())), output=tmp_path / "out",
                           state_dir=tmp_path / "state", engine="slurm")
    plan = plan_batch(request, image="it", template_sha256=digest, jobs=1, vmiso=FAKE,
                      resources=Resources(memory_mib=32, cpus=1, timeout=60))
    engine = batch_slurm.Slurm(plan, poll=0.1, queue_every=0.5)

    def cancel_when_c_runs() -> None:
        started = tmp_path / "out/.batch/slurm/1/2.started.json"
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        slurm.scancel((tmp_path / "out/.batch/slurm/1/job").read_text().strip())

    canceller = threading.Thread(target=cancel_when_c_runs)
    canceller.start()
    result = run_batch(plan, engine, _Watcher(), Stop())
    canceller.join()

    tasks = result.record.tasks
    assert {n: (e.status, e.exit_code) for n, e in tasks.items()} == {
        "a": ("ok", 0), "b": ("failed", 3), "c": ("failed", 143), "d": ("error", 125)}
    assert [tasks[n].host for n in "abc"] == [slurm.node] * 3
    assert tasks["d"].error.startswith(f"slurm ended element {engine.job}_3 before it started: CANCELLED")
    assert json.loads((tmp_path / "out/.batch/d.json").read_text())["error"] == tasks["d"].error
    assert result.record.engine == "slurm" and result.exit_code == 123
    # The fixed script, and the element's task in its file.
    array = tmp_path / "out/.batch/slurm/1"
    assert (array / "element.sh").read_text() == batch_slurm.SCRIPT
    assert [json.loads((array / f"{i}.json").read_text())["name"] for i in range(4)] == list("abcd")


class _Watcher:
    def planned(self, total, skipped, to_run):
        pass

    def started(self, entry):
        pass

    def ended(self, entry):
        pass


def no_vm_left(state: Path) -> None:
    assert vmiso_domains(state) == []
    qemu = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    assert str(state) not in qemu, qemu


JOB = ("case $(cat /in/{}) in fail) exit 3;; kill) kill -9 $$;; slow) sleep 60;; esac; "
       "tr a-z A-Z < /in/{} > /out/upper; echo ran {}")


@pytest.mark.vm
def test_a_batch_through_slurm_records_each_outcome_then_a_cancelled_one_resumes(image, slurm, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    contents = {"ok1": "alpha", "fail": "fail", "ok2": "bravo", "kill": "kill", "ok3": "charlie", "slow": "slow",
                "ok4": "delta", "ok5": "echo"}
    for name, text in contents.items():
        (data / name).write_text(text + "\n")
    out = tmp_path / "out"
    argv = ("batch", "-c", image["config"], "--on", "slurm", "-o", out, "-j", "2", "--timeout", "8",
            "--each", *sorted(data.iterdir()), "--", "sh", "-c", JOB)
    started = time.monotonic()
    done = vmiso(*argv, timeout=900, SLURM_CONF=str(slurm.conf))
    took = time.monotonic() - started
    assert done.returncode == 123, done.stderr
    template = json.loads(vmiso("images", "-c", image["config"], "--json", check=True).stdout)[0]["sha256"]
    record = json.loads((out / "batch.json").read_text())
    assert (record["engine"], record["sha256"], record["jobs"]) == ("slurm", template, 2)
    tasks = {t["name"]: t for t in record["tasks"]}
    assert {n: (t["status"], t["exit_code"], t["signal"]) for n, t in tasks.items()} == {
        "ok1": ("ok", 0, None), "ok2": ("ok", 0, None), "ok3": ("ok", 0, None), "ok4": ("ok", 0, None),
        "ok5": ("ok", 0, None), "fail": ("failed", 3, None), "kill": ("failed", 137, "SIGKILL"),
        "slow": ("timeout", 124, None)}
    for name, task in tasks.items():
        assert task["host"] == slurm.node and task["attempts"] == 1 and task["sha256"] == template
        assert task["boot"] in ("preloaded", "warm", "cold")
        assert task["input_sha256"] == hashlib.sha256((data / name).read_bytes()).hexdigest()
        run = json.loads((out / task["record"]).read_text())
        assert run["exit_code"] == task["exit_code"]
        if name.startswith("ok"):
            assert (out / name / "upper").read_text() == contents[name].upper() + "\n"
            assert f"ran {name}" in (out / task["log"]).read_text()
            assert task["manifest_sha256"] == hashlib.sha256((out / name / "MANIFEST").read_bytes()).hexdigest()
        else:
            assert not (out / name / "upper").exists()
    array = (out / ".batch/slurm/1/job").read_text().strip()
    elements = {int(r["ArrayTaskId"]): r for r in slurm.show_job(array)}
    assert {e["ExitCode"] for i, e in elements.items()} <= {"0:0", "3:0", "137:0", "124:0"}
    no_vm_left(image["state"])
    print(f"\nslurm batch of 8 at -j 2: {took:.1f} s", file=sys.stderr)

    # A second batch, cancelled half-way with scancel, then resumed.
    data2 = tmp_path / "data2"
    data2.mkdir()
    for index in range(6):
        (data2 / f"t{index}").write_text(f"task {index}\n")
    out2 = tmp_path / "out2"
    argv2 = ("batch", "-c", image["config"], "--on", "slurm", "-o", out2, "-j", "1",
             "--each", *sorted(data2.iterdir()), "--", "sh", "-c", "sleep 3; cp /in/{} /out/copy")
    env = dict(os.environ, VMISO_ACCEL="tcg", PYTHONUNBUFFERED="1", SLURM_CONF=str(slurm.conf))
    batch = subprocess.Popen([*VMISO, *map(str, argv2)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:  # two tasks done, the third running
            time.sleep(0.5)
            assert time.monotonic() < deadline and batch.poll() is None, batch.poll()
            if (out2 / "batch.json").exists() and (out2 / ".batch/slurm/1/2.started.json").exists():
                counts = json.loads((out2 / "batch.json").read_text())["counts"]
                if counts["ok"] == 2:
                    break
        slurm.scancel((out2 / ".batch/slurm/1/job").read_text().strip())
        _, stderr = batch.communicate(timeout=120)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 123, stderr
    cancelled = {t["name"]: t for t in json.loads((out2 / "batch.json").read_text())["tasks"]}
    assert [cancelled[f"t{i}"]["status"] for i in range(6)] == ["ok", "ok"] + ["error"] * 4, cancelled
    assert "slurm ended element" in cancelled["t3"]["error"] and "CANCELLED" in cancelled["t3"]["error"]
    no_vm_left(image["state"])

    # Resumed, then stopped as Ctrl-C stops it (SIGTERM to vmiso batch) while its second task runs: the
    # batch cancels its array, the running task's VM goes, and the same command resumes again.
    batch = subprocess.Popen([*VMISO, *map(str, argv2)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (out2 / ".batch/slurm/2/1.started.json").exists():
            time.sleep(0.2)
            assert time.monotonic() < deadline and batch.poll() is None, batch.poll()
        time.sleep(2)
        batch.send_signal(signal.SIGTERM)
        _, stderr = batch.communicate(timeout=120)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 130, stderr
    stopped = json.loads((out2 / "batch.json").read_text())
    assert stopped["interrupted"] and stopped["tasks"][2]["status"] == "ok", stopped
    assert stopped["tasks"][3]["status"] == "interrupted", stopped
    assert slurm.squeue((out2 / ".batch/slurm/2/job").read_text().strip()) == []
    no_vm_left(image["state"])

    done = vmiso(*argv2, timeout=600, SLURM_CONF=str(slurm.conf))
    assert done.returncode == 0, done.stderr
    assert "3 done before, skipped; 3 to run" in done.stderr
    resumed = {t["name"]: t for t in json.loads((out2 / "batch.json").read_text())["tasks"]}
    assert {n: (t["status"], t["attempts"]) for n, t in resumed.items()} == {
        "t0": ("ok", 1), "t1": ("ok", 1), "t2": ("ok", 2), "t3": ("ok", 3), "t4": ("ok", 3), "t5": ("ok", 3)}
    for index in range(6):
        assert (out2 / f"t{index}" / "copy").read_text() == f"task {index}\n"
    no_vm_left(image["state"])
