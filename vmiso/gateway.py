"""The provisioning VM's only way out: an allow-listing, recording HTTP proxy (squid) on the host.

The provisioning VM has no network device.  Its one link to the host is the
virtio-serial SSH port that runs use too; over it the host asks the guest's sshd
for a remote forward of the guest's 127.0.0.1:GUEST_PORT, and joins each
connection made there to squid, which listens on a random loopback address and
port of this host.  squid resolves names (the guest has no DNS), forwards only
to the hosts that the configuration implies plus ``provision.allow_hosts``, on
their ports only, refuses IP addresses, and logs every request with the bytes
each way.  That log becomes the image's gateway record.

This module is the only one that knows squid: its config, its argv, its log.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import logging
import os
import pwd
import re
import resource
import secrets
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from . import tools
from .config import Config
from .errors import ConfigError, ImageError, ToolError, VmisoError
from .workdir import claim, owner_alive, remove_tree

log = logging.getLogger(__name__)

GUEST_PORT = 3128  # where the guest's proxy settings point: 127.0.0.1:GUEST_PORT in the guest
DEFAULT_INDEX = "https://pypi.org/simple"
DEFAULT_FILE_HOST = "files.pythonhosted.org"
PROXY_USER = "proxy"  # Debian's squid drops to this user when started as root
RECORD = "gateway.json"
CONFIG_FILE = "squid.conf"
HOSTS_FILE = "hosts"  # provision.hosts_file, copied
ACCESS_LOG = "access.log"
PID_FILE = "squid.pid"
KEY = "provision.allow_hosts"
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
STOP_SECONDS = 5


@dataclass(frozen=True, order=True)
class Allowed:
    """One place the gateway forwards to.  ``scheme`` says how: "https" is a CONNECT tunnel to
    host:port (TLS, whose bytes the gateway does not read); "http" is GET or HEAD of that host's
    own URLs, with a Host header that names it (a plain-HTTP mirror), and never a tunnel."""
    host: str
    port: int
    scheme: str = "https"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if self.scheme == "https" else f"http://{self.host}:{self.port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def parse_allow_host(entry: str, where: str = KEY) -> list[Allowed]:
    """``pypi.example.org`` (port 443) or ``pypi.example.org:8443`` -> what it allows."""
    host, sep, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
    if _is_ip(entry) or _is_ip(host):
        raise ConfigError(f"{where}: {entry!r} is an IP address; the gateway forwards only to host names",
                          "name the host (in DNS or the host's /etc/hosts) and list that name")
    if not _HOST.match(host):
        raise ConfigError(f"{where}: {entry!r} is not a host name",
                          "write a name such as 'pypi.example.org', optionally with ':PORT'")
    port = 443
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{where}: {entry!r} has no valid port", "write HOST or HOST:PORT (1-65535)")
        port = int(port_text)
    return [Allowed(host.lower(), port)]


def url_host(url: str, where: str) -> Allowed | None:
    """The host and port an http(s) URL needs; None for an IP address (never allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {url!r} is not an http or https URL")
    if _is_ip(parts.hostname):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{where}: {url!r} has an invalid port") from None
    return Allowed(parts.hostname.lower(), port, parts.scheme)


def check_no_credentials(url: str, where: str) -> None:
    """An index URL's credentials would sit in the guest, where install-time code reads them."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{where}: the URL carries credentials (user:password@); vmiso keeps them out of the "
            "provisioning VM, where every package's install-time code could read them",
            "give an index that needs none for provisioning: a mirror or caching proxy of your own "
            "(devpi, a repository manager) that holds the credentials itself, named in "
            f"{where} without them (and in {KEY} if it is another host)",
        )


def allow_list(config: Config, apt_urls: Iterable[str] = (), *, warn: bool = False) -> tuple[Allowed, ...]:
    """What the gateway forwards to: the hosts the configuration implies, plus ``provision.allow_hosts``.

    ``apt_urls``: a cloud image's own apt sources (a recipe's layer uses ``image.mirror``).
    """
    pip = config.provision.pip
    found: set[Allowed] = set()
    implied = [(pip.index_url or DEFAULT_INDEX, "provision.pip.index_url")]
    implied += [(url, f"provision.pip.extra_index_urls[{i}]") for i, url in enumerate(pip.extra_index_urls)]
    if config.image.cloud_image is None:
        implied.append((config.image.mirror, "image.mirror"))
    implied += [(url, "the cloud image's apt sources") for url in apt_urls]
    for url, where in implied:
        allowed = url_host(url, where)
        if allowed is None and warn:
            log.warning("%s: %s names an IP address, which the gateway never forwards to; "
                        "name the host instead", where, url)
        elif allowed is not None:
            found.add(allowed)
    if pip.index_url is None or url_host(pip.index_url, "provision.pip.index_url") == url_host(DEFAULT_INDEX, ""):
        found.add(Allowed(DEFAULT_FILE_HOST, 443))
    for i, entry in enumerate(config.provision.allow_hosts):
        found.update(parse_allow_host(entry, f"{KEY}[{i}]"))
    return tuple(sorted(found))


# --- squid's config -------------------------------------------------------------------------

LOG_FIELDS = ("time", "method", "host", "port", "status", "result", "bytes_from_guest", "bytes_to_guest",
              "upstream", "error")
# %>st: bytes received from the client (the guest), %<st: bytes sent to it; a tunnel's whole.
# %<a: the address squid connected to ("-" when it connected nowhere); %err_code: why not.
_LOGFORMAT = r"%ts.%03tu %rm %>rd %>rP %>Hs %Ss %>st %<st %<a %err_code"

# Where no allowed name may lead, whatever DNS or a hosts file says: the host itself,
# "this network", link-local addresses and the cloud metadata services on them (and the
# AWS IPv6 and Alibaba ones elsewhere), multicast and broadcast.  The host's own
# addresses on every interface are added as a gateway starts (host_addresses).
INTERNAL_NETWORKS = ("127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::1", "::", "fe80::/10",
                     "fd00:ec2::254/128", "100.100.100.200/32", "224.0.0.0/4", "255.255.255.255/32", "ff00::/8")


def host_addresses() -> set[str]:
    """This host's own addresses (every interface, in this network namespace), from /proc as
    ``ip`` reads them: no allowed name may lead to a service of the host's on its LAN address."""
    found = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            found.add(previous.split("|--", 1)[1].strip())
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            digits = line.split()[0] if line.split() else ""
            if len(digits) == 32:
                found.add(str(ipaddress.ip_address(int(digits, 16))))
    except (OSError, ValueError):
        pass
    return found


