"""``vmiso run``: one disposable, offline clone per job, from start to cleanup.

The clone is a fresh qcow2 overlay over the read-only template, booted as a
transient libvirt domain with no network device at all.  Its one link to the
host is SSH over a virtio-serial port whose host end is a Unix socket in the
run's own directory.  Inputs are copied into a per-run directory shared
read-only; outputs come back through a second share and are checked before
they are copied out.  Whatever happens, the domain, the overlay and the staging
directories are removed.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import accel, gc, outputs, ssh, warm
from .clone import CloneDir, clone_spec, make_clone_dir, make_overlay, make_scratch
from .config import Config
from .domain import NAME_PREFIX, domain_xml
from .errors import GuestError, HypervisorError, ImageError, OutputError, RunTimeout, VmisoError
from .hypervisor import Hypervisor
from .image.store import Image, get_image, verified_sha256
from .progress import Steps
from .seed import RUN_USER

log = logging.getLogger(__name__)

GUEST_IN = "/in"
GUEST_OUT = "/out"
GUEST_VENV = "/opt/vmiso/venv"
GUEST_TMP = "/tmp"  # the scratch disk
WATCH_INTERVAL = 0.25


@dataclass(frozen=True)
class RunRequest:
    command: tuple[str, ...]
    image: str
    inputs: tuple[Path, ...] = ()
    output: Path | None = None
    timeout: int | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    scratch_bytes: int | None = None  # the job's /tmp; None: run.scratch from the config
    warm: bool = True  # restore a warm state when one fits; False: always boot cold


@dataclass
class RunResult:
    run_id: str
    image: str
    sha256: str
    command: tuple[str, ...]
    exit_code: int
    boot: str = ""  # "warm" or "cold"
    memory_mib: int = 0
    scratch_bytes: int = 0
    signal: str | None = None  # "SIGKILL" when a signal ended the job
    timings: dict[str, float] = field(default_factory=dict)
    outputs: outputs.OutputReport | None = None

    def signal_message(self) -> tuple[str, str] | None:
        """(what happened, what to do) when a signal ended the job, for the CLI to say."""
        if self.signal is None:
            return None
        hint = {
            "SIGILL": "an illegal instruction: a compiled package needs a CPU feature the guest's CPU lacks",
            "SIGKILL": ("most likely the guest's out-of-memory killer: raise --memory "
                        f"(this run had {self.memory_mib} MiB)"),
            "SIGSEGV": "a crash in native code (or a stack overflow)",
            "SIGBUS": "a bad memory access; also what a full /tmp gives a job that maps its files",
        }.get(self.signal, "")
        return f"the job was killed by {self.signal}", hint

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "image": self.image,
            "sha256": self.sha256,
            "command": list(self.command),
            "exit_code": self.exit_code,
            "boot": self.boot,
            "signal": self.signal,
            "memory_mib": self.memory_mib,
            "scratch_bytes": self.scratch_bytes,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "outputs": self.outputs.as_dict() if self.outputs else None,
        }


def job_command(command: tuple[str, ...]) -> str:
    """The shell line sshd runs for the job: fixed environment, then the user's argv, quoted."""
    env = {
        "VMISO_IN": GUEST_IN,
        "VMISO_OUT": GUEST_OUT,
        "PATH": f"{GUEST_VENV}/bin:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": GUEST_VENV,
        "HOME": f"/home/{RUN_USER}",
        "LANG": "C.UTF-8",
        "TMPDIR": GUEST_TMP,
    }
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"cd {GUEST_IN} && exec env -i {assignments} {shlex.join(command)}"


def _input_problem(root: Path) -> str | None:
    """Symlinks inside an input directory may not lead out of it."""
    base = root.resolve()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            if path.is_symlink():
                target = path.resolve()
                if target != base and base not in target.parents:
                    return f"{path} is a symbolic link to {target}, outside the input"
    return None


