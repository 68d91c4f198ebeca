"""Preloaded clones (vmiso pool): the hand-out's messages, and real pools of real clones."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmiso.clones import warm
from vmiso.clones.pool import client, protocol, server
from vmiso.errors import PoolError
from vmiso.host import state, workdir

from vmharness import (
    REPO,
    SMALL_FILES,
    VMISO,
    check_inputs_seen,
    make_inputs,
    network_services,
    vmiso,
    vmiso_domains,
    wait_for,
    write_config,
)

GUEST = Path(__file__).parent / "guest"

KEY = protocol.PoolKey(warm.WarmKey.make(template_sha256="a" * 64, hypervisor="libvirt 9.0, QEMU 7.2", accel="tcg",
                                     memory_mib=512, cpus=1, scratch_bytes=2 * 1024**3), 64 * 1024**2, 1000, "qemu:///system")


# --- what may be handed out -----------------------------------------------------------


def test_a_fitting_clone_has_no_stale_reason():
    assert server.stale_reason(KEY, KEY, "q", "q") is None


@pytest.mark.parametrize("now, qemu, said", [
    (None, "q", "the image was removed"),
    (KEY, "another build", "QEMU was updated"),
    (dataclasses.replace(KEY, warm=dataclasses.replace(KEY.warm, template_sha256="b" * 64)), "q",
     "provisioned again"),
    (dataclasses.replace(KEY, warm=dataclasses.replace(KEY.warm, hypervisor="libvirt 9.0, QEMU 8.0")), "q",
     "the hypervisor changed"),
    (dataclasses.replace(KEY, warm=dataclasses.replace(KEY.warm, accel="kvm", cpu="host-passthrough")), "q",
     "the accel, cpu changed"),
    (dataclasses.replace(KEY, output_max_files=10), "q", "output limits changed"),
])
def test_stale_clones_are_named_for_what_changed(now, qemu, said):
    assert said in server.stale_reason(KEY, now, "q", qemu)


# --- the messages: framed, bounded, with descriptors ------------------------------------


def test_a_message_carries_its_descriptors():
    left, right = socket.socketpair()
    r, w = os.pipe()
    try:
        protocol.send(left, {"clone": "x"}, (r, w))
        message, fds = protocol.receive(right, max_fds=2)
        assert message == {"clone": "x"} and len(fds) == 2
        os.write(fds[1], b"!")
        assert os.read(r, 1) == b"!"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff\xff" + b"x" * 100,  # a length far past the limit
    b"\x00\x00\x00\x05[1,2]",  # not an object
    b"\x00\x00\x00\x03abc",  # not JSON
])
def test_a_message_that_is_not_ours_is_refused(raw):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises((ValueError, EOFError)):
            protocol.receive(right)


def test_a_pool_whose_check_failed_says_so_not_another_configuration(monkeypatch, tmp_path):
    from vmiso.config import Config
    from vmiso.image.store import Image

    monkeypatch.setattr(server, "current_key", lambda *args: KEY)
    monkeypatch.setattr(server, "qemu_identity", lambda: "q")
    served = server.Pool(Config(state_dir=tmp_path), None, Image("it", tmp_path / "it"), 1, "tcg",  # type: ignore[arg-type]
                       threading.Event())
    other = dataclasses.replace(KEY, output_max_files=1)
    assert served._take(other.as_dict()) == "the pool's clones were made for another image, QEMU or configuration"
    served.key, served.status.problem = None, "cannot check the clones: libvirt went away"
    assert served._take(KEY.as_dict()) == "the pool gives no clone: cannot check the clones: libvirt went away"
    served.status.problem = ""
    assert served._take(KEY.as_dict()) == "the pool gives no clone: it could not check them"


def _fake_pool(path: Path, answer: dict, fds: int = 2) -> threading.Thread:
    """A pool that answers one take with ``answer`` and ``fds`` fresh descriptors."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            protocol.receive(conn)
            lock, link = os.pipe(), socket.socketpair()
            protocol.send(conn, answer, (lock[0], link[0].fileno())[:fds])
            for end in (*lock, *(s.detach() for s in link)):
                os.close(end)
            try:
                protocol.receive(conn)
            except (EOFError, OSError):
                pass
        listener.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_run_takes_no_clone_from_outside_its_own_runs(tmp_path):
    # The pool is this user's own process, but what it names is still checked:
    # a run must never adopt (and later remove) a directory elsewhere, or use as its link
    # what is not a socket.
    where = workdir.private_dir(state.home(tmp_path).pool("x"))
    served = _fake_pool(where / "pool.sock", {"clone": str(tmp_path / "elsewhere"), "name": "vmiso-x"})
    offer = client.ask(tmp_path, "x", KEY)
    served.join(5)
    assert offer == "the pool offered a clone outside this user's runs"
    (where / "pool.sock").unlink()
    runs = workdir.private_dir(tmp_path / "runs")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(where / "pool.sock"))
    listener.listen(1)

    def serve_a_pipe() -> None:
        conn, _ = listener.accept()
        with conn:
            protocol.receive(conn)
            r, w = os.pipe()
            protocol.send(conn, {"clone": str(runs / "pool-ab"), "name": "vmiso-x"}, (r, w))
            os.close(r)
            os.close(w)
    thread = threading.Thread(target=serve_a_pipe, daemon=True)
    thread.start()
    assert client.ask(tmp_path, "x", KEY) == "the pool offered a link that is not a socket"
    thread.join(5)
    listener.close()


