"""The networked run's gateway (vmiso.network.gateway), driven as the guest drives it, with real sockets.

The guest's end of each connection is one end of a socket pair (in a run it is an SSH
channel); upstream services listen on this host's loopback, which the rules refuse
unless a test's resolver says otherwise."""

import socket
import threading
import time

import pytest

from vmiso.errors import ConfigError
from vmiso.network import allow, gateway as egress
from vmiso.network.allow import Allowed

from vmharness import client_hello


class Upstream:
    """A loopback service that keeps what it received and answers with ``reply``."""

    def __init__(self, reply: bytes = b"", close_after_reply: bool = True) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply, self.close_after_reply = reply, close_after_reply
        self.received = b""
        self.connections = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(2)
            try:
                if self.reply:
                    data = conn.recv(65536)
                    self.received += data
                    conn.sendall(self.reply)
                if not self.close_after_reply or not self.reply:
                    while data := conn.recv(65536):
                        self.received += data
                        if not self.reply:
                            conn.sendall(data)  # an echo
            except OSError:
                pass
            conn.close()
            self.done.set()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstream():
    made = []

    def make(*args, **kwargs) -> Upstream:
        made.append(Upstream(*args, **kwargs))
        return made[-1]
    yield make
    for u in made:
        u.close()


class Lookups(egress.Resolver):
    def __init__(self, names, **kwargs):
        super().__init__(names, **kwargs)
        self.asked = []

    def resolve(self, host, port):
        self.asked.append(host)
        return super().resolve(host, port)


def gateway_for(hosts=(), tcp=(), names=None, internal=()):
    """A run's gateway (a tunnel and plain http to each of ``hosts``) whose resolver knows ``names``."""
    rules = allow.Rules(tuple(Allowed(h, p, scheme) for h, p in hosts for scheme in ("https", "http")), tuple(tcp))
    return egress.Gateway(rules, Lookups(names or {}, internal=internal, own=()))


def connect(gateway, serve=None):
    """The guest's end of a new connection that ``serve`` (the proxy by default) handles."""
    guest, host_end = socket.socketpair()
    guest.settimeout(10)
    worker = threading.Thread(target=serve or gateway.serve_proxy, args=(host_end,), daemon=True)
    worker.start()
    return guest, worker


