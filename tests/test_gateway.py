"""The provisioning gateway: its allow-list from the config, its rules and record, driven with real sockets
against origins of the test's own in a network namespace."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmiso import config as config_mod
from vmiso.config import Config, ImageConfig, PipOptions, ProvisionConfig
from vmiso.errors import ConfigError
from vmiso.network import allow, gateway as egress, record as gateway_record

from vmharness import client_hello, make_state_root, network_namespace, remove_tree


def make(**provision) -> Config:
    pip = provision.pop("pip", PipOptions())
    return Config(provision=ProvisionConfig(pip=pip, **provision))


def test_default_config_allows_pypi_its_file_host_and_the_mirror_only():
    assert [str(a) for a in config_mod.provisioning_allow_list(make())] == [
        "http://deb.debian.org:80", "files.pythonhosted.org:443", "pypi.org:443"]


def test_private_index_extra_indexes_and_allow_hosts():
    config = make(pip=PipOptions(index_url="https://pypi.corp.example/simple",
                                 extra_index_urls=("http://mirror.example:8080/simple",)),
                  allow_hosts=("files.corp.example", "wheels.example:8443"))
    assert [str(a) for a in config_mod.provisioning_allow_list(config)] == [
        "http://deb.debian.org:80", "files.corp.example:443", "http://mirror.example:8080",
        "pypi.corp.example:443", "wheels.example:8443"]  # no files.pythonhosted.org: the default index is not used


def test_a_cloud_image_uses_its_own_apt_sources_not_the_mirror():
    config = Config(image=ImageConfig(cloud_image=config_mod.CloudImage(Path("/x.qcow2"), "0" * 64)))
    hosts = [str(a) for a in config_mod.provisioning_allow_list(config, apt_urls=["http://ftp.example.org/debian"])]
    assert "http://deb.debian.org:80" not in hosts and "http://ftp.example.org:80" in hosts


@pytest.mark.parametrize("entry, message", [
    ("10.0.0.1", "is an IP address"),
    ("[::1]:443", "is an IP address"),
    ("bad host", "is not a host name"),
    ("pypi.org:99999", "has no valid port"),
    ("pypi.org:", "has no valid port"),
])
def test_allow_hosts_entries_are_checked_when_the_file_is_read(write, entry, message):
    path = write("vmiso.yaml", json.dumps({"provision": {"allow_hosts": ["ok.example", entry]}}))
    with pytest.raises(ConfigError, match=message) as err:
        config_mod.load(path, env={})
    assert "provision.allow_hosts[1]" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("index_url", "https://user:secret@pypi.corp.example/simple"),
    ("extra_index_urls", ["https://token@pypi.corp.example/simple"]),
])
def test_index_credentials_are_refused_with_the_safe_alternative(write, key, value):
    path = write("vmiso.yaml", json.dumps({"provision": {"pip": {key: value}}}))
    with pytest.raises(ConfigError) as err:
        config_mod.load(path, env={})
    text = str(err.value)
    assert "carries credentials" in text and "install-time code" in text and "devpi" in text
    assert "secret" not in text


# --- the provisioning's gateway, with origins of the test's own in a network namespace -------------

needs_root = pytest.mark.root(reason="network namespaces")


@pytest.fixture
def state():
    """A directory of the test's own for the hosts file and what the origins saw."""
    root = make_state_root()
    yield root / "state"
    remove_tree(root)


# The namespace's LAN, a /24 of the test's own choosing, and a link-local one beside it.
LAN = ("10.213.77.1", "10.213.77.2")
LINK_LOCAL = ("169.254.77.1", "169.254.77.2")
ORIGIN_PORTS = (80, 443, 8080)


@dataclass
class Lan:
    hosts_file: Path
    seen_path: Path
    loopback_port: int  # a listener of the test's own on the host's 127.0.0.1 and ::1
    loopback_hits: list

    def seen(self) -> list[dict]:
        """What the origins received, one dict per request."""
        if not self.seen_path.exists():
            return []
        return [json.loads(line) for line in self.seen_path.read_text().splitlines()]


