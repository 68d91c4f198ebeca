"""The lock of what provisioning installed: pip's report (the guest's account), checked, as PEP 751."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from vmiso.image import lock

WHEEL = "https://files.pythonhosted.org/packages/40/44/4a5f08c96eb108af5cb50b41f76142f0afa346dfa99d5296fe7202a11854/tabulate-0.9.0-py3-none-any.whl"
SDIST = "https://files.pythonhosted.org/packages/source/d/docopt/docopt-0.6.2.tar.gz"


def _install(name: str, version: str, download_info) -> dict:
    return {"download_info": download_info, "is_direct": False, "requested": True,
            "metadata": {"metadata_version": "2.1", "name": name, "version": version, "summary": "x" * 100}}


def _archive(url: str, digest: str, legacy: bool = False) -> dict:
    return {"url": url, "archive_info": {"hash": f"sha256={digest}"} if legacy else
            {"hash": f"sha256={digest}", "hashes": {"sha256": digest}}}


def report(*installs) -> str:
    """pip install --report's format (version 1, as pip 23 writes it)."""
    return json.dumps({"version": "1", "pip_version": "23.0.1", "install": list(installs),
                       "environment": {"implementation_name": "cpython"}})


def test_the_lock_pins_each_download_and_names_what_it_cannot_pin():
    text = report(
        _install("tabulate", "0.9.0", _archive(WHEEL, "a" * 64)),
        _install("docopt", "0.6.2", _archive(SDIST, "b" * 64, legacy=True)),  # built in the VM
        _install("local", "1.0", {"url": "file:///tmp/local", "dir_info": {}}),
        _install("fromgit", "1.0", {"url": "https://example.org/x.git", "vcs_info": {"vcs": "git"}}),
        _install("evil\x1b]0;x\x07", "1.0", _archive(WHEEL, "c" * 64)),
        _install("spaced", "1.0", _archive("https://files.pythonhosted.org/a b.whl", "d" * 64)),
        _install("plain", "1.0", _archive("ftp://files.example/plain-1.0.whl", "e" * 64)),
        _install("nohash", "1.0", _archive("https://files.pythonhosted.org/nohash-1.0.whl", "not-hex")),
        _install("odd", "1.0", _archive("https://files.pythonhosted.org/odd-1.0.exe", "f" * 64)),
        _install("tabulate", "0.9.0", _archive(WHEEL, "a" * 64)),  # twice
    )
    downloads, problems = lock.read_report(text)
    assert [(d.name, d.kind, d.sha256) for d in downloads] == [("docopt", "sdist", "b" * 64),
                                                              ("tabulate", "wheel", "a" * 64)]
    assert problems == [
        "local==1.0: a local directory, which a lock cannot pin",
        "fromgit==1.0: a VCS checkout, which a lock cannot pin",
        "an entry without a valid name and version: 'evil\\x1b]0;x\\x07' '1.0'",
        "spaced==1.0: a URL with spaces or control characters",
        "plain==1.0: not an http or https URL",
        "nohash==1.0: no sha256 of its file",
        "odd==1.0: https://files.pythonhosted.org/odd-1.0.exe is neither a wheel nor an sdist",
        "tabulate==0.9.0: listed twice",
    ]
    locked = tomllib.loads(lock.lock_text(downloads, image="it", template_sha256="9" * 64))
    assert locked["lock-version"] == "1.0" and locked["created-by"] == "vmiso"
    assert locked["packages"] == [
        {"name": "docopt", "version": "0.6.2", "sdist": {"url": SDIST, "hashes": {"sha256": "b" * 64}},
         "tool": {"vmiso": {"built": "from this sdist, in the provisioning VM"}}},
        {"name": "tabulate", "version": "0.9.0", "wheels": [{"url": WHEEL, "hashes": {"sha256": "a" * 64}}]},
    ]
    assert lock.read_report("not json") == ([], ["pip's report is not JSON"])
    assert lock.read_report('{"install": 3}') == ([], ["pip's report lists no installs"])


def test_downloads_and_connections_are_matched_with_the_gateways_record():
    downloads, _ = lock.read_report(report(
        _install("tabulate", "0.9.0", _archive(WHEEL, "a" * 64)),
        _install("probe", "1.0", _archive("http://index.example:8080/files/probe-1.0-py3-none-any.whl", "b" * 64))))
    contacted = ["pypi.org:443", "files.pythonhosted.org:443", "deb.debian.org:80", "telemetry.example.net:443"]
    found = lock.explain(downloads, contacted, ["https://pypi.org/simple"], ["deb.debian.org:80"])
    # The probe's file came from a host the gateway never reached: pip's account and the host's differ.
    assert found == {"unexplained_downloads": ["http://index.example:8080/files/probe-1.0-py3-none-any.whl"],
                     "unexplained_hosts": ["telemetry.example.net:443"]}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A wheel on an HTTP server on this host's loopback."""
    import zipfile

    files = tmp_path / "files"
    files.mkdir()
    wheel = files / "vmiso_lock_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("vmiso_lock_probe.py", "VALUE = 42\n")
        archive.writestr("vmiso_lock_probe-1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: vmiso-lock-probe\nVersion: 1.0\n")
        archive.writestr("vmiso_lock_probe-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("vmiso_lock_probe-1.0.dist-info/RECORD", "")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(files)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        yield f"http://127.0.0.1:{server.server_address[1]}/{wheel.name}", digest
    finally:
        server.shutdown()


def test_the_lock_reinstalls_elsewhere_to_the_same_hashes(served, tmp_path):
    url, digest = served
    downloads, problems = lock.read_report(report(_install("vmiso-lock-probe", "1.0", _archive(url, digest))))
    assert problems == []
    uv = Path(sys.executable).with_name("uv")
    env = dict(os.environ, UV_CACHE_DIR=str(tmp_path / "uv-cache"), UV_NO_CONFIG="1")

    def install(text: str, venv: Path) -> subprocess.CompletedProcess:
        (tmp_path / "pylock.toml").write_text(text)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        return subprocess.run([str(uv), "pip", "install", "--python", str(venv / "bin/python"), "-r",
                               str(tmp_path / "pylock.toml")], capture_output=True, text=True, timeout=300, env=env)

    done = install(lock.lock_text(downloads, image="it", template_sha256="9" * 64), tmp_path / "a")
    assert done.returncode == 0, done.stderr
    value = subprocess.run([str(tmp_path / "a/bin/python"), "-c", "import vmiso_lock_probe as p; print(p.VALUE)"],
                           capture_output=True, text=True, timeout=60)
    assert value.stdout.strip() == "42"
    # A file that is not the one locked is refused.
    wrong = lock.Download("vmiso-lock-probe", "1.0", url, "0" * 64, "wheel")
    refused = install(lock.lock_text([wrong], image="it", template_sha256="9" * 64), tmp_path / "b")
    assert refused.returncode != 0 and "hash" in refused.stderr.lower()