def read_all(sock: socket.socket) -> bytes:
    """Until the gateway closes (a reset too: it closes with the guest's bytes unread)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_tunnel_to_a_listed_host_carries_tls_that_names_it(upstream):
    service = upstream(reply=b"server hello")
    gw = gateway_for([("api.vmiso.test", service.port)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    guest.sendall(f"CONNECT api.vmiso.test:{service.port} HTTP/1.1\r\nHost: api.vmiso.test\r\n\r\n".encode())
    assert guest.recv(1024).startswith(b"HTTP/1.1 200 ")
    hello = client_hello("api.vmiso.test")
    guest.sendall(hello)
    assert guest.recv(1024) == b"server hello"
    guest.close()
    worker.join(10)
    assert service.received == hello
    [entry] = gw.record.entries
    assert entry["outcome"] == "contacted" and entry["sni"] == "api.vmiso.test"
    assert entry["upstream"] == "127.0.0.1" and entry["bytes_to_guest"] > len(b"server hello")
    assert entry["bytes_from_guest"] > len(hello)


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n", "hello for another site"])
def test_a_tunnel_that_asks_for_another_site_is_cut_before_it_reaches_it(upstream, first):
    service = upstream(reply=b"x")
    gw = gateway_for([("api.vmiso.test", service.port)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    guest.sendall(f"CONNECT api.vmiso.test:{service.port} HTTP/1.1\r\n\r\n".encode())
    assert guest.recv(1024).startswith(b"HTTP/1.1 200 ")
    guest.sendall(client_hello("other.example") if isinstance(first, str) else first)
    assert read_all(guest) == b""
    worker.join(10)
    [entry] = gw.record.entries
    assert entry["outcome"] == "refused" and not entry["allowed"] and entry["upstream"] is None
    time.sleep(0.2)  # what the service's kernel accepted, its thread has seen
    assert service.connections == 0  # not even a TCP handshake with the listed service
    assert ("other.example" in entry["reason"]) == isinstance(first, str), entry["reason"]


@pytest.mark.parametrize("request_line, why", [
    ("CONNECT telemetry.example.net:443", "not in this run's --allow-host"),
    ("CONNECT api.vmiso.test:8443", "not in this run's --allow-host"),  # another port of a listed host
    ("CONNECT 10.1.2.3:443", "IP address"),
    ("CONNECT [::1]:443", "IP address"),
    ("GET whois://api.vmiso.test:443/", "whois://"),
    ("GET ftp://api.vmiso.test:443/x", "ftp://"),
    ("GET gopher://api.vmiso.test:443/", "gopher://"),
    ("GET http://telemetry.example.net/", "not in this run's --allow-host"),
])
def test_what_is_not_listed_is_refused_without_a_lookup(request_line, why):
    gw = gateway_for([("api.vmiso.test", 443)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    guest.sendall(f"{request_line} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = read_all(guest)
    worker.join(10)
    assert answer.startswith((b"HTTP/1.1 403 ", b"HTTP/1.1 405 ")), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    # Nothing that names this host or the gateway's software: vmiso's own words only.
    assert [line.split(b":")[0] for line in head.split(b"\r\n")[1:]] == [b"Content-Type", b"Content-Length",
                                                                        b"Connection"]
    assert body.startswith(b"vmiso: ")
    [entry] = gw.record.entries
    assert entry["outcome"] == "refused" and why in entry["reason"]
    assert gw.resolver.asked == []  # a name that is not listed is never looked up


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "::1", "fe80::1", "::ffff:127.0.0.1",
                                     "192.0.2.77",
                                     # IPv4 dressed as IPv6: NAT64, SIIT, IPv4-compatible, 6to4, a local NAT64
                                     "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "::ffff:0:7f00:1", "::7f00:1",
                                     "2002:a9fe:a9fe::1", "64:ff9b:1::c000:24d"])
def test_a_listed_name_that_leads_here_or_to_metadata_is_refused(address):
    resolver = egress.Resolver({"api.vmiso.test": [address]}, own=["192.0.2.77"])
    gw = egress.Gateway(allow.Rules((Allowed("api.vmiso.test", 443),)), resolver)
    guest, worker = connect(gw)
    guest.sendall(b"CONNECT api.vmiso.test:443 HTTP/1.1\r\n\r\n")
    answer = read_all(guest)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert address.split(":")[-1].encode() not in answer.split(b"\r\n\r\n", 1)[1]  # the guest learns nothing
    worker.join(10)
    [entry] = gw.record.entries
    assert entry["outcome"] == "refused" and address.split(":")[-1] in entry["reason"]  # the record keeps it


def test_a_plain_request_goes_once_with_its_body_and_no_proxy_headers(upstream):
    service = upstream(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    gw = gateway_for([("api.vmiso.test", service.port)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    guest.sendall(f"POST http://api.vmiso.test:{service.port}/v1/x?y=1 HTTP/1.1\r\nHost: api.vmiso.test:"
                  f"{service.port}\r\nProxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
                  "Content-Length: 4\r\n\r\nbody".encode())
    # A second request on the same connection, for another site: never sent on.
    guest.sendall(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert read_all(guest).endswith(b"\r\n\r\nok")
    worker.join(10)
    head, _, body = service.received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?y=1 HTTP/1.1"
    assert f"Host: api.vmiso.test:{service.port}".encode() in lines and b"Connection: close" in lines
    assert not any(line.lower().startswith(b"proxy-") for line in lines)
    assert body == b"body"
    [entry] = gw.record.entries
    assert entry["outcome"] == "contacted" and entry["method"] == "POST"


@pytest.mark.parametrize("head, status", [
    (b"GET http://api.vmiso.test:{port}/ HTTP/1.1\r\nHost: other.example\r\n\r\n", b"403"),
    (b"POST http://api.vmiso.test:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411"),
    (b"BREW http://api.vmiso.test:{port}/ HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /relative HTTP/1.1\r\nHost: api.vmiso.test\r\n\r\n", b"400"),
    (b"\x16\x03\x01\x02\x00\x01\r\n\r\n", b"400"),
    (b"GET http://api.vmiso.test:{port}/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\n", b"400"),
    (b"GET http://api.vmiso.test:{port}/ HTTP/1.1\r\nX: a\nInjected: b\r\n\r\n", b"400"),
    (b"GET http://api.vmiso.test:{port}/ HTTP/1.1\r\nX: a\x01\x0bb\r\n\r\n", b"400"),  # controls in a value
])
def test_a_plain_request_the_gateway_will_not_vouch_for_reaches_nothing(upstream, head, status):
    service = upstream(reply=b"HTTP/1.1 200 OK\r\n\r\n")
    gw = gateway_for([("api.vmiso.test", service.port)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    guest.sendall(head.replace(b"{port}", str(service.port).encode()))
    assert read_all(guest).startswith(b"HTTP/1.1 " + status)
    worker.join(10)
    assert service.connections == 0
    [entry] = gw.record.entries
    assert entry["outcome"] in ("refused", "malformed") and not entry["allowed"]


def test_an_oversized_head_and_an_empty_connection_are_recorded_as_such():
    gw = gateway_for([("api.vmiso.test", 443)])
    guest, worker = connect(gw)
    guest.sendall(b"GET http://api.vmiso.test/ HTTP/1.1\r\nX: " + b"a" * (egress.HEAD_MAX + 10))
    assert read_all(guest).startswith(b"HTTP/1.1 400 ")
    worker.join(10)
    guest, worker = connect(gw)
    guest.close()
    worker.join(10)
    record = gw.record.as_dict(gw.rules)
    assert [e["outcome"] for e in record["connections"]] == ["malformed"]  # the empty one is counted
    assert record["empty"] == 1 and record["refused"][0]["host"] == "-"  # its head was never read
    assert "over 16384 bytes" in record["connections"][0]["reason"]


def test_a_tcp_route_joins_one_service_and_counts_both_ways(upstream):
    service = upstream()  # an echo
    route = allow.TcpRoute(5432, "db.vmiso.test", service.port)
    gw = gateway_for(tcp=[route], names={"db.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw, gw.routes()[5432])
    guest.sendall(b"ping")
    assert guest.recv(16) == b"ping"
    guest.shutdown(socket.SHUT_WR)
    assert read_all(guest) == b""
    worker.join(10)
    [entry] = gw.record.entries
    assert (entry["kind"], entry["method"], entry["host"], entry["port"]) == ("tcp", "TCP", "db.vmiso.test",
                                                                             service.port)
    assert entry["outcome"] == "contacted" and entry["bytes_from_guest"] == entry["bytes_to_guest"] == 4


def test_a_tcp_route_to_a_name_that_leads_here_connects_nowhere():
    route = allow.TcpRoute(5432, "db.vmiso.test", 5432)
    gw = egress.Gateway(allow.Rules(tcp=(route,)), egress.Resolver({"db.vmiso.test": ["127.0.0.1"]}, own=()))
    guest, worker = connect(gw, gw.routes()[5432])
    assert read_all(guest) == b""  # no error page on a raw connection: it just closes
    worker.join(10)
    assert gw.record.entries[0]["outcome"] == "refused"


def test_closing_the_gateway_cuts_every_open_tunnel(upstream):
    service = upstream()  # an echo that never closes by itself
    gw = gateway_for(tcp=[allow.TcpRoute(6000, "svc.vmiso.test", service.port)],
                     names={"svc.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw, gw.routes()[6000])
    guest.sendall(b"still here")
    assert guest.recv(16) == b"still here"
    gw.close()
    worker.join(10)
    assert not worker.is_alive()
    assert read_all(guest) == b""
    service.done.wait(5)
    assert service.done.is_set()  # the service saw the connection end too
    late, late_worker = connect(gw, gw.routes()[6000])
    assert read_all(late) == b""  # nothing new once the run is ending
    late_worker.join(10)
    assert gw.record.entries[-1]["reason"] == "the run was ending"


def test_a_flood_of_connections_hides_no_contact_and_holds_bounded_memory(monkeypatch, upstream):
    monkeypatch.setattr(egress, "RECORD_MAX", 3)
    monkeypatch.setattr(egress, "FOLDED_MAX", 2)
    service = upstream(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    gw = gateway_for([("api.vmiso.test", service.port)], names={"api.vmiso.test": ["127.0.0.1"]})
    for _ in range(20):  # connections that send nothing displace nothing
        guest, worker = connect(gw)
        guest.close()
        worker.join(10)
    for target in ["a", "b", "c", "d", "e", "f"]:  # more refused places than are kept or summed by name
        guest, worker = connect(gw)
        guest.sendall(f"CONNECT {target * 300}.example:443 HTTP/1.1\r\n\r\n".encode())
        read_all(guest)
        worker.join(10)
    guest, worker = connect(gw)
    guest.sendall(f"GET http://api.vmiso.test:{service.port}/ HTTP/1.1\r\n\r\n".encode())
    assert read_all(guest).startswith(b"HTTP/1.1 200")
    worker.join(10)
    record = gw.record.as_dict(gw.rules)
    assert record["empty"] == 20 and len(record["connections"]) == 3 and record["not_kept"] == 4
    assert [row["host"] for row in record["contacted"]] == [f"api.vmiso.test:{service.port}"]
    assert sum(row["connections"] for row in record["refused"]) == 6
    assert all(len(e["host"]) <= egress.FIELD_MAX + 3 for e in record["connections"])  # names cut short


@pytest.mark.parametrize("head", [
    "CONNECT evil.example:" + "9" * 5000 + " HTTP/1.1\r\n\r\n",  # past int()'s digit limit
    "GET http://evil.example:" + "1" * 5000 + "/ HTTP/1.1\r\n\r\n",
    "GET http://api.vmiso.test/ HTTP/1.1\r\nHost: api.vmiso.test:\xb2\r\n\r\n",  # isdigit(), not a digit
    "POST http://api.vmiso.test/ HTTP/1.1\r\nContent-Length: " + "1" * 5000 + "\r\n\r\n",
])
def test_numbers_that_are_not_ports_or_lengths_are_refused_and_recorded(head):
    gw = gateway_for([("api.vmiso.test", 80)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    guest.sendall(head.encode("latin-1"))
    assert read_all(guest).startswith((b"HTTP/1.1 400", b"HTTP/1.1 403"))
    worker.join(10)
    [entry] = gw.record.entries
    assert entry["outcome"] in ("malformed", "refused") and not entry["allowed"]


def test_a_trickle_of_bytes_does_not_stretch_the_deadline(monkeypatch):
    monkeypatch.setattr(egress, "READ_SECONDS", 0.5)
    gw = gateway_for([("api.vmiso.test", 80)], names={"api.vmiso.test": ["127.0.0.1"]})
    guest, worker = connect(gw)
    try:
        for byte in b"GET http://api.vmiso.test/ HTTP/1.1\r\nX: y":
            guest.sendall(bytes([byte]))
            time.sleep(0.05)
    except OSError:
        pass
    worker.join(10)
    assert gw.record.entries[0]["outcome"] == "malformed" and "within" in gw.record.entries[0]["reason"]


def _with_extension(hello: bytes, kind: int, data: bytes) -> bytes:
    """``hello`` (one record) with one more extension, every length fixed up."""
    body = bytearray(hello[9:])
    at = 34
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at:at + 2], "big")
    at += 1 + body[at]
    ext_len = int.from_bytes(body[at:at + 2], "big")
    extra = kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
    body[at:at + 2] = (ext_len + len(extra)).to_bytes(2, "big")
    body += extra
    handshake = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return hello[:3] + len(handshake).to_bytes(2, "big") + handshake


def test_an_sni_the_gateway_cannot_be_sure_of_is_no_sni():
    hello = client_hello("api.vmiso.test")
    assert egress.client_hello_sni(hello) == "api.vmiso.test"
    name = b"other.example"
    second = (len(name) + 3).to_bytes(2, "big") + b"\x00" + len(name).to_bytes(2, "big") + name
    assert egress.client_hello_sni(_with_extension(hello, 0, second)) is None  # two server_name extensions
    assert egress.client_hello_sni(_with_extension(hello, 0xFE0D, b"\x00" * 40)) is None  # ECH
    assert egress.client_hello_sni(_with_extension(hello, 0xFFCE, b"\x00" * 40)) is None  # ESNI
    assert egress.client_hello_sni(_with_extension(hello, 0x1234, b"")) == "api.vmiso.test"  # others are fine


def test_the_sni_reader_takes_real_hellos_and_never_fails_on_cut_or_forged_ones():
    hello = client_hello("Files.Example.org")
    assert egress.client_hello_sni(hello) == "files.example.org"
    for end in range(len(hello)):
        assert egress.client_hello_sni(hello[:end]) in (None, "files.example.org")
    forged = bytearray(hello)
    for at in range(5, min(len(hello), 200)):
        forged[at] ^= 0xFF
        egress.client_hello_sni(bytes(forged))  # never raises
        forged[at] ^= 0xFF
    assert egress.client_hello_sni(b"\x16\x03\x01\x00\x00") is None


@pytest.mark.parametrize("hosts, tcp, message", [
    (["10.0.0.1"], [], "IP address"),
    (["api.example.org:0"], [], "no valid port"),
    ([], ["80:db.example.org:5432"], "cannot be the job's local port"),
    ([], ["3128:db.example.org:5432"], "cannot be the job's local port"),
    ([], ["5432:127.0.0.1:5432"], "IP address"),
    ([], ["5432:db.example.org"], "LOCALPORT:HOST:PORT"),
    ([], ["5432:a.example.org:1", "5432:b.example.org:1"], "given twice"),
])
def test_rules_that_cannot_hold_are_refused_when_read(hosts, tcp, message):
    with pytest.raises(ConfigError, match=message):
        allow.for_run((), (), None, hosts, tcp)


def test_the_rules_of_the_config_and_the_flags_are_one():
    rules = allow.for_run(["api.example.org"], ["5432:db.example.org:5432"], None,
                           ["api.example.org", "other.example.org:8443"], ["6379:cache.example.org:6379"])
    assert rules.listed() == ["api.example.org:443", "other.example.org:8443"]
    assert [r.guest_port for r in rules.tcp] == [5432, 6379]
    assert rules.guest_env()["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert rules.guest_env()["no_proxy"] == "localhost,127.0.0.1,::1"
    assert not allow.Rules() and allow.Rules().guest_env() == {}
    assert allow.Rules(tcp=rules.tcp).guest_env() == {}  # a TCP route alone sets no proxy


def test_a_hosts_file_names_a_service_for_the_run(tmp_path):
    names = tmp_path / "hosts"
    names.write_text("# a comment\n10.213.79.2 API.vmiso.test api2.vmiso.test. # trailing\nnot-an-address x\n")
    read = egress.read_hosts_file(names, "run.hosts_file")
    assert read == {"api.vmiso.test": ["10.213.79.2"], "api2.vmiso.test": ["10.213.79.2"]}
    assert egress.Resolver(read, own=()).resolve("api.vmiso.test", 443) == [(socket.AF_INET, ("10.213.79.2", 443))]


def _mirror(upstream_port: int) -> egress.Gateway:
    """A provisioning's gateway to one plain-HTTP mirror on this host's loopback."""
    rules = allow.for_provisioning([Allowed("mirror.vmiso.test", upstream_port, "http")], None)
    return egress.Gateway(rules, Lookups({"mirror.vmiso.test": ["127.0.0.1"]}, internal=(), own=()))


def test_a_fetch_from_a_mirror_carries_only_what_a_fetch_needs(upstream):
    service = upstream(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    gw = _mirror(service.port)
    guest, worker = connect(gw)
    guest.sendall(f"GET http://mirror.vmiso.test:{service.port}/dists/InRelease HTTP/1.1\r\n"
                  f"Host: mirror.vmiso.test:{service.port}\r\nUser-Agent: Debian APT-HTTP/1.3\r\n"
                  "Range: bytes=0-9\r\nX-Forwarded-Host: other.example\r\nX-HTTP-Method-Override: DELETE\r\n"
                  "Forwarded: host=other.example\r\n\r\n".encode())
    assert read_all(guest).endswith(b"ok")
    worker.join(10)
    lines = service.received.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert lines[0] == b"GET /dists/InRelease HTTP/1.1"
    assert sorted(line.split(b":")[0].lower() for line in lines[1:]) == [b"connection", b"host", b"range",
                                                                         b"user-agent"]


def test_a_fetch_with_a_body_reaches_nothing(upstream):
    service = upstream(reply=b"HTTP/1.1 200 OK\r\n\r\n")
    gw = _mirror(service.port)
    guest, worker = connect(gw)
    # A body on a GET that a front end in the mirror's path might read as a second request.
    guest.sendall(f"GET http://mirror.vmiso.test:{service.port}/ HTTP/1.1\r\nContent-Length: 38\r\n\r\n"
                  "GET /x HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
    assert read_all(guest).startswith(b"HTTP/1.1 403 ")
    worker.join(10)
    assert service.connections == 0
    [entry] = gw.record.entries
    assert entry["outcome"] == "refused" and entry["reason"] == "a GET with a body"


def test_connections_refused_for_want_of_slots_are_recorded_and_named():
    gw = gateway_for([("api.vmiso.test", 443)])
    gw.busy(allow.PROXY_PORT)
    gw.busy(allow.PROXY_PORT)
    record = gw.record.as_dict(gw.rules)
    assert [(row["method"], row["connections"]) for row in record["refused"]] == [("BUSY", 2)]
    from vmiso.network.record import refused_hosts
    assert refused_hosts(record) == ["connections past the gateway's limit"]


def test_connections_summed_past_the_kept_ones_keep_every_address_and_sni(monkeypatch):
    monkeypatch.setattr(egress, "RECORD_MAX", 0)
    record = egress.Record()
    for upstream_address, sni, outcome in (("10.9.9.9", "api.vmiso.test", "contacted"),
                                           ("10.9.9.10", "api.vmiso.test", "contacted"),
                                           (None, "c2.attacker.example", "refused")):
        entry = record.open("proxy", allow.PROXY_PORT)
        entry.update(method="CONNECT", host="api.vmiso.test", port=443, outcome=outcome, sni=sni,
                     upstream=upstream_address, allowed=outcome == "contacted")
        record.finish(entry)
    summary = record.as_dict(allow.Rules())
    assert summary["contacted"][0]["upstream"] == ["10.9.9.9", "10.9.9.10"]
    assert [row["sni"] for row in summary["not_kept_rows"] if row["outcome"] == "refused"] == ["c2.attacker.example"]


def test_this_hosts_ipv6_addresses_are_read_as_ipv6():
    from pathlib import Path

    listed = Path("/proc/net/if_inet6")
    inet6 = listed.read_text() if listed.exists() else ""  # a host without IPv6 lists none
    found = egress.host_addresses()
    if "0" * 31 + "1" in inet6:
        assert "::1" in found
    assert "0.0.0.1" not in found


def test_ipv6_that_carries_a_public_ipv4_or_none_is_not_internal():
    resolver = egress.Resolver({}, own=["192.0.2.77"])
    assert [a for a in ("2001:db8::1", "64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "93.184.216.34")
            if resolver.internal(a)] == []
    assert [a for a in ("64:ff9b::c000:24d", "::ffff:192.0.2.77") if resolver.internal(a)] == [
        "64:ff9b::c000:24d", "::ffff:192.0.2.77"]  # this host's own address, through NAT64 or mapped