def squid_config(directory: Path, listen: tuple[str, int], allowed: Iterable[Allowed],
                 effective_user: str | None, *, hosts_file: Path | None = None,
                 own_addresses: Iterable[str] = ()) -> str:
    """squid.conf for one provisioning: listen on ``listen`` only, forward only to ``allowed``.

    A CONNECT tunnel only to an "https" entry's host:port; GET and HEAD of http:// URLs only
    for an "http" entry (squid then sends that URL's host as the Host header, whatever the
    guest wrote); no other method or scheme.  Every ``http_access allow`` line names the host
    and port before anything that makes squid resolve a name, so a name that is not allowed is
    never looked up (no DNS channel out), and the resolved addresses are checked against
    INTERNAL_NETWORKS and ``own_addresses`` (the host's) last.  ``hosts_file``: where
    squid looks names up before DNS (its default is /etc/hosts).
    """
    lines = [
        "# Generated by vmiso for one provisioning; removed when it ends.",
        f"http_port {listen[0]}:{listen[1]}",
        f"pid_filename {directory / PID_FILE}",
        f"cache_log stdio:{directory / 'cache.log'}",
        f"logformat vmiso {_LOGFORMAT}",
        f"access_log stdio:{directory / ACCESS_LOG} logformat=vmiso",
        "logfile_rotate 0",
        f"coredump_dir {directory}",
        f"hosts_file {hosts_file}" if hosts_file is not None else "",
        "cache deny all",
        "cache_mem 8 MB",
        "netdb_filename none",
        "pinger_enable off",
        "shutdown_lifetime 0 seconds",
        # Nothing that names this host or squid, to the origin or to the guest.
        "via off",
        "forwarded_for delete",
        "request_header_access X-Forwarded-For deny all",
        "reply_header_access X-Cache deny all",
        "reply_header_access X-Cache-Lookup deny all",
        "reply_header_access X-Squid-Error deny all",
        "httpd_suppress_version_string on",
        "visible_hostname vmiso-gateway",
        "acl vmiso_connect method CONNECT",
        "acl vmiso_fetch method GET HEAD",
        "acl vmiso_plain proto HTTP",
        # A name squid could not resolve matches no dst acl: "resolved" keeps "!internal" from
        # passing it (squid could not connect anyway; this says so in the rules).
        "acl vmiso_resolved dst 0.0.0.0/0 ::/0",
        "acl vmiso_internal dst " + " ".join([*INTERNAL_NETWORKS, *sorted(set(own_addresses))]),
    ]
    if effective_user:
        lines.append(f"cache_effective_user {effective_user}")
    for i, item in enumerate(sorted(set(allowed))):
        # -n: match the name as written, never a reverse lookup of an address.
        lines.append(f"acl vmiso_{i}_host dstdomain -n {item.host}")
        lines.append(f"acl vmiso_{i}_port port {item.port}")
        if item.scheme == "https":
            lines.append(f"http_access allow vmiso_connect vmiso_{i}_host vmiso_{i}_port "
                         "vmiso_resolved !vmiso_internal")
        else:
            # squid sends the URL's own host:port as Host: a guest's Host header names nothing.
            lines.append(f"http_access allow vmiso_fetch vmiso_plain vmiso_{i}_host vmiso_{i}_port "
                         "vmiso_resolved !vmiso_internal")
    lines.append("http_access deny all")
    return "\n".join(line for line in lines if line) + "\n"


