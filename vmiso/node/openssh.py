"""The analyst's own OpenSSH client, the one outside program of a node's link.

``ssh`` is run as the analyst would run it, so their ``~/.ssh/config``, agent,
hardware keys, ``ProxyJump`` and ``known_hosts`` apply; vmiso only adds what it
must never be without: host keys always checked (``StrictHostKeyChecking=yes``:
an unknown or changed key is refused, never learnt), no questions asked
(``BatchMode=yes``), no terminal (``-T``), and no forwarding of the agent, X11 or
ports to a node it has no reason to trust with them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ConfigError, VmisoError

SCHEME = "ssh://"
STDERR_TAIL = 8 * 1024
LINE_MAX = 2000
# Never weakened by the analyst's configuration: -o on the command line wins over ssh_config.
OPTIONS = ("StrictHostKeyChecking=yes", "BatchMode=yes", "ForwardAgent=no", "ForwardX11=no",
           "ClearAllForwardings=yes", "ServerAliveInterval=5", "ServerAliveCountMax=3")
_NAME = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Target:
    """``ssh://[USER@]NODE[:PORT]``, checked."""

    node: str
    user: str | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        return SCHEME + (f"{self.user}@" if self.user else "") + self.node + (f":{self.port}" if self.port else "")

    def command_to_add(self) -> str:
        """What the analyst runs to see and accept the node's host key."""
        port = f"-p {self.port} " if self.port else ""
        return f"ssh {port}{self.user + '@' if self.user else ''}{self.node}"


def parse_target(text: str, what: str = "--host") -> Target:
    """``ssh://[USER@]NODE[:PORT]``; ConfigError for anything else (a name that ssh could take as an option
    among them).  ``what`` names where it was written in errors: "--host", "host:" in a config."""
    usage = f"write {what} ssh://[USER@]NODE[:PORT], e.g. ssh://analyst@kvm1.example.org:2222"
    if not text.startswith(SCHEME):
        raise ConfigError(f"{what} {text!r} is not an ssh:// address", usage)
    parts = urlsplit(text)
    if parts.path or parts.query or parts.fragment or parts.password is not None:
        raise ConfigError(f"{what} {text!r} has more than [USER@]NODE[:PORT]", usage)
    netloc = parts.netloc
    user, _, hostport = netloc.rpartition("@")
    host = hostport
    port: int | None = None
    match = re.fullmatch(r"(.*?)(?::(\d{1,5}))?", hostport)
    if match and match.group(2) is not None:
        host, port = match.group(1), int(match.group(2))
        if not 0 < port < 65536:
            raise ConfigError(f"{what} {text!r}: port {port} is out of range", usage)
    if not _NAME.fullmatch(host) or host.startswith("-"):
        raise ConfigError(f"{what} {text!r}: {host!r} is not a host name", usage)
    if user and not _USER.fullmatch(user):
        raise ConfigError(f"{what} {text!r}: {user!r} is not a user name", usage)
    return Target(host.strip("[]"), user or None, port)


def ssh_argv(target: Target, remote: str, *, ssh: str = "ssh", extra: tuple[str, ...] = ()) -> list[str]:
    """The ssh command line that runs ``remote`` (a shell command line) on ``target``."""
    argv = [ssh, "-T", "-x", "-a"]
    for option in OPTIONS:
        argv += ["-o", option]
    argv += list(extra)
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    return [*argv, "--", target.node, remote]


def remote_command(remote_vmiso: str, *args: str) -> str:
    """The node's command line: ``remote_vmiso`` as the analyst wrote it (a path, or a command with its
    arguments), then vmiso's own arguments, quoted."""
    if not remote_vmiso.strip():
        raise ConfigError("--remote-vmiso is empty", "name the node's vmiso, e.g. /opt/vmiso/venv/bin/vmiso")
    return f"{remote_vmiso} {shlex.join(args)}"


class Link:
    """A running process whose stdin and stdout carry the protocol; its stderr is kept (the last
    STDERR_TAIL bytes) to explain a failure."""

    def __init__(self, argv: list[str], on_line: Callable[[str], None] = lambda line: None) -> None:
        self._on_line = on_line
        self.late: str | None = None  # why the client ended it: what the far side had not done in time
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            raise VmisoError(f"cannot run {argv[0]}: {err.strerror or err}",
                             "install the OpenSSH client (Debian: apt install openssh-client)") from None
        assert self.process.stdin and self.process.stdout and self.process.stderr
        self.to_fd = self.process.stdin.fileno()
        self.from_fd = self.process.stdout.fileno()
        self._stderr = b""
        self._reader = threading.Thread(target=self._keep_stderr, name="vmiso-ssh-stderr", daemon=True)
        self._reader.start()

    def _keep_stderr(self) -> None:
        """Each line the far side writes to stderr (cut to LINE_MAX) told to ``on_line``, the last ones kept."""
        assert self.process.stderr is not None
        while line := self.process.stderr.readline(LINE_MAX):
            self._stderr = (self._stderr + line)[-STDERR_TAIL:]
            self._on_line(line.decode(errors="replace").rstrip("\n"))

    def said(self, wait: float = 2.0) -> str:
        """What the process wrote to stderr (once it ended, or after ``wait`` seconds)."""
        self._reader.join(wait)
        return self._stderr.decode(errors="replace").strip()

    def close_input(self) -> None:
        """End of file on the far side's stdin."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def close(self, wait: float = 10.0) -> int | None:
        """End the link: stdin closed (the node sees end of file) and stdout too (a node still sending
        what this side no longer reads, past a bound say, is told so by its next write instead of
        blocking on a full pipe), then the process stopped if it lingers; its exit status."""
        self.close_input()
        assert self.process.stdout is not None
        self.process.stdout.close()
        try:
            return self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            assert self.process.stderr is not None
            self.process.stderr.close()


def explain(target: Target, said: str) -> VmisoError | None:
    """The error that ssh's own message ``said`` means, with what to do, or None."""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in said or ("Host key for" in said and "has changed" in said):
        return VmisoError(f"the host key of {target.node} does not match the one in known_hosts: this may be "
                          "someone in the middle; vmiso does not connect",
                          "ask the node's owner for its key's fingerprint; only if it changed on purpose, "
                          f"remove the old one (ssh-keygen -R {target.node}) and check the new one")
    if "Host key verification failed" in said or re.search(r"No \S+ host key is known for", said):
        return VmisoError(f"the host key of {target.node} is not known: vmiso connects only to a node whose key "
                          "is in known_hosts",
                          f"connect once with '{target.command_to_add()}', compare the key's fingerprint with "
                          "the one the node's owner gives you, and accept it; then run vmiso again")
    if "Permission denied" in said:
        return VmisoError(f"{target.node} refused the login ({said.splitlines()[-1]})",
                          f"check that '{target.command_to_add()}' logs in without a password prompt (a key "
                          "in your agent, or IdentityFile in ~/.ssh/config)")
    return None
