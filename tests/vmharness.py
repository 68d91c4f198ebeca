"""Helpers for the VM tests: a state directory QEMU can reach, the CLI as a user runs it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
VMISO = [sys.executable, "-m", "vmiso"]
TABULATE = "tabulate==0.9.0 --hash=sha256:024ca478df22e9340661486f85298cff5f6dcdba14f3813e8830015b9ed1948f\n"
# A wheel with compiled code built for the x86-64-v2 baseline, as most of PyPI's now are
# (the manylinux wheel for the guest's Python 3.11).  2.4.6, what pip picks today: its
# AVX2 loops for strided data gave wrong answers under TCG while the guest was offered
# AVX2 (2.2.6 took other loops and hid it).
NUMPY = "numpy==2.4.6 --hash=sha256:89cd468399cfd2504718f0ba50e410dca55a170b61a02ad92bb18c8a65186e93\n"


_made_roots: list[Path] = []  # every state root this test process made, for remove_made_roots


def make_state_root(prefix: str = "vmiso-test-") -> Path:
    """pytest's tmp dirs are 0700: QEMU, another user, could not reach images there.

    Whoever makes one removes it (remove_tree); what a fixture that failed half-way
    left, the session removes as it ends (conftest.py: remove_made_roots)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    _made_roots.append(root)
    os.chmod(root, 0o711)
    return root


def remove_made_roots() -> tuple[list[Path], list[str]]:
    """Remove every state root of this process still there: (those removed, why others stay)."""
    removed, stuck = [], []
    for root in _made_roots:
        if os.path.lexists(root):
            try:
                remove_tree(root)
                removed.append(root)
            except AssertionError as err:
                stuck.append(str(err))
    _made_roots.clear()
    return removed, stuck


# A requirements comment that provisioning copies into the guest and deletes before
# sealing, like any secret it handles: the VM tests look for it in the template.
DELETED_SECRET = f"# vmiso-deleted-secret-{secrets.token_hex(8)}\n"


