"""Known-bad packages: OSV advisories on disk, pip-audit's answers, and never a silent pass."""

from __future__ import annotations

import json
import os
import zipfile

import pytest

from vmiso.errors import ConfigError
from vmiso.image import audit

PACKAGES = [{"name": "Requests", "version": "2.19.0"}, {"name": "tabulate", "version": "0.9.0"},
            {"name": "ctx", "version": "0.2.6"}, {"name": "Jinja2", "version": "3.1.4"}]


def _advisory(id_: str, name: str, events: list, versions: list | None = None, aliases=()) -> dict:
    affected = {"package": {"ecosystem": "PyPI", "name": name}, "ranges": [{"type": "ECOSYSTEM", "events": events}]}
    if versions is not None:
        affected["versions"] = versions
    return {"schema_version": "1.6.0", "id": id_, "aliases": list(aliases), "affected": [affected]}


ADVISORIES = [
    # requests < 2.20.0 (CVE-2018-18074): 2.19.0 is in it
    _advisory("PYSEC-2018-28", "requests", [{"introduced": "0"}, {"fixed": "2.20.0"}], aliases=["CVE-2018-18074"]),
    # a malicious release, by exact version (the ctx compromise of 2022)
    _advisory("MAL-2022-1", "ctx", [{"introduced": "0"}], versions=["0.2.2", "0.2.6"]),
    # Jinja2 3.1.4 was the fix: not affected
    _advisory("GHSA-h75v-3vvj-5mfj", "jinja2", [{"introduced": "0"}, {"fixed": "3.1.4"}]),
    # tabulate: affected only through 0.8.0, then introduced again at 0.10 (neither holds 0.9.0)
    _advisory("TEST-1", "tabulate", [{"introduced": "0"}, {"last_affected": "0.8.0"}, {"introduced": "0.10.0"}]),
    # another ecosystem's package of the same name is not ours
    {"id": "TEST-2", "affected": [{"package": {"ecosystem": "npm", "name": "tabulate"},
                                   "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}]}]}]},
]


def test_osv_advisories_on_disk_name_what_is_affected_and_nothing_else(tmp_path):
    for i, record in enumerate(ADVISORIES):
        (tmp_path / f"{i}.json").write_text(json.dumps(record))
    found = audit.with_osv_files(PACKAGES, tmp_path).as_dict()
    assert [(v["name"], v["id"]) for v in found["vulnerable"]] == [("ctx", "MAL-2022-1"), ("requests", "PYSEC-2018-28")]
    assert found["vulnerable"][1]["fix"] == ["2.20.0"] and found["vulnerable"][1]["aliases"] == ["CVE-2018-18074"]
    assert found["unavailable"] is None and found["checked"]
    said = audit.lines(found)
    assert said[0].startswith("known vulnerabilities: 2 in 4 package(s) checked (OSV advisories in ")
    assert "  ctx==0.2.6: MAL-2022-1, no fixed version -- a MALICIOUS package report" in said
    # The same records as OSV publishes them, one zip per ecosystem.
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, record in enumerate(ADVISORIES):
            z.writestr(f"{i}.json", json.dumps(record))
    assert audit.with_osv_files(PACKAGES, archive).vulnerable == audit.with_osv_files(PACKAGES, tmp_path).vulnerable
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not JSON"):
        audit.with_osv_files(PACKAGES, tmp_path)


def test_without_a_network_nothing_is_passed(tmp_path):
    # Real pip-audit, whose every request meets a refused proxy: it says so, it never passes.
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               PIP_AUDIT_CACHE_DIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path))
    for service in ("pypi", "osv"):
        found = audit.with_pip_audit(PACKAGES, service, env=env).as_dict()
        assert found["vulnerable"] == [] and found["unavailable"].startswith("no network: "), found
        assert audit.lines(found)[0].startswith("known vulnerabilities: not checked (no network: ")


def test_pip_audits_answers_become_rows_and_a_package_it_does_not_know_is_not_checked(tmp_path, monkeypatch):
    # pip-audit's own JSON, as it prints it (a hit, a skip), read back through vmiso's reader.
    answer = {"dependencies": [
        {"name": "requests", "version": "2.19.0", "vulns": [
            {"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"], "aliases": ["CVE-2018-18074"], "description": "x"}]},
        {"name": "tabulate", "skip_reason": "Dependency not found on PyPI and could not be audited: tabulate (0.9.0)"},
    ], "fixes": []}
    monkeypatch.setattr(audit.tools, "run_for_status", lambda argv, timeout, env=None: (1, json.dumps(answer), ""))
    found = audit.with_pip_audit(PACKAGES, "pypi").as_dict()
    assert found["vulnerable"] == [{"name": "requests", "version": "2.19.0", "id": "PYSEC-2018-28",
                                    "aliases": ["CVE-2018-18074"], "fix": ["2.20.0"]}]
    assert [n["name"] for n in found["not_checked"]] == ["tabulate"]
    assert found["not_checked"][0]["version"] == "0.9.0"  # pip-audit leaves it out; vmiso knows it
    assert audit.lines(found)[0].startswith("known vulnerabilities: 1 in 3 package(s) checked (pip-audit (pypi)")
    # A service that knows none of them checked nothing: that is not "0 known".
    answer["dependencies"] = [{"name": p["name"], "skip_reason": "Dependency not found on PyPI"} for p in PACKAGES]
    nothing = audit.with_pip_audit(PACKAGES, "pypi").as_dict()
    assert audit.lines(nothing)[0].startswith("known vulnerabilities: not checked (the service knows none of the 4 ")
    assert audit.lines(found)[-1] == "  not checked: 1 package(s) the service does not know: tabulate==0.9.0"
