"""What a gateway may reach: the allow-lists of runs and provisionings, parsed and checked.

Nothing here opens a socket: this module turns what a configuration and the
command line name (``run.allow_hosts``, ``--allow-tcp``, ``provision.allow_hosts``,
index URLs, the mirror) into ``Rules`` for vmiso.network.gateway, with errors that
name the key.  vmiso.config checks its keys with it as a file is read.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigError

log = logging.getLogger(__name__)

PROXY_PORT = 3128  # the job's HTTP(S)_PROXY: http://127.0.0.1:PROXY_PORT in the guest
GUEST_PORT = PROXY_PORT  # where a provisioning guest's proxy settings point, the same port
HOSTS_KEY = "run.allow_hosts"
TCP_KEY = "run.allow_tcp"
KEY = "provision.allow_hosts"
DEFAULT_INDEX = "https://pypi.org/simple"
DEFAULT_FILE_HOST = "files.pythonhosted.org"
_PLAIN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
FETCH_METHODS = frozenset({"GET", "HEAD"})  # what provisioning's plain-HTTP mirrors are asked
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


@dataclass(frozen=True, order=True)
class TcpRoute:
    """The guest's 127.0.0.1:``guest_port`` joined to ``host``:``port``, resolved on this host."""
    guest_port: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.guest_port}:{self.host}:{self.port}"


@dataclass(frozen=True)
class Rules:
    """Where a gateway forwards.  Each of ``hosts`` allows, by its scheme, a CONNECT tunnel
    ("https") or plain requests with ``plain_methods`` ("http") to its host:port: a run's
    --allow-host allows both, provisioning's allow-list what each URL implies."""

    hosts: tuple[Allowed, ...] = ()
    tcp: tuple[TcpRoute, ...] = ()
    hosts_file: Path | None = None  # names looked up here before DNS, in /etc/hosts format
    plain_methods: frozenset[str] = _PLAIN_METHODS
    refusal: str = "not in this run's --allow-host"  # what a request to another place is told
    hosts_key: str = "run.hosts_file"  # where hosts_file was named, for its errors
    # Headers a plain request may carry on (None: any but hop-by-hop and proxy ones).  A fetch
    # from a mirror needs a few; none of the others (X-Forwarded-Host, X-HTTP-Method-Override,
    # Forwarded) can then bend what the mirror, or a framework before it, does.
    plain_headers: frozenset[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.hosts or self.tcp)

    def listed(self) -> list[str]:
        """host:port of each place, once."""
        return sorted({f"{a.host}:{a.port}" for a in self.hosts})

    def guest_env(self) -> dict[str, str]:
        """What points the job's HTTP clients at the gateway (both spellings: clients differ)."""
        if not self.hosts:
            return {}
        proxy = f"http://127.0.0.1:{PROXY_PORT}"
        local = "localhost,127.0.0.1,::1"
        return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy,
                "NO_PROXY": local, "no_proxy": local}


def parse_tcp_route(entry: str, where: str) -> TcpRoute:
    """``LOCALPORT:HOST:PORT`` -> a route; HOST is a name, as for --allow-host."""
    parts = entry.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{where}: {entry!r} is not LOCALPORT:HOST:PORT",
                          "write e.g. 5432:db.example.org:5432 (the job connects to 127.0.0.1:5432)")
    local, host, port = parts
    target = parse_allow_host(f"{host}:{port}", where)[0]
    if not local.isdigit() or not 1024 <= int(local) <= 65535 or int(local) == PROXY_PORT:
        raise ConfigError(f"{where}: {local!r} cannot be the job's local port",
                          f"choose a port from 1024 to 65535 other than {PROXY_PORT} (the job's proxy); "
                          "the job's unprivileged sshd session listens on it")
    return TcpRoute(int(local), target.host, target.port)