def write_config(directory: Path, state_dir: Path, requirements: str = TABULATE, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "requirements.txt").write_text(requirements)
    data: dict = {
        "accel": "tcg",
        "state_dir": str(state_dir),
        "image": {"name": "it"},
        "provision": {"requirements": "requirements.txt"},
        "vm": {"memory_mib": 512, "cpus": 1},
    }
    for section, values in extra.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    path = directory / "vmiso.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def vmiso(*args: str | Path, timeout: float = 900, check: bool = False,
          **env_changes: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMISO_ACCEL="tcg", PYTHONUNBUFFERED="1", **env_changes)
    done = subprocess.run([*VMISO, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"vmiso {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class Streamed:
    """A vmiso process whose stdout and stderr lines are timestamped as they arrive."""

    process: subprocess.Popen
    lines: list[tuple[float, str, str]] = field(default_factory=list)  # (time, stream, line)
    _threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls, *args: str | Path) -> Streamed:
        env = dict(os.environ, VMISO_ACCEL="tcg", PYTHONUNBUFFERED="1")
        process = subprocess.Popen([*VMISO, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        streamed = cls(process)
        for name, pipe in (("out", process.stdout), ("err", process.stderr)):
            thread = threading.Thread(target=streamed._read, args=(name, pipe), daemon=True)
            thread.start()
            streamed._threads.append(thread)
        return streamed

    def _read(self, name: str, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            self.lines.append((time.monotonic(), name, raw.decode(errors="replace").rstrip("\n")))

    def wait(self, timeout: float = 900) -> int:
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(10)
        return code

    def text(self, stream: str) -> str:
        return "\n".join(line for _, s, line in self.lines if s == stream)

    def when(self, stream: str, line: str) -> float:
        for stamp, s, text in self.lines:
            if s == stream and text == line:
                return stamp
        raise AssertionError(f"{line!r} never appeared on std{stream}: {self.lines}")


def vmiso_domains(state: Path) -> list[str]:
    """vmiso's domains whose files are under ``state`` (other vmiso users of the host are not ours)."""
    virsh = ["virsh", "-c", "qemu:///system"]
    names = subprocess.run([*virsh, "list", "--all", "--name"], capture_output=True, text=True,
                           check=True).stdout.split()
    found = []
    for name in names:
        if name.startswith("vmiso-"):
            xml = subprocess.run([*virsh, "dumpxml", name], capture_output=True, text=True).stdout
            if str(state) in xml:
                found.append(name)
    return found


def wait_for(predicate, timeout: float, what: str, detail=None, every: float = 0.05) -> None:
    """Until ``predicate()`` holds; else AssertionError naming ``what`` (and ``detail()``, what was seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{detail()}" if detail else ""))


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (the kernel escapes space, tab, newline and
    backslash in them as octal)."""
    base = os.path.realpath(path)
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
        if point == base or point.startswith(base + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and what a test mounted below it (as root), whatever it holds: a tree
    deeper than Python's recursion limit too.  AssertionError if anything is left."""
    if os.geteuid() == 0:
        for point in mounts_below(path):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    # rm, not shutil.rmtree: it walks any depth (shutil.rmtree recurses in Python).
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True)
    if os.path.lexists(path):
        raise AssertionError(f"{path} could not be removed: remove it by hand")


def read_terminal(master: int, seen: bytearray) -> threading.Thread:
    """A thread that adds what a pseudo-terminal's programs write to ``seen``, until they close it."""
    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def on_a_terminal(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, *,
                  stdout_too: bool = False) -> tuple[int, str, str]:
    """Run ``argv`` with stderr (and with ``stdout_too`` stdout) on a pseudo-terminal of
    200 columns: (exit code, what reached stdout's pipe, what the terminal received)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(argv, stdout=slave if stdout_too else subprocess.PIPE, stderr=slave,
                               stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(slave)
    seen = bytearray()
    reader = read_terminal(master, seen)
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()
        reader.join(30)
        os.close(master)
    return process.returncode, (stdout or b"").decode(), seen.decode(errors="replace")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


NETNS_PREFIX = "vmisons"


def _remove_stale_namespaces(pairs: list[tuple[str, str]]) -> None:
    """Take away what a test run that was killed left holding one of ``pairs``' addresses on this
    side: its namespace (no process left in it) and with it its veth pair.  Else this side would hold
    the address twice, the older route would win, and the test's connections would go to the dead
    namespace and be refused.  A namespace that still has a process (another run's live test) stays;
    an address held by anything else is an error naming it."""
    wanted = {outside for outside, _ in pairs}
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for line in shown.splitlines():
        fields = line.split()
        device, address = fields[1].split("@", 1)[0], fields[3].split("/", 1)[0]
        if address not in wanted:
            continue
        links = subprocess.run(["ip", "-o", "link", "show", device], capture_output=True, text=True).stdout
        match = re.search(rf"link-netns ({NETNS_PREFIX}[0-9a-f]+)", links)
        if not (device.startswith("vns") and match):
            raise AssertionError(f"{address}, a test network's address, is already on {device}: {line}")
        ns = match.group(1)
        if subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.strip():
            raise AssertionError(f"{address} is held by {ns}, whose processes still run (another test run?)")
        _ip("netns", "del", ns)  # its veth pair, this side's end with the address included, goes with it


@contextlib.contextmanager
def network_namespace(pairs: list[tuple[str, str]], servers: list[list[str]]):
    """A network namespace of the test's own, joined to this one by a veth pair: each
    (outside, inside) of ``pairs`` is a /24 address on this side and one in the namespace.
    Each of ``servers`` is run in it (an argv that prints "ready" once it listens) until
    the block ends; yields the namespace's name."""
    _remove_stale_namespaces(pairs)
    tag = secrets.token_hex(3)
    ns, outside, inside = f"{NETNS_PREFIX}{tag}", f"vns{tag}a", f"vns{tag}b"
    _ip("netns", "add", ns)
    started: list[subprocess.Popen] = []
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        for address, _ in pairs:
            _ip("addr", "add", f"{address}/24", "dev", outside)
        _ip("link", "set", outside, "up")
        for _, address in pairs:
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        for argv in servers:
            process = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, text=True)
            started.append(process)
            assert process.stdout is not None and process.stdout.readline().strip() == "ready", argv
        yield ns
    finally:
        for process in started:
            process.terminate()
            process.wait(10)
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        _ip("netns", "del", ns)


# --- services for networked runs ---------------------------------------------------------------

SERVICE_LAN = ("10.213.79.1", "10.213.79.2")  # this host's end, the listed service
OTHER_LAN = ("10.213.80.1", "10.213.80.2")  # a service no run lists


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a certificate it signed for the test hosts: (ca, cert, key)."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "service.pem", directory / "service.key", directory / "service.csr"
    names = directory / "names.ext"
    names.write_text("subjectAltName=DNS:api.vmiso.test,DNS:other.vmiso.test\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=vmiso test CA"],
                 ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=api.vmiso.test"],
                 ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "2", "-extfile", names]):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return ca, cert, key


@contextlib.contextmanager
def network_services(directory: Path):
    """The listed service (api.vmiso.test) and another (other.vmiso.test), each in a network namespace
    of the test's own, serving HTTPS, HTTP and a TCP echo (netns_service.py); yields (ca, hosts file,
    log).  The hosts file also names this host's own end of the link, loopback and the metadata address,
    the last two also dressed as IPv6 (NAT64, 6to4)."""
    ca, cert, key = make_test_ca(directory)
    log = directory / "service.jsonl"
    log.touch()
    hosts = directory / "hosts"
    hosts.write_text(f"{SERVICE_LAN[1]} api.vmiso.test\n{OTHER_LAN[1]} other.vmiso.test\n"
                     f"{SERVICE_LAN[0]} host.vmiso.test\n127.0.0.1 loop.vmiso.test\n"
                     "169.254.169.254 meta.vmiso.test\n"
                     # loopback through a NAT64 translator, the metadata address through a 6to4 relay
                     "64:ff9b::7f00:1 nat64.vmiso.test\n2002:a9fe:a9fe::1 sixtofour.vmiso.test\n")
    script = str(Path(__file__).with_name("netns_service.py"))
    with network_namespace([SERVICE_LAN], [[sys.executable, "-I", script, str(log), str(cert), str(key),
                                            SERVICE_LAN[1]]]), \
            network_namespace([OTHER_LAN], [[sys.executable, "-I", script, str(log), str(cert), str(key),
                                             OTHER_LAN[1]]]):
        _check_reachable([SERVICE_LAN[1], OTHER_LAN[1]], log)
        yield ca, hosts, log


def _check_reachable(addresses: list[str], log: Path) -> None:
    """Each service's echo port answers this host (the gateway's side) and the service logged it (its
    open and close); else an AssertionError with this host's addresses and routes, where a test network
    that collides with the machine's own shows.  The check's lines are then taken out of the log."""
    failed = []
    for address in addresses:
        try:
            socket.create_connection((address, 7000), timeout=10).close()
        except OSError as err:
            failed.append(f"{address}:7000: {err}")
    if failed:
        network = subprocess.run(["sh", "-c", "ip -4 addr; ip -4 route; ip rule"], capture_output=True, text=True)
        raise AssertionError(f"the test services cannot be reached from this host: {failed}\n{network.stdout}")
    wait_for(lambda: len(log.read_text().splitlines()) == 2 * len(addresses), 10, "the services to log the check",
             lambda: log.read_text())
    log.write_text("")


def client_hello(name: str) -> bytes:
    """The first TLS record a real client sends for ``name`` (its ClientHello, naming it by SNI)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS handshake cannot finish without an answer")


# --- /in as the job sees it (issue: inputs as a read-only disk) ----------------------------

SMALL_FILES = 5000
BIG_MB = 100


def make_inputs(tmp_path: Path, deep_tree) -> list[Path]:
    """Inputs of every kind a job is given: SMALL_FILES files of 1 KB, a BIG_MB MB file, and a
    tree with names with spaces and non-ASCII, an empty file, an empty directory and a deep path."""
    many = tmp_path / "many"
    for i in range(SMALL_FILES):
        sub = many / f"d{i // 500:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.json").write_bytes(os.urandom(512).hex().encode())
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG_MB):
            f.write(os.urandom(1024 * 1024))
    odd = tmp_path / "odd tree"
    (odd / "empty dir").mkdir(parents=True)
    (odd / "naïve name.txt").write_text("ünïcode\n")
    (odd / "日本語").mkdir()
    (odd / "日本語" / "empty").write_bytes(b"")
    deep_tree(odd, 40, file_every=40)
    return [many, big, odd]


def check_inputs_seen(results: dict, record: dict, inputs: list[Path]) -> None:
    """What inputs_probe.py saw under /in is what the host staged, as the run record says."""
    from vmiso.host.inputs import LARGE_FILE_BYTES, input_digest

    host = {path.name: input_digest(path) for path in inputs}
    assert results["digests"] == host  # hashed in the guest, against the host's own hashes
    assert {i["name"]: i["sha256"] for i in record["inputs"]} == host
    entries = results["entries"]
    expected = list(inputs)
    for path in inputs:
        for directory, dirs, files in os.walk(path):
            expected += [Path(directory) / name for name in dirs + files]
    def below_in(full: Path) -> str:
        return str(full.relative_to(next(p for p in inputs if full.is_relative_to(p)).parent))
    for full in expected:
        seen = entries[below_in(full)]
        if full.is_dir():
            assert seen[0] == oct(0o40755)
        else:  # a file: 0644, its size, the analyst's modification time
            assert seen[0] == oct(0o100644) and seen[3] == full.stat().st_size
            assert seen[1] == full.stat().st_mtime_ns
        assert seen[2] == 0  # root's, not the job's
    assert len(entries) == len(expected)
    assert results["cwd"] == "/in"
    assert [m[0] for m in results["mount"]] == ["erofs"] and results["mount"][0][1].startswith("ro,")
    # Each file of 1 MiB or more is bound from the read-only share over its name, read-only too.
    large = {f"/in/{below_in(full)}" for full in expected if full.is_file() and full.stat().st_size >= LARGE_FILE_BYTES}
    assert large and set(results["bound"]) == large
    assert all(fstype == "9p" and options.startswith("ro,") for fstype, options in results["bound"].values())
    assert set(results["write_bound"].values()) == {"EROFS"}
    # The share itself is out of the job's sight: only its files, where they belong.
    assert results["shares"] == sorted(["vmiso-out", *["vmiso-in-large"] * len(large)])
    assert results["write"] == "EROFS" and results["mkdir"] == "EROFS"
    assert results["raw_write"] in ("EACCES", "EROFS")  # the disk itself: neither the job's nor writable
    assert results["remount"][0] != 0  # the job is not root
