"""Integration tests: real guests booted through libvirt (under TCG here).

One provisioned image serves the session; each run test boots its own clones and
checks many things per boot, because every boot costs tens of seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from vmiso import accel
from vmiso.host import workdir

from diskimage import ROOT_PARTITION, make_cloud_image, remove_files
from vmharness import (
    DELETED_SECRET,
    OTHER_LAN,
    REPO,
    SERVICE_LAN,
    SMALL_FILES,
    TABULATE,
    VMISO,
    Streamed,
    check_inputs_seen,
    make_inputs,
    make_state_root,
    network_namespace,
    network_services,
    on_a_terminal,
    read_terminal,
    remove_tree,
    vmiso,
    vmiso_domains,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.vm
GUEST = Path(__file__).parent / "guest"


# What vmiso -q still prints under TCG (the runs here are TCG's): the one warning.
TCG_LINE = f"vmiso: WARNING: {accel.TCG_WARNING}\n".encode()

def leftovers(state: Path) -> list[str]:
    runs = state / "runs"
    found = [p.name for p in runs.iterdir()] if runs.is_dir() else []
    found += [p.name for p in (state / "images").iterdir() if p.name.startswith(".")]
    found += [f"mount {p}" for p in workdir.mounts_below(state)]  # a run's /out filesystem
    return found + vmiso_domains(state)


def host_addresses() -> list[str]:
    """This machine's own addresses and the package registry's: all must be unreachable."""
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    addresses = [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])
                 if a.get("family") == "inet" and not a["local"].startswith("127.")]
    try:
        addresses.append(socket.getaddrinfo("pypi.org", 443, socket.AF_INET)[0][4][0])
    except OSError:
        pass  # the registry is then only unreachable by name, which the DNS probe covers
    return addresses


def contains(path: Path, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the file (read in blocks that overlap by its length)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(8 * 1024**2):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def test_provision_makes_a_sealed_verified_image(image):
    state = image["state"]
    manifest = json.loads((state / "images" / "it" / "manifest.json").read_text())
    assert {"name": "tabulate", "version": "0.9.0"} in manifest["pip"]
    assert {"name": "numpy", "version": "2.4.6"} in manifest["pip"]
    assert manifest["requirements"]["hashed"] is True
    assert any(p["name"] == "openssh-server" for p in manifest["apt"])
    assert manifest["kernel"] and manifest["python"].startswith("3.")
    # What runs at every Python start, read from the template: pip's own files match their RECORDs,
    # NumPy's native extensions are NumPy's, and nothing could not be read.
    startup = manifest["startup"]
    assert startup["tampered"] == [] and startup["unreadable"] == [], startup
    assert any(n["distribution"] == "numpy-2.4.6" for n in startup["native"])
    assert all(n["distribution"] is not None for n in startup["native"]), startup["native"]
    assert manifest["host_key"].startswith("ssh-ed25519 ")
    template = state / "images" / "it" / "template.qcow2"
    assert stat.S_IMODE(template.stat().st_mode) == 0o444
    assert stat.S_IMODE((state / "images" / "it" / "client_key").stat().st_mode) == 0o600
    # The image is root's and private (the template holds the guest's SSH host key).
    assert stat.S_IMODE((state / "images" / "it").stat().st_mode) & 0o007 == 0
    assert [(p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)) for p in (template, template.with_name("vmlinuz"))] \
        == [(0, 0o444)] * 2
    # What the guest deleted before sealing is not in the template's free space.
    assert not contains(template, DELETED_SECRET.strip("# \n").encode())
    listed = json.loads(vmiso("images", "-c", image["config"], "--json", check=True).stdout)
    assert [(i["name"], i["sha256"]) for i in listed] == [("it", manifest["sha256"])]
    assert "tabulate==0.9.0" in vmiso("images", "-c", image["config"], check=True).stdout
    assert manifest["sha256"] in vmiso("images", "-c", image["config"], "verify", "it", check=True).stdout
    # Provisioned through the gateway: the index and its file host, nothing refused, all recorded.
    shown = json.loads(vmiso("images", "-c", image["config"], "show", "it", "--json", check=True).stdout)
    assert {"pypi.org:443", "files.pythonhosted.org:443"} == {h["host"] for h in shown["gateway"]["contacted"]}
    assert shown["gateway"]["refused"] == []
    assert leftovers(state) == []
    # The sealed image holds no cloud-init state or network configuration; the
    # provisioning log was kept beside it.
    assert "VMISO-STEP pip" in (state / "images" / "it" / "provision.log").read_text(errors="replace")


@pytest.mark.parametrize("boot", ["warm", "cold"])
def test_run_streams_isolates_and_checks_outputs(image, tmp_path, boot):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    data = inputs / "data.csv"
    data.write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    record = tmp_path / "run.json"
    probes = [[a, port] for a in host_addresses() for port in (22, 443)]
    flags = ["--cold"] if boot == "cold" else []
    run = Streamed.start("run", "-c", image["config"], *flags, "-i", GUEST / "probe.py", "-i", data, "-o", out,
                         "--json", record, "--", "python", "probe.py", json.dumps(probes))
    assert run.wait() == 3, run.lines
    # Streamed live and in order, not collected at the end.
    assert run.when("out", "out-1") < run.when("err", "err-1") < run.when("out", "out-2")
    assert run.when("out", "out-2") - run.when("out", "out-1") > 2.0
    results = json.loads(run.text("out").splitlines()[-1])
    assert results["write-input"] == "EROFS" and results["create-in-input"] == "EROFS"
    assert data.read_text() == "a,b\n1,2\n"
    assert results["uid"] != 0 and results["cwd"] == "/in"
    assert results["env"] == {"VMISO_IN": "/in", "VMISO_OUT": "/out"}
    assert results["python"].startswith("/opt/vmiso/venv/")
    assert results["input"] == "a,b\n1,2\n"
    assert results["tabulate"] == "0.9.0"
    # Offline: no interface but loopback, no DNS, nothing reachable.
    assert results["interfaces"] == ["lo"]
    assert results["dns"] != "ALLOWED"
    tcp = {k: v for k, v in results.items() if k.startswith("tcp ")}
    assert len(tcp) == len(probes) and "ALLOWED" not in tcp.values(), tcp
    # Outputs: regular files copied with a manifest; the rest refused and reported.
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST", "result.json", "sub"]
    assert (out / "sub" / "table.txt").read_text().startswith("  a    b")
    manifest = (out / "MANIFEST").read_text()
    assert "  result.json\n" in manifest and "  sub/table.txt\n" in manifest
    stderr = run.text("err")
    for name, reason in (("link", "symbolic link"), ("fifo", "FIFO"), ("suid", "setuid"),
                         ("sub/.git", "git runs hooks"), (".envrc", "direnv runs it")):
        assert f"refused output {name}: " in stderr and reason in stderr
    assert not (out / "sub" / ".git").exists() and not (out / ".envrc").exists()
    summary = json.loads(record.read_text())
    assert summary["exit_code"] == 3 and summary["image"] == "it" and summary["boot"] == boot
    assert summary["sha256"] == json.loads((image["state"] / "images/it/manifest.json").read_text())["sha256"]
    assert {"overlay", "start", "connect", "exec", "teardown"} <= set(summary["timings"])
    assert {f["path"] for f in summary["outputs"]["files"]} == {"result.json", "sub/table.txt"}
    assert leftovers(image["state"]) == []


@pytest.mark.parametrize("boot", ["warm", "cold"])
def test_timeout_destroys_the_vm_and_exits_124_keeping_what_the_job_wrote(image, tmp_path, boot):
    flags = ["--cold"] if boot == "cold" else []
    done = vmiso("run", "-c", image["config"], *flags, "--timeout", "3", "--json", tmp_path / "r.json",
                 "-o", tmp_path / "out", "--", "sh", "-c", "echo so far > /out/partial.txt; echo started; sleep 600")
    assert done.returncode == 124, done.stderr
    assert "started" in done.stdout
    assert f"longer than 3 s; the VM was destroyed; 1 file it had written, checked, is in {tmp_path / 'out'}" \
        in done.stderr
    assert (tmp_path / "out" / "partial.txt").read_text() == "so far\n"
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["exit_code"] == 124 and [f["path"] for f in record["outputs"]["files"]] == ["partial.txt"]
    assert record["boot"] == boot
    assert leftovers(image["state"]) == []


def test_sigkill_leaves_nothing_after_gc(image):
    # Warm (the default): a restored domain cannot have libvirt's auto-destroy.
    run = Streamed.start("run", "-c", image["config"], "--", "sh", "-c", "echo up; sleep 600")
    wait_for(lambda: any(text == "up" for _, _, text in run.lines), 300, "the job to start")
    runs = list((image["state"] / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "overlay.qcow2").exists()
    # While the VM runs, nothing below its overlay was handed to QEMU's user, and
    # nobody else can enter the run's directory.
    it = image["state"] / "images" / "it"
    slot = image["state"] / "warm" / "it" / "slot-0"  # the image's warm states: root's own (host.state.home)
    for below in (it / "template.qcow2", it / "vmlinuz", it / "initramfs.img", slot / "overlay.qcow2"):
        st = below.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o444), below
    assert stat.S_IMODE(runs[0].stat().st_mode) & 0o007 == 0
    run.process.send_signal(signal.SIGKILL)
    run.wait()
    # The VM dies with vmiso, within seconds, by its watchdog: not at the next vmiso command.
    killed = time.monotonic()
    wait_for(lambda: vmiso_domains(image["state"]) == [], 15, "the VM to be destroyed")
    assert time.monotonic() - killed < 15
    # What is left on disk is gc's.
    doctor = vmiso("doctor", "-c", image["config"])
    assert f"run directory {runs[0].name}" in doctor.stdout
    collected = vmiso("gc", "-c", image["config"], check=True)
    assert f"removed run directory {runs[0].name}" in collected.stdout
    assert leftovers(image["state"]) == []


@pytest.mark.parametrize("sig, code, said", [
    # The job gets SIGINT or SIGTERM, and (a shell that does not trap it) dies of it.
    (signal.SIGINT, 130, "killed by SIGINT"),
    (signal.SIGTERM, 143, "killed by SIGTERM"),
    # A closed terminal: vmiso stops at once.
    (signal.SIGHUP, 130, "asked to stop (SIGHUP)"),
])
def test_interrupt_cleans_up(image, sig, code, said):
    run = Streamed.start("run", "-c", image["config"], "--", "sh", "-c", "echo up; sleep 600")
    wait_for(lambda: any(text == "up" for _, _, text in run.lines), 300, "the job to start")
    run.process.send_signal(sig)
    assert run.wait(120) == code, run.lines
    assert said in run.text("err")
    assert leftovers(image["state"]) == []


def test_ctrl_c_reaches_the_job_and_a_second_one_stops_vmiso(image, tmp_path):
    job = ("import signal, sys, time\n"
           "def done(signum, frame):\n"
           "    open('/out/caught', 'w').write(signal.Signals(signum).name)\n"
           "    sys.exit(3)\n"
           "signal.signal(signal.SIGINT, done)\n"
           "print('up', flush=True)\n"
           "time.sleep(600)\n")
    run = Streamed.start("run", "-c", image["config"], "-o", tmp_path / "out", "--", "python", "-c", job)
    wait_for(lambda: "up" in run.text("out"), 300, "the job to start")
    run.process.send_signal(signal.SIGINT)
    assert run.wait(120) == 3, run.lines  # the job's own ending, not vmiso's
    assert (tmp_path / "out" / "caught").read_text() == "SIGINT"
    assert "SIGINT passed to the job" in run.text("err")
    # A job that ignores it: the second Ctrl-C destroys the VM.
    stubborn = Streamed.start("run", "-c", image["config"], "--", "sh", "-c", "trap '' INT; echo up; sleep 600")
    wait_for(lambda: "up" in stubborn.text("out"), 300, "the job to start")
    stubborn.process.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT passed to the job" in stubborn.text("err"), 30, "the signal to be passed on")
    time.sleep(1)
    assert stubborn.process.poll() is None
    stubborn.process.send_signal(signal.SIGINT)
    assert stubborn.wait(60) == 130
    assert "asked to stop (SIGINT)" in stubborn.text("err")
    assert leftovers(image["state"]) == []


def test_warm_runs_share_nothing(image, tmp_path):
    job = ("test ! -e /var/tmp/marker && echo written > /var/tmp/marker && "
           "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'")
    seen = []
    for i in range(2):
        record = tmp_path / f"run{i}.json"
        done = vmiso("run", "-c", image["config"], "--json", record, "--", "sh", "-c", job)
        assert done.returncode == 0, done.stderr
        assert json.loads(record.read_text())["boot"] == "warm"
        assert len(done.stdout) == 32
        seen.append(done.stdout)
    assert seen[0] != seen[1]
    assert leftovers(image["state"]) == []


def test_two_runs_at_once_are_separate(image, tmp_path):
    template = image["state"] / "images" / "it" / "template.qcow2"
    before = (template.stat().st_mtime_ns, vmiso("images", "-c", image["config"], "verify", "it").stdout)
    job = ("test ! -e /var/tmp/marker && echo $$-{0} > /var/tmp/marker && sleep 3 && "
           "cat /var/tmp/marker && cp /var/tmp/marker /out/")
    runs = [Streamed.start("run", "-c", image["config"], "-o", tmp_path / f"out{i}", "--",
                           "sh", "-c", job.format(i)) for i in (0, 1)]
    assert [r.wait() for r in runs] == [0, 0], [r.lines for r in runs]
    for i, run in enumerate(runs):
        assert run.text("out").endswith(f"-{i}")
        assert (tmp_path / f"out{i}" / "marker").read_text().strip().endswith(f"-{i}")
    after = (template.stat().st_mtime_ns, vmiso("images", "-c", image["config"], "verify", "it").stdout)
    assert before == after and "OK" in after[1]
    assert leftovers(image["state"]) == []


def test_the_kernel_bounds_out_whatever_the_job_writes(image, tmp_path):
    """A hostile job fills /out with bytes, then empty directories, then a chain of
    directories: each stops at the run's limits, on a filesystem the host kernel
    sized; vmiso says /out was full, the collector refuses it and nothing is left."""
    config = write_config(tmp_path / "small", image["state"],
                          run={"output_max_bytes": "8MiB", "output_max_files": 300})
    done = vmiso("run", "-c", config, "-i", GUEST / "fill_out.py", "-o", tmp_path / "out", "--",
                 "python", "fill_out.py", "flood")
    assert done.returncode == 125, done.stderr
    found = json.loads(done.stdout)
    assert found["bytes"][1] == "ENOSPC" and 8 * 16 <= found["bytes"][0] <= 9 * 16  # 64 KiB writes
    assert found["empty_dirs"][1] == "ENOSPC" and 300 <= found["empty_dirs"][0] <= 316
    assert found["deep_chain"][1] == "ENOSPC" and 300 <= found["deep_chain"][0] <= 316
    assert found["df"][0] <= 10 * 1024**2  # what the guest sees of /out: its limit
    assert "the job filled /out: it may hold 300 files and directories" in done.stderr
    assert "more than 300 files and directories to /out" in done.stderr
    assert not (tmp_path / "out").exists()
    assert leftovers(image["state"]) == []


def test_a_tree_far_past_path_max_comes_out_whole(image, tmp_path):
    done = vmiso("run", "-c", image["config"], "-i", GUEST / "fill_out.py", "-o", tmp_path / "out", "--",
                 "python", "fill_out.py", "deep")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [600, "ok"]
    name = "deeper-than-path-max-" * 4
    (bottom,) = [line for line in (tmp_path / "out" / "MANIFEST").read_text().splitlines()
                 if line.endswith("/bottom.txt")]
    assert bottom.split("  ", 1)[1] == "/".join([name] * 600 + ["bottom.txt"])  # 50,000 bytes of path
    assert leftovers(image["state"]) == []
    assert workdir.remove_tree(tmp_path / "out") == []  # pytest's own cleanup recurses


@pytest.mark.parametrize("requirements, message", [
    ("vmiso-no-such-package-4f1d2e==1.0\n", "No matching distribution"),
    (TABULATE.replace("024ca478", "00000000"), "DO NOT MATCH"),
    # A host outside the allow-list: the gateway refuses it, and the error names it and the key.
    ("tabulate @ https://blocked.invalid/tabulate-0.9.0-py3-none-any.whl\n",
     "the gateway refused blocked.invalid:443"),
])
def test_failed_pip_leaves_no_image(image, tmp_path, requirements, message):
    config = write_config(tmp_path, image["state"], requirements=requirements, image={"name": "broken"})
    done = vmiso("provision", "-c", config, timeout=2400)
    assert done.returncode == 125
    assert "provisioning failed at step 'pip'" in done.stderr
    assert message in done.stderr and "log: " in done.stderr
    if "gateway" in message:
        assert "provision.allow_hosts" in done.stderr
    assert not (image["state"] / "images" / "broken").exists()
    assert leftovers(image["state"]) == []


def test_unreachable_mirror_fails_cleanly(tmp_path):
    root = make_state_root()
    try:
        config = write_config(tmp_path, root / "state", image={"mirror": "http://127.0.0.1:9/debian"})
        done = vmiso("provision", "-c", config, timeout=600)
        assert done.returncode == 125
        assert "step 'os-layer'" in done.stderr and "127.0.0.1:9" in done.stderr
        state = root / "state"
        assert list((state / "layers").iterdir()) == []
        assert list((state / "images").iterdir()) == []
    finally:
        remove_tree(root)


def test_too_little_disk_space_is_refused(tmp_path):
    root = make_state_root()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "vmiso-test", str(root)], check=True)
        config = write_config(tmp_path, root / "state")
        done = vmiso("provision", "-c", config, timeout=120)
        assert done.returncode == 125
        assert "too little disk space" in done.stderr
        assert list((root / "state" / "images").iterdir()) == []
    finally:
        subprocess.run(["umount", str(root)], check=False)
        remove_tree(root)


@pytest.fixture(scope="module")
def cloud_image(image, vm_root):
    """A cloud-image-like qcow2 (GPT, root on partition 3) made from the session's OS layer,
    without vmiso's guest files or busybox, provisioned as its own image."""
    (layer,) = [p for p in (image["state"] / "layers").iterdir() if not p.name.startswith(".")]
    work = vm_root / "cloud"
    work.mkdir()
    filesystem = work / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(layer / "rootfs.img"), str(filesystem)], check=True)
    os.chmod(filesystem, 0o644)
    remove_files(filesystem, ["/usr/local/lib/vmiso/ssh-link", "/usr/local/lib/vmiso/ssh-serve",
                              "/etc/ssh/sshd_config.vmiso", "/usr/bin/busybox"])
    qcow2 = work / "debian-generic.qcow2"
    sha256 = make_cloud_image(filesystem, qcow2)
    filesystem.unlink()
    state = vm_root / "cloud-state"
    config = write_config(work / "config", state,
                          image={"name": "cloudy", "cloud_image": {"path": str(qcow2), "sha256": sha256}})
    done = vmiso("provision", "-c", config, timeout=2400)
    assert done.returncode == 0, done.stderr
    yield {"config": config, "state": state, "output": done, "sha256": sha256}
    remove_tree(state)
    remove_tree(work)


