"""Known-bad packages: a template's Python distributions checked against advisories, on the host.

Two sources, both read as data:

- pip-audit (PyPA's auditor, an optional dependency: ``pip install vmiso[audit]``)
  asks PyPI or OSV about each pinned ``name==version``; it runs without resolving
  and without pip (``--no-deps --disable-pip``), so nothing of the template is
  installed or run.  A package the service does not know is *not checked*, never
  passed, and a host without a network says so.
- OSV-format advisories on disk (``--osv PATH``: a directory of OSV JSON files, or
  the ``all.zip`` that OSV publishes per ecosystem), for a host without a network;
  each affected range is evaluated here with ``packaging``'s PEP 440 versions.
  OSV holds the malicious-package reports too (``MAL-`` ids).

The result carries its date: an audit says what was known then.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from .. import tools
from ..errors import ConfigError, ToolError
from .diff import canonical_name

AUDIT_TIMEOUT = 300
OSV_MAX_FILE_BYTES = 16 * 1024**2


@dataclass
class Audit:
    """What an audit found: ``vulnerable`` rows, packages ``not_checked`` (and why), or ``unavailable``
    (nothing was checked: no network, no pip-audit)."""

    source: str
    checked: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    vulnerable: list[dict[str, Any]] = field(default_factory=list)  # {"name", "version", "id", "aliases", "fix"}
    not_checked: list[dict[str, str]] = field(default_factory=list)  # {"name", "version", "why"}
    unavailable: str | None = None
    packages: int = 0  # how many distributions were asked about

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "checked": self.checked, "packages": self.packages,
                "vulnerable": self.vulnerable, "not_checked": self.not_checked, "unavailable": self.unavailable}


def _pinned(packages: Iterable[dict[str, str]]) -> list[tuple[str, str]]:
    return sorted({(canonical_name(p["name"]), p["version"]) for p in packages})


# --- pip-audit --------------------------------------------------------------------------


def has_pip_audit() -> bool:
    return importlib.util.find_spec("pip_audit") is not None


def with_pip_audit(packages: Iterable[dict[str, str]], service: str = "pypi",
                   env: dict[str, str] | None = None) -> Audit:
    """Ask ``service`` (pypi or osv) through pip-audit about each distribution."""
    pinned = _pinned(packages)
    audit = Audit(source=f"pip-audit ({service})", packages=len(pinned))
    if not has_pip_audit():
        audit.unavailable = "pip-audit is not installed (pip install 'vmiso[audit]'), and no --osv advisories given"
        return audit
    if not pinned:
        return audit
    with tempfile.TemporaryDirectory(prefix="vmiso-audit-") as work:
        requirements = Path(work) / "requirements.txt"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in pinned))
        try:
            status, out, err = tools.run_for_status(tools.pip_audit_argv(requirements, service),
                                                    timeout=AUDIT_TIMEOUT, env=env)
        except ToolError as failed:
            audit.unavailable = failed.message
            return audit
    try:
        report = json.loads(out) if out.strip() else None
    except ValueError:
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("dependencies"), list):
        last = (err.strip().splitlines() or ["no output"])[-1][:300]
        network = any(word in err for word in ("ConnectionError", "NameResolutionError", "Max retries",
                                                "ProxyError", "Connection refused"))
        audit.unavailable = ("no network: " if network else f"pip-audit failed (exit status {status}): ") + last
        return audit
    versions = dict(pinned)  # pip-audit leaves the version out of a package it skipped
    for dependency in report["dependencies"]:
        name = str(dependency.get("name", "?"))
        version = str(dependency.get("version") or versions.get(canonical_name(name), "?"))
        if dependency.get("skip_reason"):
            audit.not_checked.append({"name": name, "version": version, "why": str(dependency["skip_reason"])})
            continue
        for vuln in dependency.get("vulns", []):
            audit.vulnerable.append({"name": name, "version": version, "id": str(vuln.get("id")),
                                     "aliases": [str(a) for a in vuln.get("aliases", [])],
                                     "fix": [str(v) for v in vuln.get("fix_versions", [])]})
    return audit


# --- OSV advisories on disk -----------------------------------------------------------------


def _osv_records(path: Path) -> Iterator[dict[str, Any]]:
    """The OSV records in a directory of .json files (any depth) or in an OSV zip export."""
    def parse(data: bytes, where: str) -> dict[str, Any]:
        try:
            record = json.loads(data)
        except ValueError:
            raise ConfigError(f"--osv: {where} is not JSON", "give OSV-format advisories (osv.dev)") from None
        if not isinstance(record, dict):
            raise ConfigError(f"--osv: {where} is not an OSV record", "give OSV-format advisories (osv.dev)")
        return record

    if path.is_dir():
        for file in sorted(path.rglob("*.json")):
            if file.is_file() and not file.is_symlink() and file.stat().st_size <= OSV_MAX_FILE_BYTES:
                yield parse(file.read_bytes(), str(file))
        return
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise ConfigError(f"--osv {path}: neither a directory nor a zip of OSV records ({err})",
                          "download https://osv-vulnerabilities.storage.googleapis.com/PyPI/all.zip") from None
    with archive:
        for info in archive.infolist():
            if info.filename.endswith(".json") and info.file_size <= OSV_MAX_FILE_BYTES:
                yield parse(archive.read(info), f"{path}:{info.filename}")


def _version(text: Any) -> Version | None:
    try:
        return Version(str(text))
    except InvalidVersion:
        return None


def _in_range(version: Version, events: list[dict[str, Any]]) -> bool:
    """OSV's ECOSYSTEM range: sorted events; affected from an 'introduced' until a 'fixed' (excluded)
    or through a 'last_affected' (included)."""
    def key(event: dict[str, Any]) -> tuple[int, Version]:
        value = next(iter(event.values()), "0")
        return (0, Version("0")) if value == "0" else (1, _version(value) or Version("0"))

    affected = False
    for event in sorted((e for e in events if isinstance(e, dict) and e), key=key):
        kind, value = next(iter(event.items()))
        at = Version("0") if kind == "introduced" and value == "0" else _version(value)
        if at is None:
            continue
        if kind == "introduced" and version >= at:
            affected = True
        elif (kind == "fixed" and version >= at) or (kind == "last_affected" and version > at):
            affected = False
    return affected


def _affects(record: dict[str, Any], name: str, version: str) -> bool:
    parsed = _version(version)
    for affected in record.get("affected", []):
        package = affected.get("package", {}) if isinstance(affected, dict) else {}
        if package.get("ecosystem") != "PyPI" or canonical_name(str(package.get("name", ""))) != name:
            continue
        if version in [str(v) for v in affected.get("versions", [])]:
            return True
        if parsed is None:
            continue
        for found in affected.get("ranges", []):
            if not isinstance(found, dict) or found.get("type") != "ECOSYSTEM":
                continue
            if _in_range(parsed, found.get("events", [])):
                return True
    return False


def with_osv_files(packages: Iterable[dict[str, str]], path: Path) -> Audit:
    """Check each distribution against the OSV records at ``path``."""
    pinned = _pinned(packages)
    audit = Audit(source=f"OSV advisories in {path}", packages=len(pinned))
    wanted = {name for name, _ in pinned}
    pypi = 0  # advisories about PyPI packages read: with none, nothing was checked
    for record in _osv_records(path):
        affected = [a["package"] for a in record.get("affected", [])
                    if isinstance(a, dict) and isinstance(a.get("package"), dict)]
        names = {canonical_name(str(package.get("name", ""))) for package in affected}
        pypi += any(package.get("ecosystem") == "PyPI" for package in affected)
        for name, version in pinned:
            if name in names & wanted and _affects(record, name, version):
                fixes = sorted({str(e["fixed"]) for a in record.get("affected", []) if isinstance(a, dict)
                                for r in a.get("ranges", []) if isinstance(r, dict)
                                for e in r.get("events", []) if isinstance(e, dict) and "fixed" in e})
                audit.vulnerable.append({"name": name, "version": version, "id": str(record.get("id")),
                                         "aliases": [str(a) for a in record.get("aliases", [])], "fix": fixes})
    audit.vulnerable.sort(key=lambda v: (v["name"], v["id"]))
    if not pypi:
        audit.unavailable = f"no advisory about a PyPI package in {path}"
    return audit


def lines(audit: dict[str, Any]) -> list[str]:
    """An audit for a person (the caller makes the lines safe to print)."""
    when = f"{audit['source']}, checked {audit['checked']}"
    if audit["unavailable"]:
        return [f"known vulnerabilities: not checked ({audit['unavailable']}; {when})"]
    checked = audit.get("packages", 0) - len(audit["not_checked"])
    if checked <= 0 and audit["not_checked"]:
        out = [f"known vulnerabilities: not checked (the service knows none of the {len(audit['not_checked'])} "
               f"package(s); {when})"]
    else:
        out = [f"known vulnerabilities: {len(audit['vulnerable'])} in {checked} package(s) checked ({when})"]
    out += [f"  {v['name']}=={v['version']}: {v['id']}" + (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")
            + (f", fixed in {', '.join(v['fix'])}" if v["fix"] else ", no fixed version")
            + (" -- a MALICIOUS package report" if v["id"].startswith("MAL-") else "") for v in audit["vulnerable"]]
    if audit["not_checked"]:
        out.append(f"  not checked: {len(audit['not_checked'])} package(s) the service does not know: "
                   + ", ".join(f"{n['name']}=={n['version']}" for n in audit["not_checked"]))
    return out
