"""A private one-node Slurm for the tests: its own munged, slurmctld and slurmd, as root.

``LocalSlurm.start()`` makes a temporary directory (``/tmp/vmiso-slurm-*``) and puts
everything there: a munge key of its own and a munged (run as user ``munge``) on a socket
there, a ``slurm.conf`` whose one node is this machine (named as ``slurmd -C`` names it,
reached at 127.0.0.1, its real CPUs, a small RealMemory), two free loopback ports, the
state, spool, pid and log files.  slurmctld and slurmd run in the foreground of their own
processes with ``-f`` on that file, bound to loopback only; clients find the cluster through
``SLURM_CONF`` in ``env``.  ``stop()`` cancels what is still queued, ends every process whose
environment names this cluster's ``slurm.conf`` (job steps that outlived their job, or
escaped the process tracking), then the daemons by their pids, and removes the directory.

Two clusters at once on one host work (the tests run one per ProctrackType beside the
session's): each has its own directory, munge socket, ports and job ids (``FirstJobId`` drawn
at random).  The ports are chosen free just before slurmctld binds them: another program that
takes one in between shows as a bind error in the log tails.  With ``proctrack/cgroup`` the
clusters share one cgroup, ``slurm_NODE`` in the cgroup v1 freezer: the first to stop removes
it when it is empty, which a second cluster still running needs for its next job.

``ProctrackType`` decides which of a job's processes Slurm ends (measured in
tests/test_slurm.py): ``proctrack/linuxproc`` (the default here, as it needs nothing of the
host) follows the tree of parent pids, so a process whose parent exited (a double fork)
escapes it, and so does every child left running when the batch shell exits; ``proctrack/pgid``
follows the shell's process group, which ``setsid`` leaves; ``proctrack/cgroup`` (cgroup v1,
where its freezer is mounted) misses nothing.  ``stop()`` ends what escaped, by its
environment.  No CPU binding or memory limit (``TaskPlugin=task/none``): ``--cpus-per-task``
and ``--mem`` are accounted (``select/cons_tres``, ``CR_Core_Memory``), not enforced.  No
accounting database: ``sacct`` has nothing; finished jobs stay in ``scontrol show job`` for
``MinJobAge`` seconds (300), and ``jobcomp/filetxt`` appends one line per finished job to
``jobcomp.log`` in the directory.  ``scancel`` sends SIGTERM, and SIGKILL ``KillWait`` (30) s
later, as Slurm's defaults do.

Run by hand, as root: ``.venv/bin/python tests/slurmharness.py [PROCTRACK]`` starts one,
prints its ``SLURM_CONF`` and waits; Ctrl-C stops it and removes everything.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MUNGE_USER = "munge"
FREEZER = Path("/sys/fs/cgroup/freezer")  # proctrack/cgroup's, where cgroup v1 is mounted
DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT"}


class SlurmStartError(RuntimeError):
    """The private Slurm did not come up; the message carries the daemons' log tails."""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """``slurmd -C``'s first line as a dict: NodeName, CPUs, RealMemory, ..."""
    done = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True)
    line = done.stdout.splitlines()[0]
    return dict(word.split("=", 1) for word in line.split())


def slurm_conf(root: Path, *, node: str, cpus: int, memory_mib: int, ctld_port: int, slurmd_port: int,
               proctrack: str, first_job_id: int) -> str:
    lines = {
        "ClusterName": "vmisotest",
        # Job ids of their own for clusters that run at once: proctrack/cgroup names its
        # cgroups by node and job id only.
        "FirstJobId": first_job_id,
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmctldPort": ctld_port,
        "SlurmdPort": slurmd_port,
        # Both daemons bind the addresses above, not every interface.
        "CommunicationParameters": "NoCtldInAddrAny,NoInAddrAny",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={root / 'munge' / 'munge.socket'}",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldLogFile": root / "log" / "slurmctld.log",
        "SlurmdLogFile": root / "log" / "slurmd.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "ProctrackType": proctrack,
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/filetxt",
        "JobCompLoc": root / "jobcomp.log",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "DefMemPerCPU": 64,
        "MpiDefault": "none",
        "ReturnToService": 2,
        "SlurmdTimeout": 30,
        "InactiveLimit": 0,
    }
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    text += (f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} CPUs={cpus} RealMemory={memory_mib}"
             " State=UNKNOWN\n"
             f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP\n")
    return text


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"({err})"
    return "\n".join(text[-lines:]) or "(empty)"


KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z/:]+)=(.*?)(?=\s+[A-Za-z/:]+=|$)")


def parse_record(text: str) -> dict[str, str]:
    """One record of ``Key=Value`` words (``scontrol show job``'s, a line of jobcomp.log), where
    a value may be empty or hold spaces (up to the next `` Key=``)."""
    return {m.group(1): m.group(2) for line in text.splitlines() for m in KEY_VALUE.finditer(line.strip())}


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol show job``'s records, separated by blank lines."""
    return [parse_record(block) for block in re.split(r"\n\s*\n", text.strip()) if block.strip()]


@dataclass
class LocalSlurm:
    root: Path
    node: str
    cpus: int
    memory_mib: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs: os.environ with SLURM_CONF pointing here."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # --- start and stop ---------------------------------------------------------------------

    @classmethod
    def start(cls, *, memory_mib: int = 1024, proctrack: str = "proctrack/linuxproc",
              timeout: float = 60) -> LocalSlurm:
        """A running cluster whose node is idle; SlurmStartError (with the logs) if not."""
        for program in (*DAEMONS, "sinfo", "sbatch"):
            if shutil.which(program) is None:
                raise SlurmStartError(f"no {program} on PATH: scripts/setup-host --test installs slurm-wlm and munge")
        try:
            hardware = node_hardware()
        except (OSError, subprocess.SubprocessError) as err:
            raise SlurmStartError(f"slurmd -C: {err}") from err
        root = Path(tempfile.mkdtemp(prefix="vmiso-slurm-"))
        slurm = cls(root, hardware["NodeName"], int(hardware["CPUs"]),
                    min(memory_mib, int(hardware["RealMemory"])))
        try:
            slurm._start(proctrack, timeout)
        except BaseException as err:
            logs = slurm.log_tails()
            slurm.stop()
            if isinstance(err, Exception):
                raise SlurmStartError(f"{err}\n{logs}") from err
            raise
        return slurm

    def _start(self, proctrack: str, timeout: float) -> None:
        os.chmod(self.root, 0o755)  # munged, as munge, walks through it
        munge = pwd.getpwnam(MUNGE_USER)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        key = munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(mode=0o755)
        self.conf.write_text(slurm_conf(
            self.root, node=self.node, cpus=self.cpus, memory_mib=self.memory_mib,
            ctld_port=free_loopback_port(), slurmd_port=free_loopback_port(), proctrack=proctrack,
            first_job_id=1000 * secrets.randbelow(1000) + 1))

        if proctrack == "proctrack/cgroup":
            if not FREEZER.is_dir():
                raise SlurmStartError(f"proctrack/cgroup: no cgroup v1 freezer at {FREEZER} on this host")
            (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        self._spawn("munged", ["munged", "--foreground", f"--socket={munge_dir / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
                    user=MUNGE_USER)
        self._wait(lambda: (munge_dir / "munge.socket").exists(), 10, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, timeout, f"node {self.node} idle in sinfo")

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the daemon keeps it
        with out:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,  # a Ctrl-C on the terminal reaches the tests, who stop it
                user=user, group=user, extra_groups=[] if user else None)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmStartError(f"{name} exited {process.returncode} while waiting for {what}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmStartError(f"timed out after {timeout:.0f} s waiting for {what}")

    def _node_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def stop(self) -> None:
        """Cancel every job, end what is left of them and the daemons, remove the directory."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld"):
            self._end(name)
        self._end_strays()
        self._end("munged")
        # proctrack/cgroup's cgroup for this node, once no cluster's job is left in it.
        try:
            (FREEZER / f"slurm_{self.node}").rmdir()
        except OSError:  # none, or another cluster's jobs are in it
            pass
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            raise AssertionError(f"{self.root} could not be removed: remove it by hand")

    def _end(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def strays(self) -> list[int]:
        """Pids of processes (not the daemons) whose environment names this cluster's slurm.conf:
        slurmstepd and what it started (sbatch passes the submitter's environment on)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        daemons = {p.pid for p in self.processes.values()}  # and slurmctld's own slurmscriptd
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons or int(entry.name) == os.getpid():
                continue
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) in daemons:
                    continue
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or a kernel thread
                continue
        return found

    def _end_strays(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.strays()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                pids = self.strays()
                time.sleep(0.1)
            if not pids:
                return

    def log_tails(self, lines: int = 25) -> str:
        logs = [self.root / "munge" / "munged.log", *sorted((self.root / "log").glob("*"))]
        return "\n".join(f"--- {path.name} (last {lines} lines) ---\n{tail(path, lines)}" for path in logs)

    # --- clients ------------------------------------------------------------------------------

    def run(self, *argv: str | Path, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=self.env,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                                 f"\n{self.log_tails(10)}")
        return done

    def sbatch(self, *options: str | Path, script: str) -> int:
        """Submit ``script`` (a shell script's text) with sbatch's ``options``; the job id."""
        fd, name = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.root)
        with os.fdopen(fd, "w") as out:
            out.write(script if script.startswith("#!") else "#!/bin/sh\n" + script)
        done = self.run("sbatch", "--parsable", *options, name)
        return int(done.stdout.strip().split(";")[0])

    def squeue(self, job: int | None = None, fmt: str = "%i %T") -> list[list[str]]:
        """squeue's lines (pending, running, completing), split into words."""
        argv = ["squeue", "-h", "-o", fmt] + (["-j", str(job)] if job is not None else [])
        return [line.split() for line in self.run(*argv).stdout.splitlines()]

    def scancel(self, *args: str | int) -> None:
        self.run("scancel", *map(str, args))

    def show_job(self, job: int | str) -> list[dict[str, str]]:
        """``scontrol show job``'s records: one per array element for an array job."""
        return parse_records(self.run("scontrol", "show", "job", str(job)).stdout)

    def sacct(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("sacct", *args, check=False)

    def wait_done(self, job: int, timeout: float = 60) -> list[dict[str, str]]:
        """Wait until every element of ``job`` has ended (no longer in squeue, and in a final
        state in ``scontrol show job``); then its records."""
        deadline = time.monotonic() + timeout
        while True:
            records = [] if self.squeue(job) else self.show_job(job)
            if records and all(r.get("JobState") in FINAL_STATES for r in records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} not done after {timeout:.0f} s: {self.squeue(job)}\n"
                                     f"{self.run('scontrol', 'show', 'job', str(job), check=False).stdout}\n"
                                     f"{self.log_tails(10)}")
            time.sleep(0.1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    # Ctrl-C or SIGTERM, even where a shell started this in the background with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    slurm = LocalSlurm.start(proctrack=argv[0] if argv else "proctrack/linuxproc")
    try:
        print(f"export SLURM_CONF={slurm.conf}  # node {slurm.node}: {slurm.cpus} CPUs, {slurm.memory_mib} MiB;"
              " Ctrl-C stops it", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    finally:
        slurm.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