def test_cloud_image_is_provisioned_and_runs_isolated(cloud_image, tmp_path):
    state = cloud_image["state"]
    manifest = json.loads((state / "images" / "cloudy" / "manifest.json").read_text())
    assert manifest["source"]["cloud_image"].endswith("debian-generic.qcow2")
    assert manifest["source"]["sha256"] == cloud_image["sha256"]
    assert manifest["root_device"] == f"/dev/vda{ROOT_PARTITION}"
    assert {"name": "tabulate", "version": "0.9.0"} in manifest["pip"]
    assert "cloud-image: kernel " in cloud_image["output"].stdout + cloud_image["output"].stderr
    listed = vmiso("images", "-c", cloud_image["config"], check=True).stdout
    assert f"source: cloud image {manifest['source']['cloud_image']} (sha256 {cloud_image['sha256']})" in listed
    # Warm and cold clones boot from partition 3 with vmiso's files, which provisioning installed.
    out = tmp_path / "out"
    (tmp_path / "data.csv").write_text("a,b\n")
    probes = [[a, 443] for a in host_addresses()]
    done = vmiso("run", "-c", cloud_image["config"], "-i", GUEST / "probe.py", "-i", tmp_path / "data.csv",
                 "-o", out, "--json",
                 tmp_path / "warm.json", "--", "python", "probe.py", json.dumps(probes))
    assert done.returncode == 3, done.stderr
    assert json.loads((tmp_path / "warm.json").read_text())["boot"] == "warm"
    results = json.loads(done.stdout.splitlines()[-1])
    assert results["tabulate"] == "0.9.0" and results["uid"] != 0 and results["interfaces"] == ["lo"]
    assert "ALLOWED" not in {v for k, v in results.items() if k.startswith("tcp ")} | {results["dns"]}
    assert (out / "result.json").exists()
    cold = vmiso("run", "-c", cloud_image["config"], "--cold", "--", "sh", "-c",
                 "cat /proc/cmdline; ls /usr/local/lib/vmiso; command -v tini")
    assert cold.returncode == 0, cold.stderr
    assert f"vmiso.root=/dev/vda{ROOT_PARTITION}" in cold.stdout
    assert "ssh-link\nssh-serve\n/usr/bin/tini" in cold.stdout
    assert leftovers(state) == []


