"""A real one-node Slurm (tests/slurmharness.py), submitted to as ``vmiso batch`` will: job arrays
whose elements write their results to a shared directory.

What these tests establish about Slurm 22.05 without an accounting database (no slurmdbd):

- ``sacct`` has nothing ("Slurm accounting storage is disabled"); a finished element stays in
  ``scontrol show job`` for MinJobAge (300 s by default), as one record per element, with
  ``ExitCode=CODE:SIGNAL``: ``3:0`` for ``exit 3`` (JobState FAILED, Reason NonZeroExitCode),
  ``0:9`` for a batch shell killed by SIGKILL (FAILED, Reason JobLaunchFailure, although it ran).
  ``jobcomp/filetxt`` keeps the same ExitCode per element in a file for as long as it is kept.
- The dependable report is the element's own: a wrapper that runs the payload as a child,
  writes its status to a result file of its own (``$?``: 3, or 128 + the signal), then ends the
  same way, so Slurm reports it too.  No result file means the wrapper itself never finished
  (cancelled, killed, its node lost): then ``scontrol show job``'s ExitCode is all there is.
- ``scontrol show job ARRAY`` gives every element's record (the elements not yet started as
  one record, ``ArrayTaskId=2-3%2``); ``scontrol show job ARRAY_TASK`` gives one element's.
  Inside an element, ``SLURM_JOB_ID`` of the first is the array's own id: name an element as
  ``${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID``.
- ``scancel`` of an array ends its running elements (JobState CANCELLED, ExitCode 0:15, or 0:0
  when the cancel is recorded before the batch shell has ended), and its pending ones never
  start (CANCELLED, RunTime 00:00:00, no NodeList).  Which of an element's processes go depends
  on ProctrackType: see SURVIVE_SCANCEL and SURVIVE_EXIT below.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from slurmharness import FREEZER, LocalSlurm, SlurmStartError, parse_record

pytestmark = [
    pytest.mark.root(reason="munged runs as user munge, slurmctld and slurmd as root"),
    pytest.mark.hostsetup(reason="Slurm and munge, which scripts/setup-host --test installs"),
]


def wait_for_files(paths: list[Path], timeout: float, slurm: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise AssertionError(f"no {missing} after {timeout:.0f} s: {slurm.squeue()}\n{slurm.log_tails(10)}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def task_ids(field: str) -> list[int]:
    """An ArrayTaskId: one id, or for the elements not yet split off a pending array, ids and
    ranges with a limit (``2-3%2``, ``4,6-9``)."""
    ids = []
    for part in field.split("%")[0].split(","):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def by_task(records: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    return {task: r for r in records for task in task_ids(r["ArrayTaskId"])}


def test_an_array_of_eight_elements_each_gets_the_cpus_and_memory_it_asked_for(slurm, tmp_path):
    cpus = min(2, slurm.cpus)
    job = slurm.sbatch("--array=0-7", f"--cpus-per-task={cpus}", "--mem=96M", "-o", tmp_path / "out.%a", script=f"""
cd {tmp_path}
out=element.$SLURM_ARRAY_TASK_ID
scontrol show job ${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID > $out.scontrol  # the array's id alone: every element
{{ echo task=$SLURM_ARRAY_TASK_ID
  echo array_job=$SLURM_ARRAY_JOB_ID
  echo cpus_per_task=$SLURM_CPUS_PER_TASK
  echo cpus_on_node=$SLURM_CPUS_ON_NODE
  echo mem_per_node=$SLURM_MEM_PER_NODE
}} > $out.tmp && mv $out.tmp $out
""")
    records = by_task(slurm.wait_done(job, timeout=50))

    assert sorted(records) == list(range(8))
    for task, record in records.items():
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), record
        seen = dict(line.split("=", 1) for line in (tmp_path / f"element.{task}").read_text().split())
        assert seen == {"task": str(task), "array_job": str(job), "cpus_per_task": str(cpus),
                        "cpus_on_node": str(cpus), "mem_per_node": "96"}
        inside = parse_record((tmp_path / f"element.{task}.scontrol").read_text())
        assert inside["JobState"] == "RUNNING"
        assert (inside["ArrayJobId"], inside["ArrayTaskId"]) == (str(job), str(task))
        assert (inside["NumCPUs"], inside["CPUs/Task"], inside["MinMemoryNode"]) == (str(cpus), str(cpus), "96M")
        assert f"cpu={cpus},mem=96M" in inside["TRES"]


def test_an_exit_code_and_a_signal_reach_the_result_file_and_slurm(slurm, tmp_path):
    # The wrapper vmiso batch can use: the payload as a child, its status in a result file of
    # the element's own, then the same end for Slurm.  Element 3's wrapper itself is killed:
    # no result file, and only Slurm can tell.
    job = slurm.sbatch("--array=0-3", "--mem=32M", "-o", tmp_path / "out.%a", script=f"""
case $SLURM_ARRAY_TASK_ID in
    0) payload='exit 3' ;;
    1) payload='kill -KILL $$' ;;
    2) payload='exit 0' ;;
    3) kill -KILL $$ ;;
