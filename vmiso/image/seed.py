"""The cloud-init NoCloud seed for a provisioning boot: user-data, meta-data, the ISO.

The static part of the user-data is ``cloud-init/user-data.yaml``; the parts that
differ per image are added here as dicts and everything is written with
``yaml.safe_dump`` (through vmiso.config, the one module that imports yaml).  No
YAML is ever assembled from strings.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import tools
from ..config import PipOptions, check_apt_packages, dump_yaml, load_yaml
from ..resources import cloud_init_dir

RUN_USER = "vmiso"


@dataclass(frozen=True)
class SeedInputs:
    instance_id: str
    hostname: str
    host_key_private: str
    host_key_public: str
    authorized_key: str
    ca_pems: tuple[str, ...] = ()
    requirements: str = ""
    apt_packages: tuple[str, ...] = ()
    # (path, text, mode) of vmiso's files for images it did not build (cloud images).
    guest_files: tuple[tuple[str, str, int], ...] = ()
    pip: PipOptions = field(default_factory=PipOptions)
    require_hashes: bool = False
    gateway_port: int = 3128  # the guest's port that the host forwards to the gateway


def provision_env(inputs: SeedInputs) -> str:
    """The shell file that provision.sh sources: every value quoted by shlex."""
    values = {"APT_PACKAGES": " ".join(check_apt_packages(inputs.apt_packages)),
              "GATEWAY_PORT": str(inputs.gateway_port)}
    # pip ignores a plain-http index unless told to trust it.  Trusted by name alone, pip
    # would also stop checking the certificate of every https URL on that host, so each
    # plain-http index is named with its port, which pip matches only when the URL has
    # one: such a URL gets its default port written out.  The gateway forwards only GET
    # and HEAD to it; hashes in the requirements are what vouch for its files.
    index = _port_written(inputs.pip.index_url) if inputs.pip.index_url else None
    extra = [_port_written(url) for url in inputs.pip.extra_index_urls]
    if index:
        values["PIP_INDEX_URL"] = index
    if extra:
        values["PIP_EXTRA_INDEX_URL"] = " ".join(extra)
    plain = [urlsplit(url).netloc for url in (index, *extra) if url and urlsplit(url).scheme == "http"]
    if plain:
        values["PIP_TRUSTED_HOST"] = " ".join(dict.fromkeys(plain))
    if inputs.require_hashes:
        values["PIP_REQUIRE_HASHES"] = "1"
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


def _port_written(url: str) -> str:
    """A plain-http URL with its port written out (http://h/x -> http://h:80/x); others unchanged."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.port is not None or not parts.hostname:
        return url
    return parts._replace(netloc=f"{parts.netloc}:80").geturl()


def _write_file(path: str, content: str, permissions: str = "0644") -> dict[str, Any]:
    return {"path": path, "content": content, "owner": "root:root", "permissions": permissions}


def user_data(inputs: SeedInputs) -> dict[str, Any]:
    template = cloud_init_dir() / "user-data.yaml"
    data: dict[str, Any] = load_yaml(template)
    script = (cloud_init_dir() / "provision.sh").read_text(encoding="utf-8")
    for user in data["users"]:
        if user["name"] == RUN_USER:
            user["ssh_authorized_keys"] = [inputs.authorized_key]
    data["ssh_keys"] = {
        "ed25519_private": inputs.host_key_private,
        "ed25519_public": inputs.host_key_public,
    }
    if inputs.ca_pems:
        data["ca_certs"] = {"trusted": list(inputs.ca_pems)}
    data["write_files"] = [
        _write_file("/var/lib/vmiso/provision.sh", script, "0755"),
        _write_file("/var/lib/vmiso/provision.env", provision_env(inputs), "0600"),
        _write_file("/var/lib/vmiso/requirements.txt", inputs.requirements),
        *(_write_file(path, text, f"{mode:04o}") for path, text, mode in inputs.guest_files),
    ]
    return data


def render_user_data(inputs: SeedInputs) -> str:
    return "#cloud-config\n" + dump_yaml(user_data(inputs), sort_keys=False, width=1000)


def render_meta_data(inputs: SeedInputs) -> str:
    return dump_yaml({"instance-id": inputs.instance_id, "local-hostname": inputs.hostname})


def write_seed(inputs: SeedInputs, directory: Path) -> Path:
    """Write user-data and meta-data into ``directory`` and pack them as a NoCloud ISO."""
    user = directory / "user-data"
    meta = directory / "meta-data"
    # The user-data holds the host's private key for the guest: readable by root only.
    for path, text in ((user, render_user_data(inputs)), (meta, render_meta_data(inputs))):
        path.touch(mode=0o600)
        path.write_text(text, encoding="utf-8")
    iso = directory / "seed.iso"
    tools.run(tools.genisoimage_argv(iso, [user, meta]))
    return iso
