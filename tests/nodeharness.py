"""A node of the test's own for ``vmiso --host``: a real OpenSSH sshd, with its own host key and an
authorized key the test made, started in a network namespace of the test's own, reached by the client's real ssh through
a config that pins the host key.

The client's ``ssh`` is the analyst's own, found on PATH: the test puts a wrapper first on PATH that
adds ``-F CONFIG`` (OpenSSH reads ~/.ssh from the passwd entry, not $HOME, so a test cannot hand it a
home of its own otherwise).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vmharness import network_namespace

REPO = Path(__file__).resolve().parent.parent
NODE_LAN = ("10.213.81.1", "10.213.81.2")  # this side, the node


@dataclass(frozen=True)
class Node:
    url: str  # ssh://root@node:22
    env: dict[str, str]  # the client's environment: PATH with the ssh wrapper first, VMISO_REMOTE_VMISO
    state: Path  # the node's own state directory
    tmp: Path  # the node's TMPDIR (where it receives inputs and keeps outputs while a run goes)
    directory: Path  # keys, configs, logs


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


def write_node_files(directory: Path, address: str, port: int, *, known: bool = True) -> dict[str, Path]:
    """Keys, sshd_config, the client's ssh config and known_hosts (with the node's key unless not ``known``)."""
    host_key, client_key = directory / "host_key", directory / "client_key"
    host_pub, client_pub = keygen(host_key), keygen(client_key)
    (directory / "authorized_keys").write_text(client_pub + "\n")
    (directory / "sshd_config").write_text(
        f"ListenAddress {address}:{port}\nHostKey {host_key}\nAuthorizedKeysFile {directory}/authorized_keys\n"
        f"PidFile {directory}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n"
        f"AcceptEnv none\nSubsystem sftp internal-sftp\n")
    known_hosts = directory / "known_hosts"
    pinned = address if port == 22 else f"[{address}]:{port}"  # how ssh names it in known_hosts
    known_hosts.write_text(f"{pinned} {host_pub}\n" if known else "")
    (directory / "ssh_config").write_text(
        f"Host node\n  HostName {address}\n  Port {port}\n  User root\n  IdentityFile {client_key}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        "  ConnectTimeout 10\n")
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {directory}/ssh_config \"$@\"\n")
    wrapper.chmod(0o755)
    return {"sshd_config": directory / "sshd_config", "bin": bin_dir}


def node_vmiso(directory: Path, state: Path, tmp: Path) -> Path:
    """The node's vmiso: this tree's code, with the node's own config and TMPDIR."""
    config = directory / "node.yaml"
    config.write_text(yaml.safe_dump({"accel": "tcg", "state_dir": str(state), "image": {"name": "it"},
                                      "vm": {"memory_mib": 512, "cpus": 1}}))
    script = directory / "node-vmiso"
    script.write_text("#!/bin/sh\n"
                      f"export VMISO_CONFIG={config} VMISO_ACCEL=tcg TMPDIR={tmp} PYTHONPATH={REPO}\n"
                      f"exec {sys.executable} -m vmiso \"$@\"\n")
    script.chmod(0o755)
    return script


def wait_listening(address: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"sshd did not listen on {address}:{port}")


@contextlib.contextmanager
def sshd(directory: Path, address: str, port: int, *, netns: str | None):
    """/usr/sbin/sshd -D with ``directory``'s config, in ``netns`` (None: this one); stopped when the block ends.

    Only the network namespace is entered (nsenter --net), not ``ip netns exec``, which also gives the
    process a mount namespace of its own: the node's vmiso mounts each run's bounded /out, and QEMU,
    started by libvirtd in this mount namespace, must see that mount (in another it gets EACCES on the
    directory beneath).  So the client's directories are not hidden from the node by a mount; that the
    node works only from what crossed the link is what the protocol gives it (paths never cross)."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation directory
    argv = ["/usr/sbin/sshd", "-D", "-e", "-f", f"{directory}/sshd_config"]
    if netns is not None:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    with open(directory / "sshd.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(address, port)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def ssh_node(directory: Path, state: Path):
    """A node in a network namespace of the test's own; yields a Node."""
    tmp = directory / "node-tmp"
    tmp.mkdir()
    files = write_node_files(directory, NODE_LAN[1], 22)
    script = node_vmiso(directory, state, tmp)
    with network_namespace([NODE_LAN], []) as ns, sshd(directory, NODE_LAN[1], 22, netns=ns):
        env = dict(os.environ, PATH=f"{files['bin']}:{os.environ['PATH']}", VMISO_REMOTE_VMISO=str(script))
        yield Node("ssh://node", env, state, tmp, directory)
