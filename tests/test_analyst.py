"""vmiso run by analysts who are not root: two members of group vmiso on one host.

scripts/setup-host --test made them (vmiso-test, vmiso-test2), installed vmiso for
every user (/usr/local/bin/vmiso) and the share helper's sudo rule.  Each test
runs the CLI as they would, through runuser, against a state directory laid out
as setup-host lays out /var/lib/vmiso: a shared image store (group vmiso, setgid,
sticky) and a private directory per analyst.  The first analyst provisions an
image; both use it; neither reaches the other's runs.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmiso.host.workdir import mounts_below

from vmharness import TABULATE, make_state_root, remove_tree, wait_for, write_config

pytestmark = pytest.mark.vm

ANALYST, OTHER = "vmiso-test", "vmiso-test2"
VMISO = "/usr/local/bin/vmiso"
JOB = """\
import os, tabulate
os.makedirs("/out/tables", exist_ok=True)
with open("/out/tables/t.txt", "w") as f:
    f.write(tabulate.tabulate([[1, 2]]))
print("job ran as", os.getuid() != 0 and "a user" or "root")
"""


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def as_user(user: str, *args: str | Path, timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", "env", "VMISO_ACCEL=tcg", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd="/", stdin=subprocess.DEVNULL,
                          **popen)


def make_own(path: Path, user: str, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


@pytest.fixture(scope="module")
def store(image):
    """The shared store, and the image the first analyst provisions in it."""
    root = make_state_root()
    state = root / "state"
    state.mkdir(mode=0o711)
    images = state / "images"
    images.mkdir()
    os.chown(images, 0, grp.getgrnam("vmiso").gr_gid)
    os.chmod(images, 0o3775)
    (state / "users").mkdir(mode=0o711)
    for user in (ANALYST, OTHER):
        make_own(state / "users" / user, user)
        make_own(root / f"out-{user}", user)
    # Root's cached OS layer, as on a host where root provisioned first: the analyst's
    # provisioning starts from it (hard links: the same root-owned, read-only files).
    subprocess.run(["cp", "-al", str(image["state"] / "layers"), str(state / "layers")], check=True)
    config = write_config(root / "config", state, requirements=TABULATE)
    os.chmod(root / "config", 0o755)
    for path in (root / "config").iterdir():
        os.chmod(path, 0o644)
    inputs = root / "in"
    inputs.mkdir(mode=0o755)
    (inputs / "job.py").write_text(JOB)
    (inputs / "secret.txt").write_text("the first analyst's data\n")
    for path in inputs.iterdir():
        os.chmod(path, 0o644)
    done = as_user(ANALYST, VMISO, "-q", "provision", "-c", config, timeout=2400)
    assert done.returncode == 0, done.stdout + done.stderr
    yield {"root": root, "state": state, "config": config, "inputs": inputs}
    for point in mounts_below(root):  # what a failed test left mounted
        subprocess.run(["umount", "--lazy", str(point)], check=False)
    remove_tree(root)


def no_leftovers(store) -> None:
    state = store["state"]
    assert [p for user in (ANALYST, OTHER) for p in (state / "users" / user / "runs").glob("*")] == []
    assert str(state) not in Path("/proc/self/mounts").read_text()
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True,
                           text=True, check=True).stdout
    assert all(str(state) not in subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", n],
                                                capture_output=True, text=True).stdout
               for n in names.split())


def test_an_analyst_provisions_an_image_the_group_shares_read_only(store):
    image = store["state"] / "images" / "it"
    st = image.stat()
    assert st.st_uid == uid(ANALYST) and st.st_gid == grp.getgrnam("vmiso").gr_gid
    template = (image / "template.qcow2").stat()
    assert template.st_uid == uid(ANALYST) and template.st_mode & 0o222 == 0
    listed = as_user(OTHER, VMISO, "images", "-c", store["config"], "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(i["name"], i["owner"]) for i in json.loads(listed.stdout)] == [("it", ANALYST)]
    # Only its owner (or root) removes or replaces it.
    refused = as_user(OTHER, VMISO, "images", "-c", store["config"], "rm", "it")
    assert refused.returncode != 0 and "only vmiso-test or root may remove it" in refused.stderr
    refused = as_user(OTHER, VMISO, "provision", "--replace", "-c", store["config"])
    assert refused.returncode != 0 and "only vmiso-test or root may replace it" in refused.stderr
    assert (image / "manifest.json").is_file()
    # A user outside the group reads nothing of it.
    assert subprocess.run(["runuser", "-u", "nobody", "--", "ls", str(image)], capture_output=True).returncode != 0


@pytest.mark.parametrize("boot", ["warm", "cold"])
def test_an_analyst_runs_warm_and_cold_and_owns_the_outputs(store, boot):
    out = store["root"] / f"out-{ANALYST}" / boot
    record = store["root"] / f"out-{ANALYST}" / f"{boot}.json"
    done = as_user(ANALYST, VMISO, "run", "-c", store["config"], "--json", record, "-i", store["inputs"] / "job.py",
                   "-o", out, *(["--cold"] if boot == "cold" else []), "--", "python", "job.py")
    assert done.returncode == 0, done.stderr
    assert "job ran as a user" in done.stdout
    assert json.loads(record.read_text())["boot"] == boot
    assert (out / "tables" / "t.txt").read_text().startswith("-")
    for path in [out, *out.rglob("*")]:
        assert path.lstat().st_uid == uid(ANALYST), path  # not root's, not QEMU's
    no_leftovers(store)


def test_a_second_analyst_shares_the_image_not_the_runs_and_gc_cleans_a_killed_run(store):
    state = store["state"]
    runs = state / "users" / ANALYST / "runs"
    first = subprocess.Popen(
        ["runuser", "-u", ANALYST, "--", "env", "VMISO_ACCEL=tcg", VMISO, "run", "-c", str(store["config"]),
         "--cold", "-i", str(store["inputs"] / "secret.txt"), "--",
         "sh", "-c", "cat secret.txt > /out/copy; touch /out/started; sleep 300"],
        cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: any((p / "out" / "started").exists() for p in runs.glob("*")), 120, "the first job")
        (run_dir,) = list(runs.glob("*"))
        # The second analyst reaches none of it: not the directory, the staged input or /out.
        for path in (state / "users" / ANALYST, run_dir, run_dir / "in" / "secret.txt", run_dir / "out" / "copy"):
            peek = subprocess.run(["runuser", "-u", OTHER, "--", "cat" if path.suffix else "ls", str(path)],
                                  capture_output=True, text=True)
            assert peek.returncode != 0 and "Permission denied" in peek.stderr, path
        # Their gc leaves the first analyst's run alone; their run uses the first analyst's image.
        gc = as_user(OTHER, VMISO, "gc", "-c", store["config"])
        assert gc.returncode == 0 and "nothing to remove" in gc.stdout, gc.stdout + gc.stderr
        out = store["root"] / f"out-{OTHER}" / "o"
        done = as_user(OTHER, VMISO, "run", "-c", store["config"], "-i", store["inputs"] / "job.py", "-o", out,
                       "--", "python", "job.py")
        assert done.returncode == 0, done.stderr
        assert all(p.lstat().st_uid == uid(OTHER) for p in [out, *out.rglob("*")])
        assert first.poll() is None and (run_dir / "out" / "started").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # vmiso and everything it started, at once
        first.wait()
    # What the killed vmiso left (its VM, the run directory and its mounted /out): its owner's gc removes it.
    time.sleep(1)
    gc = as_user(ANALYST, VMISO, "gc", "-c", store["config"])
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert "removed run directory" in gc.stdout
    no_leftovers(store)


def test_doctor_tells_a_user_outside_the_group_what_to_do(store):
    done = subprocess.run(["runuser", "-u", "nobody", "--", VMISO, "doctor", "-c", str(store["config"])],
                          capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode != 0
    assert "nobody is not a member of group vmiso" in done.stdout + done.stderr
    assert "scripts/setup-host --user nobody" in done.stdout + done.stderr