@pytest.fixture
def lan(state):
    """Origins on 10.213.77.2 (ports 80, 443, 8080) and 169.254.77.2:80 in a network namespace of
    the test's own, and a hosts file for the gateway: names for them, and names that lead to loopback."""
    root = state.parent
    seen_path = root / "seen.jsonl"
    listeners = [socket.socket(socket.AF_INET), socket.socket(socket.AF_INET6)]
    listeners[0].bind(("127.0.0.1", 0))
    port = listeners[0].getsockname()[1]
    listeners[1].bind(("::1", port))
    hits: list = []
    for listener in listeners:
        listener.listen(8)
        threading.Thread(target=lambda sock=listener: hits.append(sock.accept()), daemon=True).start()
    hosts = root / "hosts"
    hosts.write_text(f"{LAN[1]} index.vmiso.test mirror.vmiso.test other.vmiso.test\n"
                     f"{LINK_LOCAL[1]} metadata.vmiso.test\n"
                     "127.0.0.1 loop.vmiso.test localhost\n::1 loop6.vmiso.test\n0.0.0.0 zero.vmiso.test\n"
                     f"{LAN[0]} self.vmiso.test\n")
    hosts.chmod(0o644)
    origin = [sys.executable, "-I", str(Path(__file__).with_name("netns_origin.py"))]
    try:
        with network_namespace([LAN, LINK_LOCAL],
                               [[*origin, LAN[1], str(seen_path), *map(str, ORIGIN_PORTS)],
                                [*origin, LINK_LOCAL[1], str(seen_path), "80"]]):
            yield Lan(hosts, seen_path, port, hits)
    finally:
        for listener in listeners:
            listener.close()


def _ask(gw: egress.Gateway, request: bytes, then: bytes = b"") -> bytes:
    """Send ``request`` on a new connection to the gateway (the guest's end of it, as an SSH
    channel is in a provisioning); after a 200 to a CONNECT, send ``then`` through the tunnel;
    all that came back."""
    guest, host_end = socket.socketpair()
    guest.settimeout(10)
    worker = threading.Thread(target=gw.serve_proxy, args=(host_end,), daemon=True)
    worker.start()
    with guest:
        guest.sendall(request)
        data = b""
        if then:
            while b"\r\n\r\n" not in data and (chunk := guest.recv(65536)):
                data += chunk
            if data.startswith(b"HTTP/1.1 200"):
                guest.sendall(then)
        try:
            while chunk := guest.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    worker.join(10)
    return data


def _get(url: str, host: str, method: str = "GET") -> bytes:
    return f"{method} {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def _connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _summary_entries() -> list[dict]:
    """Connections as a gateway records them (egress.Record), and as squid's records of older
    images hold them: the same fields."""
    def entry(method, host, port, outcome, upstream=None, up=0, down=0):
        return {"time": 1795809744.0, "method": method, "host": host, "port": port, "outcome": outcome,
                "allowed": outcome in ("contacted", "failed"), "upstream": upstream,
                "bytes_from_guest": up, "bytes_to_guest": down}
    return [entry("CONNECT", "pypi.org", 443, "contacted", "151.101.0.223", 892, 12389),
            entry("CONNECT", "evil.example", 443, "refused", None, 114, 3386),
            entry("-", "-", None, "malformed", None, 11, 3256),
            entry("garbage", "-", None, "malformed", None, 11, 3256),
            entry("-", "-", None, "empty"),
            entry("GET", "deb.debian.org", 80, "failed", None, 90, 3300),
            entry("GET", "deb.debian.org", 80, "contacted", "199.232.22.132", 158, 149469),
            entry("HEAD", "deb.debian.org", 80, "contacted", "199.232.22.132", 159, 300),
            entry("GET", "deb.debian.org", 80, "contacted", "199.232.22.132", 9000, 200),
            {**entry("CONNECT", "pypi.org", 443, "contacted", "151.101.0.223", 70000, 10), "connections": 1}]


def test_a_summary_counts_only_contact_and_keeps_what_was_refused():
    summary = gateway_record.summarize(_summary_entries())
    assert [(h["host"], h["method"]) for h in summary["contacted"]] == [
        ("deb.debian.org:80", "GET"), ("deb.debian.org:80", "HEAD"), ("pypi.org:443", "CONNECT")]
    assert summary["contacted"][2]["upstream"] == ["151.101.0.223"]
    assert [h["connections"] for h in summary["contacted"]] == [2, 1, 2]
    assert summary["contacted"][2]["bytes_from_guest"] == 892 + 70000
    assert [(h["host"], h["method"]) for h in summary["refused"]] == [
        ("-", "-"), ("-", "garbage"), ("evil.example:443", "CONNECT")]
    assert [(h["host"], h["connections"]) for h in summary["failed"]] == [("deb.debian.org:80", 1)]
    # A connection that sent nothing asked for nothing: counted, never shown as a refused request.
    assert summary["empty"] == 1


