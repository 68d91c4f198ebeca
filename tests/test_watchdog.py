"""The watchdog process, against libvirt's own test driver (no real VM)."""

import os
import signal
import subprocess
import sys
import time

import libvirt

from vmiso.clones import watchdog
from vmiso.domain import metadata_of

DOMAIN = """<domain type='test'>
  <name>{name}</name>
  <metadata><vmiso:vm xmlns:vmiso="urn:vmiso:domain:1"><vmiso:run_dir>{run_dir}</vmiso:run_dir></vmiso:vm></metadata>
  <memory>65536</memory><os><type>hvm</type></os>
</domain>"""


def test_release_leaves_the_vm_alone():
    dog = watchdog.start("test:///default", "vmiso-run-x", "/r/x", 60)
    dog.started()
    started = time.monotonic()
    dog.release()
    assert dog.process.returncode == 0 and time.monotonic() - started < 5


def test_a_dead_parent_or_a_passed_deadline_means_destroy():
    # The decision, on a real pipe: EOF without RELEASE, or the deadline, is "destroy".
    read, write = os.pipe()
    os.close(write)
    assert watchdog.wait_for_release(read, time.monotonic() + 5) == (False, False)
    os.close(read)
    read, write = os.pipe()
    started = time.monotonic()
    assert watchdog.wait_for_release(read, time.monotonic() + 0.3) == (False, False)
    assert 0.2 < time.monotonic() - started < 2
    os.write(write, watchdog.STARTED + watchdog.RELEASE)
    assert watchdog.wait_for_release(read, time.monotonic() + 5) == (True, True)
    os.close(read)
    os.close(write)


def test_destroys_only_the_run_it_watches():
    # The test driver's state lives in one process: run the watchdog's main there.
    conn = libvirt.open("test:///default")
    conn.createXML(DOMAIN.format(name="vmiso-run-a", run_dir="/r/a"), 0)
    conn.createXML(DOMAIN.format(name="vmiso-run-b", run_dir="/r/other"), 0)
    read, write = os.pipe()
    os.close(write)  # vmiso "died"
    saved = os.dup(0)
    os.dup2(read, 0)
    try:
        assert watchdog.main("test:///default", "vmiso-run-a", "/r/a", 60) == 0
        assert watchdog.main("test:///default", "vmiso-run-b", "/r/b", 60) == 0
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    names = {d.name(): metadata_of(d.XMLDesc(0)) for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    assert "vmiso-run-a" not in names
    assert names["vmiso-run-b"] == {"run_dir": "/r/other"}  # another run's VM of that name is kept
    conn.lookupByName("vmiso-run-b").destroy()
    conn.close()


def test_it_outlives_its_parent_and_ignores_the_terminal(tmp_path):
    # A parent that starts a watchdog and is then killed: the watchdog is in a
    # session of its own, sees the pipe close, and exits after acting.
    script = ("import sys, time; from vmiso.clones import watchdog\n"
              "dog = watchdog.start('test:///default', 'vmiso-run-none', '/r/none', 60); dog.started()\n"
              "print(dog.process.pid, flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert os.getsid(pid) == pid  # its own session: no SIGHUP or SIGINT from vmiso's terminal
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the watchdog did not act after its parent died")


def test_nothing_from_the_directory_vmiso_was_started_in_runs(tmp_path, monkeypatch):
    # An analyst working in an untrusted checkout: its click.py must not run on the host.
    marker = tmp_path / "ran"
    (tmp_path / "click.py").write_text(f"open({str(marker)!r}, 'w').write('owned')\n")
    monkeypatch.chdir(tmp_path)
    dog = watchdog.start("test:///default", "vmiso-run-x", "/r/x", 60)
    dog.release()  # it reads the release only once it has imported all it imports, and then it exits
    assert dog.process.returncode == 0 and not marker.exists()
