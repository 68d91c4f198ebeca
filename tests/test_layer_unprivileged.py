"""An OS layer built by an analyst who is not root: vmiso-test, of scripts/setup-host --test.

A real mmdebstrap of the default recipe from the mirror the VM tests use, run as
that user: the image is checked with debugfs (owners, device nodes, setuid bits,
vmiso's files), then removed by the user; and builds killed half-way, by SIGKILL,
leave only what the user's own tools remove.  Marked ``vm`` to run with the slow
tests: it boots nothing, but it builds a layer (minutes).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmiso.config import ImageConfig
from vmiso.image.layer import GUEST_FILES, layer_key, load_recipe
from vmiso.resources import images_dir

from vmharness import REPO

pytestmark = pytest.mark.vm
ANALYST = "vmiso-test"
RECIPE, MIRROR = ImageConfig().recipe, ImageConfig().mirror

# Run by the analyst's Python: argv[1] their own directory (state_dir/users/NAME, where
# their layers live: host.state.home), argv[2] what to do.
ACT = """
import sys
from pathlib import Path
from vmiso.host import reaper
from vmiso.image.layer import ensure_layer, remove_cached_layers
from vmiso.progress import Steps

state, action = Path(sys.argv[1]), sys.argv[2]
if action == "build":
    print(ensure_layer(state, sys.argv[3], sys.argv[4], Steps()).path)
elif action == "remove":
    removed, kept = remove_cached_layers(state)
    print(len(removed), len(kept))
else:
    cleaned = reaper.clean(None, state.parent.parent)
    print(len(cleaned.removed), cleaned.failed)
"""


@pytest.fixture(scope="module")
def analyst() -> pwd.struct_passwd:
    assert os.geteuid() == 0, "this test becomes the analyst vmiso-test, which takes root"
    try:
        return pwd.getpwnam(ANALYST)
    except KeyError:
        pytest.fail(f"no user {ANALYST}: run scripts/setup-host --test")


def as_analyst(user: pwd.struct_passwd, python: str, *args: str | Path, new_session: bool = False,
               ) -> subprocess.Popen:
    argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            python, "-c", ACT, *map(str, args)]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": user.pw_dir,
           "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
    return subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)


def finished(process: subprocess.Popen, timeout: float = 60) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}:\n{out}\n{err}"
    return out


@pytest.fixture(scope="module")
def python(analyst) -> str:
    """A Python that the analyst may run and that imports vmiso: the one setup-host installs
    for every user (/opt/vmiso), or this tree's."""
    tried = []
    for candidate in dict.fromkeys(["/opt/vmiso/bin/python", sys.executable, "/usr/bin/python3"]):
        check = subprocess.run(["setpriv", f"--reuid={analyst.pw_uid}", f"--regid={analyst.pw_gid}",
                                "--init-groups", candidate, "-c", "import vmiso.image.layer, vmiso.host.reaper"],
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, cwd="/",
                               capture_output=True, text=True)
        if check.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {check.stderr.strip()[-200:]}")
    pytest.fail(f"{ANALYST} can run no Python that imports vmiso from {REPO}: " + "; ".join(tried))