@pytest.mark.parametrize("boot", ["warm", "cold"])
def test_compiled_wheels_clock_and_scratch(image, tmp_path, boot):
    """NumPy's compiled code runs on the guest CPU, the clock is the host's, /tmp is on disk."""
    data = tmp_path / "staged-now.csv"
    data.write_text("x\n1\n")
    many = tmp_path / "many"
    expected = {}
    for i in range(600):
        path = many / f"d{i // 100}" / f"r{i:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1 + i * 7))
        expected[str(path.relative_to(tmp_path))] = hashlib.sha256(path.read_bytes()).hexdigest()
    record = tmp_path / "run.json"
    flags = ["--cold"] if boot == "cold" else []
    # More than half of the guest's 512 MiB: a tmpfs /tmp could not hold it.
    run = Streamed.start("run", "-c", image["config"], *flags, "-i", GUEST / "workday.py", "-i", data,
                         "-i", many, "--json", record, "--", "python", "workday.py", "300")
    assert run.wait() == 0, run.lines
    first = next(stamp for stamp, stream, line in run.lines if stream == "out")
    host_then = time.time() - (time.monotonic() - first)  # the host's wall clock when that line arrived
    started, results = [json.loads(line) for line in run.text("out").splitlines()]
    assert json.loads(record.read_text())["boot"] == boot
    # The job read the host's time at its start (a warm state was saved minutes ago).
    assert abs(started["started"] - host_then) < 2.0, (started, host_then)
    assert results["input_mtime_ahead"] <= 1.0  # inputs staged now are not from the guest's future
    assert results["many"] == expected
    assert results["numpy"].startswith("2.")
    assert results["dot"] == 333833500.0 and results["solve"] == [0.1, 0.6]
    assert results["tmpdir"] == "/tmp"
    assert 1.9 * 1024**3 < results["tmp_size"] <= 2 * 1024**3  # run.scratch's default
    assert results["tmp_bytes_read_back"] == 300 * 1024**2 > results["mem_total"] / 2
    summary = json.loads(record.read_text())
    assert summary["memory_mib"] == 512 and summary["scratch_bytes"] == 2 * 1024**3
    assert leftovers(image["state"]) == []


