"""Shared fixtures, and what each test needs of the host.

VM tests (marked ``vm``) boot real guests through libvirt.  A test marked ``root`` needs
root; one marked ``hostsetup`` needs what ``scripts/setup-host --test`` sets up; a VM test
needs both.  Anyone else gets them skipped, with the reason; in CI (``CI=true``, where
``.ci/run`` runs the suite as root after setup-host) they fail instead, as any skip does:
a test skipped there would prove nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slurmharness import LocalSlurm, SlurmStartError
from vmharness import (
    DELETED_SECRET,
    NUMPY,
    TABULATE,
    make_state_root,
    mounts_below,
    remove_made_roots,
    remove_tree,
    vmiso,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
ANALYSTS = ("vmiso-test", "vmiso-test2")  # scripts/setup-host --test makes them
SHARE_HELPER = Path("/usr/local/libexec/vmiso/share-mount")
SUDO_RULE = Path("/etc/sudoers.d/vmiso")


# --- what a test needs of the host: markers root and hostsetup ------------------------------------

def _missing_host_setup() -> str | None:
    """What this host lacks of scripts/setup-host --test, or None."""
    try:
        members = grp.getgrnam("vmiso").gr_mem
    except KeyError:
        return "no group vmiso"
    for user in ANALYSTS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no user {user}"
        if user not in members:
            return f"{user} is not a member of vmiso"
    if not SHARE_HELPER.is_file():
        return f"no share helper {SHARE_HELPER}"
    if not SUDO_RULE.is_file():
        return f"no sudo rule {SUDO_RULE} (or it cannot be seen without root)"
    for program in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None:
            return f"no {program} (packages munge and slurm-wlm)"
    try:
        done = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"virsh -c qemu:///system: {err}"
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        return f"libvirtd does not answer on qemu:///system ({said[-1] if said else done.returncode})"
    return None


_host_setup: list[str | None] = []  # _missing_host_setup(), asked once, when a test first needs it


def _lacks(item: pytest.Item) -> list[str]:
    """What ``item`` needs that this process or host lacks, each with its reason."""
    def why(mark: pytest.Mark | None) -> str:
        reason = mark.kwargs.get("reason") if mark else "boots real guests"  # no mark: a VM test
        return f" ({reason})" if reason else ""

    lacks = []
    vm = item.get_closest_marker("vm") is not None
    root = item.get_closest_marker("root")
    if (root or vm) and os.geteuid() != 0:
        lacks.append(f"needs root{why(root)}")
    setup = item.get_closest_marker("hostsetup")
    if setup or vm:
        if not _host_setup:
            _host_setup.append(_missing_host_setup())
        if _host_setup[0]:
            lacks.append(f"needs scripts/setup-host --test{why(setup)}: {_host_setup[0]}")
    return lacks


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what will not run
def pytest_collection_modifyitems(config, items):
    # VM tests last: the fast ones report first.
    items.sort(key=lambda item: item.get_closest_marker("vm") is not None)
    in_a_worker = hasattr(config, "workerinput")  # pytest-xdist's -n: this process is one of several
    for item in items:
        if in_a_worker and item.get_closest_marker("vm") is not None:
            # The VM tests share a few provisioned images and the host's two cores, one guest at a time.
            item.add_marker(pytest.mark.skip(reason="a VM test runs only without -n (pytest -m vm); "
                                                    "-n is for the fast tests (pytest -m 'not vm' -n auto)"))
        elif lacks := _lacks(item):
            item.add_marker(pytest.mark.skip(reason="; ".join(lacks)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        # Whatever skipped it (a marker above, or the test itself): in CI, as root after
        # scripts/setup-host --test, nothing may be skipped.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run (as root, after setup-host --test): {reason}"


# --- without root: stand-ins for what only root or scripts/setup-host gives -----------------------

def _replace(monkeypatch: pytest.MonkeyPatch, function, by) -> None:
    """``function`` of vmiso's replaced by ``by`` in its module and in every vmiso module that
    imported it by name, wherever the modules live."""
    for name, module in list(sys.modules.items()):
        if (name == "vmiso" or name.startswith("vmiso.")) and getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, by)


@pytest.fixture(autouse=True)
def stand_ins_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """For anyone but root, stand-ins for the two things vmiso has only from root or from
    scripts/setup-host, so that the fast tests of runs, warm states, pools and gc run as anyone:

    - the user's own state directory: an analyst's is ``state_dir/users/NAME``, made by
      setup-host; here it is ``state_dir`` itself, as root's is, so a test's own temporary
      state directory serves (vmiso's own check of it is tested by the VM tests, as analysts);
    - a run's bounded /out: a plain directory, not the filesystem of its own that root (or
      setup-host's share helper, through sudo) makes and mounts; the tests of those bounds
      are marked ``root`` and run as root, without stand-ins.
    """
    if os.geteuid() == 0:
        return
    from vmiso.host import state, workdir

    def home(state_dir: Path) -> state.Home:
        return state.Home(workdir.private_dir(state_dir))

    def bounded_share(path: Path, *, max_bytes: int, max_files: int) -> Path:
        path.mkdir(mode=0o700)
        return path

    _replace(monkeypatch, state.home, home)
    _replace(monkeypatch, workdir.bounded_share, bounded_share)


# --- leaving nothing behind, passed, failed or interrupted ----------------------------------------

def pytest_configure(config):
    # Stopped by SIGTERM (a cancelled CI job, runuser passing on a Ctrl-C) as by Ctrl-C:
    # the fixtures still remove what they made.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    outcome = yield
    if outcome.excinfo and issubclass(outcome.excinfo[0], KeyboardInterrupt):
        # Interrupted: pytest would tear down this test's fixtures only after removing its
        # temporary directories, which what they hold (a mounted share, a tree deeper than
        # shutil.rmtree can walk) would stop.  Torn down now; the interruption goes on.
        try:
            item.ihook.pytest_runtest_teardown(item=item, nextitem=None)
        except Exception as err:  # the interruption is what the session reports
            print(f"\nconftest: tearing down {item.nodeid} after the interruption: {err!r}", file=sys.stderr)


_basetemp: list[Path] = []  # pytest's temporary directory of this session, where every tmp_path is
_deep: list[Path] = []  # the tmp_path of each deep_tree until its teardown has emptied it


@pytest.fixture(scope="session", autouse=True)
def basetemp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _basetemp.append(tmp_path_factory.getbasetemp())
    return _basetemp[-1]


def _empty(directory: Path) -> None:
    """Remove everything in ``directory``, at any depth (vmiso.host.tree, by descriptor)."""
    from vmiso.host import tree

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            assert tree.remove_tree(fd, name) == []
    finally:
        os.close(fd)


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session):
    # First, before pytest removes its temporary directories: what a teardown cut short by
    # Ctrl-C left there that would stop it (shutil.rmtree cannot walk a deep tree, nor remove
    # a mount point, and would empty the share mounted on it).
    for directory in filter(Path.is_dir, _deep):
        try:
            _empty(directory)
        except (OSError, AssertionError) as err:
            print(f"\nconftest: cannot empty {directory}: {err!r}", file=sys.stderr)
    _deep.clear()
    if os.geteuid() == 0:
        for point in (mounts_below(_basetemp[0]) if _basetemp else []):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    yield
    # Then, once every fixture is torn down: what a fixture that failed half-way, or an
    # interrupted session, left of the state roots it made in /var/tmp: removed, and named;
    # what cannot be removed fails the session.
    removed, stuck = remove_made_roots()
    if removed:
        print(f"\nconftest: removed {len(removed)} state root(s) their fixtures left: "
              + " ".join(map(str, removed)), file=sys.stderr)
    for why in stuck:
        print(f"\nconftest: {why}", file=sys.stderr)
    if stuck and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def write(tmp_path: Path):
    """write("name", "text") -> path of a new file under tmp_path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    return _write


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# The VM tests' state directory and the one image they provision in it, shared by
# every test file (the OS layer cached there serves later provisionings too).
@pytest.fixture(scope="session")
def vm_root():
    root = make_state_root()
    yield root
    remove_tree(root)


@pytest.fixture(scope="session")
def image(vm_root):
    # The marker stands for what provisioning sees and deletes (the requirements are copied
    # in, then removed at sealing): the template's free space must not carry it.
    config = write_config(vm_root / "config", vm_root / "state", requirements=TABULATE + NUMPY + DELETED_SECRET)
    done = vmiso("-q", "provision", "-c", config, timeout=2400)
    assert done.returncode == 0, done.stderr
    return {"config": config, "state": vm_root / "state", "output": done}


os.environ.setdefault("VMISO_ACCEL", "tcg")


@pytest.fixture(scope="session")
def slurm():
    """A private one-node Slurm for the session (tests/slurmharness.py): its own munged,
    slurmctld and slurmd under /tmp/vmiso-slurm-*, stopped and removed at the end.  Its tests
    carry the markers root and hostsetup.  If it cannot start, the test fails with the
    daemons' log tails."""
    try:
        cluster = LocalSlurm.start(memory_mib=4096)  # room for two runs of 512 MiB with QEMU's share
    except SlurmStartError as err:
        pytest.fail(f"the private Slurm did not start: {err}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def deep_tree(tmp_path: Path):
    """deep_tree(root, depth, name="d", file_every=0) -> the names from ``root`` down.

    Built by descriptor, as a guest can: the path is far longer than PATH_MAX.
    ``file_every``: a file "f" (holding its depth) in every so many directories.
    Everything in ``tmp_path`` is removed afterwards by vmiso.host.tree: pytest's own
    cleanup (shutil.rmtree, recursive in Python 3.11) would crash on it, in this
    session or a later one."""
    def _make(root: Path, depth: int, name: str = "d", file_every: int = 0) -> list[str]:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for level in range(1, depth + 1):
                os.mkdir(name, dir_fd=fd)
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
                if file_every and level % file_every == 0:
                    out = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
                    os.write(out, str(level).encode())
                    os.close(out)
        finally:
            os.close(fd)
        return [name] * depth
    _deep.append(tmp_path)
    yield _make
    _empty(tmp_path)
    _deep.remove(tmp_path)
