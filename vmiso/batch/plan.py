"""A batch's request turned into tasks, and the layout of its output directory.

    DIR/batch.json          the batch's record (vmiso.batch.record)
    DIR/NAME/               a task's outputs (its ``vmiso run -o``), with their MANIFEST
    DIR/.batch/NAME.log     the task's stdout and stderr, every attempt after a header line
    DIR/.batch/NAME.json    the task's last run record (its ``vmiso run --json``)
    DIR/.batch/previous/    a task's earlier outputs and record, moved aside before it runs again
    DIR/.batch/lock         held by the one batch that writes DIR
    DIR/.batch/slurm/N/     the Nth job array that ran tasks of DIR (vmiso.batch.slurm): its
                            script, one file per element (its task), what each element reported

NAME is the input's name, as the job sees it under /in.  Every task is the argv of
one ``vmiso run`` of this vmiso: whatever runs it (an engine of vmiso.batch.engines)
runs that argv and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import tools
from ..errors import ConfigError, VmisoError
from ..host.inputs import GUEST_IN

PLACEHOLDER = "{}"  # in the command: the task's input name (as xargs -I {} and GNU parallel)
RECORD_NAME = "batch.json"
WORK = ".batch"
PREVIOUS = "previous"
SLURM = "slurm"
RESERVED = (RECORD_NAME, WORK)  # names an input cannot have: they are the batch's own
# The -j rule: a task takes --cpus cores, and --memory plus what QEMU and vmiso run add
# (QEMU's own RSS beyond the guest's, vmiso's Python); the host keeps HOST_RESERVE_MIB.
TASK_OVERHEAD_MIB = 256
HOST_RESERVE_MIB = 1024


@dataclass(frozen=True)
class BatchRequest:
    """What was asked of a batch: the job, its inputs, where the outputs go, how to run the tasks."""

    command: tuple[str, ...]
    each: tuple[Path, ...]  # one task per input
    shared: tuple[Path, ...] = ()  # given to every task
    output: Path = Path()
    run_options: tuple[str, ...] = ()  # every task's other flags of vmiso run, as given (paths absolute)
    jobs: int | None = None  # tasks at once; None: default_jobs
    retry: int = 0  # more attempts for a task that failed for vmiso's own reasons (exit 125)
    engine: str = "local"
    config: Path | None = None  # -c and --state-dir as given: where a Slurm element finds the image on its node
    state_dir: Path | None = None
    host: str | None = None  # a node every task runs on, each a vmiso run through the link (--host)
    remote_vmiso: str | None = None  # that node's vmiso command (--remote-vmiso)


@dataclass(frozen=True)
class Resources:
    """What each task's run takes, as its plan resolved it: what a Slurm element asks its node for."""

    memory_mib: int = 512
    cpus: int = 1
    timeout: int | None = None  # seconds the job may run; None: no limit
    boot_timeout: int = 0  # seconds the clone may take to come up


@dataclass(frozen=True)
class Layout:
    """The paths of a batch's output directory (see the module's docstring)."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / RECORD_NAME

    @property
    def work(self) -> Path:
        return self.root / WORK

    @property
    def previous(self) -> Path:
        return self.work / PREVIOUS

    @property
    def lock(self) -> Path:
        return self.work / "lock"

    @property
    def slurm(self) -> Path:
        return self.work / SLURM

    def output(self, name: str) -> Path:
        return self.root / name

    def log(self, name: str) -> Path:
        return self.work / log_name(name)

    def run_record(self, name: str) -> Path:
        return self.work / run_record_name(name)


def log_name(task: str) -> str:
    """A task's log, in DIR/.batch."""
    return f"{task}.log"


def run_record_name(task: str) -> str:
    """A task's run record, in DIR/.batch (and what attempt N left, in DIR/.batch/previous)."""
    return f"{task}.json"


@dataclass(frozen=True)
class Task:
    """One input's run: the argv of its ``vmiso run``, and where that puts what it makes."""

    name: str  # the input's name under /in, and its output directory's
    input: Path  # absolute
    argv: tuple[str, ...]
    output: Path  # DIR/NAME
    record: Path  # its run record
    log: Path  # its stdout and stderr


@dataclass(frozen=True)
class BatchPlan:
    """A batch, every value decided."""

    command: tuple[str, ...]  # as given, with the placeholder
    image: str
    template_sha256: str
    shared: tuple[Path, ...]
    layout: Layout
    tasks: tuple[Task, ...]
    jobs: int
    retry: int
    engine: str
    resources: Resources = Resources()
    config: Path | None = None  # absolute, as BatchRequest's
    state_dir: Path | None = None
    host: str | None = None  # as BatchRequest's: where every task runs (None: where the engine runs it)


def input_name(path: Path) -> str:
    """The name ``path`` has under /in (vmiso.host.inputs names it so)."""
    return path.resolve().name


