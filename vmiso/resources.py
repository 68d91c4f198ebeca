"""Where vmiso's own data lives: the image recipes and the cloud-init templates.

They sit at the top of the source tree (``images/``, ``cloud-init/``) beside the
package; vmiso is installed from its checkout (``pip install -e``), so the tree
is always there.  ``VMISO_DATA_DIR`` points elsewhere for a relocated copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import VmisoError


def data_root() -> Path:
    override = os.environ.get("VMISO_DATA_DIR")
    root = Path(override) if override else Path(__file__).resolve().parent.parent
    if not (root / "images").is_dir() or not (root / "cloud-init").is_dir():
        raise VmisoError(
            f"vmiso's data (images/, cloud-init/) is not under {root}",
            "install vmiso from its source tree with 'pip install -e', or set VMISO_DATA_DIR",
        )
    return root


def images_dir() -> Path:
    return data_root() / "images"


def cloud_init_dir() -> Path:
    return data_root() / "cloud-init"
