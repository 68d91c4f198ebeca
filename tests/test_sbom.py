"""A template's SBOM: CycloneDX JSON from its manifest, valid against the schema."""

from __future__ import annotations

import json

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from vmiso.image.sbom import sbom_json

SITE = "/opt/vmiso/venv/lib/python3.11/site-packages"
MANIFEST = {
    "name": "it", "sha256": "ab" * 32, "created": "2026-12-01T10:00:00+00:00", "kernel": "6.1.0-28-cloud-amd64",
    "python": "Python 3.11.2", "vmiso": "0.1.0",
    "pip": [{"name": "numpy", "version": "2.1.0"}, {"name": "Typing_Extensions", "version": "4.12.2"},
            {"name": "evil\u202ename", "version": "1.0\x1b[2J"}],
    "apt": [{"name": "python3", "version": "3.11.2-1+b1"}, {"name": "libc6", "version": "2.36-9+deb12u9"}],
    "startup": {"native": [{"path": f"{SITE}/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so",
                            "sha256": "cd" * 32, "size": 9, "distribution": "numpy-2.1.0"},
                           {"path": f"{SITE}/planted.so", "sha256": "ef" * 32, "size": 9, "distribution": None}],
                "sboms": [{"path": f"{SITE}/numpy-2.1.0.dist-info/sboms/numpy.cdx.json", "sha256": "12" * 32,
                           "size": 99, "distribution": "numpy-2.1.0"}]},
}


def test_the_sbom_names_every_distribution_package_and_native_file_and_validates():
    text = sbom_json(MANIFEST)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    assert bom["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": "ab" * 32}]
    purls = {c["purl"] for c in bom["components"] if "purl" in c}
    assert {"pkg:pypi/numpy@2.1.0", "pkg:pypi/typing-extensions@4.12.2", "pkg:deb/debian/python3@3.11.2-1%2Bb1",
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9"} <= purls
    numpy = next(c for c in bom["components"] if c.get("purl") == "pkg:pypi/numpy@2.1.0")
    assert [f["hashes"][0]["content"] for f in numpy["components"]] == ["cd" * 32]  # its native extension
    assert numpy["externalReferences"][0]["type"] == "bom"  # the SBOM its wheel carried
    assert numpy["externalReferences"][0]["hashes"] == [{"alg": "SHA-256", "content": "12" * 32}]
    unowned = [c for c in bom["components"] if c["type"] == "file"]
    assert [c["name"] for c in unowned] == [f"{SITE}/planted.so"]
    assert "no package's RECORD" in unowned[0]["description"]
    # The guest's names are data: JSON strings, escaped by the library, never raw control bytes.
    assert "\x1b" not in text and "\u202e" not in text
    # One template, one document: the same manifest gives the same SBOM.
    assert sbom_json(MANIFEST) == text
    assert bom["serialNumber"] == json.loads(sbom_json(dict(MANIFEST)))["serialNumber"]
    assert bom["serialNumber"] != json.loads(sbom_json(dict(MANIFEST, sha256="ff" * 32)))["serialNumber"]