esac
sh -c "$payload"
status=$?
echo $status > {tmp_path}/result.$SLURM_ARRAY_TASK_ID.tmp
mv {tmp_path}/result.$SLURM_ARRAY_TASK_ID.tmp {tmp_path}/result.$SLURM_ARRAY_TASK_ID
[ $status -gt 128 ] && kill -$((status - 128)) $$
exit $status
""")
    records = by_task(slurm.wait_done(job, timeout=50))

    results = {int(p.name.split(".")[1]): int(p.read_text()) for p in tmp_path.glob("result.*")}
    assert results == {0: 3, 1: 128 + 9, 2: 0}
    reported = {task: (r["JobState"], r["Reason"], r["ExitCode"]) for task, r in records.items()}
    assert reported == {
        0: ("FAILED", "NonZeroExitCode", "3:0"),
        1: ("FAILED", "JobLaunchFailure", "0:9"),
        2: ("COMPLETED", "None", "0:0"),
        3: ("FAILED", "JobLaunchFailure", "0:9"),
    }
    # The job completion log says the same, per element; sacct has nothing without slurmdbd.
    lines = (slurm.root / "jobcomp.log").read_text().splitlines()
    completed = {int(r["ArrayTaskId"]): r["ExitCode"]
                 for r in map(parse_record, lines) if r["ArrayJobId"] == str(job)}
    assert completed == {0: "3:0", 1: "0:9", 2: "0:0", 3: "0:9"}
    sacct = slurm.sacct("-j", str(job))
    assert "accounting storage is disabled" in sacct.stdout + sacct.stderr


# Which of an element's processes Slurm ends, by ProctrackType, measured here: a child of the
# batch shell; one in a session of its own (setsid); one whose parent exited, so that it belongs
# to init (a double fork).  On scancel, and when the batch shell exits leaving them running.
SURVIVE_SCANCEL = {
    "proctrack/linuxproc": {"orphan"},  # the tree of parent pids, which the orphan left
    "proctrack/pgid": {"setsid"},  # the batch shell's process group, which setsid left
    "proctrack/cgroup": set(),  # the job's cgroup (v1 freezer), which no child leaves
}
SURVIVE_EXIT = {
    "proctrack/linuxproc": {"child", "setsid", "orphan"},  # without the shell, no tree to follow
    "proctrack/pgid": {"setsid"},
    "proctrack/cgroup": set(),
}
ELEMENT = """
cd {directory}
t=$SLURM_ARRAY_TASK_ID
sleep 1001 & echo $! > child.$t
setsid sleep 1002 & echo $! > setsid.$t
( sleep 1003 & echo $! > orphan.$t )
touch started.$t
{end}
"""


@pytest.fixture(scope="module", params=sorted(SURVIVE_SCANCEL))
def tracked(request):
    """A cluster of its own with the ProctrackType ``request.param``, beside the session's."""
    if request.param == "proctrack/cgroup" and not FREEZER.is_dir():
        pytest.skip(f"no cgroup v1 freezer at {FREEZER}")
    try:
        slurm = LocalSlurm.start(proctrack=request.param)
    except SlurmStartError as err:
        pytest.fail(f"the private Slurm did not start: {err}", pytrace=False)
    yield request.param, slurm
    daemons = [p.pid for p in slurm.processes.values()]
    slurm.stop()
    # Nothing is left behind: no daemon, no process a job left, no file.
    assert not [pid for pid in daemons if alive(pid)]
    assert not slurm.strays()
    assert not slurm.root.exists()