def check_inputs(inputs: tuple[Path, ...]) -> None:
    seen: dict[str, Path] = {}
    for path in inputs:
        if not path.exists():
            raise VmisoError(f"input {path} does not exist")
        if not (path.is_file() or path.is_dir()):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        name = path.resolve().name
        if name in seen:
            raise VmisoError(f"inputs {seen[name]} and {path} would both appear as {GUEST_IN}/{name}",
                             "rename one of them")
        seen[name] = path
        if path.is_dir() and (problem := _input_problem(path)):
            raise VmisoError(f"input refused: {problem}", "copy the target into the input instead")


def stage_inputs(inputs: tuple[Path, ...], staging: Path) -> None:
    """Copy inputs into the run's read-only share: the user's files are never shared directly."""
    for path in inputs:
        target = staging / path.resolve().name
        if path.is_dir():
            shutil.copytree(path, target, symlinks=False, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(path, target)
    for directory, dirs, files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


class _OutputWatch:
    """Stops the guest as soon as /out holds more than the limits allow."""

    def __init__(self, share: Path, max_bytes: int, max_files: int, stop: Callable[[], object]) -> None:
        self._share, self._max_bytes, self._max_files = share, max_bytes, max_files
        self._stop = stop
        self._done = threading.Event()
        self.exceeded: str | None = None
        self._thread = threading.Thread(target=self._watch, name="vmiso-output-watch", daemon=True)

    def __enter__(self) -> _OutputWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_INTERVAL):
            used, files = outputs.usage(self._share, self._max_files)
            if used > self._max_bytes:
                self.exceeded = f"the job wrote more than {self._max_bytes} bytes to {GUEST_OUT}"
            elif files > self._max_files:
                self.exceeded = f"the job wrote more than {self._max_files} files to {GUEST_OUT}"
            if self.exceeded:
                self._stop()
                return


def check_scratch_room(directory: Path, scratch_bytes: int) -> None:
    """The scratch file is sparse: refuse a run whose /tmp could fill the host's disk."""
    free = shutil.disk_usage(directory).free
    if free < scratch_bytes:
        raise VmisoError(f"the run's scratch space needs up to {scratch_bytes // 1024**2} MiB under {directory}, "
                         f"which has {free // 1024**2} MiB free",
                         "free space there, or give the job less with --scratch (or run.scratch)")


def _boot_cold(hv: Hypervisor, image: Image, clone: CloneDir, name: str, key: warm.WarmKey,
               metadata: dict[str, str], steps: Steps, cleanup: ExitStack) -> str:
    with steps.step("overlay", "copy-on-write clone of the template, scratch disk"):
        make_overlay(clone, image.template)
        make_scratch(clone, key.scratch_bytes)
    spec = clone_spec(name=name, image=image, clone=clone, accel=key.accel, memory_mib=key.memory_mib,
                      cpus=key.cpus, metadata=metadata)
    with steps.step("start", "transient domain, cold boot"):
        cleanup.callback(hv.destroy, name)
        hv.start_transient(name, domain_xml(spec))
    return name


def _boot_warm(hv: Hypervisor, slot: warm.Slot, clone: CloneDir, metadata: dict[str, str],
               steps: Steps, cleanup: ExitStack) -> str:
    """Restore ``slot``; the domain keeps the name it was saved with, which the caller must use."""
    with steps.step("overlay", "copy-on-write clone of the warm disk, scratch disk"):
        make_overlay(clone, slot.clone.overlay)
        make_scratch(clone, 0, like=slot.scratch)
    with steps.step("start", "restore the saved clone"):
        name, xml = warm.restore_xml(hv, slot, clone=clone, metadata=metadata)
        # Registered before the restore: one that fails half-way is destroyed too.
        cleanup.callback(hv.destroy, name)
        try:
            hv.restore(name, slot.state, xml)
        except HypervisorError:
            hv.destroy(name)
            raise
    return name


