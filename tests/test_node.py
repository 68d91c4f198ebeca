"""vmiso --host without a VM: a hostile node (tests/fake_node.py) behind the client's real code and real
pipes, started by a fake ``ssh`` first on PATH; the argv of the real ssh; an unknown host key refused by
the real ssh against a real sshd."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmiso.errors import ConfigError
from vmiso.node import openssh

from nodeharness import ssh_node, sshd, write_node_files

REPO = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).resolve().parent / "fake_node.py"
SMALL_LIMITS = "run:\n  output_max_bytes: 1048576\n  output_max_files: 100\n"


@pytest.fixture
def place(tmp_path):
    """(the client's environment with the fake ssh, a work directory, the client's TMPDIR)."""
    bin_dir, work, tmp = tmp_path / "bin", tmp_path / "work", tmp_path / "tmp"
    for d in (bin_dir, work, tmp):
        d.mkdir()
    fake = bin_dir / "ssh"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE}\n")
    fake.chmod(0o755)
    config = work / "vmiso.yaml"
    config.write_text(SMALL_LIMITS)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp),
               PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    return env, work, tmp


def run_against(place, scenario: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    env, work, _ = place
    out = work / "out"
    done = subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "run", "-c", str(work / "vmiso.yaml"),
                           "-o", str(out), *args, "--", "python", "job.py"], env=dict(env, VMISO_FAKE_NODE=scenario),
                          capture_output=True, text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    return done, out


def written(place) -> list[str]:
    """Everything under the work directory and the client's TMPDIR, but the config."""
    _, work, tmp = place
    return sorted(str(p.relative_to(work.parent)) for root in (work, tmp) for p in root.rglob("*")
                  if p.name != "vmiso.yaml")


def test_an_honest_node_delivers_checked_outputs_with_a_manifest(place):
    done, out = run_against(place, "honest")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "job output\n"
    assert (out / "result.txt").read_text() == "fine\n" and (out / "sub" / "more.txt").read_text() == "more"
    assert "result.txt" in (out / "MANIFEST").read_text()
    assert written(place) == ["work/out", "work/out/MANIFEST", "work/out/result.txt", "work/out/sub",
                              "work/out/sub/more.txt"]


def test_a_tool_file_the_node_should_have_refused_is_refused_here(place):
    done, out = run_against(place, "tool-file")
    assert done.returncode == 0, done.stderr
    assert "refused output .envrc" in done.stderr and "direnv" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST", "result.txt"]


@pytest.mark.parametrize(("scenario", "said"), [
    ("symlink", "only regular files and directories cross the link"),
    ("dotdot", "not a plain relative path"),
    ("absolute", "not a plain relative path"),
    ("dash", "begins with '-'"),
    ("control-name", "control characters"),
    ("unlisted", "which its MANIFEST does not list"),
    ("wrong-hash", "does not match the sha256 its MANIFEST gives"),
    ("missing", "which it did not send"),
    ("oversized-frame", "at most 262144 are allowed"),
    ("oversized-stream", "hold more than 1048576 bytes"),
    ("lying-size", "more bytes for 'result.txt' than the 5 it announced"),
    ("bad-exit", "an exit status that no job can have"),
])
def test_a_hostile_node_is_refused_and_nothing_is_written(place, scenario, said):
    done, out = run_against(place, scenario)
    assert done.returncode == 125, (done.returncode, done.stderr)
    assert said in done.stderr
    assert "\x1b" not in done.stderr
    # Nothing outside --output, and nothing in it: the client's staging directory is gone too.
    assert written(place) in ([], ["work/out"]), written(place)
    assert not out.exists() or list(out.iterdir()) == []


def test_the_nodes_words_reach_the_terminal_neutralized_and_its_json_says_where(place):
    _, work, _ = place
    done, _ = run_against(place, "escapes", "--json", str(work / "run.json"))
    assert done.returncode == 125
    # The job's own bytes go to a pipe raw, as a local run's do; vmiso's lines (the node's words) never.
    ours = [line for line in done.stderr.splitlines() if line.startswith("vmiso:")]
    assert len(ours) == 3 and not any(c in line for line in ours for c in "\x1b\x07"), ours
    assert "node node: bad" in done.stderr and "node log" in done.stderr
    record = json.loads((work / "run.json").read_text())
    assert record["host"] == "ssh://node" and record["exit_code"] == 125 and "bad" in record["error"]


