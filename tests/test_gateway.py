"""The provisioning gateway: its allow-list from the config, squid's config, and a real squid on loopback."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmiso import config as config_mod, gateway, reaper
from vmiso.config import Config, ImageConfig, PipOptions, ProvisionConfig
from vmiso.errors import ConfigError

from vmharness import make_state_root, network_namespace, remove_tree, wait_for


def make(**provision) -> Config:
    pip = provision.pop("pip", PipOptions())
    return Config(provision=ProvisionConfig(pip=pip, **provision))


def test_default_config_allows_pypi_its_file_host_and_the_mirror_only():
    assert [str(a) for a in gateway.allow_list(make())] == [
        "http://deb.debian.org:80", "files.pythonhosted.org:443", "pypi.org:443"]


def test_private_index_extra_indexes_and_allow_hosts():
    config = make(pip=PipOptions(index_url="https://pypi.corp.example/simple",
                                 extra_index_urls=("http://mirror.example:8080/simple",)),
                  allow_hosts=("files.corp.example", "wheels.example:8443"))
    assert [str(a) for a in gateway.allow_list(config)] == [
        "http://deb.debian.org:80", "files.corp.example:443", "http://mirror.example:8080",
        "pypi.corp.example:443", "wheels.example:8443"]  # no files.pythonhosted.org: the default index is not used


def test_a_cloud_image_uses_its_own_apt_sources_not_the_mirror():
    config = Config(image=ImageConfig(cloud_image=config_mod.CloudImage(Path("/x.qcow2"), "0" * 64)))
    hosts = [str(a) for a in gateway.allow_list(config, apt_urls=["http://ftp.example.org/debian"])]
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


def test_squid_config_tunnels_only_to_tls_ports_and_fetches_only_from_plain_http_ones(tmp_path):
    allowed = (gateway.Allowed("pypi.org", 443), gateway.Allowed("files.pythonhosted.org", 443),
               gateway.Allowed("deb.debian.org", 80, "http"))
    text = gateway.squid_config(tmp_path, ("127.1.2.3", 40000), allowed, "proxy")
    assert "http_port 127.1.2.3:40000\n" in text
    assert text.count("http_port") == 1
    lines = text.splitlines()
    allows = [line for line in lines if line.startswith("http_access allow")]
    assert len(allows) == 3
    connects = [line for line in allows if "vmiso_connect" in line]
    fetches = [line for line in allows if "vmiso_fetch" in line]
    assert len(connects) == 2 and len(fetches) == 1
    # resolved last, and only for allowed names
    assert all(line.endswith("vmiso_resolved !vmiso_internal") for line in allows)
    assert "vmiso_plain" in fetches[0]  # http:// only
    assert text.rstrip().endswith("http_access deny all")
    for setting in ("via off", "forwarded_for delete", "httpd_suppress_version_string on",
                    "visible_hostname vmiso-gateway", "request_header_access X-Forwarded-For deny all"):
        assert setting in lines
    internal = next(line for line in lines if line.startswith("acl vmiso_internal dst "))
    for network in ("127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::1", "fe80::/10", "fd00:ec2::254/128",
                    "100.100.100.200/32"):
        assert network in internal.split()
    with_own = gateway.squid_config(tmp_path, ("127.1.2.3", 40000), allowed, None, own_addresses=["192.0.2.7"])
    assert "192.0.2.7" in next(line for line in with_own.splitlines() if line.startswith("acl vmiso_internal "))
    assert "%>st %<st %<a" in text
    assert "hosts_file" not in text  # squid's default, /etc/hosts
    assert f"hosts_file {tmp_path / 'hosts'}" in gateway.squid_config(
        tmp_path, ("127.1.2.3", 40000), allowed, None, hosts_file=tmp_path / "hosts").splitlines()


def test_access_log_becomes_requests_and_a_summary_that_counts_only_contact():
    log = ("1795809744.650 CONNECT pypi.org 443 200 TCP_TUNNEL 892 12389 151.101.0.223 -\n"
           "1795809744.673 CONNECT evil.example 443 403 TCP_DENIED 114 3386 - ERR_ACCESS_DENIED\n"
           "garbage line\n"
           "1795809744.700 garbage - - 400 NONE_NONE 11 3256 - -\n"
           "1795809744.710 - - - 0 NONE_NONE 0 0 - ERR_CLIENT_GONE\n"
           "1795809744.720 GET deb.debian.org 80 503 TCP_MISS 90 3300 - ERR_CONNECT_FAIL\n"
           "1795809744.818 GET deb.debian.org 80 200 TCP_MISS 158 149469 199.232.22.132 -\n"
           "1795809744.819 HEAD deb.debian.org 80 200 TCP_MISS 159 300 199.232.22.132 -\n"
           # Forwarded, then a 400 of the origin's own, or the guest hanging up mid-tunnel:
           # what the guest sent reached the host, so it is contact, never "refused".
           "1795809744.820 GET deb.debian.org 80 400 TCP_MISS 9000 200 199.232.22.132 -\n"
           "1795809744.830 CONNECT pypi.org 443 200 TCP_TUNNEL 70000 10 151.101.0.223 ERR_CLIENT_GONE\n")
    entries = gateway.parse_access_log(log)
    assert len(entries) == 10  # nothing vanishes, a line squid did not write in vmiso's format included
    assert entries[1] == {"time": 1795809744.673, "method": "CONNECT", "host": "evil.example", "port": 443,
                          "outcome": "refused", "allowed": False, "status": 403, "result": "TCP_DENIED",
                          "error": "ERR_ACCESS_DENIED", "upstream": None, "bytes_from_guest": 114,
                          "bytes_to_guest": 3386}
    assert [e["outcome"] for e in entries] == ["contacted", "refused", "malformed", "malformed", "empty",
                                               "failed", "contacted", "contacted", "contacted", "contacted"]
    assert entries[2]["line"] == "garbage line"
    summary = gateway.summarize(entries)
    assert [(h["host"], h["method"]) for h in summary["contacted"]] == [
        ("deb.debian.org:80", "GET"), ("deb.debian.org:80", "HEAD"), ("pypi.org:443", "CONNECT")]
    assert summary["contacted"][2]["upstream"] == ["151.101.0.223"]
    assert [h["connections"] for h in summary["contacted"]] == [2, 1, 2]
    assert summary["contacted"][2]["bytes_from_guest"] == 892 + 70000
    assert [(h["host"], h["method"]) for h in summary["refused"]] == [
        ("-", "-"), ("-", "garbage"), ("evil.example:443", "CONNECT")]  # the unreadable line's method is "-"
    assert [(h["host"], h["connections"]) for h in summary["failed"]] == [("deb.debian.org:80", 1)]
    # A connection that sent nothing asked for nothing: counted, never shown as a refused request.
    assert summary["empty"] == 1


# --- a real squid, with vmiso's config, and origins of the test's own in a network namespace ------

needs_squid = pytest.mark.skipif(shutil.which("squid", path="/usr/sbin:/usr/bin") is None,
                                 reason="squid is not installed (scripts/setup-host --test installs it)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and other users need root")


@pytest.fixture
def state():
    """squid runs as the proxy user: its directory must be reachable (pytest's tmp dirs are 0700)."""
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
    the test's own, and a hosts file for squid: names for them, and names that lead to loopback."""
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


def _ask(address: tuple[str, int], request: bytes, then: bytes = b"") -> bytes:
    """Send ``request``; after a 200 to a CONNECT, send ``then`` through the tunnel; all that came back."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(request)
        data = b""
        if then:
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            if data.startswith(b"HTTP/1.1 200"):
                conn.sendall(then)
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except TimeoutError:
            pass
        return data


def _get(url: str, host: str, method: str = "GET") -> bytes:
    return f"{method} {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def _connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@needs_squid
@needs_root
def test_a_tunnel_only_to_tls_ports_and_a_mirror_only_by_get_of_its_own_urls(state, lan):
    allowed = (gateway.Allowed("index.vmiso.test", 443), gateway.Allowed("mirror.vmiso.test", 80, "http"))
    gw = gateway.start(state, "t", allowed, hosts_file=lan.hosts_file)
    try:
        # Allowed: a tunnel to index:443 (what pip's HTTPS_PROXY does), and GET/HEAD of the mirror.
        tunnel = _ask(gw.address, _connect("index.vmiso.test:443"),
                      then=_get("/simple/", "index.vmiso.test"))
        assert _status(tunnel) == 200 and b'"port": 443' in tunnel and tunnel.endswith(b"x" * 1000)
        fetched = _ask(gw.address, _get("http://mirror.vmiso.test/dists/InRelease", "mirror.vmiso.test"))
        assert _status(fetched) == 200 and fetched.endswith(b"x" * 1000)
        assert _status(_ask(gw.address, _get("http://mirror.vmiso.test/x", "mirror.vmiso.test:80", "HEAD"))) == 200
        assert [(s["port"], s["method"]) for s in lan.seen()] == [(443, "GET"), (80, "GET"), (80, "HEAD")]
        refused = {
            # a raw tunnel to the plain-HTTP mirror, which could then name any other site
            "tunnel to port 80": _connect("mirror.vmiso.test:80"),
            "tunnel to a name not allowed": _connect("other.vmiso.test:443"),
            "tunnel to an IP literal": _connect(f"{LAN[1]}:443"),
            "a request for the proxy itself, naming another Host": _get("/", "other.vmiso.test"),
            "POST to the mirror": _get("http://mirror.vmiso.test/", "mirror.vmiso.test", "POST"),
            "PUT to the mirror": _get("http://mirror.vmiso.test/", "mirror.vmiso.test", "PUT"),
            "GET of the TLS index's port": _get("http://index.vmiso.test:443/", "index.vmiso.test:443"),
            "https:// by squid itself": _get("https://index.vmiso.test/", "index.vmiso.test"),
            "whois://": _get("whois://mirror.vmiso.test:80/", "mirror.vmiso.test"),
            "ftp://": _get("ftp://mirror.vmiso.test:80/", "mirror.vmiso.test"),
            "gopher://": _get("gopher://mirror.vmiso.test:80/", "mirror.vmiso.test"),
            "the mirror's other port": _get("http://mirror.vmiso.test:8080/", "mirror.vmiso.test:8080"),
        }
        for what, request in refused.items():
            answer = _ask(gw.address, request, then=b"GET / HTTP/1.1\r\nHost: other.vmiso.test\r\n\r\n")
            assert _status(answer) in (400, 403, 501), what  # 501: a scheme squid refuses to speak
        assert len(lan.seen()) == 3  # none of them reached an origin
        # A GET of the mirror's URL that names another Host, or none: squid asks the mirror for
        # its own name only, so the Host header reaches no other site on the mirror's address.
        for host in ("other.vmiso.test", "mirror.vmiso.test:8080"):
            assert _status(_ask(gw.address, _get("http://mirror.vmiso.test/", host))) == 200
        assert _status(_ask(gw.address, b"GET http://mirror.vmiso.test/ HTTP/1.0\r\n\r\n")) == 200
        assert [dict(s["headers"])["Host"] for s in lan.seen()[3:]] == ["mirror.vmiso.test"] * 3
    finally:
        gw.stop()
        gw.remove()


@needs_squid
@needs_root
def test_allowed_names_that_lead_to_loopback_or_link_local_addresses_are_refused(state, lan):
    port = lan.loopback_port
    allowed = (gateway.Allowed("loop.vmiso.test", port), gateway.Allowed("loop6.vmiso.test", port),
               gateway.Allowed("zero.vmiso.test", port), gateway.Allowed("metadata.vmiso.test", 80, "http"),
               gateway.Allowed("loop.vmiso.test", port, "http"), gateway.Allowed("localhost", port),
               gateway.Allowed("self.vmiso.test", 443))
    gw = gateway.start(state, "t", allowed, hosts_file=lan.hosts_file)
    try:
        for request in (_connect(f"loop.vmiso.test:{port}"), _connect(f"loop6.vmiso.test:{port}"),
                        _connect(f"zero.vmiso.test:{port}"), _connect(f"localhost:{port}"),
                        _get(f"http://loop.vmiso.test:{port}/", f"loop.vmiso.test:{port}"),
                        _get("http://metadata.vmiso.test/latest/meta-data/", "metadata.vmiso.test"),
                        # this host's own end of the LAN: 403, refused, not 503 (nothing listens there)
                        _connect("self.vmiso.test:443")):
            assert _status(_ask(gw.address, request)) == 403, request
    finally:
        gw.stop()
    summary = gateway.write_record(gw, state.parent / "gateway.json")
    gw.remove()
    assert lan.loopback_hits == [] and lan.seen() == []
    assert summary["contacted"] == [] and summary["failed"] == [] and len(summary["refused"]) == 7


@needs_squid
@needs_root
def test_nothing_the_gateway_sends_names_this_host_or_squid(state, lan):
    gw = gateway.start(state, "t", (gateway.Allowed("mirror.vmiso.test", 80, "http"),), hosts_file=lan.hosts_file)
    try:
        answer = _ask(gw.address, _get("http://mirror.vmiso.test/", "mirror.vmiso.test")
                      .replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 192.0.2.77\r\n\r\n"))
        refused = _ask(gw.address, _connect("other.vmiso.test:443"))
    finally:
        gw.stop()
        gw.remove()
    received = {name.lower(): value for name, value in lan.seen()[0]["headers"]}
    assert "via" not in received and "x-forwarded-for" not in received
    assert received["host"] == "mirror.vmiso.test"
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"via:" not in head and b"x-cache" not in head and b"x-squid" not in head
    assert _status(refused) == 403
    hostname = socket.gethostname().encode()
    for text in (answer, refused):
        assert b"5.7" not in text  # no version
        assert b"vmiso-gateway" in text or text is answer
        if len(hostname) > 3:
            assert hostname not in text


@needs_squid
@needs_root
def test_the_record_counts_only_what_reached_an_origin(state, lan):
    allowed = (gateway.Allowed("index.vmiso.test", 443), gateway.Allowed("mirror.vmiso.test", 80, "http"))
    gw = gateway.start(state, "t", allowed, hosts_file=lan.hosts_file)
    try:
        # First, so that squid has long read its end before it stops.
        socket.create_connection(gw.address).close()  # asks nothing
        _ask(gw.address, _connect("index.vmiso.test:443"), then=_get("/", "index.vmiso.test"))
        _ask(gw.address, _get("http://mirror.vmiso.test/a", "mirror.vmiso.test"))
        _ask(gw.address, _get("http://mirror.vmiso.test/a", "mirror.vmiso.test", "HEAD"))
        _ask(gw.address, _connect("mirror.vmiso.test:80"), then=_get("/", "other.vmiso.test"))
        _ask(gw.address, _get("http://mirror.vmiso.test/a", "mirror.vmiso.test", "POST"))
        _ask(gw.address, b"NOT HTTP AT ALL\r\n\r\n")
    finally:
        gw.stop()
    record_path = state.parent / "gateway.json"
    summary = gateway.write_record(gw, record_path)
    gw.remove()
    assert [(h["host"], h["method"], h["connections"], h["upstream"]) for h in summary["contacted"]] == [
        ("index.vmiso.test:443", "CONNECT", 1, [LAN[1]]), ("mirror.vmiso.test:80", "GET", 1, [LAN[1]]),
        ("mirror.vmiso.test:80", "HEAD", 1, [LAN[1]])]
    assert summary["contacted"][0]["bytes_to_guest"] > 1000 and summary["contacted"][0]["bytes_from_guest"] > 0
    refused = [(h["host"], h["method"]) for h in summary["refused"]]
    assert ("mirror.vmiso.test:80", "CONNECT") in refused and ("mirror.vmiso.test:80", "POST") in refused
    assert any(host == "-" for host, _ in refused)  # the malformed requests are kept, as refused
    record = json.loads(record_path.read_text())
    assert record["allow_list"] == ["index.vmiso.test:443", "http://mirror.vmiso.test:80"]
    assert sum(1 for c in record["connections"] if c["outcome"] == "contacted") == 3
    # The connection that asked nothing is kept and counted, not refused; and it is the only
    # one: squid started without a probe of vmiso's in the log.
    assert summary["empty"] == 1 and ("-", "-") not in refused
    assert len(record["connections"]) == 7


@needs_squid
def test_an_orphaned_gateway_is_listed_and_ended_by_gc(state):
    gw = gateway.start(state, "t", (gateway.Allowed("localhost", 9),))
    # Its vmiso died: the owner record names a process that no longer exists, and
    # squid outlived its supervisor (killed with SIGKILL, so it could not end squid).
    (gw.directory / "owner.json").write_text(json.dumps({"pid": 2**22 + 1, "start": 1}))
    os.kill(gw.process.pid, 9)
    gw.process.wait()
    assert gateway.running_orphan(gw.directory)
    found = reaper.find(None, state)
    assert [(item.kind, item.name) for item in found] == [("gateway", gw.directory.name + " (squid still running)")]
    cleaned = reaper.clean(None, state)
    assert cleaned.failed == [] and not gw.directory.exists()
    with pytest.raises(OSError):
        socket.create_connection(gw.address, timeout=2).close()


@needs_squid
def test_squid_ends_when_the_supervisors_pipe_closes(state):
    gw = gateway.start(state, "t", (gateway.Allowed("localhost", 9),))
    pid = int((gw.directory / gateway.PID_FILE).read_text())
    gw.process.stdin.close()  # as when vmiso dies: the pipe closes
    gw.process.wait(15)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    gw.remove()


@needs_squid
def test_a_vmiso_killed_with_sigkill_leaves_no_squid_and_gc_removes_its_files(state):
    import subprocess
    import sys

    script = ("import sys, time\nfrom pathlib import Path\nfrom vmiso import gateway\n"
              "gw = gateway.start(Path(sys.argv[1]), 'k', (gateway.Allowed('localhost', 9),))\n"
              "print(gw.directory, flush=True)\ntime.sleep(600)\n")
    vmiso = subprocess.Popen([sys.executable, "-c", script, str(state)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    directory = Path(vmiso.stdout.readline().strip())
    pid = int((directory / gateway.PID_FILE).read_text())
    assert Path(f"/proc/{pid}").exists()
    vmiso.kill()  # SIGKILL: no cleanup of its own runs
    vmiso.wait()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()  # the supervisor saw the pipe close and ended squid
    assert [(item.kind, item.name) for item in reaper.find(None, state)] == [("gateway", directory.name)]
    assert reaper.clean(None, state).failed == [] and not directory.exists()


@needs_root
def test_a_gateway_starts_beside_another_users_squid(state, lan):
    # Another analyst's squid (here with squid's default service name) holds shared
    # memory segments of its own; each gateway names its own, so it neither opens
    # theirs nor fails on them.
    other = make_state_root()
    conf = other / "squid.conf"
    conf.write_text(f"http_port 127.0.0.9:{lan.loopback_port + 1}\npid_filename {other}/squid.pid\n"
                    f"cache_log {other}/cache.log\naccess_log none\ncache deny all\nhttp_access deny all\n")
    os.chown(other, pwd.getpwnam("vmiso-test").pw_uid, -1)
    conf.chmod(0o644)
    theirs = subprocess.Popen(["runuser", "-u", "vmiso-test", "--", "squid", "-N", "-f", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: any(p.name.startswith("squid-") for p in Path("/dev/shm").iterdir()), 10,
                 "the other squid's shared memory")
        gw = gateway.start(state, "t", (gateway.Allowed("mirror.vmiso.test", 80, "http"),),
                           hosts_file=lan.hosts_file)
        try:
            ok = _ask(gw.address, _get("http://mirror.vmiso.test/simple/", "mirror.vmiso.test"))
            assert _status(ok) == 200
        finally:
            gw.stop()
            gw.remove()
    finally:
        os.killpg(theirs.pid, signal.SIGTERM)
        theirs.wait(timeout=30)
        remove_tree(other)


def test_a_hosts_file_is_checked_when_the_config_is_read_and_copied_when_the_gateway_starts(write, state):
    with pytest.raises(ConfigError, match=r"provision\.hosts_file: .*missing is not a file"):
        config_mod.load(write("h.yaml", "provision:\n  hosts_file: missing\n"), env={})
    names = write("names", "10.213.77.2 index.vmiso.test\n")
    assert config_mod.load(write("g.yaml", "provision:\n  hosts_file: names\n"), env={}).provision.hosts_file == names
    names.unlink()  # gone between reading the config and starting the gateway
    with pytest.raises(ConfigError, match="provision.hosts_file: cannot read"):
        gateway.start(state, "t", (gateway.Allowed("index.vmiso.test", 443),), hosts_file=names)
    assert list(gateway.gateways_root(state).iterdir()) == []  # nothing left behind


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            found += children
            todo += children
    return found


@needs_squid
@needs_root
def test_the_process_that_parses_guest_bytes_has_no_environment_and_is_not_the_caller(state, monkeypatch):
    # The analyst's agent socket, home and session bus must not reach what hostile code talks to.
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/user/1000/agent.sock")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/1000/bus")
    gw = gateway.start(state, "t", (gateway.Allowed("localhost", 9),))
    try:
        processes = [gw.process.pid, *_descendants(gw.process.pid)]
        assert len(processes) >= 2  # the supervisor and squid (in the foreground: -N)
        for pid in processes:  # (Python's C-locale coercion sets LC_CTYPE, and passes nothing else)
            names = {v.split(b"=", 1)[0] for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if v}
            assert names <= {b"LC_CTYPE"}, (pid, names)
        proxy = pwd.getpwnam(gateway.PROXY_USER).pw_uid
        uids = {pid: int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                             if line.startswith("Uid:")).split()[2]) for pid in processes}
        assert uids[processes[-1]] == proxy, uids  # squid, once it reads requests: its own user
    finally:
        gw.stop()
        gw.remove()


@needs_squid
def test_the_kernel_caps_what_the_gateway_writes(state):
    # A guest that floods the gateway with requests must not fill the host's disk: past the
    # cap squid's write fails and squid ends, so the provisioning fails rather than goes on.
    cap = 256 * 1024
    gw = gateway.start(state, "t", (gateway.Allowed("localhost", 9),), file_max_bytes=cap)
    name = b"x" * 200 + b".example"
    request = b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (name, name)
    try:
        for _ in range(10 * cap // len(request)):
            try:
                _ask(gw.address, request)
            except ConnectionRefusedError:
                break
        else:
            pytest.fail("squid went on past the cap")
        gw.process.wait(10)  # its supervisor ends with it
        assert gw.access_log.stat().st_size == cap
        assert gateway.stopped_reason(gw) == "its record reached 256 KiB, the most a gateway may write"
    finally:
        gw.stop()
        gw.remove()
