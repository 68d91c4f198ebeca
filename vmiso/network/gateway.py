"""A networked run's only way out: the host-side gateway of ``--allow-host`` and ``--allow-tcp``.

A run that asks for nothing has no gateway at all.  A run that names services
gets one that lives in vmiso's own process for as long as the run: the VM still
has no network device; the host asks the guest's sshd to listen on the guest's
own ``127.0.0.1:PROXY_PORT`` (and each ``--allow-tcp`` port) and every
connection made there comes to this module over the run's SSH link, never over a
socket another local user could open.

The proxy port speaks just enough HTTP for a client told ``HTTPS_PROXY``:
``CONNECT host:port`` to a listed host:port, whose first bytes must then be a
TLS ClientHello naming that host (SNI); or an absolute-form plain request
(``GET http://host:port/...``) to a listed host:port, whose ``Host`` must name
it, sent on with ``Connection: close`` and exactly its declared body.  Nothing
else: no other scheme, no IP literal, no name that is not listed (a name that is
not listed is never looked up), and no address on this host, loopback,
link-local or metadata networks whatever a listed name resolves to.  An
``--allow-tcp LOCALPORT:HOST:PORT`` route joins the guest's port to one
resolved HOST:PORT and reads nothing of what crosses it.

Every connection is recorded: when, what it asked for, allowed or refused (and
why), the address reached, the SNI, bytes each way.  The record has the shape of
the provisioning gateway's (vmiso.network.record reads both).  What the gateway may
reach is parsed by vmiso.network.allow; provisioning and networked runs both use
this gateway, each with its own rules.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from .allow import PROXY_PORT, Allowed, Rules, TcpRoute
from .record import summarize

log = logging.getLogger(__name__)

HEAD_MAX = 16 * 1024  # a request's line and headers
HELLO_MAX = 16 * 1024  # one TLS record: the ClientHello must fit in it
READ_SECONDS = 30  # for a request's head, or a tunnel's ClientHello
CONNECT_SECONDS = 15
RECORD_MAX = 5000  # connections kept in the record; past it they are only counted
# Hop-by-hop and proxy headers: never sent on (a Connection: close of the gateway's own is).
_DROPPED_HEADERS = frozenset({"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization",
                              "proxy-authenticate", "te", "trailer", "upgrade"})
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TARGET = re.compile(rb"^[\x21-\x7e]+$")


# --- where no name may lead ---------------------------------------------------------------

# Where no allowed name may lead, whatever DNS or a hosts file says: the host itself,
# "this network", link-local addresses and the cloud metadata services on them (and the
# AWS IPv6 and Alibaba ones elsewhere), multicast and broadcast.  The host's own
# addresses on every interface are added as a gateway starts (host_addresses).
INTERNAL_NETWORKS = ("127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::1", "::", "fe80::/10",
                     "fd00:ec2::254/128", "100.100.100.200/32", "224.0.0.0/4", "255.255.255.255/32", "ff00::/8",
                     # a network's own NAT64 prefix (RFC 8215): where it leads is the local network's choice
                     "64:ff9b:1::/48")


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
                found.add(str(ipaddress.IPv6Address(int(digits, 16))))  # ip_address(1) would be 0.0.0.1
    except (OSError, ValueError):
        pass
    return found


# --- names and addresses ----------------------------------------------------------------------

def read_hosts_file(path: Path, key: str) -> dict[str, list[str]]:
    """``/etc/hosts`` format -> name (lower case) -> addresses, in the file's order.  Read once,
    as the gateway starts: a later change to the file does not reach a running gateway."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror}",
                          "name a readable file in /etc/hosts format, or leave the key out") from None
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            names.setdefault(name.lower().rstrip("."), []).append(address)
    return names


