"""What a gateway leaves: its record of every connection, summarized, and kept as an image's record.

A gateway (vmiso.network.gateway) records each connection as it ends; a run's
record goes to its --json, a provisioning's becomes the image's ``gateway.json``,
whose digest the manifest keeps and which ``vmiso images show`` summarizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .allow import Allowed

RECORD = "gateway.json"
# What became of one connection: "contacted" when the gateway connected to an upstream
# address for it; "refused" when the rules said no; "malformed" when it could not read a
# request at all; "failed" when it was allowed but reached nothing; "empty" when a
# connection closed having sent nothing (the guest's own wait for the gateway makes one).
# (Records of images provisioned when squid was the gateway have the same fields.)
OUTCOMES = ("contacted", "refused", "malformed", "failed", "empty")


def _target(entry: dict[str, Any]) -> str:
    return f"{entry['host']}:{entry['port']}" if entry["port"] is not None else entry["host"]


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per outcome, one row per host:port and method, with request counts, bytes and upstream addresses.

    "refused" holds the malformed requests too (host "-" when the gateway read none): only a
    request the gateway forwarded to an upstream address counts as contact.  "empty" counts the
    connections that sent nothing: they asked for nothing and reached nothing.
    """
    def rows(outcomes: tuple[str, ...]) -> list[dict[str, Any]]:
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for e in entries:
            if e.get("outcome", "contacted" if e.get("allowed") else "refused") not in outcomes:
                continue
            method = e.get("method") or "-"
            item = seen.setdefault((_target(e), method), {
                "host": _target(e), "method": method, "connections": 0, "bytes_from_guest": 0,
                "bytes_to_guest": 0, "upstream": []})
            item["connections"] += e.get("connections", 1)  # a row of connections summed (gateway.Record)
            item["bytes_from_guest"] += e["bytes_from_guest"]
            item["bytes_to_guest"] += e["bytes_to_guest"]
            for address in (e.get("upstream"), *e.get("upstreams", ())):  # a summed row keeps several
                if address and address not in item["upstream"]:
                    item["upstream"].append(address)
        return sorted(seen.values(), key=lambda i: (i["host"], i["method"]))
    return {"contacted": rows(("contacted",)), "refused": rows(("refused", "malformed")),
            "failed": rows(("failed",)), "empty": sum(1 for e in entries if e.get("outcome") == "empty")}


def write_record(record: dict[str, Any], allowed: Iterable[Allowed], target: Path) -> dict[str, Any]:
    """A gateway's record (gateway.Record.as_dict) as the image's record (JSON): every connection,
    the rows of those past the kept count, how many sent nothing, and the allow-list; its summary."""
    connections = record["connections"] + record["not_kept_rows"]
    data = {"allow_list": [str(a) for a in sorted(set(allowed))], "connections": connections,
            "not_kept": record["not_kept"], "empty": record["empty"]}
    target.write_text(json.dumps(data, indent=1) + "\n")
    os.chmod(target, 0o644)
    return {**summarize(connections), "empty": record["empty"]}


def named(places: list[str], most: int = 10) -> str:
    """Places for one line: the first ``most`` by name, then how many more (the guest chose them, and
    how many: a flood of names must not flood the analyst's terminal)."""
    shown = ", ".join(places[:most])
    return shown + (f" and {len(places) - most} more" if len(places) > most else "")


def refused_hosts(record: dict[str, Any]) -> list[str]:
    """The places a gateway refused, by name, once each (gateway.Record.as_dict's summary)."""
    shown: list[str] = []
    for item in record["refused"]:
        name = ("connections past the gateway's limit" if item["method"] == "BUSY"
                else "a malformed request" if item["host"] == "-" else item["host"])
        if name not in shown:
            shown.append(name)
    return shown


def image_record(image_dir: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The record's summary from the manifest, after checking the file against its digest there."""
    entry = manifest.get("gateway")
    if not entry:
        return None
    path = image_dir / entry["record"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"the gateway record {path} is unreadable: {err.strerror}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ImageError(f"the gateway record {path} does not match the sha256 in the manifest",
                         "the record was changed; provision the image again")
    record = json.loads(data)
    summary = summarize(record["connections"])
    return {"record": entry["record"], "sha256": entry["sha256"], "allow_list": record["allow_list"],
            **summary, "empty": record.get("empty", summary["empty"])}