def test_provisioning_rules_tunnel_only_to_https_places_and_fetch_only_from_http_ones():
    rules = allow.for_provisioning((allow.Allowed("pypi.org", 443), allow.Allowed("deb.debian.org", 80, "http"),
                                     allow.Allowed("pypi.org", 443)), None)
    assert rules.hosts == (allow.Allowed("deb.debian.org", 80, "http"), allow.Allowed("pypi.org", 443))
    assert rules.tcp == () and rules.plain_methods == {"GET", "HEAD"}
    assert set(egress.Gateway.start(rules).routes()) == {allow.GUEST_PORT}  # the guest's one port


def _start(allowed, hosts_file: Path) -> egress.Gateway:
    return egress.Gateway.start(allow.for_provisioning(allowed, hosts_file))


@needs_root
def test_a_tunnel_only_to_tls_ports_and_a_mirror_only_by_get_of_its_own_urls(state, lan):
    allowed = (allow.Allowed("index.vmiso.test", 443), allow.Allowed("mirror.vmiso.test", 80, "http"))
    gw = _start(allowed, lan.hosts_file)
    try:
        # Allowed: a tunnel to index:443 whose TLS names it (what pip's HTTPS_PROXY does: the
        # origin here speaks plain HTTP, so it sees the ClientHello as a bad request), and
        # GET/HEAD of the mirror.
        tunnel = _ask(gw, _connect("index.vmiso.test:443"), then=client_hello("index.vmiso.test"))
        assert _status(tunnel) == 200 and b"Bad request" in tunnel  # the origin's own answer
        fetched = _ask(gw, _get("http://mirror.vmiso.test/dists/InRelease", "mirror.vmiso.test"))
        assert _status(fetched) == 200 and fetched.endswith(b"x" * 1000)
        assert _status(_ask(gw, _get("http://mirror.vmiso.test/x", "mirror.vmiso.test:80", "HEAD"))) == 200
        assert [(s["port"], s["method"]) for s in lan.seen()] == [(80, "GET"), (80, "HEAD")]
        refused = {
            # a raw tunnel to the plain-HTTP mirror, which could then name any other site
            "tunnel to port 80": _connect("mirror.vmiso.test:80"),
            "tunnel to a name not allowed": _connect("other.vmiso.test:443"),
            "tunnel to an IP literal": _connect(f"{LAN[1]}:443"),
            "a request for the proxy itself, naming another Host": _get("/", "other.vmiso.test"),
            "POST to the mirror": _get("http://mirror.vmiso.test/", "mirror.vmiso.test", "POST"),
            "PUT to the mirror": _get("http://mirror.vmiso.test/", "mirror.vmiso.test", "PUT"),
            "GET of the TLS index's port": _get("http://index.vmiso.test:443/", "index.vmiso.test:443"),
            "https:// by the gateway itself": _get("https://index.vmiso.test/", "index.vmiso.test"),
            "whois://": _get("whois://mirror.vmiso.test:80/", "mirror.vmiso.test"),
            "ftp://": _get("ftp://mirror.vmiso.test:80/", "mirror.vmiso.test"),
            "gopher://": _get("gopher://mirror.vmiso.test:80/", "mirror.vmiso.test"),
            "the mirror's other port": _get("http://mirror.vmiso.test:8080/", "mirror.vmiso.test:8080"),
            "the mirror's URL with a Host naming another site": _get("http://mirror.vmiso.test/", "other.vmiso.test"),
        }
        for what, request in refused.items():
            answer = _ask(gw, request, then=b"GET / HTTP/1.1\r\nHost: other.vmiso.test\r\n\r\n")
            assert _status(answer) in (400, 403, 405), what
        # A tunnel to the TLS index whose ClientHello names another site: cut before any connection.
        cut = _ask(gw, _connect("index.vmiso.test:443"), then=client_hello("other.vmiso.test"))
        assert b"Bad request" not in cut
    finally:
        gw.close()
    assert len(lan.seen()) == 2  # none of them reached an origin
    record = gw.record.as_dict(gw.rules)
    assert [(h["host"], h["method"]) for h in record["contacted"]] == [
        ("index.vmiso.test:443", "CONNECT"), ("mirror.vmiso.test:80", "GET"), ("mirror.vmiso.test:80", "HEAD")]
    assert len(gateway_record.refused_hosts(record)) >= 5