# IPv6 forms that carry an IPv4 address a translator or tunnel delivers to: each is checked as
# that IPv4 address too, so a name cannot reach 127.0.0.1 or 169.254.169.254 dressed as IPv6.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT's IPv4-translated form (RFC 2765)
_COMPATIBLE = ipaddress.ip_network("::/96")  # IPv4-compatible (deprecated, still parsed)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that ``ip`` carries: IPv4-mapped, NAT64 (well-known prefix), SIIT's
    translated form, IPv4-compatible or 6to4; None when it carries none."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in (_NAT64, _TRANSLATED, _COMPATIBLE)) and int(ip) & 0xFFFFFFFF > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class Resolver:
    """Names to addresses that are not the host's or internal; None with the reason otherwise."""

    def __init__(self, names: dict[str, list[str]] | None = None, internal: Iterable[str] | None = None,
                 own: Iterable[str] | None = None) -> None:
        self._names = names or {}
        nets = INTERNAL_NETWORKS if internal is None else tuple(internal)
        self._internal = [ipaddress.ip_network(n) for n in nets]
        self._own = {ipaddress.ip_address(a) for a in (host_addresses() if own is None else own)}

    def internal(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        seen = [ip, *([v4] if isinstance(ip, ipaddress.IPv6Address) and (v4 := embedded_ipv4(ip)) else [])]
        return any(a in self._own or any(a in net for net in self._internal) for a in seen)

    def resolve(self, host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
        """The addresses to try.  Raises Refused when any of them is internal (the name was
        made to lead here: refused whole), Unreachable when the name has none."""
        if host in self._names:
            found: list[tuple[int, tuple[str, int]]] = [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, (a, port)) for a in self._names[host]]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as err:
                raise Unreachable(f"cannot be resolved ({getattr(err, 'strerror', None) or err})") from None
            found = [(info[0], (str(info[4][0]), int(info[4][1]))) for info in infos]
        if not found:
            raise Unreachable("resolves to no address")
        inside = [a[1][0] for a in found if self.internal(a[1][0])]
        if inside:
            raise Refused(f"resolves to {inside[0]}, an address of this host, loopback or link-local")
        return found


class Refused(Exception):
    """What the rules do not allow."""


class Unreachable(Exception):
    """Allowed, but nothing answered there."""


# --- the record -------------------------------------------------------------------------------

FOLDED_MAX = 1000  # distinct places the connections past RECORD_MAX are summed under
FOLDED_ADDRESSES = 16  # upstream addresses kept per summed place
BUSY = "BUSY"  # the method of a connection refused unread: the gateway was serving all it may
FIELD_MAX = 255  # characters kept of a name, method, reason or SNI the guest chose


class Record:
    """Every connection of one run, thread-safe and bounded in memory, and never able to hide
    a contact: a connection is kept whole when it ends (RECORD_MAX of them), or past that summed
    into its place's row (FOLDED_MAX places, then one row for the rest); connections that sent
    nothing are only counted, so a flood of them displaces nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self._live: dict[int, dict[str, Any]] = {}
        self._folded: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.dropped = 0
        self.empty = 0

    def open(self, kind: str, guest_port: int) -> dict[str, Any]:
        entry = {"time": round(time.time(), 3), "kind": kind, "guest_port": guest_port, "method": "-",
                 "host": "-", "port": None, "outcome": "empty", "allowed": False, "reason": None,
                 "upstream": None, "sni": None, "bytes_from_guest": 0, "bytes_to_guest": 0}
        with self._lock:
            self._live[id(entry)] = entry
        return entry

    def finish(self, entry: dict[str, Any]) -> None:
        for key in ("method", "host", "reason", "sni"):
            if isinstance(entry[key], str) and len(entry[key]) > FIELD_MAX:
                entry[key] = entry[key][:FIELD_MAX] + "..."
        with self._lock:
            self._live.pop(id(entry), None)
            if entry["outcome"] == "empty":
                self.empty += 1
            elif len(self.entries) < RECORD_MAX:
                self.entries.append(entry)
            else:
                self.dropped += 1
                # The SNI too: a tunnel refused for naming another site says which.
                place = (entry["outcome"], entry["host"], entry["port"], entry["method"], entry["sni"])
                # Contacted and failed places are few (the allow-list's); refused ones are the guest's choice.
                if place not in self._folded and len(self._folded) >= FOLDED_MAX and not entry["allowed"]:
                    place = (entry["outcome"], "-", None, "-", None)
                row = self._folded.setdefault(place, {
                    "outcome": place[0], "allowed": entry["allowed"], "host": place[1], "port": place[2],
                    "method": place[3], "sni": place[4], "upstream": entry["upstream"], "upstreams": [],
                    "connections": 0, "bytes_from_guest": 0, "bytes_to_guest": 0, "reason": entry["reason"]})
                if entry["upstream"] and entry["upstream"] not in row["upstreams"] \
                        and len(row["upstreams"]) < FOLDED_ADDRESSES:
                    row["upstreams"].append(entry["upstream"])  # every address contacted, not the first only
                row["connections"] += 1
                row["bytes_from_guest"] += entry["bytes_from_guest"]
                row["bytes_to_guest"] += entry["bytes_to_guest"]

    def busy(self, guest_port: int) -> None:
        """A connection refused unread because the gateway was serving all it may at once."""
        entry = self.open("proxy" if guest_port == PROXY_PORT else "tcp", guest_port)
        entry["method"] = BUSY
        _refuse(entry, "the gateway was serving as many connections as it may at once")
        self.finish(entry)

    def connections(self) -> tuple[list[dict[str, Any]], int]:
        """A copy of every connection kept (those still open included), and how many more were summed."""
        with self._lock:
            live = [dict(e) for e in self._live.values() if e["outcome"] != "empty"]
            return [dict(e) for e in self.entries] + live, self.dropped

    def as_dict(self, rules: Rules) -> dict[str, Any]:
        entries, dropped = self.connections()
        with self._lock:
            folded = [dict(row) for row in self._folded.values()]
            empty = self.empty + sum(1 for e in self._live.values() if e["outcome"] == "empty")
        return {"allow_hosts": rules.listed(), "allow_tcp": [str(r) for r in rules.tcp],
                "connections": entries, "not_kept": dropped, "not_kept_rows": folded,
                **summarize(entries + folded), "empty": empty}


def _refuse(entry: dict[str, Any], reason: str) -> None:
    entry.update(outcome="refused", allowed=False, reason=reason)


# --- one guest connection ---------------------------------------------------------------------

class Stream(Protocol):
    """The guest's end of one connection: a paramiko channel (or a socket, in tests)."""

    def recv(self, size: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def shutdown(self, how: int) -> None: ...
    def close(self) -> None: ...


class _Bad(Exception):
    """The guest sent something that is not a request the gateway reads."""


def _read_head(guest: Stream, entry: dict[str, Any]) -> tuple[bytes, bytes]:
    """The request's head (through the blank line) and whatever came after it."""
    data = b""
    deadline = time.monotonic() + READ_SECONDS
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_MAX:
            raise _Bad(f"a request head over {HEAD_MAX} bytes")
        if time.monotonic() > deadline:  # a trickle of bytes does not stretch it
            raise _Bad(f"no whole request within {READ_SECONDS} s")
        guest.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = guest.recv(4096)
        except TimeoutError:
            raise _Bad(f"no whole request within {READ_SECONDS} s") from None
        if not chunk:
            if data:
                raise _Bad("the connection closed in the middle of a request")
            raise EOFError
        data += chunk
        entry["bytes_from_guest"] += len(chunk)
    head, rest = data.split(b"\r\n\r\n", 1)
    if len(head) > HEAD_MAX:
        raise _Bad(f"a request head over {HEAD_MAX} bytes")
    return head, rest


def _parse_head(head: bytes) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line or b"\0" in line for line in lines):
        raise _Bad("a bare CR, LF or NUL in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not _TOKEN.match(parts[0]) \
            or not _TARGET.match(parts[1]):
        raise _Bad("not an HTTP/1 request line")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _Bad("a malformed header line")
        if _CONTROL.search(value):  # RFC 9110: no control character in a field value but HTAB
            raise _Bad("a control character in a header value")
        headers.append((name, value.strip(b" \t")))
    return parts[0].decode(), parts[1], headers


_PORT = re.compile(r"[0-9]{1,5}")
_LENGTH = re.compile(rb"[0-9]{1,18}")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _split_authority(authority: str, default_port: int) -> tuple[str, int] | None:
    host, sep, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if sep and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        return None
    return host.lower().rstrip("."), int(port) if sep else default_port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return ":" in host  # an IPv6 literal with a zone, or a bracketed form
    return True


def client_hello_sni(record: bytes) -> str | None:
    """The server name in one TLS record holding a ClientHello; None if it is not one or names none."""
    if len(record) < 9 or record[0] != 0x16 or record[1] != 3 or record[5] != 1:
        return None
    body = record[9:5 + int.from_bytes(record[3:5], "big")]
    length = int.from_bytes(record[6:9], "big")
    if length > len(body):
        return None  # a ClientHello over more than one record: not read
    at = 2 + 32  # client version, random
    try:
        at += 1 + body[at]  # session id
        at += 2 + int.from_bytes(body[at:at + 2], "big")  # cipher suites
        at += 1 + body[at]  # compression methods
        end = at + 2 + int.from_bytes(body[at:at + 2], "big")
        at += 2
        if end > length:
            return None
        names = []
        while at + 4 <= end:
            kind, size = int.from_bytes(body[at:at + 2], "big"), int.from_bytes(body[at + 2:at + 4], "big")
            data = body[at + 4:at + 4 + size]
            if len(data) != size:
                return None
            at += 4 + size
            if kind in _HIDDEN_NAME:
                return None  # the name that counts would be one the gateway cannot read
            if kind == 0:
                names.append(_host_name(data))
        if at != end or len(names) != 1:
            return None  # as OpenSSL: exactly one server_name extension, lengths that add up
        return names[0]
    except (IndexError, UnicodeDecodeError):
        return None


# Encrypted ClientHello (ECH) and its draft predecessor (ESNI): the server behind the name read
# here would route by another name, hidden from the gateway.
_HIDDEN_NAME = frozenset({0xFE0D, 0xFFCE})


def _host_name(data: bytes) -> str | None:
    """The one host_name of a server_name extension's list, or None if it is not exactly that."""
    if len(data) < 5 or int.from_bytes(data[:2], "big") != len(data) - 2 or data[2] != 0:
        return None
    size = int.from_bytes(data[3:5], "big")
    if 5 + size != len(data):
        return None
    text = data[5:].decode("ascii")
    return text.lower().rstrip(".") if text.isprintable() and text else None


def _read_record(guest: Stream, entry: dict[str, Any]) -> bytes:
    """One TLS record from the guest (at most HELLO_MAX bytes of body), within READ_SECONDS."""
    data = b""
    deadline = time.monotonic() + READ_SECONDS
    want = 5
    while len(data) < want:
        if time.monotonic() > deadline:
            raise _Bad(f"no TLS ClientHello within {READ_SECONDS} s")
        guest.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = guest.recv(want - len(data))
        except TimeoutError:
            raise _Bad(f"no TLS ClientHello within {READ_SECONDS} s") from None
        if not chunk:
            raise _Bad("the tunnel closed before a TLS ClientHello")
        data += chunk
        entry["bytes_from_guest"] += len(chunk)
        if len(data) == 5 and want == 5:
            if data[0] != 0x16:
                raise _Bad("the tunnel did not start with TLS")
            size = int.from_bytes(data[3:5], "big")
            if size > HELLO_MAX:
                raise _Bad("a TLS record over 16 KiB")
            want = 5 + size
    return data


@dataclass
class Gateway:
    """The run's gateway: serves each connection the guest makes to a port the run was given."""

    rules: Rules
    resolver: Resolver
    record: Record = field(default_factory=Record)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ends: set[Any] = field(default_factory=set[Any])
    _closed: bool = False

    @classmethod
    def start(cls, rules: Rules) -> Gateway:
        names = read_hosts_file(rules.hosts_file, rules.hosts_key) if rules.hosts_file is not None else None
        return cls(rules, Resolver(names))

    def busy(self, guest_port: int) -> None:
        """What the link calls for a connection it refused unread (all slots taken): recorded."""
        self.record.busy(guest_port)

    def routes(self) -> dict[int, Callable[[Stream], None]]:
        """Guest port -> what serves a connection made to it."""
        served: dict[int, Callable[[Stream], None]] = {}
        if self.rules.hosts:
            served[PROXY_PORT] = self.serve_proxy
        for route in self.rules.tcp:
            served[route.guest_port] = functools.partial(self.serve_tcp, route=route)
        return served

    def close(self) -> None:
        """End every connection: nothing the job opened outlives the run."""
        with self._lock:
            self._closed = True
            ends = list(self._ends)
        for end in ends:
            _close(end)

    def _hold(self, end: Stream | socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._ends.add(end)
            return True

    def _release(self, *ends: Stream | socket.socket) -> None:
        with self._lock:
            self._ends.difference_update(ends)
        for end in ends:
            _close(end)

    # -- the proxy port --

    def serve_proxy(self, guest: Stream) -> None:
        entry = self.record.open("proxy", PROXY_PORT)
        if not self._hold(guest):
            _refuse(entry, "the run was ending")
            _close(guest)
            self.record.finish(entry)
            return
        upstream = None
        try:
            upstream = self._proxy(guest, entry)
        except EOFError:
            pass  # connected and closed, having sent nothing: outcome "empty"
        except OSError:
            if entry["outcome"] == "empty" and entry["bytes_from_guest"]:
                entry.update(outcome="malformed", reason="the connection ended in the middle of a request")
        except _Bad as err:
            entry.update(outcome="malformed", allowed=False, reason=str(err))
            _answer(guest, entry, 400, "vmiso's gateway could not read the request")
        except Exception:  # what no rule foresaw: refused, and recorded as such, never "empty"
            log.debug("the gateway could not read a request", exc_info=True)
            if entry["outcome"] == "empty":  # a contact made stays one: it reached the host
                entry.update(outcome="malformed", allowed=False, reason="a request the gateway could not read")
            _answer(guest, entry, 400, "vmiso's gateway could not read the request")
        finally:
            self._release(guest, *(() if upstream is None else (upstream,)))
            self.record.finish(entry)

    def _proxy(self, guest: Stream, entry: dict[str, Any]) -> socket.socket | None:
        head, rest = _read_head(guest, entry)
        method, target, headers = _parse_head(head)
        entry["method"] = method
        text = target.decode("ascii")
        if method == "CONNECT":
            where = _split_authority(text, 443)
            if where is None:
                raise _Bad("a CONNECT target that is not HOST:PORT")
        else:
            scheme, sep, tail = text.partition("://")
            if not sep:
                raise _Bad("a request for a path, not through a proxy")
            authority, _, path = tail.partition("/")
            where = _split_authority(authority, 80) if "@" not in authority else None
            if where is None:
                raise _Bad("a URL whose host cannot be read")
            entry["host"], entry["port"] = where
            if scheme.lower() != "http":
                _refuse(entry, f"{scheme.lower()}:// (the gateway carries http:// and https:// only)")
                _answer(guest, entry, 403, f"vmiso: {scheme}:// is not carried")
                return None
            if method not in self.rules.plain_methods:
                _refuse(entry, f"method {method}")
                _answer(guest, entry, 405, f"vmiso: method {method} is not carried")
                return None
        host, port = where
        entry["host"], entry["port"] = host, port
        if _is_ip(host):
            _refuse(entry, "an IP address (the gateway forwards only to listed names)")
            _answer(guest, entry, 403, "vmiso: IP addresses are not reached; only listed names are")
            return None
        if Allowed(host, port, "https" if method == "CONNECT" else "http") not in self.rules.hosts:
            how = "a tunnel" if method == "CONNECT" else "plain http://"
            listed = any((a.host, a.port) == (host, port) for a in self.rules.hosts)
            _refuse(entry, f"{how} to it is not allowed" if listed else self.rules.refusal)
            _answer(guest, entry, 403, f"vmiso: {host}:{port} is {self.rules.refusal}" if not listed
                    else f"vmiso: {how} to {host}:{port} is not allowed")
            return None
        if method == "CONNECT":
            return self._tunnel(guest, entry, host, port, rest)
        return self._plain(guest, entry, method, host, port, "/" + path, headers, rest)

    def _resolve(self, guest: Stream, entry: dict[str, Any], host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
        """The addresses to try, or [] with the refusal or failure recorded and answered."""
        try:
            return self.resolver.resolve(host, port)
        except Refused as err:  # the address stays in the record: the guest learns nothing of this host
            _refuse(entry, str(err))
            _answer(guest, entry, 403, f"vmiso: {host}:{port} leads to an address the gateway never reaches")
        except Unreachable as err:
            _fail(entry, str(err))
            _answer(guest, entry, 502, f"vmiso: {host}:{port} {err}")
        return []

    def _open(self, guest: Stream, entry: dict[str, Any], host: str, port: int,
              addresses: list[tuple[int, tuple[str, int]]], *, answer: bool = True) -> socket.socket | None:
        errors = []
        for family, address in addresses:
            conn = socket.socket(family, socket.SOCK_STREAM)
            conn.settimeout(CONNECT_SECONDS)
            try:
                conn.connect(address)
            except OSError as err:
                conn.close()
                errors.append(f"{address[0]}: {err.strerror or err}")
                continue
            conn.settimeout(None)
            if not self._hold(conn):
                conn.close()
                _refuse(entry, "the run was ending")
                return None
            entry.update(upstream=address[0], outcome="contacted", allowed=True)
            return conn
        _fail(entry, "; ".join(errors))
        if answer:
            _answer(guest, entry, 502, f"vmiso: {host}:{port} did not answer")
        return None

    def _connect(self, guest: Stream, entry: dict[str, Any], host: str, port: int) -> socket.socket | None:
        addresses = self._resolve(guest, entry, host, port)
        return self._open(guest, entry, host, port, addresses) if addresses else None

    def _tunnel(self, guest: Stream, entry: dict[str, Any], host: str, port: int, rest: bytes) -> socket.socket | None:
        """The service is connected to only once the tunnel's ClientHello has named it: a tunnel
        that asks for another site reaches nothing, not even a TCP handshake."""
        if rest:
            raise _Bad("bytes after CONNECT before the tunnel was open")
        addresses = self._resolve(guest, entry, host, port)
        if not addresses:
            return None
        _send(guest, entry, b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            hello = _read_record(guest, entry)
        except _Bad as err:
            _refuse(entry, f"{err} (a tunnel carries TLS to {host} only)")
            return None
        sni = client_hello_sni(hello)
        entry["sni"] = sni
        if sni != host:
            _refuse(entry, f"the TLS ClientHello names {sni or 'no server'}, not {host}")
            return None
        # No error page inside an open tunnel: a failure to connect just closes it.
        conn = self._open(guest, entry, host, port, addresses, answer=False)
        if conn is None:
            return None
        guest.settimeout(None)
        conn.sendall(hello)
        _splice(guest, conn, entry)
        return conn

    def _plain(self, guest: Stream, entry: dict[str, Any], method: str, host: str, port: int, path: str,
               headers: list[tuple[bytes, bytes]], rest: bytes) -> socket.socket | None:
        named = host if port == 80 else f"{host}:{port}"
        length: int | None = None
        kept = []
        for name, value in headers:
            low = name.lower()
            if low == b"transfer-encoding":
                _refuse(entry, "a request body in chunks (Transfer-Encoding); send a Content-Length")
                _answer(guest, entry, 411, "vmiso: send the body with a Content-Length")
                return None
            if low == b"content-length":
                if not _LENGTH.fullmatch(value) or length is not None:
                    raise _Bad("a Content-Length that is not one number")
                length = int(value)
            if low == b"host" and _split_authority(value.decode("latin-1"), 80) != (host, port):
                _refuse(entry, f"its Host header names another site than {named}")
                _answer(guest, entry, 403, "vmiso: the Host header must name the URL's host")
                return None
            allowed = self.rules.plain_headers
            if low.decode() not in _DROPPED_HEADERS and (allowed is None or low.decode() in allowed):
                kept.append(name + b": " + value)
        if length and self.rules.plain_headers is not None:  # a fetch (provisioning) carries no body
            _refuse(entry, f"a {method} with a body")
            _answer(guest, entry, 403, f"vmiso: a {method} to a mirror carries no body")
            return None
        conn = self._connect(guest, entry, host, port)
        if conn is None:
            return None
        out = [f"{method} {path} HTTP/1.1".encode(), f"Host: {named}".encode(), *kept, b"Connection: close"]
        body = rest[:length or 0]
        conn.sendall(b"\r\n".join(out) + b"\r\n\r\n" + body)
        guest.settimeout(None)
        _splice(guest, conn, entry, upload=(length or 0) - len(body))
        return conn

    # -- a TCP route --

    def serve_tcp(self, guest: Stream, route: TcpRoute) -> None:
        entry = self.record.open("tcp", route.guest_port)
        entry.update(method="TCP", host=route.host, port=route.port)
        if not self._hold(guest):
            _refuse(entry, "the run was ending")
            _close(guest)
            self.record.finish(entry)
            return
        conn = None
        try:
            conn = self._connect(guest, entry, route.host, route.port)
            if conn is not None:
                guest.settimeout(None)
                _splice(guest, conn, entry)
        finally:
            self._release(guest, *(() if conn is None else (conn,)))
            self.record.finish(entry)


def _fail(entry: dict[str, Any], reason: str) -> None:
    entry.update(outcome="failed", allowed=True, reason=reason)


def _send(guest: Stream, entry: dict[str, Any], data: bytes) -> None:
    try:
        guest.sendall(data)
    except (OSError, EOFError):
        return
    entry["bytes_to_guest"] += len(data)


def _answer(guest: Stream, entry: dict[str, Any], status: int, message: str) -> None:
    """An error page that says what vmiso refused and names nothing of this host."""
    if entry["kind"] != "proxy":
        return
    body = (message + "\n").encode("ascii", "replace")
    reason = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 411: "Length Required",
              502: "Bad Gateway"}[status]
    _send(guest, entry, f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: "
                        f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def _close(end: Stream | socket.socket) -> None:
    """Shut down first: that wakes a thread blocked reading it."""
    try:
        end.shutdown(socket.SHUT_RDWR)
    except Exception:  # see below
        pass
    try:
        end.close()
    except Exception:  # a channel of a link that is gone raises kinds of its own
        pass


def _splice(guest: Stream, conn: socket.socket, entry: dict[str, Any], upload: int | None = None) -> None:
    """Copy both ways, counting, until both directions end.  ``upload``: copy only that many
    more bytes from the guest (a plain request's body), then nothing more of what it sends."""
    def up() -> None:
        left = upload
        try:
            while left is None or left > 0:
                data = guest.recv(65536 if left is None else min(65536, left))
                if not data:
                    break
                conn.sendall(data)
                entry["bytes_from_guest"] += len(data)
                if left is not None:
                    left -= len(data)
        except (OSError, EOFError):
            pass
        if upload is None:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    sender = threading.Thread(target=up, daemon=True)
    sender.start()
    try:
        while data := conn.recv(65536):
            guest.sendall(data)
            entry["bytes_to_guest"] += len(data)
    except (OSError, EOFError):
        pass
    try:
        guest.shutdown(socket.SHUT_WR)
    except Exception:  # see _close
        pass
    if upload is not None:
        _close(guest)  # the response is whole: a plain request's connection ends with it
    sender.join()