def rules(allow_hosts: Iterable[str], allow_tcp: Iterable[str], hosts_file: Path | None,
          where: tuple[str, str] = (HOSTS_KEY, TCP_KEY)) -> Rules:
    hosts: set[Allowed] = set()
    for i, entry in enumerate(allow_hosts):
        for place in parse_allow_host(entry, f"{where[0]}[{i}]"):  # a tunnel, and plain http, to it
            hosts.update((place, Allowed(place.host, place.port, "http")))
    routes: dict[int, TcpRoute] = {}
    for i, entry in enumerate(allow_tcp):
        route = parse_tcp_route(entry, f"{where[1]}[{i}]")
        if route.guest_port in routes and routes[route.guest_port] != route:
            raise ConfigError(f"{where[1]}[{i}]: local port {route.guest_port} is given twice",
                              "give each service a local port of its own")
        routes[route.guest_port] = route
    return Rules(tuple(sorted(hosts)), tuple(sorted(routes.values())), hosts_file)


def for_run(allow_hosts: Iterable[str], allow_tcp: Iterable[str], hosts_file: Path | None,
            flag_hosts: Iterable[str] = (), flag_tcp: Iterable[str] = ()) -> Rules:
    """The config's ``run.allow_hosts``/``run.allow_tcp`` and the command line's flags, as one set of rules."""
    from_config = rules(allow_hosts, allow_tcp, hosts_file)
    from_flags = rules(flag_hosts, flag_tcp, hosts_file, ("--allow-host", "--allow-tcp"))
    routes = {r.guest_port: r for r in from_config.tcp}
    for route in from_flags.tcp:
        if routes.get(route.guest_port, route) != route:
            raise ConfigError(f"--allow-tcp {route}: local port {route.guest_port} is taken by {TCP_KEY}",
                              "give the service another local port")
        routes[route.guest_port] = route
    return Rules(tuple(sorted({*from_config.hosts, *from_flags.hosts})), tuple(sorted(routes.values())),
                 hosts_file)


# What apt and pip send to a mirror (a fetch has no body and needs no other header).
FETCH_HEADERS = frozenset({"user-agent", "accept", "accept-encoding", "accept-language", "range", "if-range",
                           "if-modified-since", "if-unmodified-since", "if-none-match", "if-match",
                           "cache-control", "pragma"})


def for_provisioning(allowed: Iterable[Allowed], hosts_file: Path | None) -> Rules:
    """A provisioning's rules: a tunnel to each "https" place, GET and HEAD of each "http" one
    (a plain-HTTP mirror or index), as ``provisioning`` says, and nothing else."""
    return Rules(tuple(sorted(set(allowed))), (), hosts_file, plain_methods=FETCH_METHODS,
                 refusal="not in this provisioning's allow-list", hosts_key="provision.hosts_file",
                 plain_headers=FETCH_HEADERS)


# --- a provisioning's allow-list ------------------------------------------------------------

def provisioning(*, index_url: str | None, extra_index_urls: Iterable[str], mirror: str | None,
                 allow_hosts: Iterable[str], apt_urls: Iterable[str] = (), warn: bool = False) -> tuple[Allowed, ...]:
    """What a provisioning's gateway forwards to: the hosts its index URLs and mirror imply, plus
    ``provision.allow_hosts``.

    ``mirror``: ``image.mirror`` (None for a cloud image, whose own apt sources are ``apt_urls``).
    """
    found: set[Allowed] = set()
    implied = [(index_url or DEFAULT_INDEX, "provision.pip.index_url")]
    implied += [(url, f"provision.pip.extra_index_urls[{i}]") for i, url in enumerate(extra_index_urls)]
    if mirror is not None:
        implied.append((mirror, "image.mirror"))
    implied += [(url, "the cloud image's apt sources") for url in apt_urls]
    for url, where in implied:
        allowed = url_host(url, where)
        if allowed is None and warn:
            log.warning("%s: %s names an IP address, which the gateway never forwards to; "
                        "name the host instead", where, url)
        elif allowed is not None:
            found.add(allowed)
    if index_url is None or url_host(index_url, "provision.pip.index_url") == url_host(DEFAULT_INDEX, ""):
        found.add(Allowed(DEFAULT_FILE_HOST, 443))
    for i, entry in enumerate(allow_hosts):
        found.update(parse_allow_host(entry, f"{KEY}[{i}]"))
    return tuple(sorted(found))