# --- the running gateway --------------------------------------------------------------------

def gateways_root(state_dir: Path) -> Path:
    return state_dir / "gateways"


@dataclass
class Gateway:
    directory: Path
    address: tuple[str, int]
    allowed: tuple[Allowed, ...]
    process: tools.Detached
    file_max_bytes: int

    @property
    def access_log(self) -> Path:
        return self.directory / ACCESS_LOG

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """End squid (its supervisor ends it when its pipe closes) and wait for both."""
        tools.finish_detached(self.process, b"", timeout=STOP_SECONDS + 5)

    def remove(self) -> None:
        remove_tree(self.directory)


def _free_address() -> tuple[str, int]:
    """A random loopback address and a port free on it now (squid binds it a moment later)."""
    host = "127." + ".".join(str(secrets.randbelow(254) + 1) for _ in range(3))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return host, probe.getsockname()[1]


def _listening(directory: Path, address: tuple[str, int]) -> bool:
    """squid says in its cache.log when it accepts connections: no probe connection of ours, which
    would land in the record as a request that never came."""
    try:
        text = (directory / "cache.log").read_text(errors="replace")
    except OSError:
        return False
    return "Accepting HTTP Socket connections at conn" in text and f"local={address[0]}:{address[1]} " in text


# The largest file squid may write, its access.log above all: install-time code could
# otherwise fill the host's disk with requests.  The kernel holds it (RLIMIT_FSIZE): past
# it squid's write fails and squid ends, so the provisioning fails with its record whole
# up to that point (stopped_reason says so).  A provisioning writes a few KiB.
FILE_MAX_BYTES = 64 * 1024 * 1024


