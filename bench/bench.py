"""vmiso benchmark: a trivial run phase by phase, against two floors, measured in one invocation.

The strict floor is the same kernel started by plain QEMU, without libvirt or a
disk, with an initramfs that holds only a static busybox whose /init powers off
at once: the least any start on this host can cost.  The (libvirt) floor boots
the image's own kernel and vmiso's initramfs as a libvirt domain to such an /init.  Absolute
times drift between machines and runs; the ratios, measured side by side, do not.

    .venv/bin/python bench/bench.py -c examples/vmiso.yaml [--runs 5] [--json FILE]

``--batch-only`` measures only issue 26's batch items, side by side in one invocation: the
same BATCH_INPUTS small inputs as a shell loop of ``vmiso run``, as ``vmiso batch --on local
-j 2`` and as ``vmiso batch --on slurm -j 2`` through a private one-node Slurm (started as
tests/slurmharness.py starts it, as root; or the cluster SLURM_CONF names, with ``--slurm-conf``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmiso import accel, config as config_mod, tools
from vmiso.clones.clone import KERNEL_CMDLINE
from vmiso.domain import NAME_PREFIX, Disk, DomainSpec, KernelBoot, domain_xml
from vmiso.host.workdir import claim
from vmiso.hypervisor import connected
from vmiso.image.initramfs import _Newc
from vmiso.image.store import Image, get_image

VMISO = [sys.executable, "-m", "vmiso"]
MB = 1024 * 1024


def vmiso(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([*VMISO, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"vmiso {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


def floor_spec(cfg: config_mod.Config, name: str, image: Image, initramfs: Path, overlay: Path, work: Path,
               kvm_check: Callable[[], str | None] = accel.kvm_problem) -> DomainSpec:
    """The floor's domain: under the accelerator (and so the guest CPU) that runs resolve."""
    return DomainSpec(name=name, memory_mib=cfg.vm.memory_mib, cpus=cfg.vm.cpus,
                      accel=accel.resolve(cfg.accel, kvm_check),
                      # As a run's: the template read-only below the overlay, the kernel a copy
                      # (libvirt would otherwise hand the image's own files to QEMU's user).
                      disks=(Disk(overlay, cache="unsafe", backing=((image.template, "qcow2"),)),),
                      console_log=work / "floor.log",
                      boot=KernelBoot(work / "floor-vmlinuz", initramfs, KERNEL_CMDLINE),
                      metadata={"kind": "bench", "run_dir": str(work)})  # gc: ours, and alive


def floor_boot(cfg: config_mod.Config, image_name: str, work: Path) -> float:
    """Seconds from domain start until a kernel whose /init powers off is gone."""
    image = get_image(cfg.state_dir, image_name)
    extra = _Newc()
    extra.file("init", b"#!/bin/sh\n/bin/poweroff -f\n", 0o755)
    initramfs = work / "floor-initramfs.img"
    # Concatenated archives: the kernel unpacks both, and the later /init wins.
    initramfs.write_bytes(image.initramfs.read_bytes() + extra.finish())
    os.chmod(initramfs, 0o644)
    shutil.copyfile(image.kernel, work / "floor-vmlinuz")
    overlay = work / "floor.qcow2"
    overlay.unlink(missing_ok=True)
    tools.run(tools.qemu_img_overlay_argv(image.template, overlay))
    name = f"{NAME_PREFIX}bench-floor"
    spec = floor_spec(cfg, name, image, initramfs, overlay, work)
    with connected(cfg.libvirt_uri) as hv:
        started = time.monotonic()
        hv.start_transient(name, domain_xml(spec))
        hv.wait_stopped(name, 300, poll=0.02)
        return time.monotonic() - started


