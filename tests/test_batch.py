"""vmiso batch: tasks planned from inputs, run by an engine, recorded, resumed and retried; and a real batch.

The fast tests run the local engine against a stand-in for vmiso run (batchfake.py),
where the VM is not the point; the VM test runs a real batch of real runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmiso.batch import plan as batch_plan, record
from vmiso.batch.engines import Ended, Local, Stop
from vmiso.batch.plan import BatchRequest, default_jobs, plan_batch, substitute
from vmiso.batch.runner import EXIT_SOME_FAILED, open_output, run_batch
from vmiso.cli import cli
from vmiso.errors import EXIT_INTERRUPTED, ConfigError, VmisoError
from vmiso.host.inputs import input_digest

from vmharness import vmiso, vmiso_domains

FAKE = (sys.executable, str(Path(__file__).with_name("batchfake.py")))
TEMPLATE = "f" * 64


class Watcher:
    """Keeps what the batch told it, and what batch.json said at each task's end."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self.plan: tuple[int, list[str], list[str]] | None = None
        self.starts: list[str] = []
        self.ends: list[tuple[str, str]] = []
        self.on_disk: list[dict] = []

    def planned(self, total: int, skipped: list[str], to_run: list[str]) -> None:
        self.plan = (total, skipped, to_run)

    def started(self, entry: record.TaskEntry) -> None:
        self.starts.append(entry.name)

    def ended(self, entry: record.TaskEntry) -> None:
        self.ends.append((entry.name, entry.status))
        if self.root is not None:
            self.on_disk.append(json.loads((self.root / "batch.json").read_text()))