def test_without_a_pool_a_run_goes_on_at_once(tmp_path):
    assert client.ask(tmp_path, "x", KEY) == ""
    # A pool that died left its socket: nobody listens there.
    where = workdir.private_dir(state.home(tmp_path).pool("x"))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(where / "pool.sock"))
    dead.close()
    assert client.ask(tmp_path, "x", KEY) == ""


def test_a_pool_that_ends_before_yours_gives_no_clone(tmp_path):
    where = workdir.private_dir(state.home(tmp_path).pool("x"))
    runs = workdir.private_dir(tmp_path / "runs")
    served = _fake_pool(where / "pool.sock", {"clone": str(runs / "pool-ab"), "name": "vmiso-x"})
    offer = client.ask(tmp_path, "x", KEY)
    assert isinstance(offer, client.Offer) and offer.clone.path == runs / "pool-ab"
    with pytest.raises(PoolError, match="did not hand over"):
        client.confirm(offer)
    served.join(5)
    os.close(offer.lock_fd)
    offer.link.close()


# --- real pools ----------------------------------------------------------------------


def _pool_pid(image) -> int:
    rows = json.loads(vmiso("pool", "status", "-c", image["config"], "--json", check=True).stdout)
    assert len(rows) == 1, rows
    return rows[0]["pid"]


def _status(image) -> dict:
    rows = json.loads(vmiso("pool", "status", "-c", image["config"], "--json", check=True).stdout)
    return rows[0] if rows else {}


@pytest.fixture(scope="module")
def pool_of_two(image):
    started = vmiso("pool", "start", "-c", image["config"], "--size", "2", timeout=600)
    assert started.returncode == 0, started.stderr
    assert "ready" in started.stdout
    yield image
    vmiso("pool", "stop", "-c", image["config"])
    wait_for(lambda: not [d for d in vmiso_domains(image["state"])], 30, "the pool's clones to go")


def _job(tag: str) -> str:
    return ("set -e; ls -A /in > /out/in.txt; cat /in/secret.txt >> /out/in.txt; ls -A /out >> /out/in.txt; "
            "test ! -e /var/tmp/marker; echo written > /var/tmp/marker; ls /sys/class/net > /out/net.txt; "
            "date +%s > /out/clock.txt; od -An -tx1 -N16 /dev/urandom | tr -d ' \\n' > /out/random.txt; "
            f"echo {tag}")