def test_the_jobs_exit_code_comes_back(place):
    _, work, _ = place
    done, _ = run_against(place, "exit-3", "--json", str(work / "run.json"))
    assert done.returncode == 3, done.stderr
    assert "vmiso: a hint" in done.stderr and "\x1b" not in done.stderr
    assert json.loads((work / "run.json").read_text())["host"] == "ssh://node"


def test_the_first_sigterm_while_the_job_runs_is_passed_to_the_node(place):
    env, _, _ = place
    process = subprocess.Popen([sys.executable, "-m", "vmiso", "--host", "ssh://node", "run", "--", "python", "job.py"],
                               env=dict(env, VMISO_FAKE_NODE="signal"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, cwd=REPO)
    assert process.stdout is not None and process.stdout.readline() == b"job output\n"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert stdout == b"got SIGTERM\n", stderr
    assert process.returncode == 143 and b"SIGTERM passed to the job" in stderr
    assert b"killed by SIGTERM" in stderr


@pytest.mark.parametrize(("scenario", "said"), [
    ("hang", "sent no result in the time the run could take"),
    ("stall-outputs", "did not finish sending the run's outputs in the time they could take"),
])
def test_a_node_that_never_answers_is_given_up_on_when_the_run_could_no_longer_go(place, monkeypatch, scenario,
                                                                                   said):
    import dataclasses
    import io
    import time

    from vmiso import config
    from vmiso.errors import VmisoError
    from vmiso.execution import JobIO
    from vmiso.node import client
    from vmiso.plan import RunRequest, plan_run
    from vmiso.progress import Steps
    from vmiso.run import Interruption

    env, work, _ = place
    monkeypatch.setenv("VMISO_FAKE_NODE", scenario)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.setattr(client, "NODE_SLACK", 0.5)
    monkeypatch.setattr(client, "OUTPUT_MIN_RATE", 2**60)  # the outputs' deadline: the slack alone
    out = work / "out"
    request = RunRequest(command=("x",), timeout=1, host="ssh://node", output=out)
    plan = dataclasses.replace(plan_run(config.load(None), request), boot_timeout=0)
    node = client.SshNode(openssh.parse_target("ssh://node"),
                          argv_for=lambda target, remote: [sys.executable, str(FAKE)])
    started = time.monotonic()
    with pytest.raises(VmisoError, match=said) as caught:
        node.execute(plan, JobIO(io.BytesIO(), io.BytesIO()), Steps(), Interruption(grace=0))
    assert time.monotonic() - started < 15
    assert caught.value.exit_code == 125 and caught.value.record["host"] == "ssh://node"
    assert written(place) == []  # nothing of a transfer that never ended


def test_another_protocol_version_is_refused_naming_both(place):
    done, _ = run_against(place, "old-protocol")
    assert done.returncode == 125
    assert "protocol 99 (vmiso '9.9')" in done.stderr and "speaks protocol 2" in done.stderr


def test_a_node_without_vmiso_is_named(place):
    done, _ = run_against(place, "silent")
    assert done.returncode == 125
    assert "did not answer as a vmiso node" in done.stderr and "command not found" in done.stderr
    assert "--remote-vmiso" in done.stderr


def test_a_dropped_link_ends_the_run_with_125(place):
    done, _ = run_against(place, "drop")
    assert done.returncode == 125
    assert "the link to node was lost" in done.stderr


def test_other_commands_refuse_host_rather_than_act_here(place):
    env, _, _ = place
    for args in (["images", "sbom", "it"], ["shell"], ["provision"]):
        done = subprocess.run([sys.executable, "-m", "vmiso", *args], env=dict(env, VMISO_HOST="ssh://node"),
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 125, args
        assert f"--host is not supported for 'vmiso {' '.join(args[:2]) if args[0] == 'images' else args[0]}' yet" \
            in done.stderr, done.stderr


@pytest.mark.parametrize("args", [["gc", "--layers"], ["pool", "start", "--image", "it", "--size", "1"],
                                  ["pool", "stop"], ["pool", "status", "--json"], ["images", "show", "it", "--json"],
                                  ["images", "verify", "it"], ["images", "warm", "it"], ["images", "rm", "it"]])
def test_commands_run_on_the_node_their_words_neutralized_and_their_exit_status_kept(place, args):
    env, _, _ = place

    def vmiso(scenario, *more):
        return subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", *args, *more],
                              env=dict(env, VMISO_FAKE_NODE=scenario), capture_output=True, timeout=60, cwd=REPO)

    done = vmiso("command")
    assert done.returncode == 3, done.stderr  # the node's vmiso's
    asked, escapes = done.stdout.decode().splitlines()
    assert asked == f"asked for {' '.join(args)}"
    assert "\x1b" not in escapes and "\x07" not in escapes and escapes.startswith("^[") and escapes.endswith("cleared")
    assert done.stderr.decode() == "vmiso: error: half a line, then \u20ac the rest\n"
    lying = vmiso("command-bad-exit")
    assert lying.returncode == 125 and b"reported exit status 999" in lying.stderr
    mixed = vmiso("command", "--state-dir", "/var/lib/vmiso") if args[0] != "images" else None
    assert mixed is None or (mixed.returncode == 125 and b"--state-dir name this machine's settings" in mixed.stderr)


@pytest.mark.parametrize(("argv", "said"), [
    (["gc", "-c/etc/vmiso.yaml"], "-c/etc/vmiso.yaml is for the node's own configuration"),
    (["gc", "--config=/x"], "--config is for the node's own configuration"),
    (["pool", "start", "--state-dir", "/x"], "--state-dir is for the node's own configuration"),
    (["pool", "start", "--accel", "kvm"], "--accel is for the node's own configuration"),
    (["pool", "rm"], "'vmiso pool rm' is not a command a client may run on this node"),
    (["images", "sbom", "it"], "'vmiso images sbom' is not a command"),
    (["provision"], "'vmiso provision' is not a command"),
    (["_node"], "'vmiso _node' is not a command"),
    (["gc"] * 65, "whose argv is not one"),
    (["gc", "a\0b"], "whose argv is not one"),
    ("gc", "whose argv is not one"),
])
def test_a_node_runs_only_the_commands_it_offers_and_only_with_its_own_configuration(argv, said):
    from vmiso.errors import VmisoError
    from vmiso.node import server

    with pytest.raises(VmisoError, match=re.escape(said)):
        server._command_argv(json.dumps({"op": "command", "argv": argv}).encode(), Path("/node/vmiso.yaml"))
    assert server._command_argv(b'{"op": "command", "argv": ["images", "show", "it"]}', Path("/n.yaml")) == [
        "images", "-c", "/n.yaml", "show", "it"]
    assert server._command_argv(b'{"op": "command", "argv": ["pool", "status"]}', None) == ["pool", "status"]


@pytest.fixture
def real_node(tmp_path):
    """A node with no image (tests/nodeharness.py): a real sshd in a network namespace of the test's own,
    and this tree's vmiso there with a state directory of its own."""
    directory = tmp_path / "node"
    directory.mkdir()
    with ssh_node(directory, tmp_path / "state") as node:
        yield node


@pytest.mark.root(reason="a real sshd in a network namespace of the test's own")
def test_gc_pool_and_images_act_on_a_real_node_with_its_own_configuration(real_node):
    node, state = real_node, real_node.state
    # The node's own login sets VMISO_HOST (for its user's runs from there): commands for a client act here.
    script = node.directory / "node-vmiso"
    script.write_text(script.read_text().replace("\nexec ", "\nexport VMISO_HOST=ssh://elsewhere.invalid\nexec ", 1))

    def vmiso(*args):
        return subprocess.run([sys.executable, "-m", "vmiso", "--host", node.url, *args], env=node.env,
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    left = state / "runs" / "0123456789ab"  # what a killed run left on the node
    left.mkdir(parents=True)
    gc = vmiso("gc")
    assert gc.returncode == 0 and not left.exists(), gc.stderr
    assert "removed run directory 0123456789ab" in gc.stdout + gc.stderr
    status = vmiso("pool", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == [], status.stderr
    show = vmiso("images", "show", "it")
    assert show.returncode == 125 and f"no image named 'it' in {state / 'images'}" in show.stderr, show.stderr
    refused = vmiso("images", "--state-dir", "/tmp", "show", "it")
    assert refused.returncode == 125 and "--state-dir name this machine's settings" in refused.stderr


def test_the_configs_host_key_sends_runs_images_and_doctor_to_the_node_and_local_overrides_it(place, tmp_path):
    env, work, _ = place
    config = work / "vmiso.yaml"
    state = tmp_path / "state"
    config.write_text(SMALL_LIMITS + f"state_dir: {state}\nhost: ssh://node\n")

    def vmiso(scenario, *args, host=()):
        return subprocess.run([sys.executable, "-m", "vmiso", *host, *args], capture_output=True, text=True,
                              env=dict(env, VMISO_FAKE_NODE=scenario), timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)

    out = work / "out"
    done = vmiso("honest", "run", "-c", config, "-o", out, "--", "python", "job.py")
    assert done.returncode == 0 and done.stdout == "job output\n", done.stderr
    assert (out / "result.txt").read_text() == "fine\n"
    listed = vmiso("images", "images", "-c", config)
    assert listed.returncode == 0 and "(on ssh://node)" in listed.stdout, listed.stderr
    doctor = vmiso("doctor", "doctor", "-c", config)
    assert doctor.returncode == 1 and "[ok  ] link: ssh://node answers" in doctor.stdout, doctor.stderr
    gc = vmiso("command", "gc", "-c", config)
    assert gc.returncode == 3 and "asked for gc\n" in gc.stdout, gc.stderr
    # --host local: this machine, whatever the config says (the fake node, asked, would fail: no scenario).
    local = vmiso("unknown", "images", "-c", config, host=("--host", "local"))
    assert local.returncode == 0 and "no images; build one" in local.stdout, local.stderr
    # A command that cannot act on a node yet refuses rather than act here.
    for args in (["provision"], ["shell"]):
        refused = vmiso("unknown", args[0], "-c", config, *args[1:])
        assert refused.returncode == 125, (args, refused.stderr)
        assert f"sets host: ssh://node, and 'vmiso {args[0]}' cannot act on a node yet" in refused.stderr
        assert "--host local" in refused.stderr
    assert not state.exists() and not (work / "b").exists()
    config.write_text("host: http://node\n")
    bad = vmiso("unknown", "images", "-c", config)
    assert bad.returncode == 125 and "host: 'http://node' is not an ssh:// address" in bad.stderr, bad.stderr


def test_a_batch_through_the_link_checks_the_nodes_template_before_any_task(place, tmp_path):
    """The tasks' runs through --host are tested on a real node (test_node_vm.py); here, what a batch
    for a node refuses before it starts one."""
    env, work, _ = place
    data = tmp_path / "a.txt"
    data.write_text("a\n")

    def batch(*args):
        return subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "batch", "-o", work / "b",
                               *args, "--each", data, "--", "cat", "/in/{}"], env=dict(env, VMISO_FAKE_NODE="images"),
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    missing = batch("--image", "other")
    assert missing.returncode == 125 and "ssh://node has no image named 'other'" in missing.stderr, missing.stderr
    unknown = batch("--image", "evil\x1b]0;owned\x07\x1b[2J")  # listed, with no sha256
    assert unknown.returncode == 125 and "does not know the sha256 of its image" in unknown.stderr, unknown.stderr
    slurm = batch("--image", "it", "--on", "slurm")
    assert slurm.returncode == 125 and "--host runs every task on ssh://node through the link" in slurm.stderr
    assert not (work / "b").exists()


def test_the_nodes_images_are_listed_with_their_digests(place):
    env, _, _ = place
    done = subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "images"],
                          env=dict(env, VMISO_FAKE_NODE="images"), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "a" * 64 in done.stdout and "(on ssh://node)" in done.stdout
    assert "\x1b" not in done.stdout and "evil" in done.stdout
    lying = subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "images"],
                           env=dict(env, VMISO_FAKE_NODE="images-lying"), capture_output=True, text=True, timeout=60,
                           cwd=REPO)
    assert lying.returncode == 125 and "name, size, date or sha256 is not one" in lying.stderr


