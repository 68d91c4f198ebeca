"""The run plan: a run's flags and the configuration, resolved once into one value.

The command line turns its flags into a ``RunRequest`` (None: not given) and
``plan_run`` resolves it against the configuration; every step of a run then
reads the one frozen ``RunPlan`` and derives nothing again.  A new flag is one
field of each.  Values that only the host where the run executes can know (the
accelerator ``auto`` resolves to, the hypervisor's version, the template's
sha256) are resolved there, from what the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import MIN_SCRATCH, Config, check_at_least
from .host.inputs import InputLimits
from .network import allow

LOCAL = "local"  # where a run executes: this host; else a node, "ssh://[USER@]NODE[:PORT]" (vmiso.node)
WATCHDOG_GRACE = 30  # seconds past boot + job timeout before a run's watchdog acts on its own


@dataclass(frozen=True)
class RunRequest:
    """What was asked of one run, flag by flag; None (or empty) leaves the configuration's value."""

    command: tuple[str, ...] = ()
    image: str | None = None  # None: image.name
    inputs: tuple[Path, ...] = ()
    output: Path | None = None
    timeout: int | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    scratch_bytes: int | None = None  # the job's /tmp; None: run.scratch
    warm: bool = True  # a preloaded or warm clone when one fits; False: always boot cold
    env: tuple[tuple[str, str], ...] = ()  # set for the job, after vmiso's own
    accept_tool_files: bool = False  # copy outputs that host tools run code from (.git/, .envrc)
    publish: tuple[int, ...] = ()  # guest loopback ports the host may reach while the job runs
    allow_hosts: tuple[str, ...] = ()  # added to run.allow_hosts
    allow_tcp: tuple[str, ...] = ()  # added to run.allow_tcp
    host: str | None = None  # --host ssh://[USER@]NODE[:PORT]; None: this host
    remote_vmiso: str | None = None  # the node's vmiso command (--remote-vmiso); None: "vmiso"


@dataclass(frozen=True)
class RunPlan:
    """One run, every value decided: what each of its steps reads."""

    command: tuple[str, ...]
    image: str
    inputs: tuple[Path, ...]
    output: Path | None
    env: tuple[tuple[str, str], ...]
    accept_tool_files: bool
    publish: tuple[int, ...]
    network: allow.Rules  # empty: offline, no gateway at all
    # The clone: what a warm state or a pool's clone must match (with the template and hypervisor).
    memory_mib: int
    cpus: int
    scratch_bytes: int
    accel: str  # as configured ("auto", "kvm", "tcg"): resolved where the run executes
    tcg_cpu_features: tuple[str, ...]
    warm: bool  # may take a preloaded clone or restore a warm state
    # Limits.
    timeout: int  # seconds the job may run
    boot_timeout: int  # seconds a clone has to answer SSH
    input_limits: InputLimits
    output_max_bytes: int
    output_max_files: int
    # Where it executes.
    state_dir: Path
    libvirt_uri: str
    where: str = LOCAL
    remote_vmiso: str = "vmiso"  # the command that runs vmiso on the node (where it is not LOCAL)

    @property
    def output_limits(self) -> tuple[int, int]:
        """(bytes, files and directories) /out may hold."""
        return self.output_max_bytes, self.output_max_files

    @property
    def watchdog_seconds(self) -> int:
        """How long a run's watchdog waits at most before it destroys the VM on its own (vmiso hangs)."""
        return self.boot_timeout + self.timeout + WATCHDOG_GRACE


def plan_run(config: Config, request: RunRequest) -> RunPlan:
    """``request`` resolved against ``config``; ConfigError for a value no run may have."""
    scratch = config.run.scratch
    if request.scratch_bytes is not None:
        scratch = check_at_least("run.scratch", request.scratch_bytes, MIN_SCRATCH)
    return RunPlan(
        command=request.command,
        image=request.image or config.image.name,
        inputs=request.inputs,
        output=request.output,
        env=request.env,
        accept_tool_files=request.accept_tool_files,
        publish=request.publish,
        network=allow.for_run(config.run.allow_hosts, config.run.allow_tcp, config.run.hosts_file,
                               request.allow_hosts, request.allow_tcp),
        memory_mib=request.memory_mib or config.vm.memory_mib,
        cpus=request.cpus or config.vm.cpus,
        scratch_bytes=scratch,
        accel=config.accel,
        tcg_cpu_features=config.vm.tcg_cpu_features,
        warm=request.warm,
        timeout=request.timeout or config.run.timeout,
        boot_timeout=config.run.boot_timeout,
        input_limits=InputLimits(config.run.input_max_bytes, config.run.input_max_files),
        output_max_bytes=config.run.output_max_bytes,
        output_max_files=config.run.output_max_files,
        state_dir=config.state_dir,
        libvirt_uri=config.libvirt_uri,
        where=request.host or LOCAL,
        remote_vmiso=request.remote_vmiso or "vmiso",
    )
