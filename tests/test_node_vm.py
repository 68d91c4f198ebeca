"""vmiso --host ssh://NODE run, end to end: a real sshd in a network namespace of the test's own, the node's
vmiso (this tree) with a state directory of its own."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nodeharness import ssh_node
from vmharness import REPO, make_state_root, remove_tree, vmiso_domains, wait_for

pytestmark = pytest.mark.vm

JOB = ("import hashlib, sys, pathlib; print(open('/in/data.txt').read().strip().upper(), flush=True); "
       "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), flush=True); "
       "print('to stderr', file=sys.stderr, flush=True); pathlib.Path('/out/result.txt').write_text('done'); "
       "sys.exit(3)")
SLOW = "import time; print('started', flush=True); time.sleep(600)"


@pytest.fixture
def node(image, tmp_path):
    """The node: its own state directory holding the session's image (hard links: the store's files are
    read-only), sshd in a network namespace of the test's own."""
    root = make_state_root("vmiso-node-")
    try:
        state = root / "state"
        state.mkdir()
        subprocess.run(["cp", "-al", str(image["state"] / "images"), str(state / "images")], check=True)
        directory = root / "node"
        directory.mkdir()
        with ssh_node(directory, state) as made:
            yield made
    finally:
        remove_tree(root)


def client(node, *args, **popen):
    return subprocess.Popen([sys.executable, "-m", "vmiso", "--host", node.url, *map(str, args)], cwd=REPO,
                            env=dict(node.env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **{"stdin": subprocess.DEVNULL, **popen})


def left_on(node) -> list[str]:
    """What a run left on the node: VMs, run directories, received inputs or kept outputs."""
    runs = node.state / "runs"
    return [*vmiso_domains(node.state), *(str(p) for p in runs.iterdir() if runs.is_dir()),
            *(str(p) for p in node.tmp.iterdir())]


def test_a_run_on_a_node_streams_exits_and_brings_checked_outputs_back(node, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello from the client\n")
    out, record = tmp_path / "out", tmp_path / "run.json"
    started = time.monotonic()
    stdin = os.urandom(3 << 20)  # twelve times the node's stdin window: the flow control's credits go round
    process = client(node, "run", "--image", "it", "-i", data, "-o", out, "--json", record, "--", "python", "-c", JOB,
                     stdin=subprocess.PIPE)
    stdout, stderr = process.communicate(stdin, timeout=900)
    took = time.monotonic() - started
    assert process.returncode == 3, stderr.decode()
    assert stdout.decode().splitlines() == ["HELLO FROM THE CLIENT", hashlib.sha256(stdin).hexdigest()], \
        stderr.decode()
    assert "to stderr" in stderr.decode()
    assert (out / "result.txt").read_text() == "done"
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST", "result.txt"]
    kept = json.loads(record.read_text())
    assert kept["host"] == node.url and kept["exit_code"] == 3 and kept["error"] is None
    assert [f["path"] for f in kept["outputs"]["files"]] == ["result.txt"]
    assert kept["inputs"][0]["name"] == "data.txt"
    assert left_on(node) == []
    print(f"\nrun through --host: {took:.1f} s, boot {kept['boot']}")
    # The node's images, with the digest of the template the run used.
    listed = client(node, "images", "--json")
    shown, said = listed.communicate(timeout=120)
    assert listed.returncode == 0, said.decode()
    assert [(row["name"], row["sha256"]) for row in json.loads(shown)] == [("it", kept["sha256"])]


def test_a_client_killed_mid_run_leaves_no_vm_on_the_node(node):
    process = client(node, "run", "--image", "it", "--", "python", "-c", SLOW)
    assert process.stdout is not None
    assert process.stdout.readline().decode().strip() == "started"
    assert vmiso_domains(node.state), "the job runs in a VM of the node's"
    killed = time.monotonic()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    wait_for(lambda: not vmiso_domains(node.state), 30, "the node's VM to be destroyed")
    gone = time.monotonic() - killed
    wait_for(lambda: left_on(node) == [], 30, "the node's run to be cleaned up")
    assert gone < 20
    print(f"\nVM gone {gone:.1f} s after the client was killed")


def test_a_pool_started_through_the_link_serves_the_nodes_runs_preloaded(node, tmp_path):
    """vmiso --host NODE pool start|status|stop and images verify: the node's own vmiso, with its own
    configuration, and a run through the link takes the clone its pool holds."""
    def ok(*args) -> str:
        process = client(node, *args)
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, (args, err.decode())
        return out.decode()

    started = ok("pool", "start", "--image", "it", "--size", "1")
    assert "pool of 1 for it ready" in started
    try:
        status = json.loads(ok("pool", "status", "--json"))
        assert [(row["image"], row["size"]) for row in status] == [("it", 1)]
        record = tmp_path / "run.json"
        # The node's pool was made with its config's memory and CPUs; the run asks for the same.
        assert ok("run", "--image", "it", "--memory", "512", "--cpus", "1", "--json", record, "--",
                  "python", "-c", "print('from the pool')") == "from the pool\n"
        assert json.loads(record.read_text())["boot"] == "preloaded"
    finally:
        stopped = ok("pool", "stop", "--image", "it")
    assert "pool for it stopped" in stopped
    assert ok("images", "verify", "it").startswith("it: OK sha256 ")
    wait_for(lambda: left_on(node) == [] and not vmiso_domains(node.state), 60, "the node's pool to be gone",
             lambda: f"left: {left_on(node)}")


def test_a_batch_runs_every_task_on_the_node_and_resumes_against_its_template(node, tmp_path):
    """vmiso --host NODE batch: each task a run through the link (two at once), its outputs checked here,
    the node's template recorded; the same batch again runs only the task that failed."""
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("a.txt", "alpha\n"), ("b.txt", "fail\n")):
        (data / name).write_text(text)
    out = tmp_path / "out"
    job = "tr a-z A-Z < /in/{} > /out/upper; ls /in > /out/listing; if grep -q fail /in/{}; then exit 3; fi"
    argv = ("batch", "--image", "it", "-o", out, "-j", "2", "--each", data / "a.txt", data / "b.txt", "--",
            "sh", "-c", job)

    def batch():
        process = client(node, *argv)
        _, err = process.communicate(timeout=900)
        return process.returncode, err.decode()

    code, err = batch()
    assert code == 123, err  # one task failed
    listed = client(node, "images", "--json")
    shown, _ = listed.communicate(timeout=120)
    template = {row["name"]: row["sha256"] for row in json.loads(shown)}["it"]
    recorded = json.loads((out / "batch.json").read_text())
    assert recorded["sha256"] == template
    tasks = {t["name"]: t for t in recorded["tasks"]}
    assert {n: (t["status"], t["exit_code"], t["host"], t["sha256"]) for n, t in tasks.items()} == {
        "a.txt": ("ok", 0, node.url, template), "b.txt": ("failed", 3, node.url, template)}, err
    for name in ("a.txt", "b.txt"):
        assert (out / name / "upper").read_text() == (data / name).read_text().upper()
        assert (out / name / "listing").read_text() == f"{name}\n"
    wait_for(lambda: left_on(node) == [], 30, "the node's runs to be cleaned up", lambda: f"left: {left_on(node)}")

    (data / "b.txt").write_text("bravo\n")
    code, err = batch()
    assert code == 0, err
    assert "1 done before, skipped; 1 to run" in err
    again = {t["name"]: t for t in json.loads((out / "batch.json").read_text())["tasks"]}
    assert again["a.txt"] == tasks["a.txt"] and again["b.txt"]["attempts"] == 2
    assert (out / "b.txt" / "upper").read_text() == "BRAVO\n"