def load_guest_module(name: str):
    spec = importlib.util.spec_from_file_location(f"guest_{name}", GUEST / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_numbers_computed_in_the_guest_are_the_hosts(image, tmp_path):
    """Condition numbers, solves, SVDs and strided products in four dtypes, warm, against the host's NumPy.

    With AVX2 offered under QEMU 7.2's TCG, NumPy's strided loops gathered the wrong
    elements: numpy.linalg's TestCond gave 11.9 for 21.0 with exit code 0."""
    numerics = load_guest_module("numerics")
    done = vmiso("run", "-c", image["config"], "--json", tmp_path / "r.json", "-i", GUEST / "numerics.py",
                 "--", "python", "numerics.py")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["boot"] == "warm"
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["numpy"] == "2.4.6"
    assert numerics.mismatches(numerics.results(), got) == []
    # BMI2 is withheld with AVX2: offered alone, libgcrypt's SHA-1 (apt's) ran AVX2 and died of SIGILL.
    done = vmiso("run", "-c", image["config"], "-i", GUEST / "gcrypt_sha1.py", "--", "python", "gcrypt_sha1.py")
    assert done.returncode == 0, done.stderr
    sha1 = json.loads(done.stdout.splitlines()[-1])
    assert sha1["gcrypt"] == sha1["hashlib"], sha1


def test_a_job_that_needs_a_withheld_instruction_dies_of_sigill_and_offering_it_shows_why(image, tmp_path):
    """Under TCG the guest has no AVX2: an AVX2 gather is an illegal instruction, named as such
    (cold: the domain XML is made afresh, not restored).  Offered with vm.tcg_cpu_features,
    the same gather runs and reads the wrong memory when its index is ymm4, the QEMU 7.2
    fault that made vmiso withhold AVX2."""
    done = vmiso("run", "-c", image["config"], "--cold", "-i", GUEST / "gather_probe.py", "--json",
                 tmp_path / "r.json", "--", "python", "gather_probe.py")
    assert done.returncode == 128 + signal.SIGILL, (done.stdout, done.stderr)
    assert "killed by SIGILL (an illegal instruction: a compiled package needs a CPU feature" in done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["signal"] == "SIGILL"
    offered = yaml.safe_load(Path(image["config"]).read_text())
    offered["vm"]["tcg_cpu_features"] = ["avx2", "bmi2"]  # QEMU's max CPU whole
    config = tmp_path / "offered.yaml"
    config.write_text(yaml.safe_dump(offered))
    done = vmiso("run", "-c", config, "-i", GUEST / "gather_probe.py", "--", "python", "gather_probe.py")
    assert done.returncode == 0, done.stderr
    assert "offers avx2 to the guest" in done.stderr and "may be wrong" in done.stderr
    assert "another cpu (cpu maximum -avx2 -bmi2, not maximum)" in done.stderr  # no state made without it is used
    probe = json.loads(done.stdout.splitlines()[-1])
    assert probe["ymm5"] is True
    assert probe["ymm4"] is False, ("QEMU's TCG now gathers right with index ymm4: "
                                    f"AVX2 may no longer need withholding ({probe})")
    assert leftovers(image["state"]) == []


def test_a_failure_that_the_vms_rules_explain_is_explained(image):
    job = ("python -c 'import urllib.request; urllib.request.urlopen(\"https://pypi.org/simple/\", timeout=5)'; "
           "python -c 'import matplotlib.pyplot'")
    done = vmiso("run", "-c", image["config"], "--", "sh", "-c", job)
    assert done.returncode == 1, done.stderr
    assert "Temporary failure in name resolution" in done.stderr  # the job's own words, first
    assert "ModuleNotFoundError: No module named 'matplotlib'" in done.stderr
    assert "vmiso: this run has no network, on purpose" in done.stderr
    assert ("vmiso: the job's output says image it has no module 'matplotlib': see what it holds with "
            "'vmiso images show it'") in done.stderr
    assert leftovers(image["state"]) == []


def test_scratch_is_bounded_by_its_size(image, tmp_path):
    job = ("import errno, sys, time\n"
           "written = 0\n"
           "try:\n"
           "    with open('/tmp/fill', 'wb') as f:\n"
           "        while True:\n"
           "            f.write(b'x' * 1048576); f.flush(); written += 1\n"
           "except OSError as err:\n"
           "    print(errno.errorcode[err.errno], written, flush=True)\n"
           "time.sleep(6)\n")
    run = Streamed.start("run", "-c", image["config"], "--scratch", "64MiB", "--json", tmp_path / "r.json",
                         "--", "python", "-c", job)
    wait_for(lambda: run.text("out"), 300, "the job to fill its scratch space")
    code, written = run.text("out").split()
    assert code == "ENOSPC" and 40 <= int(written) < 64
    # On the host, the run's scratch file holds no more than its size.
    (scratch,) = (image["state"] / "runs").glob("*/scratch.img")
    assert scratch.stat().st_size == 64 * 1024**2 and scratch.stat().st_blocks * 512 <= 64 * 1024**2
    assert run.wait() == 0, run.lines
    # Another scratch size than the warm state's: a cold boot that says why.
    assert json.loads((tmp_path / "r.json").read_text())["boot"] == "cold"
    assert "scratch_bytes" in run.text("err")
    assert leftovers(image["state"]) == []


def test_a_job_killed_by_a_signal_is_named(image, tmp_path):
    done = vmiso("run", "-c", image["config"], "--json", tmp_path / "r.json", "--", "sh", "-c", "kill -ILL $$")
    assert done.returncode == 128 + signal.SIGILL, done.stderr
    assert "the job was killed by SIGILL (an illegal instruction: " in done.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["signal"] == "SIGILL" and record["exit_code"] == 132
    assert leftovers(image["state"]) == []


def test_a_terminal_sees_escape_sequences_not_their_effect(image):
    job = r"printf '\033]0;owned\007\033[31mred\tok\n'; printf 'x\033[2J\342\200\256\n' >&2"
    code, _, text = on_a_terminal([*VMISO, "-q", "run", "-c", str(image["config"]), "--", "sh", "-c", job],
                                  REPO, dict(os.environ, VMISO_ACCEL="tcg"), 300, stdout_too=True)
    assert code == 0, text
    assert "^[]0;owned^G^[[31mred\tok" in text and "x^[[2J<U+202E>" in text
    assert "\x1b" not in text and "\x07" not in text
    # A pipe gets the job's bytes unchanged.
    piped = subprocess.run([*VMISO, "-q", "run", "-c", str(image["config"]), "--", "sh", "-c", job],
                           capture_output=True, cwd=REPO, env=dict(os.environ, VMISO_ACCEL="tcg"), timeout=300)
    assert piped.stdout == b"\x1b]0;owned\x07\x1b[31mred\tok\n"
    # -q keeps one line of vmiso's own: the TCG warning, before the job's bytes.
    assert piped.stderr == TCG_LINE + "x\x1b[2J\u202e\n".encode()
    assert leftovers(image["state"]) == []


def test_stdin_streams_through_and_only_given_variables_reach_the_job(image, tmp_path):
    payload = tmp_path / "payload"
    digest = hashlib.sha256()
    with open(payload, "wb") as f:
        for _ in range(200):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    (tmp_path / "vars").write_text("# for the job\nFROM_FILE=one two\n\nSECOND=x=y\n")
    job = 'echo "$GREETING|$FROM_FILE|$SECOND|${HOST_SECRET:-unset}" >&2; cat'
    started = time.monotonic()
    with open(payload, "rb") as source:
        done = subprocess.run([*VMISO, "-q", "run", "-c", str(image["config"]), "-e", "GREETING=hello world",
                               "--env-file", str(tmp_path / "vars"), "--", "sh", "-c", job],
                              stdin=source, capture_output=True, cwd=REPO, timeout=600,
                              env=dict(os.environ, VMISO_ACCEL="tcg", HOST_SECRET="s3cret"))
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stderr == TCG_LINE + b"hello world|one two|x=y|unset\n"
    assert len(done.stdout) == 200 << 20 and hashlib.sha256(done.stdout).hexdigest() == digest.hexdigest()
    print(f"200 MiB through stdin and stdout in {elapsed:.1f} s")
    refused = vmiso("run", "-c", image["config"], "-e", "1BAD=x", "--", "true")
    assert refused.returncode == 125 and "'1BAD' is not a valid environment variable name" in refused.stderr
    assert leftovers(image["state"]) == []


def test_a_shell_on_a_pseudo_terminal(image, tmp_path):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([*VMISO, "-q", "shell", "-c", str(image["config"]), "-o", str(tmp_path / "out")],
                               stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True,
                               env=dict(os.environ, VMISO_ACCEL="tcg", TERM="xterm"))
    os.close(slave)
    seen = bytearray()
    reader = read_terminal(master, seen)
    try:
        wait_for(lambda: b"$ " in seen, 300, "the shell's prompt")
        os.write(master, b"stty size; echo hi-$((6*7)) > /out/said; printf 'title\\033]0;x\\007-end\\n'; exit 7\r")
        assert process.wait(120) == 7, bytes(seen)
    finally:
        process.kill()
        reader.join(10)
        os.close(master)
    text = seen.decode(errors="replace")
    assert "40 120" in text  # the host terminal's size
    assert "title-end" in text and "\x1b]0;x" not in text  # the window title stays the analyst's
    assert (tmp_path / "out" / "said").read_text() == "hi-42\n"  # outputs collected when the shell exits
    assert leftovers(image["state"]) == []


def test_a_terminal_shows_where_the_run_is_until_the_job_speaks_and_a_pipe_shows_nothing(image):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    job = ["--", "sh", "-c", "echo job-begins; sleep 2; echo job-ends"]
    process = subprocess.Popen([*VMISO, "run", "-c", str(image["config"]), *job],
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=REPO,
                               start_new_session=True, env=dict(os.environ, VMISO_ACCEL="tcg", TERM="xterm"))
    os.close(slave)
    seen = bytearray()
    reader = read_terminal(master, seen)
    try:
        assert process.wait(300) == 0, bytes(seen)
    finally:
        process.kill()
        reader.join(10)
        os.close(master)
    before, _, after = bytes(seen).partition(b"job-begins")
    assert after, bytes(seen)
    # Before the job: a status line (a step and its elapsed time), redrawn in place and erased.
    assert re.search(rb"  (overlay|start|connect|exec) \d+:\d\d", before), before
    assert before.rstrip(b"\r\n").endswith(b"\r\x1b[K"), before  # erased before the job's first byte
    assert b"\n[" not in before and not before.startswith(b"[")  # no step lines without -v
    # After it: the job's bytes and nothing of vmiso's drawn over them.
    assert b"\x1b" not in after and b"job-ends" in after, after
    # On a pipe: the job's output, and on stderr nothing but the warning that the VM runs under TCG.
    piped = vmiso("run", "-c", image["config"], *job)
    assert piped.returncode == 0 and piped.stdout == "job-begins\njob-ends\n", piped
    assert "\x1b" not in piped.stderr and "\r" not in piped.stderr
    assert all("TCG" in line for line in piped.stderr.splitlines()), piped.stderr
    assert leftovers(image["state"]) == []


def test_a_published_port_serves_this_host_while_the_job_runs(image, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("from the guest\n")
    run = Streamed.start("run", "-c", image["config"], "-i", site, "--publish", "8000", "--",
                         "python", "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", "/in/site")
    wait_for(lambda: "is at 127." in run.text("err"), 300, "the published port")
    found = re.search(r"port 8000 is at (127\.\d+\.\d+\.\d+):(\d+)", run.text("err"))
    assert found, run.text("err")
    url = f"http://{found.group(1)}:{found.group(2)}/hello.txt"
    body = None
    for _ in range(120):  # until the server in the guest listens
        try:
            body = urllib.request.urlopen(url, timeout=10).read()
            break
        except (OSError, http.client.HTTPException):
            time.sleep(0.5)
    assert body == b"from the guest\n"
    run.process.send_signal(signal.SIGINT)  # passed on: http.server exits 0 on KeyboardInterrupt
    assert run.wait(120) == 0, run.lines
    with pytest.raises(OSError):  # the port was the run's only while it lasted
        socket.create_connection((found.group(1), int(found.group(2))), timeout=2)
    assert leftovers(image["state"]) == []


def _probe_wheel(probe: dict) -> bytes:
    """A wheel whose .pth file runs tests/guest/gateway_probe.py at every start of the venv's Python."""
    import base64
    import io
    import zipfile

    code = (GUEST / "gateway_probe.py").read_text().replace("PROBE = {}", f"PROBE = {json.dumps(probe)}")
    files = {
        "vmiso_gateway_probe.py": code,
        "vmiso_gateway_probe.pth": "import vmiso_gateway_probe\n",
        "vmiso_gateway_probe_data.txt": "as the wheel has it\n",  # the probe changes it after install
        "vmiso_gateway_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: vmiso-gateway-probe\n"
                                                     "Version: 1.0\n",
        "vmiso_gateway_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n",
    }
    record = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text.encode())}")
        # What a hostile wheel may ship as it is: a file its RECORD does not list, and one
        # whose RECORD hash is not its own (pip installs both without a word).
        wheel.writestr("vmiso_gateway_probe_carried.py", "print('not in RECORD')\n")
        wheel.writestr("vmiso_gateway_probe_lies.txt", "not what RECORD says\n")
        wrong = base64.urlsafe_b64encode(hashlib.sha256(b"what RECORD says").digest()).rstrip(b"=").decode()
        record.append(f"vmiso_gateway_probe_lies.txt,sha256={wrong},16")
        record.append("vmiso_gateway_probe-1.0.dist-info/RECORD,,")
        wheel.writestr("vmiso_gateway_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buffer.getvalue()


INDEX_LAN = ("10.213.78.1", "10.213.78.2")
INDEX_PORT = 8080


def test_provisioning_reaches_only_its_gateway(image, tmp_path):
    """One provisioning behind the gateway, with install-time code (a .pth file) that tries every
    other way out: the host's loopback and addresses, QEMU's NAT gateway, the metadata address, DNS,
    the registry by address, and through the gateway an IP literal, a host not allowed, an allowed name
    that leads to the host's loopback, a tunnel to the index whose TLS names another site, a plain
    request to the index naming another Host, and other schemes."""
    loopback_hits = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    loop_port = listener.getsockname()[1]
    threading.Thread(target=lambda: loopback_hits.append(listener.accept()), daemon=True).start()

    # The extra index is a server in a network namespace of the test's own, named for the
    # gateway by provision.hosts_file: the gateway connects to no loopback address.
    files, report_log = tmp_path / "files", tmp_path / "reports.jsonl"
    files.mkdir()
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"{INDEX_LAN[1]} index.vmiso.test\n127.0.0.1 loop.vmiso.test\n")
    index = f"http://index.vmiso.test:{INDEX_PORT}"
    registry = socket.getaddrinfo("pypi.org", 443, socket.AF_INET)[0][4][0]
    probe = {
        "gateway_port": 3128,
        "report": f"{index}/report",
        "direct": [["10.0.2.2", loop_port], ["169.254.169.254", 80], [registry, 443], [INDEX_LAN[1], INDEX_PORT],
                   *[[a, loop_port] for a in host_addresses()]],
        "refused": [f"{registry}:443", "blocked.invalid:443", f"loop.vmiso.test:{loop_port}"],
        "other_sni": [["pypi.org:443", "example.org"]],
        "plain": [[f"{index}/simple/", "other.vmiso.test"],
                  [f"whois://index.vmiso.test:{INDEX_PORT}/", "index.vmiso.test"],
                  [f"ftp://index.vmiso.test:{INDEX_PORT}/", "index.vmiso.test"]],
    }
    wheel = _probe_wheel(probe)
    (files / "vmiso_gateway_probe-1.0-py3-none-any.whl").write_bytes(wheel)
    requirements = TABULATE + f"vmiso-gateway-probe==1.0 --hash=sha256:{hashlib.sha256(wheel).hexdigest()}\n"
    config = write_config(tmp_path, image["state"], requirements=requirements, image={"name": "gw"},
                          provision={"pip": {"extra_index_urls": [f"{index}/simple"]},
                                     "allow_hosts": [f"loop.vmiso.test:{loop_port}"],
                                     "hosts_file": str(hosts_file)})
    server = [sys.executable, "-I", str(Path(__file__).with_name("netns_index.py")), INDEX_LAN[1], str(INDEX_PORT),
              str(files), str(report_log)]
    try:
        with network_namespace([INDEX_LAN], [server]):
            done = vmiso("provision", "-c", config, timeout=2400)
    finally:
        listener.close()
    reports = [json.loads(line) for line in report_log.read_text().splitlines()] if report_log.exists() else []
    assert done.returncode == 0, done.stderr
    assert reports, "the probe never reported through the gateway"
    results = reports[-1]
    assert results["uid"] != 0  # install-time code is not root
    assert results["interfaces"] == ["lo"]  # no network device at all
    assert results["dns"] != "ALLOWED"
    blocked = {k: v for k, v in results.items() if k.startswith(("tcp ", "gateway ", "write "))}
    assert len(blocked) == sum(map(len, (probe["direct"], probe["refused"], probe["other_sni"], probe["plain"]))) + 2
    assert "ALLOWED" not in blocked.values(), blocked
    assert loopback_hits == []  # the host's loopback listener saw nothing
    # The refusals were said at the end, named; the record is bound to the manifest.
    assert "blocked.invalid:443" in done.stderr and "provision.allow_hosts" in done.stderr
    shown = json.loads(vmiso("images", "-c", config, "show", "gw", "--json", check=True).stdout)
    contacted = {h["host"] for h in shown["gateway"]["contacted"]}
    refused = {h["host"] for h in shown["gateway"]["refused"]}
    assert {"pypi.org:443", "files.pythonhosted.org:443", f"index.vmiso.test:{INDEX_PORT}"} <= contacted
    assert {"blocked.invalid:443", f"{registry}:443", f"loop.vmiso.test:{loop_port}",
            f"index.vmiso.test:{INDEX_PORT}"} <= refused
    # The start-up inventory, read from the sealed template, names the install-time code.
    pth = {p["path"].rsplit("/", 1)[-1]: p["executes"] for p in shown["startup"]["pth"]}
    assert pth["vmiso_gateway_probe.pth"] == ["import vmiso_gateway_probe"]
    assert "vmiso_gateway_probe.pth (import vmiso_gateway_probe)" in \
        vmiso("images", "-c", config, "show", "gw", check=True).stdout
    # ... and what that code did to the venv: a file no package lists, a listed file changed.
    assert [p for p in shown["startup"]["unlisted"] if p.endswith("/site-packages/vmiso_planted.py")]
    assert [t["why"] for t in shown["startup"]["tampered"]
            if t["path"].endswith("/vmiso_gateway_probe_data.txt")] == ["its sha256 differs from RECORD's"]
    # ... and what the wheel itself carried: a file its RECORD does not list, a hash that is not its file's.
    from vmiso.image.inventory import HASHLESS

    assert [p for p in shown["startup"]["unlisted"] if p.endswith("/vmiso_gateway_probe_carried.py" + HASHLESS)]
    assert [t["why"] for t in shown["startup"]["tampered"]
            if t["path"].endswith("/vmiso_gateway_probe_lies.txt")] == ["its sha256 differs from RECORD's"]
    assert all(h["bytes_to_guest"] > 0 for h in shown["gateway"]["contacted"])
    # Against the shared image (tabulate and numpy, no index of its own), the diff names the probe.
    diff = vmiso("images", "-c", config, "diff", "it", "gw")
    assert diff.returncode == 1, diff.stderr
    assert "  + vmiso-gateway-probe==1.0\n" in diff.stdout and "  - numpy==" in diff.stdout
    assert "vmiso_gateway_probe.pth (runs import vmiso_gateway_probe at every Python start)" in diff.stdout
    assert [line for line in diff.stdout.splitlines()
            if line.startswith("  + file in no package ") and line.endswith("/site-packages/vmiso_planted.py")]
    assert "vmiso_gateway_probe_data.txt (its sha256 differs from RECORD's)" in diff.stdout
    assert "vmiso_gateway_probe_lies.txt (its sha256 differs from RECORD's)" in diff.stdout
    assert "/vmiso_gateway_probe_carried.py" + HASHLESS in diff.stdout
    said = {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(", ") for line in diff.stdout.splitlines()
            if line.startswith("provisioning ")}
    assert f"index.vmiso.test:{INDEX_PORT}" in said["provisioning gw only reached"]
    assert "blocked.invalid:443" in said["provisioning gw only was refused"]
    # The lock pins the probe's wheel to the file the index served, fetched through the gateway.
    import tomllib

    entry = shown["lock"]
    assert entry["unexplained_downloads"] == [] and entry["unexplained_hosts"] == [], entry
    locked = {p["name"]: p for p in tomllib.loads((image["state"] / "images/gw/pylock.toml").read_text())["packages"]}
    assert locked["vmiso-gateway-probe"]["wheels"][0]["hashes"]["sha256"] == hashlib.sha256(wheel).hexdigest()
    assert locked["tabulate"]["wheels"][0]["url"].startswith("https://files.pythonhosted.org/")
    # Its SBOM names the probe by purl and validates against CycloneDX's schema.
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    sbom = vmiso("images", "-c", config, "sbom", "gw", check=True).stdout
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom) is None
    assert "pkg:pypi/vmiso-gateway-probe@1.0" in {c.get("purl") for c in json.loads(sbom)["components"]}
    manifest = json.loads((image["state"] / "images/gw/manifest.json").read_text())
    record = image["state"] / "images/gw" / manifest["gateway"]["record"]
    assert hashlib.sha256(record.read_bytes()).hexdigest() == manifest["gateway"]["sha256"]
    # The gateway lived in the provisioning's vmiso process and left nothing on disk.
    assert not (image["state"] / "gateways").exists()
    assert leftovers(image["state"]) == []
    vmiso("images", "-c", config, "rm", "gw", check=True)