def inputs(directory: Path, **contents: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in contents.items():
        path = directory / name.replace("_", ".")
        path.write_text(text + "\n")
        paths.append(path)
    return paths


def batch(each: list[Path], out: Path, *, jobs: int = 2, retry: int = 0, template: str = TEMPLATE,
          shared: tuple[Path, ...] = (), stop: Stop | None = None, command: tuple[str, ...] = ("job", "{}")):
    plan = plan_batch(BatchRequest(command=command, each=tuple(each), shared=shared, output=out, jobs=jobs,
                                   retry=retry), image="it", template_sha256=template, jobs=jobs, vmiso=FAKE)
    watcher = Watcher(out)
    result = run_batch(plan, Local(jobs, poll=0.02), watcher, stop or Stop())
    return result, watcher


# --- planning ---------------------------------------------------------------------------------


def test_the_placeholder_is_the_inputs_name_anywhere_in_an_argument():
    assert substitute(("python", "job.py", "{}", "--out=/out/{}.csv", "x"), "a.csv") == (
        "python", "job.py", "a.csv", "--out=/out/a.csv.csv", "x")


def test_each_input_is_one_vmiso_run_with_its_own_record_and_output(tmp_path):
    a, b = inputs(tmp_path / "data", a_csv="", b_csv="")
    shared = inputs(tmp_path, job_py="")[0]
    plan = plan_batch(BatchRequest(command=("python", "job.py", "{}"), each=(a, b), shared=(shared,),
                                   output=tmp_path / "out", run_options=("--memory", "1024")),
                      image="it", template_sha256=TEMPLATE, jobs=2, vmiso=("vmiso",))
    out = tmp_path / "out"
    assert [t.name for t in plan.tasks] == ["a.csv", "b.csv"]
    task = plan.tasks[1]
    assert task.argv == ("vmiso", "run", "--image", "it", "--json", str(out / ".batch/b.csv.json"), "-o",
                         str(out / "b.csv"), "--memory", "1024", "-i", str(shared), "-i", str(b), "--",
                         "python", "job.py", "b.csv")
    assert task.log == out / ".batch" / "b.csv.log"


def test_a_batch_for_a_node_runs_each_task_through_the_link_and_records_the_node(tmp_path):
    from vmiso.batch.engines import engine_for

    (a,) = inputs(tmp_path / "data", a_csv="")
    request = BatchRequest(command=("job", "{}"), each=(a,), output=tmp_path / "out", host="ssh://node",
                           remote_vmiso="/opt/vmiso/bin/vmiso")
    plan = plan_batch(request, image="it", template_sha256=TEMPLATE, jobs=1, vmiso=("vmiso",))
    assert plan.tasks[0].argv[:5] == ("vmiso", "--host", "ssh://node", "--remote-vmiso", "/opt/vmiso/bin/vmiso")
    assert plan.tasks[0].argv[5] == "run" and plan.host == "ssh://node"
    assert engine_for("local", plan).host == "ssh://node"  # what each task's entry says of where it ran
    assert engine_for("local", dataclasses.replace(plan, host=None)).host == os.uname().nodename


def test_the_tasks_run_this_vmiso():
    from vmiso import tools

    argv = tools.vmiso_argv("run")
    assert argv[0] == sys.executable and argv[1:] == ["-P", "-m", "vmiso", "run"]


@pytest.mark.parametrize("make, said, fix", [
    (lambda d: ([d / "x" / "a.csv", d / "y" / "a.csv"], ()), "have the same name, 'a.csv'", "rename one"),
    (lambda d: ([d / "x" / "a.csv", d / "x" / "a.csv"], ()), "is given twice", "give each input once"),
    (lambda d: ([d / "x" / "batch.json"], ()), "is the batch's own", "rename it"),
    (lambda d: ([d / "x" / ".batch"], ()), "is the batch's own", "rename it"),
    (lambda d: ([d / "x" / "a.csv"], (d / "y" / "a.csv",)), "would both appear as /in/a.csv", "rename one"),
    (lambda d: ([], ()), "--each names no input", "--each data/"),
    (lambda d: ([d / "x" / "a.csv", d], ()), "holds the batch's own directory", "outside the inputs"),
    (lambda d: ([d / "x" / "a.csv"], (d / "out",)), "holds the batch's own directory", "outside the inputs"),
])
def test_inputs_whose_names_clash_are_refused_with_the_fix(tmp_path, make, said, fix):
    each, shared = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        plan_batch(BatchRequest(command=("job",), each=tuple(each), shared=shared, output=tmp_path / "out"),
                   image="it", template_sha256=TEMPLATE, jobs=1)
    assert said in caught.value.message and fix in (caught.value.hint or "")


@pytest.mark.parametrize("cores, available, memory, cpus, jobs", [
    (2, 23000, 512, 1, 2),  # this kind of machine: the cores decide
    (16, 4096, 512, 1, 4),  # (4096 - 1024) // (512 + 256): the memory decides
    (2, 23000, 512, 4, 1),  # more vCPUs than cores: still one
    (8, 512, 512, 1, 1),  # no memory to spare: still one
])
def test_the_default_jobs_follow_cores_and_available_memory(cores, available, memory, cpus, jobs):
    assert default_jobs(cores=cores, available_mib=available, memory_mib=memory, cpus=cpus) == jobs


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684544 kB\nMemAvailable:   2097152 kB\n")
    assert batch_plan.available_memory_mib(meminfo) == 2048


# --- what a task's end means ----------------------------------------------------------------------


@pytest.mark.parametrize("code, error, interrupted, status, again", [
    (0, None, False, "ok", False),
    (3, None, False, "failed", False),
    (125, None, False, "failed", False),  # the job's own 125 is the job's: never retried
    (124, None, False, "failed", False),
    (137, None, False, "failed", False),
    (125, "the guest did not come up", False, "error", True),
    (124, "the job ran longer than 20 s", False, "timeout", False),
    (143, None, True, "interrupted", False),
    (0, None, True, "ok", False),
])
def test_a_tasks_status_and_whether_retry_runs_it_again(code, error, interrupted, status, again):
    entry = record.TaskEntry("a", "/a")
    entry.ended({"exit_code": code, "error": error, "inputs": []}, exit_code=code, host="h", start=0, end=1,
                manifest_sha256=None, interrupted=interrupted)
    assert (entry.status, record.retryable(entry)) == (status, again)


def test_a_run_that_wrote_no_record_is_vmisos_failure():
    entry = record.TaskEntry("a", "/a")
    entry.ended(None, exit_code=-9, host="h", start=0, end=1, manifest_sha256=None, interrupted=False)
    assert (entry.status, entry.exit_code, entry.error) == ("error", 125, "vmiso run was killed by SIGKILL")


# --- batches against the stand-in for vmiso run ---------------------------------------------------


def test_a_batch_records_every_task_and_says_whether_all_exited_0(tmp_path):
    each = inputs(tmp_path / "data", a="ok", b="ok", c="exit 3", d="signal")
    out = tmp_path / "out"
    result, seen = batch(each, out)
    assert result.exit_code == EXIT_SOME_FAILED
    data = json.loads((out / "batch.json").read_text())
    assert data["schema"] == 1 and data["sha256"] == TEMPLATE and data["command"] == ["job", "{}"]
    tasks = {t["name"]: t for t in data["tasks"]}
    assert {n: (t["status"], t["exit_code"], t["signal"]) for n, t in tasks.items()} == {
        "a": ("ok", 0, None), "b": ("ok", 0, None), "c": ("failed", 3, None), "d": ("failed", 137, "SIGKILL")}
    for name, task in tasks.items():
        assert task["input"] == str(tmp_path / "data" / name)
        assert task["input_sha256"] == input_digest(tmp_path / "data" / name)
        assert task["boot"] == "warm" and task["host"] == os.uname().nodename and task["attempts"] == 1
        assert task["start"] <= task["end"] and task["seconds"] >= 0
        assert (out / name / "result.txt").read_text() == f"job {name}\n"
        assert task["manifest_sha256"] == hashlib.sha256((out / name / "MANIFEST").read_bytes()).hexdigest()
        log = (out / task["log"]).read_text()
        assert log.startswith(f"==> vmiso batch: task {name}, attempt 1, ") and f"job job {name} starts" in log
    # Written after each task: the record on disk had every task that had ended.
    for count, on_disk in enumerate(seen.on_disk, 1):
        assert sum(t["status"] not in ("pending", "running") for t in on_disk["tasks"]) == count


def test_running_again_skips_what_succeeded_and_runs_the_failed_again_keeping_their_outputs(tmp_path):
    each = inputs(tmp_path / "data", a="ok", b="exit 3")
    out = tmp_path / "out"
    batch(each, out)
    first_a = (out / "a" / "MANIFEST").read_text()
    (tmp_path / "data" / "b").write_text("ok\n")  # the job's fault fixed
    result, seen = batch(each, out)
    assert result.exit_code == 0 and result.skipped == ["a"] and seen.plan == (2, ["a"], ["b"])
    assert seen.starts == ["b"]
    tasks = {t["name"]: t for t in json.loads((out / "batch.json").read_text())["tasks"]}
    assert (tasks["a"]["attempts"], tasks["b"]["attempts"]) == (1, 2)
    assert (out / "a" / "MANIFEST").read_text() == first_a
    # The failed attempt's outputs and record were moved aside, not removed.
    assert (out / ".batch" / "previous" / "b.1" / "result.txt").exists()
    assert json.loads((out / ".batch" / "previous" / "b.1.json").read_text())["exit_code"] == 3
    assert (out / ".batch" / "b.log").read_text().count("==> vmiso batch: task b") == 2


@pytest.mark.parametrize("change", ["template", "input", "shared", "outputs"])
def test_a_done_task_runs_again_when_its_template_inputs_or_outputs_changed(tmp_path, change):
    each = inputs(tmp_path / "data", a="ok")
    shared = inputs(tmp_path / "shared", s="one")[0]
    out = tmp_path / "out"
    batch(each, out, shared=(shared,))
    template = TEMPLATE
    if change == "template":
        template = "e" * 64
        os.environ["BATCHFAKE_SHA256"] = template
    elif change == "input":
        (tmp_path / "data" / "a").write_text("ok, another\n")
    elif change == "shared":
        shared.write_text("two\n")
    else:
        (out / "a" / "result.txt").write_text("changed by hand\n")
        (out / "a" / "MANIFEST").write_text("changed by hand\n")
    try:
        result, seen = batch(each, out, shared=(shared,), template=template)
    finally:
        os.environ.pop("BATCHFAKE_SHA256", None)
    assert result.skipped == [] and seen.starts == ["a"] and result.exit_code == 0
    assert (out / ".batch" / "previous" / "a.1" / "result.txt").exists()  # the earlier outputs, kept


def test_a_link_at_a_tasks_output_is_moved_aside_not_followed(tmp_path):
    each = inputs(tmp_path / "data", a="exit 1")
    out = tmp_path / "out"
    batch(each, out)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine\n")
    (out / "a").rename(tmp_path / "old")
    (out / "a").symlink_to(victim)
    batch(each, out)
    assert (victim / "keep").read_text() == "mine\n" and sorted(os.listdir(victim)) == ["keep"]
    assert (out / ".batch" / "previous" / "a.1").is_symlink()
    assert (out / "a").is_dir() and not (out / "a").is_symlink()


def test_retry_runs_again_only_what_vmiso_failed(tmp_path):
    marker = tmp_path / "flaky-marker"
    each = inputs(tmp_path / "data", flaky=f"flaky {marker}", own="exit 125", broken="error")
    out = tmp_path / "out"
    result, seen = batch(each, out, retry=2)
    tasks = {t["name"]: t for t in json.loads((out / "batch.json").read_text())["tasks"]}
    assert (tasks["flaky"]["status"], tasks["flaky"]["attempts"]) == ("ok", 2)
    assert (tasks["own"]["status"], tasks["own"]["exit_code"], tasks["own"]["attempts"]) == ("failed", 125, 1)
    assert (tasks["broken"]["status"], tasks["broken"]["attempts"]) == ("error", 3)
    assert tasks["broken"]["error"] == "the guest did not come up"
    assert seen.starts.count("broken") == 3 and result.exit_code == EXIT_SOME_FAILED


def test_without_retry_a_vmiso_failure_stays_failed(tmp_path):
    each = inputs(tmp_path / "data", broken="error")
    result, _ = batch(each, tmp_path / "out")
    assert result.exit_code == EXIT_SOME_FAILED and result.record.tasks["broken"].attempts == 1


def test_an_interrupted_batch_stops_its_tasks_says_so_and_resumes(tmp_path):
    each = inputs(tmp_path / "data", a="sleep 30", b="sleep 30", c="ok")
    out = tmp_path / "out"
    stop = Stop()
    timer = threading.Timer(1.0, stop.request)
    timer.start()
    started = time.monotonic()
    result, _ = batch(each, out, stop=stop, jobs=2)
    assert time.monotonic() - started < 10  # the tasks were stopped, not waited for
    assert result.exit_code == EXIT_INTERRUPTED
    data = json.loads((out / "batch.json").read_text())
    assert data["interrupted"] is True
    assert {t["name"]: t["status"] for t in data["tasks"]} == {"a": "interrupted", "b": "interrupted",
                                                               "c": "pending"}
    (tmp_path / "data" / "a").write_text("ok\n")
    (tmp_path / "data" / "b").write_text("ok\n")
    result, seen = batch(each, out)
    assert result.exit_code == 0 and sorted(seen.starts) == ["a", "b", "c"]


def test_an_engine_can_be_a_fake(tmp_path):
    # The seam: anything with run(tasks, listener, stop) is an engine (a Slurm one will be).
    class Instant:
        def run(self, tasks, listener, stop):
            for task in tasks:
                if listener.starting(task, "node1"):
                    task.output.mkdir()
                    (task.output / "MANIFEST").write_text("")
                    task.record.write_text(json.dumps({"exit_code": 0, "error": None, "sha256": TEMPLATE,
                                                       "boot": "preloaded", "inputs": []}))
                    listener.ended(Ended(task, 0, "node1", 1.0, 2.0))

    each = inputs(tmp_path / "data", a="ok")
    plan = plan_batch(BatchRequest(command=("job",), each=tuple(each), output=tmp_path / "out"), image="it",
                      template_sha256=TEMPLATE, jobs=1)
    result = run_batch(plan, Instant(), Watcher(), Stop())
    entry = result.record.tasks["a"]
    assert (result.exit_code, entry.host, entry.boot, entry.seconds) == (0, "node1", "preloaded", 1.0)


# --- the batch's directory ------------------------------------------------------------------------


def test_a_directory_that_is_not_a_batchs_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(VmisoError, match="not empty and holds no batch.json"):
        open_output(out)
    assert os.listdir(out) == ["notes.txt"]


def test_a_link_or_a_shared_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(VmisoError, match="symbolic link"):
        open_output(tmp_path / "link")
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(VmisoError, match="writable by others"):
        open_output(tmp_path / "open")


def test_a_batch_of_another_command_is_not_resumed(tmp_path):
    each = inputs(tmp_path / "data", a="ok")
    batch(each, tmp_path / "out")
    with pytest.raises(VmisoError, match="holds a batch of another command"):
        batch(each, tmp_path / "out", command=("other", "{}"))


def test_the_cli_refuses_clashing_names_before_anything_is_made(tmp_path):
    one, two = tmp_path / "x" / "a.csv", tmp_path / "y" / "a.csv"
    for path in (one, two):
        path.parent.mkdir()
        path.write_text("ok\n")
    out = tmp_path / "out"
    done = CliRunner().invoke(cli, ["batch", "--state-dir", str(tmp_path / "state"), "-o", str(out),
                                    "--each", str(one), str(two), "--", "python", "job.py", "{}"])
    assert done.exit_code == 125, done.output
    assert f"--each {one} and {two} have the same name" in done.output and "rename one of them" in done.output
    assert not out.exists()


def test_the_cli_runs_a_batch_says_each_task_and_sums_up(tmp_path, monkeypatch):
    from vmiso import tools
    from vmiso.image import store

    monkeypatch.setattr(tools, "vmiso_argv", lambda *args: [*FAKE, *args])
    monkeypatch.setattr(store, "get_image", lambda state_dir, name: store.Image(name, tmp_path))
    monkeypatch.setattr(store, "verified_sha256", lambda image: TEMPLATE)
    a, b, c = inputs(tmp_path / "data", a="ok", b="exit 3", c="ok")
    out = tmp_path / "out"
    argv = ["batch", "--state-dir", str(tmp_path / "state"), "-o", str(out), "-j", "2", "--memory", "256",
            "--each", str(a), str(b), "-e", "X=1", "--each", str(c), "--", "job", "{}"]
    done = CliRunner().invoke(cli, argv)
    assert done.exit_code == EXIT_SOME_FAILED, done.output
    assert f"vmiso: batch of 3 tasks into {out}: 3 to run, 2 at a time" in done.output
    assert "b: failed, exit 3 [warm," in done.output  # a line per finished task (not a terminal)
    table = done.output[done.output.index("TASK"):].splitlines()
    row = table[2].split()  # TASK STATUS EXIT BOOT TIME TRIES LOG
    assert row[:4] == ["b", "failed", "3", "warm"] and row[5] == "1"
    assert table[2].endswith(str(out / ".batch" / "b.log"))
    assert "vmiso: 3 tasks: 2 ok, 1 failed; record: " in done.output
    run = json.loads((out / ".batch" / "a.json").read_text())
    assert run["command"] == ["job", "a"]
    log = (out / ".batch" / "a.log").read_text()
    given = json.loads(log[log.index("argv ") + 5:].splitlines()[0])
    assert given[:4] == ["run", "--image", "default", "--json"]
    assert given[given.index("--state-dir") + 1] == str(tmp_path / "state")
    assert given[given.index("--memory") + 1] == "256" and given[given.index("-e") + 1] == "X=1"
    (tmp_path / "data" / "b").write_text("ok\n")
    done = CliRunner().invoke(cli, argv)
    assert done.exit_code == 0, done.output
    assert "2 done before, skipped; 1 to run" in done.output
    assert "vmiso: 3 tasks: 3 ok (2 done before); record: " in done.output


# --- a real batch -----------------------------------------------------------------------------------


def _said(out: Path, tasks: dict) -> str:
    """What a real batch's tasks recorded and logged, for a failing assertion."""
    said = []
    for name, task in sorted(tasks.items()):
        log = out / ".batch" / f"{name}.log"
        text = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
        said.append(f"{name}: {task['status']} {task['exit_code']} error={task.get('error')!r}\n{text}")
    return "\n".join(said)


@pytest.mark.vm
def test_a_batch_of_real_runs_records_each_and_resumes_only_the_failed_one(image, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("a.txt", "alpha\n"), ("b.txt", "bravo\n"), ("c.txt", "fail\n"), ("d.txt", "delta\n")):
        (data / name).write_text(text)
    out = tmp_path / "out"
    job = ("echo job {} on $(hostname); tr a-z A-Z < /in/{} > /out/upper; ls /in > /out/listing; "
           "if grep -q fail /in/{}; then echo failing >&2; exit 3; fi")
    argv = ("batch", "-c", image["config"], "-o", out, "-j", "2", "--each", *sorted(data.iterdir()),
            "--", "sh", "-c", job)
    started = time.monotonic()
    done = vmiso(*argv, timeout=600)
    first = time.monotonic() - started
    assert done.returncode == EXIT_SOME_FAILED, done.stderr
    template = json.loads(vmiso("images", "-c", image["config"], "--json", check=True).stdout)[0]["sha256"]
    record_ = json.loads((out / "batch.json").read_text())
    assert record_["sha256"] == template and record_["image"] == "it" and record_["jobs"] == 2
    tasks = {t["name"]: t for t in record_["tasks"]}
    assert {n: (t["status"], t["exit_code"]) for n, t in tasks.items()} == {
        "a.txt": ("ok", 0), "b.txt": ("ok", 0), "c.txt": ("failed", 3), "d.txt": ("ok", 0)}, _said(out, tasks)
    for name, task in tasks.items():
        assert task["sha256"] == template and task["boot"] in ("preloaded", "warm", "cold")
        assert task["host"] == os.uname().nodename and task["attempts"] == 1
        assert task["input_sha256"] == hashlib.sha256((data / name).read_bytes()).hexdigest()
        assert (out / name / "upper").read_text() == (data / name).read_text().upper()
        assert (out / name / "listing").read_text() == f"{name}\n"  # its own input, and only it
        assert task["manifest_sha256"] == hashlib.sha256((out / name / "MANIFEST").read_bytes()).hexdigest()
        run = json.loads((out / task["record"]).read_text())
        assert run["exit_code"] == task["exit_code"] and run["command"][-1] == job.replace("{}", name)
        assert f"job {name} on" in (out / task["log"]).read_text()
    assert "failing" in (out / ".batch" / "c.txt.log").read_text()
    assert "c.txt" in done.stderr and "failed" in done.stderr  # the summary table
    assert vmiso_domains(image["state"]) == []

    (data / "c.txt").write_text("charlie\n")
    done = vmiso(*argv, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "3 done before, skipped; 1 to run" in done.stderr
    again = {t["name"]: t for t in json.loads((out / "batch.json").read_text())["tasks"]}
    assert {n: (t["status"], t["attempts"]) for n, t in again.items()} == {
        "a.txt": ("ok", 1), "b.txt": ("ok", 1), "c.txt": ("ok", 2), "d.txt": ("ok", 1)}
    for name in ("a.txt", "b.txt", "d.txt"):
        assert again[name] == tasks[name]  # not run again: its entry as it was
    assert (out / "c.txt" / "upper").read_text() == "CHARLIE\n"
    assert (out / ".batch" / "previous" / "c.txt.1" / "upper").read_text() == "FAIL\n"
    assert vmiso_domains(image["state"]) == []
    print(f"first batch of 4 at -j 2: {first:.1f} s", file=sys.stderr)


@pytest.mark.vm
def test_a_batch_with_a_pool_records_a_signal_and_a_timeout_and_an_interrupted_one_resumes(image, tmp_path):
    """The local engine as the Slurm one is tested: 8 inputs, one exits 3, one is killed by SIGKILL
    inside its guest (137), one runs past --timeout; with a pool of the image running, so tasks take
    preloaded clones. Then a second batch interrupted half-way (SIGINT, as Ctrl-C) leaves no run's VM
    and resumes to the end."""
    import signal
    import subprocess

    from vmharness import VMISO, wait_for

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        (data / f"in{i}").write_text({2: "fail\n", 4: "kill\n", 6: "slow\n"}.get(i, f"n{i}\n"))
    job = ("cp /in/{} /out/copy; grep -q fail /in/{} && exit 3; grep -q kill /in/{} && kill -9 $$; "
           "grep -q slow /in/{} && sleep 60; exit 0")
    started = vmiso("pool", "start", "-c", image["config"], "--size", "2", timeout=600)
    assert started.returncode == 0, started.stderr
    try:
        out = tmp_path / "out"
        done = vmiso("batch", "-c", image["config"], "-o", out, "-j", "2", "--timeout", "10",
                     "--each", *sorted(data.iterdir()), "--", "sh", "-c", job, timeout=900)
        assert done.returncode == EXIT_SOME_FAILED, done.stderr
        tasks = {t["name"]: t for t in json.loads((out / "batch.json").read_text())["tasks"]}
        assert {n: (t["status"], t["exit_code"]) for n, t in tasks.items()} == {
            **{f"in{i}": ("ok", 0) for i in (0, 1, 3, 5, 7)},
            "in2": ("failed", 3), "in4": ("failed", 137), "in6": ("timeout", 124)}
        assert "preloaded" in {t["boot"] for t in tasks.values()}  # the pool's clones were taken
        for i in (0, 1, 3, 5, 7):
            assert (out / f"in{i}" / "copy").read_text() == f"n{i}\n"
        run = json.loads((out / tasks["in4"]["record"]).read_text())
        assert run["signal"] == "SIGKILL", run

        # A second batch, interrupted once two tasks are done; then resumed.
        again = tmp_path / "again"
        argv = [*VMISO, "batch", "-c", str(image["config"]), "-o", str(again), "-j", "1",
                "--each", *map(str, sorted(data.iterdir())[:6:2]), *map(str, sorted(data.iterdir())[1:6:2]),
                "--", "sh", "-c", "cp /in/{} /out/copy; sleep 2"]
        batch = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, VMISO_ACCEL="tcg"))

        def ok_count() -> int:
            try:
                return sum(t["status"] == "ok" for t in json.loads((again / "batch.json").read_text())["tasks"])
            except (OSError, ValueError, KeyError):
                return 0
        wait_for(lambda: ok_count() >= 2, 600, "two tasks of the second batch")
        batch.send_signal(signal.SIGINT)
        _, err = batch.communicate(timeout=120)
        assert batch.returncode == 130, err
        # No run's VM is left: once the pool is full again, its two clones are all there is.
        def pool_ready() -> int:
            rows = json.loads(vmiso("pool", "status", "-c", image["config"], "--json", check=True).stdout)
            return rows[0]["ready"] if rows else -1
        wait_for(lambda: pool_ready() == 2, 300, "the pool to refill")
        assert len(vmiso_domains(image["state"])) == 2, vmiso_domains(image["state"])
        resumed = vmiso("batch", "-c", image["config"], "-o", again, "-j", "1",
                        "--each", *sorted(data.iterdir())[:6:2], *sorted(data.iterdir())[1:6:2],
                        "--", "sh", "-c", "cp /in/{} /out/copy; sleep 2", timeout=900)
        assert resumed.returncode == 0, resumed.stderr
        skipped = re.search(r"(\d+) done before, skipped; (\d+) to run", resumed.stderr)
        assert skipped and int(skipped[1]) >= 2 and int(skipped[1]) + int(skipped[2]) == 6, resumed.stderr
        final = {t["name"]: t for t in json.loads((again / "batch.json").read_text())["tasks"]}
        assert all(t["status"] == "ok" for t in final.values()) and len(final) == 6
    finally:
        vmiso("pool", "stop", "-c", image["config"])
        wait_for(lambda: vmiso_domains(image["state"]) == [], 60, "the pool's clones to go")