def start(state_dir: Path, name: str, allowed: tuple[Allowed, ...], ready_seconds: float = 30, *,
          hosts_file: Path | None = None, file_max_bytes: int = FILE_MAX_BYTES) -> Gateway:
    """Start squid for one provisioning, under a supervisor that ends it when this vmiso ends.

    The supervisor, and squid after it, start with an empty environment: squid parses
    what hostile install-time code sends, and must not hold the analyst's agent socket,
    home or session bus.  ``hosts_file``: squid's names before DNS (default /etc/hosts),
    copied into the gateway's directory as it starts, so that squid reads the copy (as the
    user it runs as) and a later change to the file does not reach a running gateway.
    """
    squid = tools.which("squid")
    root = gateways_root(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    directory = root / f"{name}-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o700)
    claim(directory)
    user = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(PROXY_USER)
        except KeyError:
            raise ToolError(f"the user {PROXY_USER!r} that squid runs as does not exist",
                            "install squid: apt-get install squid", program="squid") from None
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        user = PROXY_USER
    address = _free_address()
    names = None
    if hosts_file is not None:
        names = directory / HOSTS_FILE
        try:
            names.write_bytes(hosts_file.read_bytes())
        except OSError as err:
            remove_tree(directory)
            raise ConfigError(f"provision.hosts_file: cannot read {hosts_file}: {err.strerror}",
                              "name a readable file in /etc/hosts format, or leave the key out") from None
        os.chmod(names, 0o644)
    conf = directory / CONFIG_FILE
    conf.write_text(squid_config(directory, address, allowed, user, hosts_file=names,
                                 own_addresses=host_addresses()))
    os.chmod(conf, 0o644)
    process = tools.start_detached(tools.gateway_argv(str(conf), file_max_bytes), env={})
    gateway = Gateway(directory, address, allowed, process, file_max_bytes)
    deadline = time.monotonic() + ready_seconds
    while time.monotonic() < deadline:
        if not gateway.running():
            tail = tools.log_tail(directory / "cache.log", 6)
            gateway.remove()
            raise ToolError(f"the gateway (squid) did not start: {tail or 'no log'}", program=squid)
        if _listening(directory, address):
            return gateway
        time.sleep(0.05)
    gateway.stop()
    gateway.remove()
    raise ToolError(f"the gateway (squid) did not listen within {ready_seconds:.0f} s", program=squid)


def stopped_reason(gateway: Gateway) -> str | None:
    """Why the gateway ended before its provisioning did, when it was the cap; else None."""
    if gateway.running():
        return None
    try:
        size = gateway.access_log.stat().st_size
    except OSError:
        return None
    if size < gateway.file_max_bytes:
        return None
    cap = gateway.file_max_bytes
    shown = f"{cap // 2**20} MiB" if cap >= 2**20 else f"{cap // 1024} KiB"
    return f"its record reached {shown}, the most a gateway may write"


def supervise(conf: str, file_max_bytes: int) -> int:
    """``python -m vmiso _gateway CONF BYTES``: run squid until stdin (vmiso's pipe) closes, then end it.

    vmiso holds the pipe for the length of a provisioning; however vmiso ends (even
    by SIGKILL) the pipe closes and squid goes with it.  squid inherits the cap on
    the size of any file it writes (FILE_MAX_BYTES).
    """
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_max_bytes, file_max_bytes))
    return tools.run_while_piped(tools.squid_argv(conf), STOP_SECONDS)


# --- leftovers --------------------------------------------------------------------------------

def orphans(state_dir: Path) -> list[Path]:
    root = gateways_root(state_dir)
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not owner_alive(p)]


def _pid_of(directory: Path) -> int | None:
    """squid's pid from its pid file, when that process still runs with this directory's config."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(directory / CONFIG_FILE).encode() in cmdline else None


def running_orphan(directory: Path) -> bool:
    return _pid_of(directory) is not None


def end_orphan(directory: Path) -> None:
    """Stop an orphaned gateway's squid (its vmiso died and its supervisor too) and remove its files."""
    pid = _pid_of(directory)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while _pid_of(directory) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_of(directory) is not None:
            os.kill(pid, signal.SIGKILL)
    if failures := remove_tree(directory):
        raise VmisoError(f"cannot remove {directory / failures[0].path}: {failures[0].reason}")


# --- the record ---------------------------------------------------------------------------------

# What became of one request, from squid's log: "contacted" only when squid connected
# to an upstream address for it; "refused" when the rules said no; "malformed" when
# squid could not read a request at all (no host, a bad request line, bytes that were
# not HTTP); "failed" when it was allowed but squid reached nothing; "empty" when a
# connection closed having sent nothing (the guest's own wait for the gateway makes one).
OUTCOMES = ("contacted", "refused", "malformed", "failed", "empty")


def _outcome(raw: dict[str, str]) -> str:
    if raw["method"] == "-" and raw["host"] == "-" and raw["bytes_from_guest"] == "0":
        return "empty"
    if raw["result"] == "TCP_DENIED" or raw["error"] == "ERR_ACCESS_DENIED":
        return "refused"
    # Before any sign of a bad request: a request squid forwarded reached the host, whatever
    # came of it (the origin's own 400, the guest hanging up mid-transfer: ERR_CLIENT_GONE).
    if raw["upstream"] != "-":
        return "contacted"
    if raw["host"] == "-" or raw["status"] == "400" or raw["error"].startswith(("ERR_INVALID", "ERR_CLIENT")):
        return "malformed"
    return "failed"