# --- networked runs -----------------------------------------------------------------------------

# Every way past a networked run's gateway that the job tries (tests/guest/egress_probe.py).
API = "https://api.vmiso.test"
ALLOW = [*(f"--allow-host={h}" for h in ("api.vmiso.test", "api.vmiso.test:80", "loop.vmiso.test", "meta.vmiso.test",
                                        "host.vmiso.test", "nat64.vmiso.test", "sixtofour.vmiso.test")),
         "--allow-tcp", "7000:api.vmiso.test:7000"]
EVERY_WAY = {
    "fetch": [f"{API}/hello", "http://api.vmiso.test/plain", "https://other.vmiso.test/", f"{API}:8443/",
              f"https://{SERVICE_LAN[1]}/", "https://loop.vmiso.test/", "https://meta.vmiso.test/",
              "https://host.vmiso.test/", "https://nat64.vmiso.test/", "https://sixtofour.vmiso.test/"],
    "raw": ["GET http://api.vmiso.test/ HTTP/1.1\r\nHost: other.vmiso.test\r\n\r\n",
            "GET whois://api.vmiso.test:443/ HTTP/1.1\r\n\r\n", "GET ftp://api.vmiso.test/x HTTP/1.1\r\n\r\n",
            "GET gopher://api.vmiso.test:70/ HTTP/1.1\r\n\r\n"],
    "sni": [["api.vmiso.test:443", "other.vmiso.test"]],
    "dns": ["api.vmiso.test", "pypi.org"],
    "direct": [[SERVICE_LAN[1], 443], [SERVICE_LAN[0], 22], [OTHER_LAN[1], 80], ["10.0.2.2", 80]],
    "echo": [7000],
    "hold": 7000,
}
REFUSED_PLACES = {"other.vmiso.test:443", "api.vmiso.test:8443", f"{SERVICE_LAN[1]}:443", "loop.vmiso.test:443",
                  "meta.vmiso.test:443", "host.vmiso.test:443", "api.vmiso.test:443", "api.vmiso.test:80",
                  "nat64.vmiso.test:443", "sixtofour.vmiso.test:443"}