@needs_root
def test_allowed_names_that_lead_to_loopback_or_link_local_addresses_are_refused(state, lan):
    port = lan.loopback_port
    allowed = (allow.Allowed("loop.vmiso.test", port), allow.Allowed("loop6.vmiso.test", port),
               allow.Allowed("zero.vmiso.test", port), allow.Allowed("metadata.vmiso.test", 80, "http"),
               allow.Allowed("loop.vmiso.test", port, "http"), allow.Allowed("localhost", port),
               allow.Allowed("self.vmiso.test", 443))
    gw = _start(allowed, lan.hosts_file)
    try:
        for request in (_connect(f"loop.vmiso.test:{port}"), _connect(f"loop6.vmiso.test:{port}"),
                        _connect(f"zero.vmiso.test:{port}"), _connect(f"localhost:{port}"),
                        _get(f"http://loop.vmiso.test:{port}/", f"loop.vmiso.test:{port}"),
                        _get("http://metadata.vmiso.test/latest/meta-data/", "metadata.vmiso.test"),
                        # this host's own end of the LAN: refused, not "unreachable"
                        _connect("self.vmiso.test:443")):
            assert _status(_ask(gw, request)) == 403, request
    finally:
        gw.close()
    summary = gateway_record.write_record(gw.record.as_dict(gw.rules), allowed, state.parent / "gateway.json")
    assert lan.loopback_hits == [] and lan.seen() == []
    assert summary["contacted"] == [] and summary["failed"] == [] and len(summary["refused"]) == 7


@needs_root
def test_nothing_the_gateway_sends_names_this_host(state, lan):
    gw = _start((allow.Allowed("mirror.vmiso.test", 80, "http"),), lan.hosts_file)
    try:
        answer = _ask(gw, _get("http://mirror.vmiso.test/", "mirror.vmiso.test")
                      .replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 192.0.2.77\r\nVia: 1.1 guest\r\n"
                                                b"User-Agent: pip/24\r\n\r\n"))
        refused = _ask(gw, _connect("other.vmiso.test:443"))
    finally:
        gw.close()
    received = {name.lower(): value for name, value in lan.seen()[0]["headers"]}
    # a fetch's own headers pass as sent; the guest's others are dropped, and the gateway adds none
    assert received == {"host": "mirror.vmiso.test", "user-agent": "pip/24", "connection": "close"}
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"x-cache" not in head and b"squid" not in head
    assert _status(refused) == 403
    hostname = socket.gethostname().encode()
    if len(hostname) > 3:
        for text in (answer, refused):
            assert hostname not in text