@pytest.fixture
def state(analyst):
    """The analyst's own directory in a state directory laid out as setup-host lays it out."""
    root = Path(tempfile.mkdtemp(prefix="vmiso-layer-test-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    home = root / "state" / "users" / ANALYST
    home.mkdir(parents=True)
    for directory in (root / "state", root / "state" / "users"):
        os.chmod(directory, 0o711)
    os.chown(home, analyst.pw_uid, analyst.pw_gid)
    os.chmod(home, 0o700)
    yield home
    # Root's cleanup, whatever the test found: a failed removal must not stay behind.
    shutil.rmtree(root, ignore_errors=True)


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


def stat_fields(image: Path, path: str) -> tuple[int, int, int, str]:
    """(uid, gid, permission bits, type) of ``path`` in the image."""
    fields = debugfs(image, f'stat "{path}"').split()
    assert "Type:" in fields, f"{path} is not in the image"
    return (int(fields[fields.index("User:") + 1]), int(fields[fields.index("Group:") + 1]),
            int(fields[fields.index("Mode:") + 1], 8), fields[fields.index("Type:") + 1])


def cat(image: Path, path: str) -> str:
    return debugfs(image, f'cat "{path}"')


def id_of(table: str, name: str) -> int:
    """The uid or gid of ``name`` in a passwd or group file's text."""
    for line in table.splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no {name} in {table[:200]}")


def owners_below(path: Path) -> set[int]:
    owners = {path.lstat().st_uid}
    for directory, dirs, files in os.walk(path):
        owners.update(Path(directory, name).lstat().st_uid for name in dirs + files)
    return owners


def build_processes(state: Path) -> list[str]:
    """Command lines of the processes still at work on this state directory (a build's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if str(state).encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def check_image(layer: Path) -> None:
    image = layer / "rootfs.img"
    passwd, group = cat(image, "/etc/passwd"), cat(image, "/etc/group")
    # root's files, and the packages' own users and groups where they put them
    assert stat_fields(image, "/")[:2] == (0, 0)
    assert stat_fields(image, "/etc/passwd") == (0, 0, 0o644, "regular")
    assert stat_fields(image, "/usr/bin/python3.11")[:2] == (0, 0)
    assert stat_fields(image, "/var/lib/apt/lists/partial") == (id_of(passwd, "_apt"), 0, 0o700, "directory")
    assert stat_fields(image, "/var/log/journal") == (0, id_of(group, "systemd-journal"), 0o2755, "directory")
    # setuid programs and device nodes, as mmdebstrap made them
    for program in ("/usr/bin/su", "/usr/bin/mount"):
        assert stat_fields(image, program) == (0, 0, 0o4755, "regular")
    assert stat_fields(image, "/dev/null") == (0, 0, 0o666, "character")
    assert "Device major/minor number: 01:03" in debugfs(image, "stat /dev/null")
    # vmiso's files at their paths, with their modes, root's; no SSH host keys
    for name, (inside, mode) in GUEST_FILES.items():
        assert stat_fields(image, "/" + inside) == (0, 0, mode, "regular")
        assert cat(image, "/" + inside) == (images_dir() / "guest" / name).read_text()
    assert "ssh_host_" not in debugfs(image, "ls /etc/ssh")
    # the boot files beside it: the image's kernel, and its release
    release = (layer / "kernel-release").read_text().strip()
    with tempfile.TemporaryDirectory() as scratch:
        dumped = Path(scratch) / "vmlinuz"
        debugfs(image, f'dump "/boot/vmlinuz-{release}" "{dumped}"')
        assert dumped.read_bytes() == (layer / "vmlinuz").read_bytes()
    for name in ("initrd.img", "initramfs.img"):
        assert (layer / name).stat().st_size > 1024**2


def ipc_objects(user: pwd.struct_passwd) -> set[str]:
    """The analyst's System V message queues and semaphore sets (their ids)."""
    found = set()
    for kind in ("msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        uid_column = lines[0].split().index("uid")
        found.update(f"{kind} {line.split()[1]}" for line in lines[1:] if int(line.split()[uid_column]) == user.pw_uid)
    return found


def kill_build_when(state: Path, user: pwd.struct_passwd, python: str, ready, what: str) -> None:
    """Start a build as the analyst, SIGKILL it (vmiso alone: its steps must follow) when
    ``ready(work)`` holds for its build directory, then check what is left and reap it."""
    ipc_before = ipc_objects(user)
    build = as_analyst(user, python, state, "build", RECIPE, MIRROR, new_session=True)
    layers = state / "layers"

    def at_work() -> bool:
        works = list(layers.glob(".building-*")) if layers.is_dir() else []
        assert build.poll() is None, f"the build ended before {what}: {build.communicate()}"
        return bool(works) and ready(works[0])

    try:
        wait_for(at_work, 900, what)
    finally:
        build.send_signal(signal.SIGKILL)
        build.communicate()
    wait_for(lambda: not build_processes(state), 30, "the killed build's processes to end")
    # No System V queue or semaphore of fakeroot's is left (it was in the step's ipc namespace)...
    assert ipc_objects(user) - ipc_before == set()
    # ...what is left is the analyst's own, to the last file...
    assert owners_below(state) == {user.pw_uid}
    # ...and their reaper removes it, as the analyst.
    out = finished(as_analyst(user, python, state, "reap"))
    assert out.strip() == "1 []", out
    assert list(layers.iterdir()) == []


def test_an_analyst_builds_removes_and_kills_a_layer_leaving_nothing_behind(analyst, python, state):
    key = layer_key(load_recipe(RECIPE), MIRROR)
    log = state / "logs" / f"layer-{key}.log"

    # Killed by SIGKILL while mmdebstrap installs packages: the chroot's files belong to
    # the analyst's subordinate ids then, in the build's tmpfs.
    kill_build_when(state, analyst, python,
                    lambda work: log.exists() and "installing remaining packages" in log.read_text(errors="replace"),
                    "mmdebstrap to install the packages")
    # Killed while fakeroot unpacks the tarball: the tree on disk, setuid programs included.
    kill_build_when(state, analyst, python, lambda work: (work / "root/usr/bin").is_dir(),
                    "the tarball to be unpacked")

    layer = Path(finished(as_analyst(analyst, python, state, "build", RECIPE, MIRROR), timeout=1800).strip())
    assert layer == state / "layers" / key
    assert {p.name for p in layer.iterdir()} == {"rootfs.img", "vmlinuz", "initrd.img", "initramfs.img",
                                                 "kernel-release", "recipe.json"}
    assert owners_below(state) == {analyst.pw_uid}
    check_image(layer)

    assert finished(as_analyst(analyst, python, state, "remove")).split() == ["1", "0"]
    assert list((state / "layers").iterdir()) == []
