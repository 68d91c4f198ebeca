"""The provisioning gateway: its allow-list from the config, squid's config, and a real squid on loopback."""

from __future__ import annotations

import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmiso import config as config_mod, gateway, reaper
from vmiso.config import Config, ImageConfig, PipOptions, ProvisionConfig
from vmiso.errors import ConfigError

from vmharness import make_state_root, remove_tree, wait_for


def make(**provision) -> Config:
    pip = provision.pop("pip", PipOptions())
    return Config(provision=ProvisionConfig(pip=pip, **provision))


def test_default_config_allows_pypi_its_file_host_and_the_mirror_only():
    assert [str(a) for a in gateway.allow_list(make())] == [
        "deb.debian.org:80", "files.pythonhosted.org:443", "pypi.org:443"]


def test_private_index_extra_indexes_and_allow_hosts():
    config = make(pip=PipOptions(index_url="https://pypi.corp.example/simple",
                                 extra_index_urls=("http://mirror.example:8080/simple",)),
                  allow_hosts=("files.corp.example", "wheels.example:8443"))
    assert [str(a) for a in gateway.allow_list(config)] == [
        "deb.debian.org:80", "files.corp.example:443", "mirror.example:8080", "pypi.corp.example:443",
        "wheels.example:8443"]  # no files.pythonhosted.org: the default index is not used


def test_a_cloud_image_uses_its_own_apt_sources_not_the_mirror():
    config = Config(image=ImageConfig(cloud_image=config_mod.CloudImage(Path("/x.qcow2"), "0" * 64)))
    hosts = [str(a) for a in gateway.allow_list(config, apt_urls=["http://ftp.example.org/debian"])]
    assert "deb.debian.org:80" not in hosts and "ftp.example.org:80" in hosts


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


def test_squid_config_listens_on_one_address_and_allows_by_name_and_port(tmp_path):
    allowed = (gateway.Allowed("pypi.org", 443), gateway.Allowed("files.pythonhosted.org", 443),
               gateway.Allowed("deb.debian.org", 80))
    text = gateway.squid_config(tmp_path, ("127.1.2.3", 40000), allowed, "proxy")
    assert "http_port 127.1.2.3:40000\n" in text
    assert text.count("http_port") == 1
    assert "acl vmiso_hosts_443 dstdomain -n files.pythonhosted.org pypi.org\n" in text
    assert "http_access allow vmiso_hosts_80 vmiso_port_80\n" in text
    assert text.rstrip().endswith("http_access deny all")
    assert "%>st %<st" in text


def test_access_log_becomes_connections_and_a_summary():
    log = ("1795809744.650 CONNECT pypi.org 443 200 TCP_TUNNEL 892 12389\n"
           "1795809744.673 CONNECT evil.example 443 403 TCP_DENIED 114 3386\n"
           "garbage line\n"
           "1795809744.818 GET deb.debian.org 80 200 TCP_MISS 158 149469\n")
    entries = gateway.parse_access_log(log)
    assert len(entries) == 3
    assert entries[1] == {"time": 1795809744.673, "method": "CONNECT", "host": "evil.example", "port": 443,
                          "allowed": False, "status": 403, "result": "TCP_DENIED", "bytes_from_guest": 114,
                          "bytes_to_guest": 3386}
    summary = gateway.summarize(entries)
    assert [h["host"] for h in summary["contacted"]] == ["deb.debian.org:80", "pypi.org:443"]
    assert summary["refused"] == [{"host": "evil.example:443", "connections": 1, "bytes_from_guest": 114,
                                   "bytes_to_guest": 3386}]


# --- a real squid, on loopback only -------------------------------------------------------

needs_squid = pytest.mark.skipif(shutil.which("squid", path="/usr/sbin:/usr/bin") is None,
                                 reason="squid is not installed (scripts/setup-host --test installs it)")


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def state():
    """squid runs as the proxy user: its directory must be reachable (pytest's tmp dirs are 0700)."""
    root = make_state_root()
    yield root / "state"
    remove_tree(root)


@pytest.fixture
def local_index():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _through(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data


@needs_squid
def test_a_real_squid_forwards_allowed_names_refuses_the_rest_and_records_bytes(tmp_path, state, local_index):
    allowed = (gateway.Allowed("localhost", local_index),)
    gw = gateway.start(state, "t", allowed)
    try:
        assert gw.address[0].startswith("127.") and gw.address[0] != "0.0.0.0"
        ok = _through(gw.address, f"GET http://localhost:{local_index}/simple/ HTTP/1.0\r\n\r\n".encode())
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"x" * 1000)
        for request in (f"GET http://127.0.0.1:{local_index}/ HTTP/1.0\r\n\r\n",  # an IP literal
                        "CONNECT blocked.invalid:443 HTTP/1.0\r\n\r\n",  # not allowed
                        "GET http://localhost:9/ HTTP/1.0\r\n\r\n"):  # an allowed name, another port
            assert _through(gw.address, request.encode()).startswith(b"HTTP/1.1 403"), request
    finally:
        gw.stop()
    assert not gw.running()
    summary = gateway.write_record(gw, tmp_path / "gateway.json")
    assert [h["host"] for h in summary["contacted"]] == [f"localhost:{local_index}"]
    assert summary["contacted"][0]["bytes_to_guest"] > 1000
    assert summary["contacted"][0]["bytes_from_guest"] > 0
    assert {h["host"] for h in summary["refused"]} == {"127.0.0.1:" + str(local_index), "blocked.invalid:443",
                                                     "localhost:9"}
    record = json.loads((tmp_path / "gateway.json").read_text())
    assert record["allow_list"] == [f"localhost:{local_index}"]
    asked = [c for c in record["connections"] if c["host"] != "-"]  # "-": start()'s readiness probe
    assert len(asked) == 4
    gw.remove()
    assert not gw.directory.exists()


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


def test_a_gateway_starts_beside_another_users_squid(tmp_path, state, local_index):
    # Another analyst's squid (here with squid's default service name) holds shared
    # memory segments of its own; each gateway names its own, so it neither opens
    # theirs nor fails on them.
    other = make_state_root()
    conf = other / "squid.conf"
    conf.write_text(f"http_port 127.0.0.9:{local_index + 1}\npid_filename {other}/squid.pid\n"
                    f"cache_log {other}/cache.log\naccess_log none\ncache deny all\nhttp_access deny all\n")
    os.chown(other, pwd.getpwnam("vmiso-test").pw_uid, -1)
    conf.chmod(0o644)
    theirs = subprocess.Popen(["runuser", "-u", "vmiso-test", "--", "squid", "-N", "-f", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: any(p.name.startswith("squid-") for p in Path("/dev/shm").iterdir()), 10,
                 "the other squid's shared memory")
        gw = gateway.start(state, "t", (gateway.Allowed("localhost", local_index),))
        try:
            ok = _through(gw.address, f"GET http://localhost:{local_index}/simple/ HTTP/1.0\r\n\r\n".encode())
            assert ok.startswith(b"HTTP/1.1 200")
        finally:
            gw.stop()
            gw.remove()
    finally:
        os.killpg(theirs.pid, signal.SIGTERM)
        theirs.wait(timeout=30)
        remove_tree(other)