def started_processes(directory: Path, tasks: range) -> dict[tuple[str, int], int]:
    pids = {(kind, t): int((directory / f"{kind}.{t}").read_text())
            for kind in ("child", "setsid", "orphan") for t in tasks}
    assert all(map(alive, pids.values()))
    return pids


def test_scancel_ends_running_elements_and_pending_ones_never_start(tracked, tmp_path):
    proctrack, slurm = tracked
    running = min(2, slurm.cpus)
    job = slurm.sbatch(f"--array=0-3%{running}", "--cpus-per-task=1", "--mem=32M", "-o", tmp_path / "out.%a",
                       script=ELEMENT.format(directory=tmp_path, end="wait"))
    wait_for_files([tmp_path / f"started.{t}" for t in range(running)], 30, slurm)
    pids = started_processes(tmp_path, range(running))

    slurm.scancel(job)
    records = by_task(slurm.wait_done(job, timeout=40))
    time.sleep(0.5)  # what was killed is reaped

    assert {kind for (kind, _), pid in pids.items() if alive(pid)} == SURVIVE_SCANCEL[proctrack]
    for task, record in records.items():
        assert record["JobState"] == "CANCELLED", record
        if task < running:  # ExitCode 0:15, or 0:0 when the cancel is recorded before the shell's end
            assert record["NodeList"] == slurm.node and record["ExitCode"] in ("0:15", "0:0"), record
        else:  # (its StartTime is when it was cancelled, as its EndTime)
            assert (record["RunTime"], record["NodeList"]) == ("00:00:00", ""), record
            assert not (tmp_path / f"started.{task}").exists()


def test_what_an_element_leaves_running_when_it_exits(tracked, tmp_path):
    proctrack, slurm = tracked
    job = slurm.sbatch("--array=0-1", "--cpus-per-task=1", "--mem=32M", "-o", tmp_path / "out.%a",
                       script=ELEMENT.format(directory=tmp_path, end="exit 0"))
    records = slurm.wait_done(job, timeout=40)
    time.sleep(0.5)

    assert {r["JobState"] for r in records} == {"COMPLETED"}
    pids = {(kind, t): int((tmp_path / f"{kind}.{t}").read_text())
            for kind in ("child", "setsid", "orphan") for t in range(2)}
    assert {kind for (kind, _), pid in pids.items() if alive(pid)} == SURVIVE_EXIT[proctrack]


def test_overhead_of_a_trivial_array_element(slurm, tmp_path, record_property):
    # From sbatch to the last element's end, divided by the elements (shown with -s).  Slurm
    # starts them in waves, one element per free CPU, 2 to 3 s apart here (scontrol's
    # StartTimes): what each element of vmiso batch adds to its own run.
    elements = 16
    start = time.monotonic()
    job = slurm.sbatch(f"--array=1-{elements}", "--cpus-per-task=1", "--mem=32M", "-o", "/dev/null",
                       script=f"touch {tmp_path}/done.$SLURM_ARRAY_TASK_ID\n")
    records = slurm.wait_done(job, timeout=55)
    took = time.monotonic() - start
    assert len(list(tmp_path.glob("done.*"))) == elements, sorted(p.name for p in tmp_path.iterdir())
    assert {r["JobState"] for r in records} == {"COMPLETED"}
    per_element = took / elements
    record_property("slurm_seconds_per_trivial_element", round(per_element, 2))
    print(f"\n{elements} trivial elements, {slurm.cpus} CPUs, 1 each: {took:.1f} s from sbatch to the last "
          f"done, {per_element:.2f} s per element", file=sys.stderr)
    assert per_element < 5