def run(config: Config, hv: Hypervisor, request: RunRequest, stdout: BinaryIO, stderr: BinaryIO,
        steps: Steps | None = None) -> RunResult:
    steps = steps or Steps()
    if not request.command:
        raise VmisoError("no command to run", "give one after --, e.g. vmiso run -- python job.py")
    check_inputs(request.inputs)
    if request.output is not None:
        outputs.check_destination(request.output)
    accel_name = accel.resolve(config.accel)
    image = get_image(config.state_dir, request.image)
    gc.collect(hv, config.state_dir)  # what a vmiso killed earlier left behind

    run_id = secrets.token_hex(6)
    name = f"{NAME_PREFIX}run-{run_id}"
    timeout = request.timeout or config.run.timeout
    with ExitStack() as cleanup:
        with steps.step("verify", "template sha256"):
            sha256 = verified_sha256(image)
        key = warm.WarmKey.make(template_sha256=sha256, hypervisor=hv.version(), accel=accel_name,
                                memory_mib=request.memory_mib or config.vm.memory_mib,
                                cpus=request.cpus or config.vm.cpus,
                                scratch_bytes=request.scratch_bytes or config.run.scratch)
        result = RunResult(run_id, image.name, sha256, request.command, exit_code=-1,
                           memory_mib=key.memory_mib, scratch_bytes=key.scratch_bytes)
        with steps.step("stage", "run directory and inputs"):
            clone = make_clone_dir(config.state_dir / "runs" / run_id)
            check_scratch_room(clone.path, key.scratch_bytes)
            cleanup.callback(shutil.rmtree, clone.path, ignore_errors=True)
            stage_inputs(request.inputs, clone.inputs)
        metadata = {"kind": "run", "run_dir": str(clone.path), "image": image.name}
        slot, why_cold = (None, "--cold") if not request.warm else warm.acquire(image, key, cleanup)
        if slot is not None:
            try:
                name = _boot_warm(hv, slot, clone, metadata, steps, cleanup)
                result.boot = "warm"
            except (HypervisorError, ImageError) as err:
                why_cold = f"the warm state {slot.clone.path.name} could not be restored: {err}"
                clone.overlay.unlink(missing_ok=True)
                clone.scratch.unlink(missing_ok=True)
                slot = None
        if slot is None:
            if request.warm:
                log.warning("cold boot: %s", why_cold)
            result.boot = "cold"
            name = _boot_cold(hv, image, clone, name, key, metadata, steps, cleanup)
        with steps.step("connect", "SSH over the virtio-serial link"):
            session = ssh.connect(
                clone.ssh_socket, name=name, host_key=image.host_key.read_text(), client_key=image.client_key,
                user=RUN_USER, deadline=time.monotonic() + config.run.boot_timeout,
                alive=lambda: hv.is_running(name), hello=warm.hello if result.boot == "warm" else None)
            cleanup.callback(session.close)
        with steps.step("exec", shlex.join(request.command)):
            with _OutputWatch(clone.outputs, config.run.output_max_bytes, config.run.output_max_files,
                              stop=lambda: hv.destroy(name)) as watch:
                try:
                    status = session.execute(job_command(request.command), stdout, stderr,
                                             deadline=time.monotonic() + timeout,
                                             should_stop=lambda: watch.exceeded is not None)
                except GuestError:
                    if watch.exceeded is None:
                        raise
                    status = None
        with steps.step("teardown", "destroy the VM"):
            session.close()
            hv.destroy(name)
        if watch.exceeded:
            raise OutputError(f"{watch.exceeded}; the VM was stopped",
                              "raise run.output_max_bytes / run.output_max_files in vmiso.yaml if expected")
        if status is None:
            raise RunTimeout(f"the job ran longer than {timeout} s; the VM was destroyed",
                             "raise --timeout if the job needs longer")
        if status.unknown_signal:
            raise GuestError("the job was killed by a signal that vmiso does not know")
        if status.signal is not None:
            result.signal = status.signal.name
            result.exit_code = 128 + status.signal.value  # as a shell and docker run report it
        elif status.code is not None:
            result.exit_code = status.code
        else:
            raise GuestError("the job ended without an exit status")
        if request.output is not None:
            with steps.step("collect", f"check and copy {GUEST_OUT}"):
                result.outputs = outputs.collect(clone.outputs, request.output,
                                                 max_bytes=config.run.output_max_bytes,
                                                 max_files=config.run.output_max_files)
        with steps.step("cleanup", "remove the overlay and staging directories"):
            cleanup.close()
    result.timings = dict(steps.timings)
    return result
