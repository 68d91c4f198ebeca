"""Checks a requirements file on the host before any VM is booted.

Only the file's text travels into the provisioning VM, so anything that points
at other host files (``-r``, ``-c``, ``-e``, local paths) cannot work there and
is refused here, with the line number.  The file is not interpreted beyond
that: pip, in the guest, stays the judge of what the lines mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MAX_BYTES = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(\[[A-Za-z0-9._,\s-]*\])?\s*($|[<>=!~;@\s])")
_ALLOWED_OPTIONS = {
    "--hash", "--index-url", "-i", "--extra-index-url", "--require-hashes",
    "--only-binary", "--no-binary", "--prefer-binary", "--pre", "--no-index",
}
_REFUSED_OPTIONS = {
    "-r": "nested requirement files", "--requirement": "nested requirement files",
    "-c": "constraint files", "--constraint": "constraint files",
    "-e": "editable installs", "--editable": "editable installs",
    "-f": "find-links", "--find-links": "find-links",
}


@dataclass(frozen=True)
class Requirements:
    path: Path
    text: str
    count: int
    hashed: int  # how many requirements carry --hash

    @property
    def has_hashes(self) -> bool:
        return self.hashed > 0


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations, drop comments; keep the first line number."""
    lines: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append((start, line))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def load_requirements(path: Path, require_hashes: bool | None) -> Requirements:
    where = f"requirements file {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist", "fix provision.requirements in vmiso.yaml") from None
    except OSError as err:
        raise ConfigError(f"cannot read {where}: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_BYTES} bytes; is it really a requirements file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    if "\0" in text:
        raise ConfigError(f"{where} is not a text file")
    count = hashed = 0
    for number, line in _logical_lines(text):
        first = line.split()[0].split("=", 1)[0]
        if first.startswith("-"):
            if first in _REFUSED_OPTIONS:
                raise ConfigError(
                    f"{path}:{number}: {_REFUSED_OPTIONS[first]} ({first}) are not supported",
                    "only this file travels into the VM; put every requirement in it",
                )
            if first not in _ALLOWED_OPTIONS:
                raise ConfigError(f"{path}:{number}: unknown or unsupported option {first!r}")
            continue
        if not _NAME.match(line):
            raise ConfigError(
                f"{path}:{number}: {line.split()[0]!r} is not a requirement",
                "write 'name', 'name==version' or 'name==version --hash=sha256:...'",
            )
        count += 1
        if "--hash" in line:
            hashed += 1
    if require_hashes is True and hashed < count:
        raise ConfigError(
            f"{where}: provision.pip.require_hashes is true, but {count - hashed} of {count} "
            "requirements have no --hash",
            "pin every requirement with --hash=sha256:... (pip-compile --generate-hashes does this)",
        )
    if require_hashes is None and 0 < hashed < count:
        raise ConfigError(
            f"{where}: {hashed} of {count} requirements have --hash and {count - hashed} do not",
            "pip then refuses the file; give every requirement a --hash, or none",
        )
    return Requirements(path=path, text=text, count=count, hashed=hashed)
