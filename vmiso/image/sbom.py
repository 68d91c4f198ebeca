"""A template's SBOM: CycloneDX JSON made with cyclonedx-python-lib from the image's manifest.

The SBOM is a function of the manifest alone: the distributions pip reported in the
venv, the Debian packages dpkg reported, the native extensions and the SBOMs that wheels
carried (PEP 770), both from the start-up inventory read from the sealed template.  Its
serial number and timestamp come from the manifest too, so one template always gives
the same document, and ``vmiso images verify`` (which checks the template the manifest
describes) covers it.  Names and versions are the guest's: the library writes them as
JSON strings, never as anything that runs.

This is the one module that imports cyclonedx and packageurl.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, Property, XsUri
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from .. import __version__
from .diff import canonical_name
from .inventory import VENV

SPEC = "1.6"


def _sha256(digest: str | None) -> list[HashType]:
    return [HashType(alg=HashAlgorithm.SHA_256, content=digest)] if digest else []


def _created(manifest: dict[str, Any]) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(manifest["created"])
    except (KeyError, TypeError, ValueError):
        return None


def _dist_info_name(distribution: str) -> str:
    """``numpy-2.1.0`` (a .dist-info directory's name) -> numpy, as PEP 503 compares names."""
    return canonical_name(distribution.rsplit("-", 1)[0])


def bom_of(manifest: dict[str, Any]) -> Bom:
    """The CycloneDX BOM of the template that ``manifest`` describes."""
    name, digest = str(manifest.get("name") or "template"), str(manifest.get("sha256") or "")
    bom = Bom(serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"vmiso:template:{digest}"))
    if created := _created(manifest):
        bom.metadata.timestamp = created
    template = Component(
        name=name, version=digest[:12] or None, type=ComponentType.OPERATING_SYSTEM, bom_ref="template",
        description="a vmiso template: the sealed disk a run's clone starts from", hashes=_sha256(digest),
        properties=[Property(name="vmiso:version", value=str(manifest.get("vmiso") or __version__)),
                    *[Property(name=f"vmiso:{key}", value=str(manifest[key]))
                      for key in ("kernel", "python", "created") if manifest.get(key)]])
    bom.metadata.component = template
    startup = manifest.get("startup") or {}
    carried: dict[str, list[dict[str, Any]]] = {}
    for sbom in startup.get("sboms", []):
        carried.setdefault(_dist_info_name(sbom["distribution"]), []).append(sbom)
    natives: dict[str, list[dict[str, Any]]] = {}
    for native in startup.get("native", []):
        owner = _dist_info_name(native["distribution"]) if native.get("distribution") else ""
        natives.setdefault(owner, []).append(native)

    components: list[Component] = []
    for dist in manifest.get("pip", []):
        key = canonical_name(dist["name"])
        component = Component(
            name=dist["name"], version=dist["version"], type=ComponentType.LIBRARY, bom_ref=f"pypi:{key}",
            purl=PackageURL("pypi", name=key, version=dist["version"]),
            properties=[Property(name="vmiso:installed-in", value=VENV)],
            external_references=[ExternalReference(type=ExternalReferenceType.BOM, url=XsUri(f"file://{s['path']}"),
                                                   comment="an SBOM this distribution carried (PEP 770), in the "
                                                           "template", hashes=_sha256(s["sha256"]))
                                 for s in carried.get(key, [])])
        for native in natives.pop(key, []):
            component.components.add(_file(native, f"pypi:{key}:"))
        components.append(component)
    for dist in manifest.get("apt", []):
        components.append(Component(
            name=dist["name"], version=dist["version"], type=ComponentType.LIBRARY, bom_ref=f"deb:{dist['name']}",
            purl=PackageURL("deb", namespace="debian", name=dist["name"], version=dist["version"])))
    for native in [n for rest in natives.values() for n in rest]:  # in no package's RECORD, or its package's gone
        components.append(_file(native, "unowned:"))
    for component in components:
        bom.components.add(component)
    bom.register_dependency(template, components)
    return bom


def _file(native: dict[str, Any], prefix: str) -> Component:
    return Component(name=native["path"], type=ComponentType.FILE, bom_ref=prefix + native["path"],
                     hashes=_sha256(native.get("sha256")),
                     description="a native extension" + ("" if native.get("distribution")
                                                         else " that no package's RECORD lists"))


def sbom_json(manifest: dict[str, Any]) -> str:
    """The BOM as CycloneDX 1.6 JSON."""
    return JsonV1Dot6(bom_of(manifest)).output_as_string(indent=2)