def substitute(command: tuple[str, ...], name: str) -> tuple[str, ...]:
    """``command`` with every ``{}`` (anywhere in an argument) replaced by ``name``."""
    return tuple(arg.replace(PLACEHOLDER, name) for arg in command)


def _check_names(each: tuple[Path, ...], shared: tuple[Path, ...], output: Path) -> None:
    """Each input has a name of its own, none of the batch's, none that a shared input has."""
    if not each:
        raise ConfigError("--each names no input", "give the inputs, one task each: --each data/*.csv")
    seen: dict[str, Path] = {}
    for path in each:
        name = input_name(path)
        if not name:
            raise ConfigError(f"--each {path} is the root directory: it has no name for its task",
                              "give the files or directories to run the job on")
        if name in seen:
            same = seen[name].resolve() == path.resolve()
            raise ConfigError(
                f"--each {path} is given twice" if same else
                f"--each {seen[name]} and {path} have the same name, {name!r}: both tasks would write "
                f"{output / name}/ and see {GUEST_IN}/{name}",
                "give each input once" if same else
                "rename one of them (or copy it under another name), or run them in two batches")
        if name in RESERVED:
            raise ConfigError(f"--each {path}: its name {name!r} is the batch's own ({output / name})",
                              f"rename it, or copy it under another name; {' and '.join(RESERVED)} are reserved")
        seen[name] = path
    where = output.resolve()
    for path in (*each, *shared):
        if path.resolve() == where or path.resolve() in where.parents:
            raise ConfigError(f"input {path} holds the batch's own directory {output}: its tasks would read "
                              "the batch's outputs", "name an --output directory outside the inputs")
    for path in shared:
        name = input_name(path)
        if name in seen:
            raise ConfigError(f"-i {path} and --each {seen[name]} would both appear as {GUEST_IN}/{name}",
                              "rename one of them")


def check_request(request: BatchRequest) -> None:
    """ConfigError for what no batch may be asked: no command, no inputs, names that clash."""
    if not request.command:
        raise ConfigError("no command: write it after --", "vmiso batch ... --each data/*.csv -- python job.py {}")
    if request.retry < 0:
        raise ConfigError(f"--retry {request.retry}: must be 0 or more")
    if request.host is not None and request.engine != "local":
        raise ConfigError(f"--on {request.engine} runs each task where {request.engine} places it; --host runs every "
                          f"task on {request.host} through the link from here", "give one or the other")
    _check_names(request.each, request.shared, request.output)


def plan_batch(request: BatchRequest, *, image: str, template_sha256: str, jobs: int,
               vmiso: tuple[str, ...] | None = None, resources: Resources = Resources()) -> BatchPlan:
    """``request`` as tasks (check_request first).  ``vmiso``: the argv that starts vmiso (default:
    this Python's, tools.vmiso_argv); ``resources``: each run's, as its plan resolved them."""
    check_request(request)
    start = vmiso if vmiso is not None else tuple(tools.vmiso_argv())
    if request.host is not None:
        start = (*start, "--host", request.host,
                 *(("--remote-vmiso", request.remote_vmiso) if request.remote_vmiso else ()))
    layout = Layout(request.output.absolute())
    shared = tuple(p.absolute() for p in request.shared)
    tasks = []
    for path in request.each:
        name = input_name(path)
        record, output = layout.run_record(name), layout.output(name)
        argv = [*start, "run", "--image", image, "--json", str(record), "-o", str(output), *request.run_options]
        for item in (*shared, path.absolute()):
            argv += ["-i", str(item)]
        argv += ["--", *substitute(request.command, name)]
        tasks.append(Task(name, path.absolute(), tuple(argv), output, record, layout.log(name)))
    return BatchPlan(command=request.command, image=image, template_sha256=template_sha256, shared=shared,
                     layout=layout, tasks=tuple(tasks), jobs=jobs, retry=request.retry, engine=request.engine,
                     resources=resources, config=request.config.absolute() if request.config else None,
                     state_dir=request.state_dir.absolute() if request.state_dir else None, host=request.host)


def default_jobs(*, cores: int, available_mib: int, memory_mib: int, cpus: int) -> int:
    """Tasks at once when -j is not given: as many as the cores hold at --cpus each, and the
    memory available now holds at --memory + TASK_OVERHEAD_MIB each, past HOST_RESERVE_MIB; at least 1."""
    by_cores = cores // max(cpus, 1)
    by_memory = (available_mib - HOST_RESERVE_MIB) // (memory_mib + TASK_OVERHEAD_MIB)
    return max(1, min(by_cores, by_memory))


def available_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The memory the kernel says is available for new work (MemAvailable), in MiB."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    raise VmisoError(f"cannot read the available memory from {meminfo}", "give -j N")
