"""Where vmiso's own data lives: the image recipes and the cloud-init templates.

They sit at the top of the source tree (``images/``, ``cloud-init/``) beside the
package.  A wheel carries them inside the package, as ``vmiso/_data/images`` and
``vmiso/_data/cloud_init`` (pyproject.toml maps them there); both places are
found from the package's own location, through ``importlib.resources``.  An
editable install or a bare checkout reads the source tree.  ``VMISO_DATA_DIR``
points at a relocated copy laid out like the source tree.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from .errors import VmisoError


def _candidates() -> list[tuple[Path, Path]]:
    """(images, cloud-init) directory pairs to try, in order."""
    override = os.environ.get("VMISO_DATA_DIR")
    if override:
        return [(Path(override) / "images", Path(override) / "cloud-init")]
    package = importlib.resources.files(__package__)
    if not isinstance(package, Path):  # e.g. imported from a zip file: its data are no files
        raise VmisoError(f"vmiso's data cannot be read as files from {package}",
                         "install vmiso with pip or pipx, or set VMISO_DATA_DIR")
    return [
        (package / "_data" / "images", package / "_data" / "cloud_init"),  # an installed wheel
        (package.parent / "images", package.parent / "cloud-init"),  # a checkout or editable install
    ]


def data_dirs() -> tuple[Path, Path]:
    """The directories of the image recipes and guest files, and of the cloud-init templates."""
    candidates = _candidates()
    for images, cloud_init in candidates:
        if images.is_dir() and cloud_init.is_dir():
            return images, cloud_init
    where = " or ".join(str(images.parent) for images, _ in candidates)
    raise VmisoError(
        f"vmiso's data (images/, cloud-init/) is not under {where}",
        "reinstall vmiso (a wheel with pip or pipx, or 'pip install -e' from its source tree), "
        "or set VMISO_DATA_DIR",
    )


def images_dir() -> Path:
    return data_dirs()[0]


def cloud_init_dir() -> Path:
    return data_dirs()[1]
