"""A run's inputs: checked on the host, then copied into the share the guest reads.

The user's files are never shared directly: each run gets its own copy, files
0644 and directories 0755, so nothing the guest does through the (read-only)
share can reach the originals, and a symbolic link in an input may not lead out
of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import VmisoError

GUEST_IN = "/in"


def _input_problem(root: Path) -> str | None:
    """Symlinks inside an input directory may not lead out of it."""
    base = root.resolve()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            if path.is_symlink():
                target = path.resolve()
                if target != base and base not in target.parents:
                    return f"{path} is a symbolic link to {target}, outside the input"
    return None


def check_inputs(inputs: tuple[Path, ...]) -> None:
    seen: dict[str, Path] = {}
    for path in inputs:
        if not path.exists():
            raise VmisoError(f"input {path} does not exist")
        if not (path.is_file() or path.is_dir()):
            raise VmisoError(f"input {path} is neither a file nor a directory")
        name = path.resolve().name
        if name in seen:
            raise VmisoError(f"inputs {seen[name]} and {path} would both appear as {GUEST_IN}/{name}",
                             "rename one of them")
        seen[name] = path
        if path.is_dir() and (problem := _input_problem(path)):
            raise VmisoError(f"input refused: {problem}", "copy the target into the input instead")


def stage_inputs(inputs: tuple[Path, ...], staging: Path) -> None:
    """Copy inputs into the run's read-only share: the user's files are never shared directly."""
    for path in inputs:
        target = staging / path.resolve().name
        if path.is_dir():
            shutil.copytree(path, target, symlinks=False, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(path, target)
    for directory, dirs, files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