def service_events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("boot", ["warm", "cold"])
def test_a_networked_run_reaches_its_listed_service_and_nothing_else(image, tmp_path, boot):
    """The listed service through the proxy (HTTPS, HTTP) and a TCP route; every other way refused, from
    inside the guest; the record matches what the services saw; a tunnel held past the job is cut."""
    record = tmp_path / "run.json"
    with network_services(tmp_path) as (ca, hosts, log):
        config = write_config(tmp_path / "config", image["state"], run={"hosts_file": str(hosts)})
        checks = EVERY_WAY if boot == "warm" else {"fetch": [f"{API}/hello", "https://other.vmiso.test/"],
                                                   "echo": [7000], "hold": 7000}
        done = vmiso("run", "-c", config, *(["--cold"] if boot == "cold" else []), "-i", GUEST / "egress_probe.py",
                     "-i", ca, "--json", record, *ALLOW, "--", "python", "egress_probe.py", json.dumps(checks))
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.splitlines()[-1])
        # What the guest saw first: a failure below then says why the service saw what it saw.
        seen = f"the guest saw {results}\nvmiso said:\n{done.stderr}"
        assert results["echo 7000"] == "ping", seen
        # The holder's connection ended with the run, not with the VM's life or the service's patience.
        wait_for(lambda: [e["event"] for e in service_events(log) if e.get("port") == 7000].count("close") == 2,
                 10, "the held connection to end", lambda: f"the service saw {service_events(log)}\n{seen}")
        events = service_events(log)
    summary = json.loads(record.read_text())
    assert summary["boot"] == boot
    assert results["env"] == {"HTTPS_PROXY": "http://127.0.0.1:3128", "http_proxy": "http://127.0.0.1:3128",
                              "NO_PROXY": "localhost,127.0.0.1,::1"}
    hello = results[f"fetch {API}/hello"]
    assert isinstance(hello, dict), seen
    assert (hello["address"], hello["sni"], hello["host"], hello["proxy_headers"]) == \
        (SERVICE_LAN[1], "api.vmiso.test", "api.vmiso.test", [])
    assert results["echo 7000"] == "ping"
    assert "403" in results["fetch https://other.vmiso.test/"]
    # The services saw only what was allowed: nothing at all reached the other one.
    assert not [e for e in events if e["address"] == OTHER_LAN[1]], events
    requests = [(e["port"], e["host"], e["sni"], e["proxy_headers"]) for e in events if e["event"] == "request"]
    network = summary["network"]
    contacted = {row["host"] for row in network["contacted"]}
    refused = {row["host"] for row in network["refused"]}
    if boot == "warm":
        assert requests == [(443, "api.vmiso.test", "api.vmiso.test", []), (80, "api.vmiso.test", None, [])]
        assert results["fetch http://api.vmiso.test/plain"]["path"] == "/plain"
        for key, value in results.items():
            if key.startswith(("fetch", "raw", "sni", "dns", "tcp")) and key not in (f"fetch {API}/hello",
                                                                                    "fetch http://api.vmiso.test/plain"):
                assert isinstance(value, str) and not value.startswith("ALLOWED"), (key, value)
        for request in EVERY_WAY["raw"]:
            assert results[f"raw {request.splitlines()[0]}"].startswith("HTTP/1.1 403"), request
        assert contacted == {"api.vmiso.test:443", "api.vmiso.test:80", "api.vmiso.test:7000"}
        assert refused >= REFUSED_PLACES, refused
        # Allowed names that lead to loopback or the metadata address dressed as IPv6 are refused as such.
        dressed = {e["host"]: (e["port"], e["outcome"], e["upstream"], e["reason"]) for e in network["connections"]
                   if e["host"] in ("nat64.vmiso.test", "sixtofour.vmiso.test")}
        assert dressed == {
            "nat64.vmiso.test": (443, "refused", None, "resolves to 64:ff9b::7f00:1, an address of this host, "
                                                       "loopback or link-local"),
            "sixtofour.vmiso.test": (443, "refused", None, "resolves to 2002:a9fe:a9fe::1, an address of this "
                                                           "host, loopback or link-local")}, network["connections"]
        tricked = [e for e in network["connections"] if e["sni"] == "other.vmiso.test"]
        assert [e["outcome"] for e in tricked] == ["refused"] and tricked[0]["upstream"] is None
    else:
        assert requests == [(443, "api.vmiso.test", "api.vmiso.test", [])]
        assert contacted == {"api.vmiso.test:443", "api.vmiso.test:7000"} and refused == {"other.vmiso.test:443"}
    assert all(row["bytes_to_guest"] > 0 for row in network["contacted"])
    assert "vmiso: network: reached api.vmiso.test:443 (" in done.stderr
    assert "vmiso: the job tried to reach other.vmiso.test:443, refused: not in this run's --allow-host" \
        in done.stderr
    assert leftovers(image["state"]) == []