def parse_access_log(text: str) -> list[dict]:
    """squid's access.log in vmiso's format -> one dict per request the gateway saw.

    A line that is not in that format is kept as a malformed entry with its text:
    nothing the guest sent vanishes from the record.
    """
    entries: list[dict] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        raw = dict(zip(LOG_FIELDS, fields, strict=False))
        try:
            if len(fields) != len(LOG_FIELDS):
                raise ValueError(line)
            outcome = _outcome(raw)
            entry = {
                "time": float(raw["time"]),
                "method": raw["method"],
                "host": raw["host"],
                "port": int(raw["port"]) if raw["port"].isdigit() else None,
                "outcome": outcome,
                "allowed": outcome in ("contacted", "failed"),
                "status": int(raw["status"]) if raw["status"].isdigit() else None,
                "result": raw["result"],
                "error": None if raw["error"] == "-" else raw["error"],
                "upstream": None if raw["upstream"] == "-" else raw["upstream"],
                "bytes_from_guest": int(raw["bytes_from_guest"]),
                "bytes_to_guest": int(raw["bytes_to_guest"]),
            }
        except ValueError:
            entry = {"time": None, "method": None, "host": "-", "port": None, "outcome": "malformed",
                     "allowed": False, "status": None, "result": None, "error": None, "upstream": None,
                     "bytes_from_guest": 0, "bytes_to_guest": 0, "line": line}
        entries.append(entry)
    return entries


def _target(entry: dict) -> str:
    return f"{entry['host']}:{entry['port']}" if entry["port"] is not None else entry["host"]


def summarize(entries: list[dict]) -> dict:
    """Per outcome, one row per host:port and method, with request counts, bytes and upstream addresses.

    "refused" holds the malformed requests too (host "-" when squid read none): only a
    request squid forwarded to an upstream address counts as contact.  "empty" counts the
    connections that sent nothing: they asked for nothing and reached nothing.
    """
    def rows(outcomes: tuple[str, ...]) -> list[dict]:
        seen: dict[tuple[str, str], dict] = {}
        for e in entries:
            if e.get("outcome", "contacted" if e.get("allowed") else "refused") not in outcomes:
                continue
            method = e.get("method") or "-"
            item = seen.setdefault((_target(e), method), {
                "host": _target(e), "method": method, "connections": 0, "bytes_from_guest": 0,
                "bytes_to_guest": 0, "upstream": []})
            item["connections"] += e.get("connections", 1)  # a row of connections summed (egress.Record)
            item["bytes_from_guest"] += e["bytes_from_guest"]
            item["bytes_to_guest"] += e["bytes_to_guest"]
            if e.get("upstream") and e["upstream"] not in item["upstream"]:
                item["upstream"].append(e["upstream"])
        return sorted(seen.values(), key=lambda i: (i["host"], i["method"]))
    return {"contacted": rows(("contacted",)), "refused": rows(("refused", "malformed")),
            "failed": rows(("failed",)), "empty": sum(1 for e in entries if e.get("outcome") == "empty")}


def write_record(gateway: Gateway, target: Path) -> dict:
    """The gateway's log as the image's record (JSON): every connection, and the allow-list."""
    try:
        text = gateway.access_log.read_text(errors="replace")
    except OSError:
        text = ""
    entries = parse_access_log(text)
    record = {"allow_list": [str(a) for a in gateway.allowed], "connections": entries}
    target.write_text(json.dumps(record, indent=1) + "\n")
    os.chmod(target, 0o644)
    return summarize(entries)


def refused_hosts(gateway: Gateway) -> list[str]:
    try:
        text = gateway.access_log.read_text(errors="replace")
    except OSError:
        return []
    shown = []
    for item in summarize(parse_access_log(text))["refused"]:
        name = "a malformed request" if item["host"] == "-" else item["host"]
        if name not in shown:
            shown.append(name)
    return shown


def image_record(image_dir: Path, manifest: dict) -> dict | None:
    """The record's summary from the manifest, after checking the file against its digest there."""
    entry = manifest.get("gateway")
    if not entry:
        return None
    path = image_dir / entry["record"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"the gateway record {path} is unreadable: {err.strerror}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ImageError(f"the gateway record {path} does not match the sha256 in the manifest",
                         "the record was changed; provision the image again")
    record = json.loads(data)
    return {"record": entry["record"], "sha256": entry["sha256"], "allow_list": record["allow_list"],
            **summarize(record["connections"])}
