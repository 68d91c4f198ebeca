"""A lock of what provisioning installed: a PEP 751 ``pylock.toml`` from pip's installation report.

pip runs in the provisioning VM with ``--report``: for every distribution it
installed, the file it downloaded (URL and sha256), and whether that was a wheel
or an sdist it then built in the VM.  That report is the guest's account,
written while install-time code ran, so every field is checked here before it
goes into the lock (names, versions, URLs, digests of the expected form; a
local directory or a VCS checkout cannot be locked and is named), and the
downloads are matched with what the host itself saw: the gateway's record of
connections.  A download from a host the gateway never connected to, or a
connection that neither a download nor a package index explains, is shown.

The lock reinstalls elsewhere to the same hashes (``uv pip install -r pylock.toml``),
for the template's Python and platform.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from ..network import allow

LOCK_FILE = "pylock.toml"
REPORT_FILE = "pip-report.json"  # what provision.sh copies from pip install --report
REPORT_MAX_BYTES = 64 * 1024**2  # pip's report carries every distribution's METADATA

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9.+!_-]{1,100}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tgz")


@dataclass(frozen=True)
class Download:
    """One installed distribution and the file pip downloaded for it."""

    name: str
    version: str
    url: str
    sha256: str
    kind: str  # "wheel": installed as downloaded; "sdist": built in the VM from this file

    @property
    def host(self) -> str | None:
        """host:port, as the gateway's record names it (None: an IP address, never forwarded)."""
        found = allow.url_host(self.url, "pip's report")
        return f"{found.host}:{found.port}" if found else None


def _url_problem(url: Any) -> str | None:
    if not isinstance(url, str) or not 0 < len(url) <= 2000:
        return "no URL"
    if any(ord(c) < 0x21 or 0x7f <= ord(c) <= 0x9f for c in url):
        return "a URL with spaces or control characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http or https URL"
    if parts.username is not None or parts.password is not None:
        return "a URL with credentials"
    try:
        allow.url_host(url, "pip's report")
    except ConfigError:
        return "a URL with an invalid port"
    return None


def _kind(url: str) -> str | None:
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1]).lower()
    if filename.endswith(".whl"):
        return "wheel"
    if filename.endswith(_SDIST_SUFFIXES):
        return "sdist"
    return None


def _sha256(archive: dict[str, Any]) -> str | None:
    hashes = archive.get("hashes")
    if isinstance(hashes, dict) and isinstance(hashes.get("sha256"), str):
        return str(hashes["sha256"])
    legacy = archive.get("hash")
    if isinstance(legacy, str) and legacy.startswith("sha256="):
        return legacy.removeprefix("sha256=")
    return None


def read_report(text: str) -> tuple[list[Download], list[str]]:
    """pip's installation report (the guest's): the downloads, and why each entry that could not be
    locked was left out (shown as the guest wrote it; the caller neutralizes it for a terminal)."""
    try:
        report = json.loads(text)
    except ValueError:
        return [], ["pip's report is not JSON"]
    installs = report.get("install") if isinstance(report, dict) else None
    if not isinstance(installs, list):
        return [], ["pip's report lists no installs"]
    found: list[Download] = []
    problems: list[str] = []
    seen: set[str] = set()
    for item in installs:
        metadata = item.get("metadata") if isinstance(item, dict) else None
        info = item.get("download_info") if isinstance(item, dict) else None
        name = metadata.get("name") if isinstance(metadata, dict) else None
        version = metadata.get("version") if isinstance(metadata, dict) else None
        if not (isinstance(name, str) and _NAME.fullmatch(name) and isinstance(version, str)
                and _VERSION.fullmatch(version)):
            problems.append(f"an entry without a valid name and version: {str(name)[:80]!r} {str(version)[:40]!r}")
            continue
        label = f"{name}=={version}"
        if name.lower() in seen:
            problems.append(f"{label}: listed twice")
            continue
        seen.add(name.lower())
        if not isinstance(info, dict) or not isinstance(info.get("archive_info"), dict):
            source = "a local directory" if isinstance(info, dict) and "dir_info" in info else \
                "a VCS checkout" if isinstance(info, dict) and "vcs_info" in info else "no downloaded file"
            problems.append(f"{label}: {source}, which a lock cannot pin")
            continue
        url = info.get("url")
        problem = _url_problem(url)
        if problem is not None or not isinstance(url, str):
            problems.append(f"{label}: {problem}")
            continue
        digest = _sha256(info["archive_info"])
        if digest is None or not _SHA256.fullmatch(digest):
            problems.append(f"{label}: no sha256 of its file")
            continue
        kind = _kind(url)
        if kind is None:
            problems.append(f"{label}: {url} is neither a wheel nor an sdist")
            continue
        found.append(Download(name, version, url, digest, kind))
    return sorted(found, key=lambda d: d.name.lower()), problems


def _toml(value: str) -> str:
    """A TOML basic string: JSON's escapes (ASCII only) are TOML's."""
    return json.dumps(value, ensure_ascii=True)


def lock_text(downloads: Iterable[Download], *, image: str, template_sha256: str) -> str:
    """The PEP 751 lock of ``downloads``."""
    lines = [f"# What vmiso installed in the venv of image {image} (template sha256 {template_sha256}),",
             "# each file as pip downloaded it in the provisioning VM. It installs these for the",
             "# template's Python and platform: uv pip install -r pylock.toml",
             'lock-version = "1.0"', 'created-by = "vmiso"', ""]
    for d in downloads:
        lines += ["[[packages]]", f"name = {_toml(d.name)}", f"version = {_toml(d.version)}", ""]
        table = "[[packages.wheels]]" if d.kind == "wheel" else "[packages.sdist]"
        lines += [table, f"url = {_toml(d.url)}", f"hashes = {{sha256 = {_toml(d.sha256)}}}", ""]
        if d.kind == "sdist":
            lines += ["[packages.tool.vmiso]", 'built = "from this sdist, in the provisioning VM"', ""]
    return "\n".join(lines)


def explain(downloads: Iterable[Download], contacted: Iterable[str], index_urls: Iterable[str],
            other_sources: Iterable[str]) -> dict[str, list[str]]:
    """Downloads from a host the gateway never reached, and hosts it reached that no download, package
    index or ``other_sources`` (host:port, apt's mirrors) explain."""
    reached = set(contacted)
    from_hosts = {d.host for d in downloads}
    indexes = {f"{a.host}:{a.port}" for url in index_urls if (a := allow.url_host(url, "an index URL"))}
    return {
        "unexplained_downloads": sorted(d.url for d in downloads if d.host not in reached),
        "unexplained_hosts": sorted(reached - {h for h in from_hosts if h} - indexes - set(other_sources)),
    }