def test_an_image_without_networked_runs_says_so_and_a_run_without_rules_is_offline(image, tmp_path):
    """A run that asks for nothing gets no gateway: the guest's sshd listens on nothing and the
    proxy variables are unset."""
    done = vmiso("run", "-c", image["config"], "--json", tmp_path / "r.json", "--", "python", "-c",
                 "import os, socket\n"
                 "print(sorted(k for k in os.environ if 'proxy' in k.lower()))\n"
                 "s = socket.socket()\n"
                 "print(s.connect_ex(('127.0.0.1', 3128)))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "[]" and done.stdout.splitlines()[1] != "0"
    assert json.loads((tmp_path / "r.json").read_text())["network"] is None
    assert "network" not in done.stderr


@pytest.mark.parametrize("boot", ["warm", "cold"])
def test_inputs_arrive_whole_on_a_read_only_disk(image, tmp_path, boot, deep_tree):
    inputs = make_inputs(tmp_path / "inputs", deep_tree)
    record = tmp_path / "run.json"
    flags = ["--cold"] if boot == "cold" else []
    done = vmiso("run", "-c", image["config"], *flags, "--json", record, "-i", GUEST / "inputs_probe.py",
                 *(arg for path in inputs for arg in ("-i", path)), "--", "python", "inputs_probe.py", "many")
    assert done.returncode == 0, done.stderr
    results, summary = json.loads(done.stdout.splitlines()[-1]), json.loads(record.read_text())
    assert summary["boot"] == boot
    check_inputs_seen(results, summary, [GUEST / "inputs_probe.py", *inputs])
    ratio = results["walk_in"] / results["walk_tmpfs"]
    print(f"{boot}: walk of {SMALL_FILES} files over /in {results['walk_in']:.2f} s, on tmpfs "
          f"{results['walk_tmpfs']:.2f} s: {ratio:.2f} x; staging {summary['timings']['stage']:.2f} s")
    # The bench holds 2 x; here (1.74-1.79 x was measured) with room for a loaded
    # machine.  9p took 26-44 x.  (The 100 MB file is on its share, not in the disk's read-ahead.)
    assert ratio < 4
    assert leftovers(image["state"]) == []