def strict_floor_boot(cfg: config_mod.Config, image_name: str, work: Path) -> float:
    """The strict floor: the same kernel started by plain QEMU (no libvirt, no disk) with an
    initramfs that holds only a static busybox whose /init powers off at once."""
    image = get_image(cfg.state_dir, image_name)
    initramfs = work / "strict-floor.cpio"
    if not initramfs.exists():
        archive = _Newc()
        for directory in ("bin", "dev", "proc"):
            archive.directory(directory)
        archive.file("bin/busybox", Path(tools.which("busybox")).read_bytes(), 0o755)
        archive.file("init", b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n", 0o755)
        initramfs.write_bytes(archive.finish())
    kvm = accel.resolve(cfg.accel) == "kvm"
    argv = [tools.which("qemu-system-x86_64"), "-machine", f"q35,accel={'kvm' if kvm else 'tcg'}",
            "-cpu", "host" if kvm else "max", "-m", str(cfg.vm.memory_mib), "-smp", str(cfg.vm.cpus),
            "-kernel", str(image.kernel), "-initrd", str(initramfs), "-append", KERNEL_CMDLINE,
            "-nodefaults", "-display", "none", "-serial", "null", "-no-reboot"]
    started = time.monotonic()
    subprocess.run(argv, check=True, timeout=300, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def timed_run(config: Path, image: str, work: Path, *command: str, extra: tuple[str, ...] = ()) -> dict:
    record = work / f"run-{time.monotonic_ns()}.json"
    started = time.monotonic()
    done = vmiso("run", "-c", str(config), "--image", image, "--json", str(record), *extra, "--", *command)
    total = time.monotonic() - started
    data = json.loads(record.read_text())
    record.unlink()
    return {"total": total, "phases": data["timings"], "stdout": done.stdout, "boot": data["boot"]}


def qemu_rss_mib(config: Path, image: str, work: Path) -> float:
    """Resident memory of one running VM's QEMU process, sampled while its job sleeps."""
    proc = subprocess.Popen([*VMISO, "run", "-c", str(config), "--image", image, "--", "sh", "-c",
                             "echo up; sleep 20"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    proc.stdout.readline()
    samples = []
    for pidfile in Path("/run/libvirt/qemu").glob(f"{NAME_PREFIX}*.pid"):
        pid = pidfile.read_text().strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                samples.append(int(line.split()[1]) / 1024)
    proc.wait()
    return max(samples) if samples else float("nan")


def throughput(config: Path, image: str, work: Path, size_mb: int) -> dict:
    """A SIZE_MB input (a large file: bound into /in from its read-only share) read in one run: as
    the job's first act, then copied to /out (fsynced), then read over /out (9p, uncached) and over
    /in again, side by side once the guest has warmed up; against a copy on the host."""
    blob = work / "blob"
    with open(blob, "wb") as f:
        f.write(os.urandom(size_mb * MB))
    started = time.monotonic()
    shutil.copyfile(blob, work / "blob-copy")
    os.sync()
    host = time.monotonic() - started
    (work / "blob-copy").unlink()
    script = ("import os, shutil, time\n"
              "def read(path):\n"
              "    t = time.monotonic(); n = 0\n"
              "    with open(path, 'rb') as f:\n"
              "        while b := f.read(1 << 20): n += len(b)\n"
              "    return time.monotonic() - t\n"
              "t_first = read('/in/blob')\n"
              "t = time.monotonic()\n"
              "shutil.copyfile('/in/blob', '/out/blob')\n"
              "with open('/out/blob', 'rb+') as f: os.fsync(f.fileno())\n"
              "t_out = time.monotonic() - t\n"
              "t_9p = read('/out/blob')\n"
              "t_in = read('/in/blob')\n"
              "print(t_first, t_in, t_out, t_9p)\n")
    out = work / "tp-out"
    result = timed_run(config, image, work, "python", "-c", script,
                       extra=("-i", str(blob), "-o", str(out), "--timeout", "600"))
    shutil.rmtree(out)
    blob.unlink()
    t_first, t_in, t_out, t_9p = map(float, result["stdout"].split())
    mbps = lambda seconds: size_mb / seconds  # noqa: E731
    return {"size_mb": size_mb, "in_first_mb_s": mbps(t_first), "in_mb_s": mbps(t_in), "out_mb_s": mbps(t_out),
            "host_copy_mb_s": mbps(host), "in_9p_mb_s": mbps(t_9p), "in_ratio_to_9p": t_9p / t_in,
            "in_first_ratio_to_9p": t_9p / t_first,
            "in_ratio_to_host_copy": host / t_in, "out_ratio_to_host_copy": host / t_out}


def small_files(config: Path, image: str, work: Path, count: int, extra: tuple[str, ...] = ()) -> dict:
    """Walk and read COUNT files of 1 KB in /in, then the same tree on the guest's tmpfs, in one run.

    Also the same walk over /out, the 9p share, uncached (as /in was before the inputs disk).
    """
    tree = work / "many"
    for i in range(count):
        sub = tree / f"d{i // 500:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.json").write_bytes(os.urandom(512).hex().encode())
    script = ("import os, shutil, time\n"
              "def walk(root):\n"
              "    t = time.monotonic(); n = 0\n"
              "    for d, _, files in os.walk(root):\n"
              "        for name in files:\n"
              "            with open(os.path.join(d, name), 'rb') as f: n += len(f.read())\n"
              "    return time.monotonic() - t, n\n"
              "t_in, n_in = walk('/in/many')\n"
              "shutil.copytree('/in/many', '/dev/shm/many')\n"
              "t_mem, n_mem = walk('/dev/shm/many')\n"
              "shutil.copytree('/dev/shm/many', '/out/many')\n"
              "t_none, n_none = walk('/out/many')\n"
              "assert n_in == n_mem == n_none\n"
              "print(t_in, t_mem, t_none, n_in)\n")
    result = timed_run(config, image, work, "python", "-c", script,
                       extra=("-i", str(tree), "--timeout", "900", *extra))
    shutil.rmtree(tree)
    t_in, t_mem, t_none, size = result["stdout"].split()
    return {"files": count, "bytes": int(size), "in_s": float(t_in), "tmpfs_s": float(t_mem),
            "uncached_9p_s": float(t_none), "ratio": float(t_in) / float(t_mem),
            "uncached_ratio": float(t_none) / float(t_mem), "boot": result["boot"],
            "stage_s": result["phases"].get("stage", 0.0)}


def disk_build_cost(work: Path) -> dict:
    """What putting inputs on the inputs disk costs the host: staging (the copy) and the image, as a
    run does them (a large file goes to its share), for one 1 GB file and for 100,000 files of 1 KB;
    and the 1 GB file's image were it on the disk (as 1 GB of files under 1 MiB would be)."""
    from vmiso.host.inputs import InputLimits, build_disk, stage_inputs

    cases = {}
    big = work / "cost-1g"
    big.mkdir()
    with open(big / "blob", "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(MB))
    many = work / "cost-100k"
    for i in range(100_000):
        sub = many / f"d{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:06d}").write_bytes(os.urandom(512).hex().encode())
    for label, tree, shared in (("1 GB file", big, True), ("1 GB file, on the disk", big, False),
                                ("100,000 files", many, True)):
        staging, large = work / "cost-staging", work / "cost-large"
        staging.mkdir(mode=0o755)
        large.mkdir(mode=0o755)
        started = time.monotonic()
        stage_inputs((tree,), staging, InputLimits(2 * 1024**3, 200_000), large=large if shared else None)
        staged = time.monotonic() - started
        started = time.monotonic()
        size = build_disk(staging, work / "cost.img")
        cases[label] = {"stage_s": staged, "image_s": time.monotonic() - started, "image_mb": size / MB}
        (work / "cost.img").unlink()
        shutil.rmtree(large)
    shutil.rmtree(big)
    shutil.rmtree(many)
    return cases


def networked(config: Path, image: str, work: Path, runs: int, size_mb: int) -> dict:
    """A warm run with one --allow-host against one without, alternating; then SIZE_MB over plain
    HTTP from a service in a network namespace of the bench's own, through the run's gateway, against
    the same download by this host itself."""
    sys.path.insert(0, str(REPO / "tests"))
    from vmharness import SERVICE_LAN, network_services  # the VM tests' own services

    cfg = config_mod.load(config)
    service = work / "service"
    service.mkdir()
    with network_services(service) as (_, hosts, _):
        # The bench's config with the service's name for the run's gateway.
        data = config_mod.load_yaml(config) or {}
        data.setdefault("run", {})["hosts_file"] = str(hosts)
        data["state_dir"] = str(cfg.state_dir)
        provision = data.get("provision") or {}
        if provision.get("requirements"):  # as the original config names it
            provision["requirements"] = str((config.parent / provision["requirements"]).resolve())
        networked_config = work / "networked.yaml"
        networked_config.write_text(json.dumps(data))
        allow = ("--allow-host", "api.vmiso.test:80")
        offline, online = [], []
        for _ in range(runs):
            offline.append(timed_run(networked_config, image, work, "python", "-c", "pass")["total"])
            online.append(timed_run(networked_config, image, work, "python", "-c", "pass", extra=allow)["total"])
        url = f"http://api.vmiso.test/bytes/{size_mb * MB}"
        script = ("import time, urllib.request\n"
                  "t = time.monotonic(); n = 0\n"
                  f"with urllib.request.urlopen({url!r}) as r:\n"
                  "    while b := r.read(1 << 20): n += len(b)\n"
                  "print(n, time.monotonic() - t)\n")
        got = timed_run(networked_config, image, work, "python", "-c", script, extra=(*allow, "--timeout", "900"))
        size, guest_s = got["stdout"].split()
        direct = f"http://{SERVICE_LAN[1]}/bytes/{size_mb * MB}"
        started = time.monotonic()
        with urllib.request.urlopen(direct) as answer:
            while answer.read(MB):
                pass
        host_s = time.monotonic() - started
    return {"offline_s": statistics.median(offline), "allow_host_s": statistics.median(online),
            "added_s": statistics.median(online) - statistics.median(offline),
            "download_mb": int(size) / MB, "through_gateway_mb_s": int(size) / MB / float(guest_s),
            "host_direct_mb_s": size_mb / host_s, "ratio_to_host": host_s / float(guest_s)}


def pool_status(config: Path, image: str) -> dict:
    rows = json.loads(vmiso("pool", "status", "-c", str(config), "--json").stdout)
    return next((r for r in rows if r["image"] == image), {})


def wait_pool_full(config: Path, image: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = pool_status(config, image)
        if status and status["ready"] >= status["size"]:
            return
        time.sleep(0.2)
    raise SystemExit(f"the pool for {image} did not fill in {timeout:.0f} s")


def idle_clones(state_dir: Path) -> dict:
    """QEMU's RSS and CPU share of each running clone (the pool's, idle), sampled over 5 s."""
    pids = []
    for pidfile in Path("/run/libvirt/qemu").glob(f"{NAME_PREFIX}*.pid"):
        pids.append(int(pidfile.read_text().strip()))

    def cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    before = {pid: cpu(pid) for pid in pids}
    time.sleep(5)
    rss = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss.append(int(line.split()[1]) / 1024)
    return {"clones": len(pids), "rss_mib": rss, "cpu_share": [(cpu(pid) - before[pid]) / 5 for pid in pids]}


def runs_per_minute(config: Path, image: str, work: Path, parallel: int, per_worker: int) -> float:
    def worker() -> None:
        for _ in range(per_worker):
            timed_run(config, image, work, "python", "-c", "pass")
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return parallel * per_worker * 60 / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=REPO / "examples" / "vmiso.yaml")
    parser.add_argument("--image", help="image to clone (default: image.name from the config)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions for medians (default 5)")
    parser.add_argument("--size-mb", type=int, default=100, help="9p throughput payload")
    parser.add_argument("--quick", action="store_true",
                        help="skip throughput, small files, memory and runs/minute")
    parser.add_argument("--small-files", type=int, default=5000, help="files of 1 KB for the small-file walk")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--batch-only", action="store_true",
                        help="only the batch items: a loop of vmiso run, --on local, --on slurm")
    parser.add_argument("--batch-inputs", type=int, default=BATCH_INPUTS)
    parser.add_argument("--inputs-only", action="store_true",
                        help="only the inputs items: the small-file walk cold, warm and preloaded, a large "
                             "file's first read over /in and over 9p, the host's cost of the inputs disk")
    parser.add_argument("--slurm-conf", type=Path, help="submit to this cluster instead of a private one")
    args = parser.parse_args()
    cfg = config_mod.load(args.config)
    image = args.image or cfg.image.name
    work = Path(tempfile.mkdtemp(prefix="vmiso-bench-", dir="/var/tmp"))
    os.chmod(work, 0o711)
    claim(work)
    try:
        results: dict = {"image": image, "runs": args.runs}
        only = None
        if args.inputs_only:
            results["inputs"] = inputs_compare(args.config, image, work, args.small_files, args.size_mb)
            only = lambda: report_inputs(results["inputs"])  # noqa: E731
        elif args.batch_only:
            results["batch"] = batch_compare(args.config, image, work, args.batch_inputs, args.slurm_conf)
            only = lambda: report_batch(results["batch"])  # noqa: E731
        if only is not None:
            only()
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
            return
        stricts, floors, colds, warms = [], [], [], []
        for i in range(args.runs):
            stricts.append(strict_floor_boot(cfg, image, work))
            floors.append(floor_boot(cfg, image, work))
            colds.append(timed_run(args.config, image, work, "python", "-c", "pass", extra=("--cold",)))
            warms.append(timed_run(args.config, image, work, "python", "-c", "pass"))
            print(f"round {i + 1}: strict floor {stricts[-1]:.2f} s, floor {floors[-1]:.2f} s, "
                  f"cold run {colds[-1]['total']:.2f} s, "
                  f"warm run {warms[-1]['total']:.2f} s ({warms[-1]['boot']})", file=sys.stderr)
        floor = statistics.median(floors)
        strict = statistics.median(stricts)
        for label, runs in (("cold", colds), ("warm", warms)):
            total = statistics.median(r["total"] for r in runs)
            results[f"{label}_s"] = total
            results[f"{label}_ratio"] = total / floor
            results[f"{label}_strict_ratio"] = total / strict
            results[f"{label}_samples_s"] = [r["total"] for r in runs]
            results[f"{label}_phases_s"] = {k: statistics.median(r["phases"].get(k, 0.0) for r in runs)
                                            for k in runs[0]["phases"]}
        results["warm_boots"] = [r["boot"] for r in warms]
        for label, runs in (("cold", colds), ("warm", warms)):
            results[f"{label}_outside_phases_s"] = statistics.median(
                r["total"] - sum(r["phases"].values()) for r in runs)
        # vmiso's own start: the interpreter, click and vmiso's CLI, nothing else; then the
        # modules a run loads (libvirt, paramiko and cryptography, PyYAML), against a bare interpreter.
        rounds = range(max(args.runs, 5))
        results["vmiso_version_s"] = statistics.median(_timed(lambda: vmiso("--version")) for _ in rounds)
        results["python_s"] = statistics.median(
            _timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in rounds)
        results["run_imports_s"] = statistics.median(_timed(lambda: subprocess.run(
            [sys.executable, "-c", "import vmiso.cli, vmiso.run, vmiso.hypervisor, vmiso.config"],
            check=True, cwd=REPO)) for _ in rounds) - results["python_s"]
        # Preloaded: a pool of 2, full again before each run.
        vmiso("pool", "start", "-c", str(args.config), "--image", image, "--size", "2", timeout=1800)
        try:
            preloads = []
            for i in range(args.runs):
                wait_pool_full(args.config, image)
                preloads.append(timed_run(args.config, image, work, "python", "-c", "pass"))
                print(f"preloaded run {i + 1}: {preloads[-1]['total']:.2f} s ({preloads[-1]['boot']})", file=sys.stderr)
            total = statistics.median(r["total"] for r in preloads)
            results.update(preloaded_s=total, preloaded_ratio=total / floor, preloaded_strict_ratio=total / strict,
                           preloaded_samples_s=[r["total"] for r in preloads],
                           preloaded_phases_s={k: statistics.median(r["phases"].get(k, 0.0) for r in preloads)
                                               for k in preloads[0]["phases"]},
                           preloaded_boots=[r["boot"] for r in preloads],
                           preloaded_outside_phases_s=statistics.median(
                               r["total"] - sum(r["phases"].values()) for r in preloads))
            if not args.quick:
                wait_pool_full(args.config, image)
                results["small_files_preloaded"] = small_files(args.config, image, work, args.small_files)
            wait_pool_full(args.config, image)
            results["idle_clones"] = idle_clones(cfg.state_dir)
            results["pool_runs_per_minute"] = runs_per_minute(args.config, image, work, 2, args.runs * 2)
        finally:
            vmiso("pool", "stop", "-c", str(args.config), "--image", image)
        results.update(floor_s=floor, floor_samples_s=floors, strict_floor_s=strict, strict_floor_samples_s=stricts)
        if not args.quick:
            results["throughput_9p"] = throughput(args.config, image, work, args.size_mb)
            results["small_files"] = small_files(args.config, image, work, args.small_files)
            results["small_files_cold"] = small_files(args.config, image, work, args.small_files, ("--cold",))
            results["inputs_disk_cost"] = disk_build_cost(work)
            results["networked"] = networked(args.config, image, work, args.runs, args.size_mb)
            results["qemu_rss_mib"] = qemu_rss_mib(args.config, image, work)
            results["runs_per_minute"] = {
                "1": runs_per_minute(args.config, image, work, 1, args.runs),
                "2": runs_per_minute(args.config, image, work, 2, args.runs),
            }
            results["batch"] = batch_compare(args.config, image, work, args.batch_inputs, args.slurm_conf)
        report(results)
        if "batch" in results:
            report_batch(results["batch"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def inputs_compare(config: Path, image: str, work: Path, count: int, size_mb: int) -> dict:
    """The inputs disk, in one invocation: the small-file walk cold, warm and preloaded, a large
    file's first read over /in against 9p, and what building the disk costs the host."""
    found = {"throughput_9p": throughput(config, image, work, size_mb),
             "small_files_cold": small_files(config, image, work, count, ("--cold",)),
             "small_files": small_files(config, image, work, count)}
    vmiso("pool", "start", "-c", str(config), "--image", image, "--size", "1", timeout=1800)
    try:
        wait_pool_full(config, image)
        found["small_files_preloaded"] = small_files(config, image, work, count)
    finally:
        vmiso("pool", "stop", "-c", str(config), "--image", image)
    found["inputs_disk_cost"] = disk_build_cost(work)
    return found


def report_inputs(r: dict) -> None:
    t = r["throughput_9p"]
    print(f"{t['size_mb']} MB input (bound into /in from its read-only share): read as the job's first act "
          f"{t['in_first_mb_s']:.0f} MB/s ({t['in_first_ratio_to_9p']:.2f} x /out's); then, side by side, /in "
          f"{t['in_mb_s']:.0f} MB/s and the 9p share /out (uncached) {t['in_9p_mb_s']:.0f} MB/s: "
          f"{t['in_ratio_to_9p']:.2f} x 9p's speed")
    for key in ("small_files_cold", "small_files", "small_files_preloaded"):
        if key not in r:
            continue
        m = r[key]
        print(f"{m['files']} files of 1 KB, walked and read ({m['boot']}): /in {m['in_s']:.2f} s, the same "
              f"tree on the guest's tmpfs {m['tmpfs_s']:.2f} s: {m['ratio']:.2f} x tmpfs (over 9p, uncached: "
              f"{m['uncached_9p_s']:.2f} s, {m['uncached_ratio']:.2f} x); the run's stage step {m['stage_s']:.2f} s")
    for label, c in r.get("inputs_disk_cost", {}).items():
        print(f"inputs disk for {label}: staging {c['stage_s']:.2f} s, the image {c['image_s']:.2f} s "
              f"({c['image_mb']:.0f} MB)")


BATCH_INPUTS = 20
BATCH_JOB = "tr a-z A-Z < /in/{} > /out/upper"


def batch_inputs(work: Path, count: int) -> list[Path]:
    data = work / "batch-inputs"
    data.mkdir()
    paths = []
    for index in range(count):
        path = data / f"in{index:02d}.txt"
        path.write_text(f"input {index}\n")
        paths.append(path)
    return paths


def batch_compare(config: Path, image: str, work: Path, count: int, slurm_conf: Path | None) -> dict:
    """The same ``count`` small inputs: a shell loop of vmiso run, vmiso batch --on local -j 2, and
    vmiso batch --on slurm -j 2 on one node; wall time of each and the per-task cost against local."""
    inputs = batch_inputs(work, count)
    loop_out = work / "loop"
    loop_out.mkdir()

    def loop() -> None:
        for path in inputs:
            done = vmiso("run", "-c", str(config), "--image", image, "-i", str(path), "-o", str(loop_out / path.name),
                         "--", "sh", "-c", BATCH_JOB.replace("{}", path.name))
            assert done.returncode == 0, done.stderr

    def batch(engine: str, env: dict[str, str] | None = None, tag: str = "") -> None:
        out = work / f"batch-{engine}{tag}"
        argv = [*VMISO, "batch", "-c", str(config), "--image", image, "--on", engine, "-j", "2", "-o",
                str(out), "--each", *map(str, inputs), "--", "sh", "-c", BATCH_JOB]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        record = json.loads((out / "batch.json").read_text())
        assert record["counts"]["ok"] == count, record["counts"]

    def with_pool() -> float:
        """batch --on local -j 2 again, a pool of two preloaded clones of the image running."""
        started = vmiso("pool", "start", "-c", str(config), "--image", image, "--size", "2")
        assert started.returncode == 0, started.stderr
        try:
            return _timed(lambda: batch("local", tag="-pool"))
        finally:
            vmiso("pool", "stop", "-c", str(config), "--image", image)

    slurm = None
    if slurm_conf is None:
        sys.path.insert(0, str(REPO / "tests"))
        from slurmharness import LocalSlurm

        slurm = LocalSlurm.start(memory_mib=4096)
        slurm_conf = slurm.conf
    try:
        results = {"inputs": count, "loop_s": _timed(loop), "local_s": _timed(lambda: batch("local")),
                   "local_pool_s": with_pool()}
        results["slurm_s"] = _timed(lambda: batch("slurm", dict(os.environ, SLURM_CONF=str(slurm_conf))))
    finally:
        if slurm is not None:
            slurm.stop()
    boots = {engine: json.loads((work / f"batch-{engine}" / "batch.json").read_text())
             for engine in ("local", "local-pool", "slurm")}
    for engine, record in boots.items():
        results[f"{engine}_boots"] = sorted({t["boot"] for t in record["tasks"]})
        results[f"{engine}_task_s"] = statistics.median(t["seconds"] for t in record["tasks"])
    results["local_vs_loop"] = results["loop_s"] / results["local_s"]
    results["local_pool_vs_loop"] = results["loop_s"] / results["local_pool_s"]
    results["slurm_vs_local"] = results["slurm_s"] / results["local_s"]
    results["slurm_overhead_per_task_s"] = (results["slurm_s"] - results["local_s"]) / count
    return results


def report_batch(b: dict) -> None:
    print(f"batch of {b['inputs']} small inputs ('{BATCH_JOB}'), wall time from start to exit: "
          f"shell loop of vmiso run {b['loop_s']:.1f} s, vmiso batch --on local -j 2 {b['local_s']:.1f} s "
          f"({b['local_vs_loop']:.2f} x the loop's runs per minute), --on slurm -j 2 (one node) {b['slurm_s']:.1f} s "
          f"= {b['slurm_vs_local']:.2f} x local, {b['slurm_overhead_per_task_s']:+.2f} s per task")
    print(f"  with a pool of two preloaded clones: --on local -j 2 {b['local_pool_s']:.1f} s "
          f"({b['local_pool_vs_loop']:.2f} x the loop's runs per minute; boots {', '.join(b['local-pool_boots'])})")
    print(f"  median task (its vmiso run, as batch.json times it): local {b['local_task_s']:.2f} s "
          f"({', '.join(b['local_boots'])}), slurm {b['slurm_task_s']:.2f} s ({', '.join(b['slurm_boots'])})")


def _timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def _spread(samples: list[float]) -> str:
    return f"{min(samples):.2f}-{max(samples):.2f} s"


def report(r: dict) -> None:
    print(f"strict floor (plain QEMU, the same kernel, a busybox-only initramfs whose /init powers off), "
          f"median of {r['runs']}: {r['strict_floor_s']:.2f} s ({_spread(r['strict_floor_samples_s'])})")
    print(f"floor (libvirt, the image's kernel and initramfs to a trivial /init): {r['floor_s']:.2f} s "
          f"({_spread(r['floor_samples_s'])})")
    for label in ("cold", "warm", "preloaded"):
        print(f"{label} run of 'python -c pass', vmiso start to exit: {r[f'{label}_s']:.2f} s "
              f"({_spread(r[f'{label}_samples_s'])}) = {r[f'{label}_strict_ratio']:.2f} x strict floor, "
              f"{r[f'{label}_ratio']:.2f} x floor")
        print("  phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in r[f"{label}_phases_s"].items())
              + f"; outside them (vmiso's start and exit) {r[f'{label}_outside_phases_s']:.2f}s")
    print(f"vmiso --version (the interpreter, click, the CLI): {r['vmiso_version_s']:.2f} s; the interpreter alone "
          f"{r['python_s']:.2f} s; the modules a run imports (libvirt, paramiko, cryptography, PyYAML, vmiso's) "
          f"{r['run_imports_s']:.2f} s on top")
    if any(b != "warm" for b in r["warm_boots"]):
        print(f"  note: warm runs booted {r['warm_boots']}: the image has no usable warm state")
    if any(b != "preloaded" for b in r["preloaded_boots"]):
        print(f"  note: preloaded runs booted {r['preloaded_boots']}")
    idle = r["idle_clones"]
    print(f"idle pool clones: {idle['clones']}, QEMU RSS " + ", ".join(f"{m:.0f}" for m in idle["rss_mib"])
          + " MiB, CPU " + ", ".join(f"{c * 100:.0f}%" for c in idle["cpu_share"]) + " of a core each")
    print(f"trivial runs per minute, two at a time with a pool of 2: {r['pool_runs_per_minute']:.1f}")
    if "throughput_9p" in r:
        t = r["throughput_9p"]
        report_inputs({"throughput_9p": t, **{k: r[k] for k in ("small_files_cold", "small_files",
                                                                 "small_files_preloaded", "inputs_disk_cost")
                                                if k in r}})
        n = r["networked"]
        print(f"networked run: warm 'python -c pass' with one --allow-host {n['allow_host_s']:.2f} s, without "
              f"{n['offline_s']:.2f} s ({n['added_s']:+.2f} s); {n['download_mb']:.0f} MB over HTTP through the "
              f"run's gateway {n['through_gateway_mb_s']:.1f} MB/s, by this host directly "
              f"{n['host_direct_mb_s']:.1f} MB/s ({n['ratio_to_host']:.2f} x)")
        print(f"host memory per running VM (QEMU RSS): {r['qemu_rss_mib']:.0f} MiB")
        rpm = r["runs_per_minute"]
        print(f"trivial runs per minute: {rpm['1']:.1f} one at a time, {rpm['2']:.1f} two at a time (warm)")


if __name__ == "__main__":
    main()