@pytest.mark.vm
def test_two_jobs_from_one_pool_see_only_their_own(pool_of_two, tmp_path):
    image = pool_of_two
    assert _status(image)["ready"] == 2
    procs = []
    for tag in ("one", "two"):
        data = tmp_path / tag
        data.mkdir()
        (data / "secret.txt").write_text(f"secret-{tag}\n")
        procs.append(subprocess.Popen(
            [*VMISO, "run", "-c", str(image["config"]), "-i", str(data / "secret.txt"),
             "-o", str(tmp_path / f"out-{tag}"), "--json", str(tmp_path / f"{tag}.json"), "--", "sh", "-c", _job(tag)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env=dict(os.environ, VMISO_ACCEL="tcg")))
    randoms = set()
    for tag, proc in zip(("one", "two"), procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.strip() == tag
        record = json.loads((tmp_path / f"{tag}.json").read_text())
        assert record["boot"] == "preloaded", err
        result = tmp_path / f"out-{tag}"
        # Only its own input; an empty /out to begin with; no network device at all.
        assert (result / "in.txt").read_text() == f"secret.txt\nsecret-{tag}\nin.txt\n"
        assert (result / "net.txt").read_text().split() == ["lo"]
        assert abs(int((result / "clock.txt").read_text()) - time.time()) < 30
        randoms.add((result / "random.txt").read_text())
    assert len(randoms) == 2
    # Each clone served one job and is gone; the pool made new ones behind them.
    wait_for(lambda: _status(image)["ready"] == 2, 120, "the pool to refill")
    assert _status(image)["served"] >= 2
    assert not any(p.name.startswith("run-") for p in (image["state"] / "runs").iterdir())


@pytest.mark.vm
def test_a_preloaded_clones_inputs_arrive_whole_on_its_read_only_disk(pool_of_two, tmp_path, deep_tree):
    image = pool_of_two
    wait_for(lambda: _status(image)["ready"] == 2, 120, "the pool to be full")
    inputs = make_inputs(tmp_path / "inputs", deep_tree)
    record = tmp_path / "run.json"
    done = vmiso("run", "-c", image["config"], "--json", record, "-i", GUEST / "inputs_probe.py",
                 *(arg for path in inputs for arg in ("-i", path)), "--", "python", "inputs_probe.py", "many")
    assert done.returncode == 0, done.stderr
    results, summary = json.loads(done.stdout.splitlines()[-1]), json.loads(record.read_text())
    assert summary["boot"] == "preloaded"
    check_inputs_seen(results, summary, [GUEST / "inputs_probe.py", *inputs])
    ratio = results["walk_in"] / results["walk_tmpfs"]
    print(f"preloaded: walk of {SMALL_FILES} files over /in {results['walk_in']:.2f} s, on tmpfs "
          f"{results['walk_tmpfs']:.2f} s: {ratio:.2f} x; staging {summary['timings']['stage']:.2f} s")
    # The bench holds 2 x; here 2.29 x was measured (the pool restoring its next clone meanwhile),
    # with room for a loaded machine.  9p took 26-44 x.  (The 100 MB file is on its share.)
    assert ratio < 4


@pytest.mark.vm
def test_clones_restored_from_one_saved_state_are_reseeded(pool_of_two, tmp_path):
    # A pool of two restores from 2 x 2 warm slots: five clones in a row include two
    # restored from the same saved state, which without the host's fresh randomness
    # would read the same bytes from /dev/urandom.
    image = pool_of_two
    seen = []
    for i in range(5):
        wait_for(lambda: _status(image)["ready"] == 2, 120, "the pool to be full")
        record = tmp_path / f"r{i}.json"
        done = vmiso("run", "-c", image["config"], "--json", record, "--",
                     "sh", "-c", "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'")
        assert done.returncode == 0, done.stderr
        assert json.loads(record.read_text())["boot"] == "preloaded"
        seen.append(done.stdout)
    assert len(set(seen)) == 5, seen
    slots = list((image["state"] / "warm" / "it").glob("slot-*/warm.json"))
    assert len(slots) == 4


@pytest.mark.vm
def test_a_preloaded_clone_runs_a_networked_job_and_the_next_one_is_offline(pool_of_two, tmp_path):
    """The pool's clones were made offline: a networked run gets its gateway on the clone it takes,
    and the clone after it has none."""
    image = pool_of_two
    guest = Path(__file__).parent / "guest" / "egress_probe.py"
    with network_services(tmp_path) as (ca, hosts, log):
        config = write_config(tmp_path / "config", image["state"], run={"hosts_file": str(hosts)})
        checks = {"fetch": ["https://api.vmiso.test/hello", "https://other.vmiso.test/"]}
        results, said = [], []
        for allow in (["--allow-host", "api.vmiso.test"], []):
            wait_for(lambda: _status(image)["ready"] == 2, 120, "the pool to be full")
            record = tmp_path / f"r{len(results)}.json"
            done = vmiso("run", "-c", config, "-i", guest, "-i", ca, "--json", record, *allow, "--",
                         "python", "egress_probe.py", json.dumps(checks))
            assert done.returncode == 0, done.stderr
            assert json.loads(record.read_text())["boot"] == "preloaded"
            results.append((json.loads(done.stdout.splitlines()[-1]), json.loads(record.read_text())["network"]))
            said.append(done.stderr)
        seen = [json.loads(line) for line in log.read_text().splitlines()]
    (networked, record), (offline, no_record) = results
    hello = networked["fetch https://api.vmiso.test/hello"]
    assert isinstance(hello, dict), f"the guest saw {networked}, the service {seen}; vmiso said:\n{said[0]}"
    assert hello["sni"] == "api.vmiso.test"
    assert "403" in networked["fetch https://other.vmiso.test/"]
    assert [r["host"] for r in record["contacted"]] == ["api.vmiso.test:443"]
    assert [r["host"] for r in record["refused"]] == ["other.vmiso.test:443"]
    # The next clone: no proxy, no gateway, no record; the service saw one request in all.
    assert offline["env"]["HTTPS_PROXY"] is None and no_record is None
    assert all(isinstance(v, str) and v.startswith("REFUSED") for k, v in offline.items() if k != "env")
    assert [e["event"] for e in seen] == ["request"]


@pytest.mark.vm
def test_a_preloaded_job_is_bounded_like_any_other(pool_of_two, tmp_path):
    image = pool_of_two
    wait_for(lambda: _status(image)["ready"] == 2, 120, "the pool to be full")
    done = vmiso("run", "-c", image["config"], "--timeout", "3", "--json", tmp_path / "r.json",
                 "--", "sh", "-c", "echo started; sleep 600")
    assert done.returncode == 124, done.stderr
    timings = json.loads((tmp_path / "r.json").read_text())["timings"]
    assert "take" in timings and "start" not in timings  # no restore or boot of its own: a pool's clone
    # Its clone is gone, its directory too; only the pool's idle clones remain.
    runs = sorted(p.name for p in (image["state"] / "runs").iterdir())
    assert all(name.startswith(protocol.CLONE_PREFIX) for name in runs)
    wait_for(lambda: len(vmiso_domains(image["state"])) == 2, 60, "the pool's two idle clones")
    # A run that asks for other memory gets no clone of the pool: it restores or boots its own.
    other = vmiso("run", "-c", image["config"], "--memory", "640", "--json", tmp_path / "m.json",
                  "--", "true")
    assert other.returncode == 0, other.stderr
    assert json.loads((tmp_path / "m.json").read_text())["boot"] == "cold"


@pytest.mark.vm
def test_killing_the_pool_leaves_no_vm(pool_of_two):
    image = pool_of_two
    wait_for(lambda: _status(image)["ready"] == 2, 120, "the pool to be full")
    assert len(vmiso_domains(image["state"])) == 2
    os.kill(_pool_pid(image), signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: vmiso_domains(image["state"]) == [], 15, "the clones to be destroyed")
    assert time.monotonic() - killed < 15
    # Their directories are gc's, as any dead vmiso's.
    collected = vmiso("gc", "-c", image["config"], check=True)
    assert collected.stdout.count("removed run directory pool-") == 2
    # A run without a live pool restores a warm state.
    assert vmiso("pool", "status", "-c", image["config"], check=True).stdout.startswith("no pool")


@pytest.mark.vm
def test_a_removed_image_ends_its_pool(image, tmp_path):
    # A copy of the session's image and its warm states, under a name of its own.
    state = image["state"]
    shutil.copytree(state / "images" / "it", state / "images" / "it-copy", symlinks=True)
    shutil.copytree(state / "warm" / "it", state / "warm" / "it-copy", symlinks=True,
                    ignore=shutil.ignore_patterns("*.lock"))
    try:
        started = vmiso("pool", "start", "-c", image["config"], "--image", "it-copy", "--size", "1", timeout=600)
        assert started.returncode == 0, started.stderr
        pid = _pool_pid(image)
        assert len(vmiso_domains(state)) == 1
        vmiso("images", "-c", image["config"], "rm", "it-copy", check=True)
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                 Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z", 30, "the pool to end")
        wait_for(lambda: vmiso_domains(state) == [], 15, "its clone to be destroyed")
        log = (state / "pools" / "it-copy" / "pool.log").read_text()
        assert "image it-copy was removed" in log
    finally:
        vmiso("pool", "stop", "-c", image["config"], "--image", "it-copy")
        shutil.rmtree(state / "images" / "it-copy", ignore_errors=True)
        shutil.rmtree(state / "warm" / "it-copy", ignore_errors=True)
