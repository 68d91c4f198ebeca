"""The provisioning gateway's allow-list, and the record a gateway leaves.

The provisioning VM has no network device.  Its one link to the host is the
virtio-serial SSH port that runs use too; over it the host asks the guest's sshd
to listen on the guest's own 127.0.0.1:GUEST_PORT, and each connection made there
comes over the link to the gateway in the provisioning vmiso process (vmiso.egress,
the same gateway a networked run gets): there is no socket on this host that
another local user could reach.  This module says what that gateway may forward
to (the hosts the configuration implies, plus ``provision.allow_hosts``) and how
its record of every connection becomes the image's record (``gateway.json``),
which ``vmiso images show`` summarizes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config import Config
from .errors import ConfigError, ImageError

log = logging.getLogger(__name__)

GUEST_PORT = 3128  # where the guest's proxy settings point: 127.0.0.1:GUEST_PORT in the guest
DEFAULT_INDEX = "https://pypi.org/simple"
DEFAULT_FILE_HOST = "files.pythonhosted.org"
RECORD = "gateway.json"
KEY = "provision.allow_hosts"
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


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


# --- where no name may lead ---------------------------------------------------------------

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


# --- the record ---------------------------------------------------------------------------------

# What became of one connection: "contacted" when the gateway connected to an upstream
# address for it; "refused" when the rules said no; "malformed" when it could not read a
# request at all; "failed" when it was allowed but reached nothing; "empty" when a
# connection closed having sent nothing (the guest's own wait for the gateway makes one).
# (Records of images provisioned when squid was the gateway have the same fields.)
OUTCOMES = ("contacted", "refused", "malformed", "failed", "empty")


def _target(entry: dict) -> str:
    return f"{entry['host']}:{entry['port']}" if entry["port"] is not None else entry["host"]


def summarize(entries: list[dict]) -> dict:
    """Per outcome, one row per host:port and method, with request counts, bytes and upstream addresses.

    "refused" holds the malformed requests too (host "-" when the gateway read none): only a
    request the gateway forwarded to an upstream address counts as contact.  "empty" counts the
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


def write_record(record: dict, allowed: Iterable[Allowed], target: Path) -> dict:
    """A gateway's record (egress.Record.as_dict) as the image's record (JSON): every connection,
    the rows of those past the kept count, how many sent nothing, and the allow-list; its summary."""
    connections = record["connections"] + record["not_kept_rows"]
    data = {"allow_list": [str(a) for a in sorted(set(allowed))], "connections": connections,
            "not_kept": record["not_kept"], "empty": record["empty"]}
    target.write_text(json.dumps(data, indent=1) + "\n")
    os.chmod(target, 0o644)
    return {**summarize(connections), "empty": record["empty"]}


def refused_hosts(record: dict) -> list[str]:
    """The places a gateway refused, by name, once each (egress.Record.as_dict's summary)."""
    shown: list[str] = []
    for item in record["refused"]:
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
    summary = summarize(record["connections"])
    return {"record": entry["record"], "sha256": entry["sha256"], "allow_list": record["allow_list"],
            **summary, "empty": record.get("empty", summary["empty"])}
