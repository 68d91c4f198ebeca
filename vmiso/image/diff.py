"""What changed between two templates: what an analyst reads before trusting an upgrade.

Both sides are read from the images' manifests (each inventory was read from the template
whose sha256 the manifest records, which ``vmiso images verify`` checks) and from the
gateway records the manifests pin (checked against their sha256 as they are read): the
distributions pip and dpkg reported, the start-up inventory of each sealed template
(inventory.py), and the hosts each provisioning reached or was refused.  Everything in them
came from a guest, so it is compared as data and shown by the caller as text that no
terminal obeys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

# The inventory's lists whose entries are keyed by path, and what of an entry says it changed.
_KEYED = {"pth": ("path", ("sha256", "executes")), "startup_modules": ("path", ("sha256",)),
          "native": ("path", ("sha256", "distribution")), "tampered": ("path", ("why",)),
          "entry_points": ("name", ("target",))}


def canonical_name(name: str) -> str:
    """A distribution's name as PEP 503 compares them (Typing_Extensions is typing-extensions)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions(a: Iterable[dict[str, str]], b: Iterable[dict[str, str]],
                   key: Callable[[str], str]) -> dict[str, list[dict[str, str]]]:
    old = {key(p["name"]): p for p in a}
    new = {key(p["name"]): p for p in b}
    return {
        "added": [new[k] for k in sorted(new.keys() - old.keys())],
        "removed": [old[k] for k in sorted(old.keys() - new.keys())],
        "changed": [{"name": new[k]["name"], "from": old[k]["version"], "to": new[k]["version"]}
                    for k in sorted(old.keys() & new.keys()) if old[k]["version"] != new[k]["version"]],
    }


def _keyed(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str,
           compared: tuple[str, ...]) -> dict[str, list[Any]]:
    old = {e[key]: e for e in a}
    new = {e[key]: e for e in b}
    return {
        "added": [new[k] for k in sorted(new.keys() - old.keys())],
        "removed": [old[k] for k in sorted(old.keys() - new.keys())],
        "changed": [{"from": old[k], "to": new[k]} for k in sorted(old.keys() & new.keys())
                    if any(old[k].get(f) != new[k].get(f) for f in compared)],
    }