@needs_root
def test_the_record_counts_only_what_reached_an_origin(state, lan):
    allowed = (allow.Allowed("index.vmiso.test", 443), allow.Allowed("mirror.vmiso.test", 80, "http"))
    gw = _start(allowed, lan.hosts_file)
    try:
        _ask(gw, b"")  # asks nothing, as the guest's wait for the gateway does
        _ask(gw, _connect("index.vmiso.test:443"), then=client_hello("index.vmiso.test"))
        _ask(gw, _get("http://mirror.vmiso.test/a", "mirror.vmiso.test"))
        _ask(gw, _get("http://mirror.vmiso.test/a", "mirror.vmiso.test", "HEAD"))
        _ask(gw, _connect("mirror.vmiso.test:80"), then=_get("/", "other.vmiso.test"))
        _ask(gw, _get("http://mirror.vmiso.test/a", "mirror.vmiso.test", "POST"))
        _ask(gw, b"NOT HTTP AT ALL\r\n\r\n")
    finally:
        gw.close()
    record_path = state.parent / "gateway.json"
    summary = gateway_record.write_record(gw.record.as_dict(gw.rules), allowed, record_path)
    assert [(h["host"], h["method"], h["connections"], h["upstream"]) for h in summary["contacted"]] == [
        ("index.vmiso.test:443", "CONNECT", 1, [LAN[1]]), ("mirror.vmiso.test:80", "GET", 1, [LAN[1]]),
        ("mirror.vmiso.test:80", "HEAD", 1, [LAN[1]])]
    assert summary["contacted"][0]["bytes_to_guest"] > 0 and summary["contacted"][0]["bytes_from_guest"] > 0
    refused = [(h["host"], h["method"]) for h in summary["refused"]]
    assert ("mirror.vmiso.test:80", "CONNECT") in refused and ("mirror.vmiso.test:80", "POST") in refused
    assert any(host == "-" for host, _ in refused)  # the malformed request is kept, as refused
    record = json.loads(record_path.read_text())
    assert record["allow_list"] == ["index.vmiso.test:443", "http://mirror.vmiso.test:80"]
    assert sum(1 for c in record["connections"] if c["outcome"] == "contacted") == 3
    # The connection that asked nothing is counted, never refused: the one refused row with no
    # host is the request that was not HTTP.
    assert summary["empty"] == record["empty"] == 1
    assert [h["connections"] for h in summary["refused"] if h["host"] == "-"] == [1]
    assert len(record["connections"]) == 6
    # What `vmiso images show` reads back, checked against the manifest's digest.
    manifest = {"gateway": {"record": record_path.name, "sha256": hashlib.sha256(record_path.read_bytes()).hexdigest()}}
    shown = gateway_record.image_record(record_path.parent, manifest)
    assert shown["contacted"] == summary["contacted"] and shown["empty"] == 1


def test_a_hosts_file_is_checked_when_the_config_is_read_and_read_when_the_gateway_starts(write):
    with pytest.raises(ConfigError, match=r"provision\.hosts_file: .*missing is not a file"):
        config_mod.load(write("h.yaml", "provision:\n  hosts_file: missing\n"), env={})
    names = write("names", "10.213.77.2 index.vmiso.test\n")
    assert config_mod.load(write("g.yaml", "provision:\n  hosts_file: names\n"), env={}).provision.hosts_file == names
    allowed = (allow.Allowed("index.vmiso.test", 443),)
    gw = _start(allowed, names)
    names.unlink()  # a later change does not reach a running gateway
    assert gw.resolver.resolve("index.vmiso.test", 443) == [(socket.AF_INET, ("10.213.77.2", 443))]
    # gone between reading the config and starting the gateway
    with pytest.raises(ConfigError, match="provision.hosts_file: cannot read"):
        _start(allowed, names)


STALE_LAN = ("10.213.82.1", "10.213.82.2")


def _held(address: str) -> int:
    """On how many of this side's interfaces ``address``/24 is."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return shown.count(f" {address}/24 ")


@needs_root
def test_a_namespace_that_a_killed_run_left_does_not_take_a_test_networks_address(tmp_path):
    """A run killed inside network_namespace leaves its namespace, and this side's end of its veth keeps
    the address: the next test's connections would go to the dead namespace (this failed CI once).  The
    next network_namespace takes it away first."""
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, pathlib; sys.path.insert(0, sys.argv[1]); import vmharness\n"
        f"with vmharness.network_namespace([{STALE_LAN!r}], []):\n"
        "    pathlib.Path(sys.argv[2]).touch(); os.kill(os.getpid(), signal.SIGKILL)\n"),
        str(Path(__file__).parent), str(ready)])
    child.wait(30)
    assert ready.exists() and child.returncode == -signal.SIGKILL
    assert _held(STALE_LAN[0]) == 1  # what the killed run left
    echo = [sys.executable, "-c", (
        "import socket, sys\ns = socket.create_server((sys.argv[1], 7000))\nprint('ready', flush=True)\n"
        "while True:\n    c, _ = s.accept(); c.sendall(b'here'); c.close()\n"), STALE_LAN[1]]
    with network_namespace([STALE_LAN], [echo]):
        with socket.create_connection((STALE_LAN[1], 7000), timeout=10) as conn:
            assert conn.recv(4) == b"here"
        assert _held(STALE_LAN[0]) == 1  # the new namespace's, not the dead one's beside it
    assert _held(STALE_LAN[0]) == 0