def test_the_nodes_doctor_is_shown_neutralized_and_a_lying_one_refused(place):
    env, _, _ = place

    def doctor(scenario, *args):
        return subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "doctor", *args],
                              env=dict(env, VMISO_FAKE_NODE=scenario), capture_output=True, text=True, timeout=60,
                              cwd=REPO)

    done = doctor("doctor")
    assert done.returncode == 1, done.stderr  # the node found a failure
    assert "[ok  ] link: ssh://node answers as a vmiso node" in done.stdout
    assert "[ok  ] qemu-img: /usr/bin/qemu-img" in done.stdout and "[FAIL] evil" in done.stdout
    assert "\x1b" not in done.stdout + done.stderr and "fix: sudo" in done.stdout
    for scenario, said in (("doctor-lying", "name, result, detail or fix is not one"),
                           ("doctor-flood", "more than 200 checks")):
        lying = doctor(scenario)
        assert lying.returncode == 125 and said in lying.stderr, lying.stderr
        assert "qemu-img" not in lying.stdout
    mixed = doctor("doctor", "--state-dir", "/var/lib/vmiso")
    assert mixed.returncode == 125 and "--state-dir name this machine's settings" in mixed.stderr


@pytest.mark.root(reason="a real sshd in a network namespace of the test's own")
def test_the_doctor_of_a_real_node_says_through_the_link_what_it_says_there(real_node):
    node = real_node
    there = subprocess.run([str(node.directory / "node-vmiso"), "doctor", "-c", str(node.directory / "node.yaml")],
                           capture_output=True, text=True, timeout=120)
    here = subprocess.run([sys.executable, "-m", "vmiso", "--host", node.url, "doctor"], env=node.env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert here.returncode == there.returncode, here.stderr
    first, *rest = here.stdout.splitlines()
    assert first == f"[ok  ] link: {node.url} answers as a vmiso node; what it finds on itself:"
    assert rest == there.stdout.splitlines() and any(line.startswith("[ok  ] qemu-img") for line in rest)


@pytest.mark.parametrize("text", ["node", "http://node", "ssh://-oProxyCommand=x", "ssh://node/path",
                                  "ssh://us er@node", "ssh://node:99999", "ssh://a:b@node"])
def test_host_addresses_that_are_not_one_are_refused(text):
    with pytest.raises(ConfigError):
        openssh.parse_target(text)


def test_the_ssh_argv_always_checks_host_keys():
    target = openssh.parse_target("ssh://ana@kvm1.example.org:2222")
    assert (target.user, target.node, target.port) == ("ana", "kvm1.example.org", 2222)
    argv = openssh.ssh_argv(target, openssh.remote_command("/opt/v/bin/vmiso", "_node"))
    assert argv[:2] == ["ssh", "-T"]
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert argv[-3:] == ["--", "kvm1.example.org", "/opt/v/bin/vmiso _node"]
    assert argv[argv.index("-p"):argv.index("-p") + 2] == ["-p", "2222"]


@pytest.mark.root(reason="a real sshd, as root, on loopback")
def test_an_unknown_host_key_is_refused_with_the_command_that_adds_it(tmp_path):
    files = write_node_files(tmp_path, "127.0.0.1", 42223, known=False)
    env = dict(os.environ, PATH=f"{files['bin']}:{os.environ['PATH']}", VMISO_REMOTE_VMISO="false")
    with sshd(tmp_path, "127.0.0.1", 42223, netns=None):
        done = subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "run", "--", "true"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 125
    assert "the host key of node is not known" in done.stderr
    assert "connect once with 'ssh node'" in done.stderr
    assert not (tmp_path / "known_hosts").read_text()  # never learnt


def test_the_client_sends_stdin_only_as_far_as_the_nodes_credit(place):
    env, work, _ = place
    data = os.urandom(512 * 1024)  # the window, then four credits' worth
    done = subprocess.run([sys.executable, "-m", "vmiso", "--host", "ssh://node", "run", "-c", str(work / "vmiso.yaml"),
                           "--", "cat"], env=dict(env, VMISO_FAKE_NODE="stdin-credit"), input=data,
                          capture_output=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.decode().splitlines()[-1])
    assert seen == {"received": len(data), "over": []}  # all of it, and never past the credit


# --- stdin's flow control, on the node's side ------------------------------------------------------

def _node_reading():
    """The node's reader of the link (vmiso.node.server._listen) in a thread, with a job that never reads
    its stdin: (client's writer, node's frames to the client, the job's stdin, interruption, stopped)."""
    import threading

    from vmiso.node import protocol, server
    from vmiso.run import Interruption

    to_node_r, to_node_w = os.pipe()
    to_client_r, to_client_w = os.pipe()
    os.set_blocking(to_client_r, False)
    feed = server._StdinFeed(protocol.Writer(to_client_w, "the client"))
    interruption = Interruption(job_running=True)
    stopped = threading.Event()
    threading.Thread(target=server._listen, args=(protocol.Reader(to_node_r, "the client"), feed, interruption,
                                                   threading.Event(), stopped.set), daemon=True).start()
    return protocol.Writer(to_node_w, "node"), to_client_r, feed, interruption, stopped


def _credits(fd: int) -> int:
    from vmiso.node import protocol

    data = b""
    while True:
        try:
            block = os.read(fd, 65536)
        except BlockingIOError:
            break
        data += block
    total = 0
    while data:
        kind, size = int(data[0]), int.from_bytes(data[1:5], "big")
        assert kind == protocol.CREDIT
        total += json.loads(data[5:5 + size])["bytes"]
        data = data[5 + size:]
    return total


def test_a_job_that_reads_no_stdin_does_not_keep_a_signal_from_the_node():
    import time

    from vmiso.node import protocol

    client, credits, feed, interruption, stopped = _node_reading()
    # A whole window of stdin (four times what a pipe holds), then a signal: the node's reader is not
    # stuck writing to the job, so the signal is taken at once.
    for _ in range(protocol.STDIN_WINDOW // protocol.CHUNK):
        client.send(protocol.STDIN, b"x" * protocol.CHUNK)
    client.send_json(protocol.SIGNAL, {"signal": "SIGTERM"})
    deadline = time.monotonic() + 5
    while interruption.received is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert interruption.received == signal.SIGTERM and not stopped.is_set()
    # What the job has taken is given back as credit, and no more than that.
    given = _credits(credits)
    assert given < protocol.STDIN_WINDOW
    taken = b""
    while len(taken) < protocol.STDIN_WINDOW:
        taken += feed.job_end.read(protocol.STDIN_WINDOW - len(taken))
    deadline = time.monotonic() + 5
    while given < protocol.STDIN_WINDOW and time.monotonic() < deadline:
        time.sleep(0.01)
        given += _credits(credits)
    assert given == protocol.STDIN_WINDOW
    feed.stop()


def test_stdin_beyond_the_nodes_credit_ends_the_run():
    import threading

    from vmiso.node import protocol

    client, _, feed, _, stopped = _node_reading()

    def flood() -> None:  # the window, what the job's pipe holds, and more: a client that ignores its credit
        for _ in range(protocol.STDIN_WINDOW // protocol.CHUNK + 3):
            client.send(protocol.STDIN, b"x" * protocol.CHUNK)
    threading.Thread(target=flood, daemon=True).start()  # the node stops reading: the last sends block
    assert stopped.wait(5)  # a protocol error: the run is stopped, the node's memory stays bounded
    feed.stop()
