"""The outside programs vmiso runs: argv lists built here, run here, failures converted here.

Each ``*_argv`` function only builds a list (unit-tested without running anything);
``run`` executes one and turns a failure into a ``ToolError`` that names the
program and the tail of its output.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ToolError

log = logging.getLogger(__name__)

# Debian package that provides each program, for the "how to fix" part of errors.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "genisoimage": "genisoimage",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkfs.erofs": "erofs-utils",
    "sfdisk": "fdisk",
    "busybox": "busybox-static",
    "ssh-keygen": "openssh-client",
    "umount": "mount",
    "cp": "coreutils",
    "fakeroot": "fakeroot",
    "newuidmap": "uidmap",
    "newgidmap": "uidmap",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "sbatch": "slurm-client",
    "squeue": "slurm-client",
    "scontrol": "slurm-client",
    "scancel": "slurm-client",
}


def which(program: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        package = PACKAGES.get(program, program)
        raise ToolError(f"{program} is not installed", f"install it: apt-get install {package}", program=program)
    return found


def run(argv: Sequence[str], *, log_path: Path | None = None, timeout: float | None = None,
        input_text: str | None = None, cwd: Path | None = None, name: str | None = None) -> str:
    """Run ``argv``; return its stdout.  Output goes to ``log_path`` when given.

    ``name``: the program that errors name, when ``argv[0]`` only starts it (a namespace, fakeroot).
    """
    program = name or argv[0]
    full = [which(argv[0]), *argv[1:]]
    log.debug("running %s", " ".join(full))
    try:
        if log_path is not None:
            with open(log_path, "ab") as log_file:
                done: subprocess.CompletedProcess[Any] = subprocess.run(
                    full, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout,
                    input=input_text.encode() if input_text else None)
            output = ""
        else:
            done = subprocess.run(full, capture_output=True, text=True, errors="replace", timeout=timeout,
                                  input=input_text, cwd=cwd)
            output = done.stdout
    except subprocess.TimeoutExpired:
        raise ToolError(f"{program} did not finish within {timeout:.0f} s", program=program) from None
    if done.returncode != 0:
        if log_path is not None:
            tail = log_tail(log_path)
            where = f"; its log is {log_path}"
        else:
            tail = (done.stderr or done.stdout or "").strip()[-600:]
            where = ""
        raise ToolError(f"{program} failed with exit code {done.returncode}{where}: {tail}", program=program)
    return output


def run_for_status(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``argv`` (found on PATH, or a path) for what it says: (exit status, stdout, stderr), whatever
    the status; ToolError only when it cannot start or does not finish within ``timeout``."""
    program = argv[0]
    try:
        done = subprocess.run([which(program), *argv[1:]], capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{program} did not finish within {timeout:.0f} s", program=program) from None
    return done.returncode, done.stdout, done.stderr


def pip_audit_argv(requirements: Path, service: str) -> list[str]:
    """pip-audit (this Python's) on pinned ``name==version`` lines, no resolving, no pip run: JSON out."""
    return [sys.executable, "-m", "pip_audit", "--requirement", str(requirements), "--no-deps", "--disable-pip",
            "--format", "json", "--vulnerability-service", service, "--progress-spinner", "off"]


def log_tail(path: Path, lines: int = 8) -> str:
    """The last ``lines`` lines of a log, on one line, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


Detached = subprocess.Popen[bytes]


def start_detached(argv: Sequence[str], env: dict[str, str] | None = None) -> Detached:
    """Start ``argv`` in a session of its own (no signal from this process's terminal
    reaches it), with a pipe on its stdin and no output.  ``env``: its whole environment
    (None: this process's)."""
    return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, cwd="/",
                            env=env)


def start_server(argv: Sequence[str], log: BinaryIO) -> Detached:
    """Start ``argv`` in a session of its own that outlives this process: its stdout a pipe
    (where it says once that it is ready), its stderr ``log``."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                            start_new_session=True, close_fds=True, cwd="/")


def start_relayed(argv: Sequence[str]) -> Detached:
    """Start ``argv`` in a session of its own with no stdin, its stdout and stderr pipes for the caller
    to relay (a node's command for its client, vmiso.node.server)."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True)


def pool_argv(*args: str) -> list[str]:
    """``vmiso pool ...`` as this Python and this vmiso run it (-I, as watchdog_argv)."""
    return [sys.executable, "-I", "-m", "vmiso", "pool", *args]


def vmiso_argv(*args: str) -> list[str]:
    """``vmiso ARGS`` as this Python and this vmiso run it, for a batch's tasks.  -P, not -I: the
    directory vmiso was started in stays off the path (an untrusted checkout's click.py, say), and
    PYTHONPATH, which chose this vmiso, still chooses the tasks' (-I would drop it)."""
    return [sys.executable, "-P", "-m", "vmiso", *args]


def start_task(argv: Sequence[str], log: int, env: dict[str, str] | None = None) -> Detached:
    """Start a batch's task: ``argv`` in a session of its own (the terminal's Ctrl-C reaches the
    batch, which stops its tasks itself), stdin empty, stdout and stderr to the descriptor ``log``.
    When the batch ends, even by SIGKILL, the task gets SIGTERM (setpriv --pdeathsig), which a
    vmiso run answers by stopping its job and cleaning up: no task outlives its batch."""
    return subprocess.Popen([which("setpriv"), "--pdeathsig=TERM", "--", *argv], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True, close_fds=True, env=env)


def tell_detached(process: Detached, message: bytes) -> None:
    """Write ``message`` to its stdin now (it may have ended: then nothing happens)."""
    if process.stdin is not None:
        try:
            process.stdin.write(message)
            process.stdin.flush()
        except OSError:
            pass


def finish_detached(process: Detached, message: bytes, timeout: float = 5) -> None:
    """Send ``message`` and end of file on its stdin, then reap it (killed after ``timeout``)."""
    if process.stdin is not None:
        try:
            process.stdin.write(message)
            process.stdin.close()
        except OSError:
            pass  # it has ended already
        process.stdin = None
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Slurm: a submit host's clients ------------------------------------------------

def slurm_query(argv: Sequence[str], timeout: float = 60) -> tuple[int, str, str]:
    """Run a Slurm client (sbatch, squeue, scontrol, scancel): its exit status, stdout and stderr.
    ToolError when it is not installed or does not answer within ``timeout`` (the controller is down)."""
    full = [which(argv[0]), *argv[1:]]
    log.debug("running %s", " ".join(full))
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{argv[0]} did not answer within {timeout:.0f} s", program=argv[0]) from None
    return done.returncode, done.stdout, done.stderr


def sbatch_argv(script: Path, *args: str, array: str, cpus: int, memory_mib: int, minutes: int | None,
                workdir: Path, name: str) -> list[str]:
    """Submit ``script ARGS`` as a job array (``array``: ``0-N%J``), each element with ``cpus`` CPUs and
    ``memory_mib`` MiB, at most ``minutes`` (None: the partition's limit), run in ``workdir`` (where its
    own output goes, as INDEX.out), never requeued (an element is a task: the batch runs it again)."""
    time = [f"--time={minutes}"] if minutes is not None else []
    return ["sbatch", "--parsable", f"--array={array}", f"--job-name={name}", f"--cpus-per-task={cpus}",
            f"--mem={memory_mib}M", *time, f"--chdir={workdir}", "--output=%a.out", "--no-requeue",
            str(script), *args]


def squeue_array_argv(job: str) -> list[str]:
    """One line per element of the array ``job`` that is pending, running or completing: its index,
    state and node."""
    return ["squeue", "-h", "-r", "-j", job, "-o", "%K %T %N"]


def scontrol_job_argv(job: str) -> list[str]:
    return ["scontrol", "show", "job", job]


def scancel_argv(job: str, signal_name: str | None = None) -> list[str]:
    """Cancel the array ``job`` (its running elements get SIGTERM, then SIGKILL after KillWait; its pending
    ones never start); with ``signal_name``: send that signal to every process of its running elements."""
    return ["scancel", *(["--full", f"--signal={signal_name}"] if signal_name else []), job]


def watchdog_argv(uri: str, name: str, run_dir: str, seconds: float) -> list[str]:
    # This Python and this vmiso, whichever way it was installed; -I: not the
    # directory vmiso was started in (an untrusted checkout's click.py, say) on the path.
    return [sys.executable, "-I", "-m", "vmiso", "_watchdog", uri, name, run_dir, f"{seconds:.0f}"]


# --- qemu-img -----------------------------------------------------------------------

def qemu_img_overlay_argv(backing: Path, overlay: Path, backing_format: str = "qcow2",
                          cluster_size: int | None = None) -> list[str]:
    options = ["-o", f"cluster_size={cluster_size}"] if cluster_size else []
    return ["qemu-img", "create", "-q", "-f", "qcow2", *options, "-F", backing_format,
            "-b", str(backing), str(overlay)]


def qemu_img_convert_argv(source: Path, source_format: str, target: Path,
                          target_format: str = "qcow2") -> list[str]:
    # No compression: a compressed template is smaller but every cold read of a
    # cluster pays for inflating it, and runs read the template far more often.
    return ["qemu-img", "convert", "-q", "-f", source_format, "-O", target_format, str(source), str(target)]


def qemu_img_info_argv(image: Path) -> list[str]:
    return ["qemu-img", "info", "--output=json", "-U", str(image)]


def qemu_img_info(image: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run(qemu_img_info_argv(image)))
    return info


# --- OS layer ---------------------------------------------------------------------------
# Built the same way by root and by an analyst who is not root.  mmdebstrap makes the
# chroot in a tmpfs that exists only in a mount namespace of the build's own, and
# writes it out as a tarball: killed at any point, the build leaves nothing on disk
# that its user cannot remove (files of the subordinate ids never reach the disk).
# Then, in one fakeroot session, the tarball is unpacked (mkfs.ext4 -d of e2fsprogs
# 1.47.0 reads only directories), vmiso's files are added, and mkfs.ext4 packs the
# tree: it sees the owners, modes and device nodes fakeroot has on record, while
# the files on disk are plain files of the user's.  Each step runs in a pid
# namespace whose processes all die with vmiso, however vmiso ends.

# The ids a user namespace maps besides root: every Debian system user and group,
# up to nobody and nogroup (65534).
LAYER_IDS = 65536


def mmdebstrap_argv(*, suite: str, mirror: str, target: Path, packages: Sequence[str],
                    variant: str = "minbase", hooks: Sequence[str] = ()) -> list[str]:
    # unshare: mmdebstrap makes mount, pid, uts and ipc namespaces of its own, and a
    # user namespace only when it is not root (layer_namespace_argv runs it as root of
    # one).  The tarball is the one root mode makes, /dev's nodes included: mmdebstrap
    # writes those into the archive itself.
    argv = ["mmdebstrap", "--mode=unshare", "--format=tar", f"--variant={variant}", "--verbose"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    for hook in hooks:
        argv.append(f"--customize-hook={hook}")
    argv += [suite, str(target), mirror]
    return argv


def _dying_with_vmiso(namespaces: Sequence[str]) -> list[str]:
    """The start of an argv run in new ``namespaces`` (unshare's options), pid and ipc ones.

    When vmiso ends, even by SIGKILL, unshare gets SIGKILL (setpriv --pdeathsig); with
    --kill-child it passes it to the first process of the pid namespace, and with that
    one every process in the namespace dies (mmdebstrap's nested ones, fakeroot's
    daemon, which leaves its session and would outlive a killed process group).  The
    System V message queues and semaphores of fakeroot's daemon, which it removes only
    when it ends by SIGTERM, go with the ipc namespace.
    """
    return ["setpriv", "--pdeathsig=KILL", "--", "unshare", *namespaces,
            "--pid", "--fork", "--kill-child=KILL", "--ipc", "--"]


# Runs as root of the namespace.  The tmpfs is on /tmp, inside the namespace only:
# there the chroot's path is one that apt's sandbox user (_apt) can reach, as
# mmdebstrap requires to download as _apt rather than as root.
_TMPFS_SCRIPT = 'mount -t tmpfs -o mode=1777 vmiso-layer /tmp && TMPDIR=/tmp && export TMPDIR && exec "$@"'


def layer_namespace_argv(argv: Sequence[str], *, sub_ids: tuple[int, int] | None) -> list[str]:
    """``argv`` (mmdebstrap) in namespaces of its own, with a tmpfs of its own on /tmp as its TMPDIR.

    ``sub_ids``: (first subordinate uid, first subordinate gid) of a user who is not
    root; the namespaces are then in a user namespace too, where root is that user
    (what it writes outside the tmpfs is theirs) and ids 1 to LAYER_IDS are the
    subordinate ones.  Nothing written in the tmpfs outlives the namespace.
    """
    namespaces = ["--mount", "--propagation=private"]
    if sub_ids is not None:
        uid, gid = sub_ids
        namespaces += ["--map-user=0", "--map-group=0",
                       f"--map-users={uid},1,{LAYER_IDS}", f"--map-groups={gid},1,{LAYER_IDS}"]
    return [*_dying_with_vmiso(namespaces), "sh", "-c", _TMPFS_SCRIPT, "sh", *argv]


# Runs under fakeroot: $1 the tarball, $2 the directory to fill; then (file, path in
# the root, octal mode) triples up to "--"; then the mkfs argv.  The SSH host keys of
# openssh-server's postinst are not unpacked: each image gets its own, made on the
# host and pinned.
_PACK_SCRIPT = """set -eu
tar --extract --numeric-owner --preserve-permissions --xattrs --xattrs-include='*' \\
    --exclude='./etc/ssh/ssh_host_*' --file "$1" --directory "$2"
root=$2
shift 2
while [ "$1" != -- ]; do
    install -D --owner=0 --group=0 --mode="$3" "$1" "$root/$2"
    shift 3
done
shift
exec "$@"
"""


def pack_layer_argv(*, tarball: Path, root: Path, files: Sequence[tuple[Path, str, int]],
                    mkfs: Sequence[str], user_namespace: bool) -> list[str]:
    """Unpack ``tarball`` into ``root``, add ``files`` (source, path in the root, mode; root's),
    then run ``mkfs`` on the tree, all in one fakeroot session: mkfs sees the owners, modes
    and device nodes the archive holds, and vmiso's files as root's.  One session, because
    fakeroot keeps its records by inode: a file made outside it could take the inode, and
    so the owner and type, of one deleted inside it.

    ``user_namespace``: for a user who is not root, who needs one for a pid namespace; it
    maps only that user, as itself.  fakeroot never changes an owner for real
    (FAKEROOTDONTTRYCHOWN), so every file on disk is the user's (root's, for root).
    """
    triples = [str(item) for source, inside, mode in files for item in (source, inside, f"{mode:o}")]
    namespaces = ["--map-current-user"] if user_namespace else []
    return [*_dying_with_vmiso(namespaces), "env", "FAKEROOTDONTTRYCHOWN=1",
            "fakeroot", "--", "sh", "-c", _PACK_SCRIPT, "sh", str(tarball), str(root), *triples, "--", *mkfs]


def mkfs_ext4_argv(*, source_dir: Path, image: Path, size_bytes: int, label: str) -> list[str]:
    # -d fills the filesystem from a directory: no loop mount, no root needed.
    # Huge files and metadata checksums are kept; the size is in KiB blocks.
    return ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0",
            "-d", str(source_dir), str(image), f"{size_bytes // 1024}k"]


def mkfs_scratch_argv(image: Path) -> list[str]:
    # A run's /tmp on an existing sparse file: no journal (nothing in it outlives the
    # run), no reserved blocks, inode tables left unwritten (the guest mounts it with
    # noinit_itable, so they are never zeroed and the file stays sparse).
    return ["mkfs.ext4", "-q", "-F", "-L", "vmiso-tmp", "-m", "0", "-O", "^has_journal",
            "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0", str(image)]


def mkfs_erofs_argv(image: Path, tree: Path) -> list[str]:
    # /in as the guest mounts it: an erofs image (read-only by design) of the staged
    # copy, built without root or a mount.  Every file root's; the copy's modes and
    # mtimes kept (--preserve-mtime); no xattrs (-x-1: the run directory's ACLs are
    # the host's business, not the guest's); uncompressed, so reads cost no CPU.
    return ["mkfs.erofs", "--quiet", "-x-1", "--all-root", "--preserve-mtime", str(image), str(tree)]


def mkfs_inputs_ext4_argv(image: Path, tree: Path, entries: int) -> list[str]:
    # /in when erofs-utils cannot take the tree: ext4 on an existing sparse file, filled
    # from the staged copy (-d, no mount), read-only in the guest.  Room for every entry
    # (-N, with slack: mke2fs spreads inodes over groups); no journal, no reserved blocks.
    return ["mkfs.ext4", "-q", "-F", "-L", "vmiso-in", "-m", "0", "-N", str(entries + entries // 8 + 1024),
            "-O", "^has_journal,^resize_inode", "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0",
            "-d", str(tree), str(image)]


def cp_sparse_argv(source: Path, target: Path) -> list[str]:
    # Holes stay holes (coreutils finds them with SEEK_DATA): a 2 GiB scratch image
    # with a few MiB of metadata copies in milliseconds.
    return ["cp", "--sparse=always", "--reflink=auto", "--no-preserve=all", str(source), str(target)]


def debugfs_argv(disk: Path, offset: int, request_file: Path) -> list[str]:
    # Reads an ext4 filesystem that starts ``offset`` bytes into a raw disk image,
    # without mounting it (read-only: no -w).  The requests come from a file, one
    # per line; debugfs reports a failed request on stderr and still exits 0.
    return ["debugfs", "-f", str(request_file), f"{disk}?offset={offset}"]


def sfdisk_json_argv(disk: Path) -> list[str]:
    # The partition table of a raw disk image (a file, not a device).
    return ["sfdisk", "--json", str(disk)]


def ldd_argv(program: Path) -> list[str]:
    # Succeeds only for a dynamically linked program.
    return ["ldd", str(program)]


def sudo_argv(program: Path, *args: str) -> list[str]:
    # -n: never ask for a password (setup-host's rule needs none; without it, fail at once).
    return ["sudo", "-n", "--", str(program), *args]


def umount_argv(mount_point: Path) -> list[str]:
    # Lazy: the point may be busy, and all that matters is that it is no longer below the tree.
    return ["umount", "--lazy", str(mount_point)]


# --- seed ---------------------------------------------------------------------------------

def genisoimage_argv(iso: Path, files: Sequence[Path]) -> list[str]:
    return ["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata",
            "-joliet", "-rock", *[str(f) for f in files]]


# --- keys ---------------------------------------------------------------------------------

def ssh_keygen_argv(path: Path, comment: str) -> list[str]:
    return ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