def _startup(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The start-up inventories compared; None when either template was not inventoried."""
    if a is None or b is None:
        return None
    found: dict[str, Any] = {name: _keyed(a.get(name, []), b.get(name, []), key, compared)
                             for name, (key, compared) in _KEYED.items()}
    for name in ("unlisted", "unreadable"):
        old, new = set(a.get(name, [])), set(b.get(name, []))
        found[name] = {"added": sorted(new - old), "removed": sorted(old - new)}
    return found


def _hosts(gateway: dict[str, Any] | None, outcome: str) -> set[str]:
    return {row["host"] for row in gateway[outcome]} if gateway else set()


def _gateway(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    found: dict[str, Any] = {"recorded": [a is not None, b is not None]}
    for outcome in ("contacted", "refused"):
        old, new = _hosts(a, outcome), _hosts(b, outcome)
        found[outcome] = {"only_a": sorted(old - new), "only_b": sorted(new - old)}
    return found


def compare(a: dict[str, Any], b: dict[str, Any], gateway_a: dict[str, Any] | None,
            gateway_b: dict[str, Any] | None) -> dict[str, Any]:
    """Manifest ``a`` against manifest ``b`` (with each one's checked gateway summary): what B adds,
    removes or changes.  ``differ`` says whether anything an analyst would review differs."""
    found: dict[str, Any] = {
        "a": {"name": a.get("name"), "sha256": a.get("sha256"), "created": a.get("created")},
        "b": {"name": b.get("name"), "sha256": b.get("sha256"), "created": b.get("created")},
        "same_template": a.get("sha256") == b.get("sha256"),
        "base": {field: {"from": a.get(field), "to": b.get(field)} for field in ("python", "kernel")
                 if a.get(field) != b.get(field)},
        "pip": _distributions(a.get("pip", []), b.get("pip", []), canonical_name),
        "apt": _distributions(a.get("apt", []), b.get("apt", []), str),
        "startup": _startup(a.get("startup"), b.get("startup")),
        "gateway": _gateway(gateway_a, gateway_b),
    }
    found["differ"] = differs(found)
    return found


def differs(found: dict[str, Any]) -> bool:
    def any_entry(value: Any) -> bool:
        if isinstance(value, dict):
            return any(any_entry(v) for v in value.values())
        return bool(value) if isinstance(value, list) else False

    parts = [found["base"], found["pip"], found["apt"], found["startup"] or {},
             {k: v for k, v in found["gateway"].items() if k != "recorded"}]
    return bool(found["base"]) or any(any_entry(p) for p in parts)


def lines(found: dict[str, Any], limit: int = 40) -> list[str]:
    """The comparison as lines for a person (the caller makes them safe to print): the
    distributions, start-up code and hosts that B adds (+), removes (-) or changes (~)."""
    out: list[str] = []

    def cut(items: list[str]) -> list[str]:
        return items if len(items) <= limit else [*items[:limit], f"  ... and {len(items) - limit} more (--json)"]

    for field, change in found["base"].items():
        out.append(f"{field}: {change['from']} -> {change['to']}")
    for title, key in (("python packages", "pip"), ("debian packages", "apt")):
        part = found[key]
        if any(part.values()):
            out.append(f"{title}: {len(part['added'])} added, {len(part['removed'])} removed, "
                       f"{len(part['changed'])} changed")
            out.extend(cut([f"  + {p['name']}=={p['version']}" for p in part["added"]]
                           + [f"  - {p['name']}=={p['version']}" for p in part["removed"]]
                           + [f"  ~ {p['name']} {p['from']} -> {p['to']}" for p in part["changed"]]))
    startup = found["startup"]
    if startup is None:
        out.append("start-up code: not compared (a template provisioned before vmiso read it; provision it again)")
    else:
        out.extend(cut(_startup_lines(startup)))
    gateway = found["gateway"]
    for outcome, verb in (("contacted", "reached"), ("refused", "was refused")):
        for side, label in (("only_b", found["b"]["name"]), ("only_a", found["a"]["name"])):
            if hosts := gateway[outcome][side]:
                out.append(f"provisioning {label} only {verb}: {', '.join(hosts)}")
    if not all(gateway["recorded"]):
        out.append("gateway: no record for " + " and ".join(
            found[side]["name"] for side, kept in zip("ab", gateway["recorded"], strict=True) if not kept))
    return out


def _startup_lines(startup: dict[str, Any]) -> list[str]:
    out = []
    for entry in startup["pth"]["added"]:
        runs = f"runs {', '.join(entry['executes'])}" if entry["executes"] else "runs nothing"
        out.append(f"  + .pth file {entry['path']} ({runs} at every Python start)")
    for entry in startup["pth"]["removed"]:
        out.append(f"  - .pth file {entry['path']}")
    for change in startup["pth"]["changed"]:
        runs = ", ".join(change["to"]["executes"]) or "nothing"
        out.append(f"  ~ .pth file {change['to']['path']} changed (now runs {runs})")
    for sign, kind in (("+", "added"), ("-", "removed")):
        out.extend(f"  {sign} start-up module {e['path']}" for e in startup["startup_modules"][kind])
        owned: dict[str, int] = {}
        for e in startup["native"][kind]:
            if e.get("distribution"):
                owned[e["distribution"]] = owned.get(e["distribution"], 0) + 1
            else:
                out.append(f"  {sign} native extension {e['path']} (in no package's RECORD)")
        out.extend(f"  {sign} {n} native extension(s) of {owner}" for owner, n in sorted(owned.items()))
        out.extend(f"  {sign} file in no package {path}" for path in startup["unlisted"][kind])
        out.extend(f"  {sign} file that differs from its RECORD {e['path']} ({e['why']})"
                   for e in startup["tampered"][kind])
        out.extend(f"  {sign} console script {e['name']} -> {e['target']}" for e in startup["entry_points"][kind])
    out.extend(f"  ~ start-up module {c['to']['path']} changed" for c in startup["startup_modules"]["changed"])
    upgraded = [c for c in startup["native"]["changed"]
                if c["to"].get("distribution") and c["from"].get("distribution") != c["to"]["distribution"]]
    if upgraded:
        out.append(f"  ~ {len(upgraded)} native extension(s) changed with their package's version")
    for change in startup["native"]["changed"]:
        if change in upgraded:
            continue
        owner = change["to"].get("distribution")
        out.append(f"  ~ native extension {change['to']['path']} changed "
                   + (f"within the same {owner} (built again, or another file)" if owner
                      else "(in no package's RECORD)"))
    out.extend(f"  ~ console script {c['to']['name']} -> {c['to']['target']}"
               for c in startup["entry_points"]["changed"])
    return ["start-up code:", *out] if out else ["start-up code: the same"]
