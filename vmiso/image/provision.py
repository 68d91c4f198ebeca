"""``vmiso provision``: OS layer -> cloud-init boot behind the gateway -> sealed, read-only template.

``provision`` reads as its steps, named as its progress shows them: check what can
be refused, start the build directory, hold the OS layer, make the keys, open the
way out (the gateway), provision the guest (boot, then the guest's own steps,
followed on its console), keep the gateway's record, flatten the template, check
it and read what runs at every Python start, seal it (hash, manifest, into the
store), then save warm states.

The only phase with a way out, and that way is vmiso's gateway (vmiso.network:
the allow-list, the gateway, its record): the VM has no network device; over its
SSH link the guest's sshd listens on one port of the guest's loopback, and each
connection made there comes to the allow-listing, recording gateway in this
process.  Nothing of the user's is present but the requirements file.
Everything is built under a temporary name and renamed into the store at the
end; a failure undoes what was made, in reverse order.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__, accel, ssh, tools
from ..clones import warm
from ..config import Config, check_name, provisioning_allow_list
from ..domain import NAME_PREFIX, Disk, DomainSpec, Hypervisor, KernelBoot, Share, domain_xml
from ..errors import ConfigError, ImageError, ProvisionError, ToolError, VmisoError
from ..host import state
from ..host.console import GuestLog
from ..host.workdir import (
    OWNER_FILE,
    SHARE_FS_SUFFIX,
    bounded_share,
    console_file,
    install_dir,
    link_dir,
    private_dir,
    remove_tree,
    shared_dir,
)
from ..network import allow, record as gateway_record
from ..network.gateway import Gateway
from ..progress import Steps
from . import audit, inventory, lock, sealcheck
from .cloud import CLOUD_PACKAGES, cloud_key, ensure_cloud_layer, read_apt_sources
from .layer import Layer, ensure_layer, guest_files, hold_layer, layer_key, load_recipe
from .requirements import Requirements, load_requirements
from .seed import RUN_USER, SeedInputs, write_seed
from .store import GUEST_PROTOCOL, MANIFEST, Image, check_owner, is_shared, prepare_root, root_only, sha256_file

log = logging.getLogger(__name__)

HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# The report share holds each step's log and the package lists; what install-time
# code can write to the host is bounded by its filesystem (workdir.bounded_share).
REPORT_SHARE_BYTES = 256 * 1024**2
REPORT_SHARE_FILES = 100
GIB = 1024**3
# Free space a provisioning needs in the state directory, measured on Debian 12:
# the layer's root directory (~0.8 GiB) and its image, the overlay, the template.
SPACE_WITH_LAYER = 6 * GIB
SPACE_FROM_CACHED_LAYER = 3 * GIB
REPORT_MAX_BYTES = 4 * 1024 * 1024
GUEST_STEPS = ("gateway", "apt", "venv", "pip", "manifest", "seal", "poweroff")
_MARKER = re.compile(rb"VMISO-(STEP|FAIL) ([a-z-]+)")
# What the guest is doing, in the words of systemd and cloud-init (console) and of
# apt and pip (each step's log in the report share): a live status, never logged.
_ACTIVITY = tuple((re.compile(pattern), template) for pattern, template in (
    (r"Starting (.+)\.\.\.\s*$", "starting {}"),
    (r"Cloud-init v\. \S+ running '([^']+)'", "cloud-init {}"),
    (r"^Get:\d+ \S+ \S+ \S+ (\S+)", "downloading {}"),
    (r"^Unpacking (\S+)", "unpacking {}"),
    (r"^Setting up (\S+)", "setting up {}"),
    (r"^Collecting (\S+)", "collecting {}"),
    (r"^\s*Downloading (\S+)", "downloading {}"),
    (r"^\s*Building wheel for (\S+)", "building {}"),
    (r"^Installing collected packages: (.+)", "installing {}"),
))
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STEP_LOG_READ_BYTES = 1024 * 1024  # per poll: a step log only feeds the live status
FOLLOW_POLL = 0.5  # seconds between two looks at the provisioning guest's console and step log


def load_ca_certificates(setting: str | tuple[Path, ...], host_dir: Path = HOST_CA_DIR) -> tuple[str, ...]:
    """The PEM texts the provisioning VM should trust."""
    if setting == "none":
        return ()
    if isinstance(setting, str):  # "host"; config validation refuses other strings
        paths: list[Path] = sorted(host_dir.rglob("*.crt")) if host_dir.is_dir() else []
    else:
        paths = list(setting)
    pems = []
    for path in paths:
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"provision.ca_certificates: cannot read {path}: {err}") from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"provision.ca_certificates: {path} holds no PEM certificate")
        pems.append(text.strip() + "\n")
    return tuple(pems)


def check_free_space(directory: Path, needed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ImageError(
            f"too little disk space in {directory}: {free / GIB:.1f} GiB free, provisioning needs "
            f"about {needed / GIB:.0f} GiB",
            "free some space, remove unused images (vmiso images rm), or set state_dir elsewhere",
        )


def guest_activity(line: str) -> str | None:
    """A short, printable description of what a line of guest output says the guest does."""
    if "\u2026" in line:  # systemd shortened it, mangling its colour codes; the kernel log has it whole
        return None
    text = _ANSI.sub("", line).strip("\r")
    for pattern, template in _ACTIVITY:
        found = pattern.search(text)
        if found:
            # The guest chose these bytes: printable ASCII only, bounded, before a terminal sees them.
            return re.sub(r"[^\x20-\x7e]", "?", template.format(found.group(1)))[:120]
    return None


class ConsoleWatcher:
    """Follows a guest log (the console, a step's log): vmiso's step markers, and the guest's latest activity."""

    def __init__(self, path: Path, read_max: int = -1) -> None:
        self._log = GuestLog(path, read_max)  # -1: all there is (the console's markers must all be seen)
        self.activity: str | None = None

    def poll(self) -> list[tuple[str, str]]:
        markers = []
        for line in self._log.lines():
            marker = _MARKER.search(line)
            if marker:
                markers.append((marker.group(1).decode(), marker.group(2).decode()))
            else:
                self.activity = guest_activity(line.decode("utf-8", errors="replace")) or self.activity
        return markers


@dataclass(frozen=True)
class _Keys:
    client_private: Path
    client_public: str
    host_private: str
    host_public: str


def _make_keys(work: Path) -> _Keys:
    tools.run(tools.ssh_keygen_argv(work / "client_key", "vmiso client"))
    tools.run(tools.ssh_keygen_argv(work / "host_key", "vmiso guest host key"))
    keys = _Keys(
        client_private=work / "client_key",
        client_public=(work / "client_key.pub").read_text().strip(),
        host_private=(work / "host_key").read_text(),
        host_public=(work / "host_key.pub").read_text().strip(),
    )
    # The host's private key lives on only in the guest; the host keeps the public half to pin.
    (work / "host_key").unlink()
    (work / "client_key.pub").unlink()
    os.chmod(work / "client_key", 0o600)
    return keys


def _read_report(report: Path, name: str, limit: int = REPORT_MAX_BYTES) -> str:
    """A file the guest wrote: read with a size limit, never following links."""
    try:
        fd = os.open(report / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ProvisionError("manifest", f"the guest's {name} is larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")


def _pairs(text: str, separator: str) -> list[dict[str, str]]:
    found = []
    for line in text.splitlines():
        name, sep, version = line.strip().partition(separator)
        if sep and name:
            found.append({"name": name.strip(), "version": version.strip()})
    return found


def new_console_log(logs: Path, name: str) -> Path:
    """A new file for this provisioning's console, named for the image and the time; two
    provisionings of one name in the same second each get their own."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return console_file(logs / f"provision-{name}-{stamp}-{secrets.token_hex(3)}.log")


@dataclass
class _Build:
    """One provisioning under way: what its steps share."""

    config: Config
    hv: Hypervisor
    name: str
    final: Path  # where the image goes in the store once complete
    steps: Steps
    accel: str
    requirements: Requirements | None
    shared: bool  # a group's store: the group reads the image
    console_log: Path
    work: Path = Path()  # the build directory (``_start``)


@dataclass(frozen=True)
class _Way:
    """The provisioning's one way out: its gateway, the rules it was given and the allow-list they came from."""

    gateway: Gateway
    rules: allow.Rules
    allowed: tuple[allow.Allowed, ...]
    apt_sources: tuple[str, ...] = ()  # the URLs apt fetched from (the mirror, or the cloud image's sources)


# --- the line of steps ------------------------------------------------------------------


def provision(config: Config, hv: Hypervisor, *, name: str | None = None, replace: bool = False,
              steps: Steps | None = None) -> Image:
    """Build image ``name`` (default: image.name) and put it in the store; the image, or an error
    naming the step that failed.  What a step made is undone, in reverse order, when a later one fails."""
    build = _prepare(config, hv, check_name(name or config.image.name), replace, steps or Steps())
    with ExitStack() as undo, ExitStack() as held:
        _start(build, undo)
        layer = _hold_source(build, held)
        keys = _keys(build)
        way = _open_way(build, layer, undo)
        report = _provision_guest(build, layer, keys, way, undo)
        record = _keep_record(build, way)
        template = _flatten(build)
        _check_sealed(build, template, layer)
        startup = _read_startup(build, template, layer)
        _seal(build, layer, keys, template, report, way, record, startup)
        undo.pop_all()  # complete: keep it
    image = Image(build.name, build.final)
    if refused := gateway_record.refused_hosts(record):
        log.warning("the gateway refused connections to %s during provisioning: install-time code tried to "
                    "reach hosts outside the allow-list (see 'vmiso images show %s'; %s allows a host)",
                    gateway_record.named(refused), build.name, allow.KEY)
    if build.requirements is not None and not build.requirements.has_hashes:
        log.warning("image %s: its requirements are not hash-pinned, so pip installed whatever the index served "
                    "today; a hash-pinned file (pip-compile --generate-hashes, uv pip compile --generate-hashes) "
                    "makes the template reproducible", build.name)
    try:
        warm.make_warm_state(config, hv, image, build.steps, build.accel)
    except VmisoError as err:  # runs boot cold without it: the image is still good
        log.warning("image %s: no warm state (%s); runs will boot cold", image.name, err)
    return image


def _prepare(config: Config, hv: Hypervisor, name: str, replace: bool, steps: Steps) -> _Build:
    """Everything that can be refused before anything is made; the console log's file."""
    state_dir = config.state_dir
    final = state.image(state_dir, name)
    if final.exists() and not replace:
        raise ImageError(f"an image named {name!r} exists already",
                         "pass --replace to rebuild it, or choose another --name")
    if final.exists():
        check_owner(Image(name, final), "replace")
    accel_name = accel.resolve(config.accel, tcg_cpu_features=config.vm.tcg_cpu_features)
    if config.image.cloud_image is None:
        load_recipe(config.image.recipe)  # a bad recipe fails before anything is built
    elif not config.image.cloud_image.path.is_file():
        raise ConfigError(f"image.cloud_image.path: {config.image.cloud_image.path} is not a file",
                          "give the path of a qcow2 cloud image")
    requirements = (load_requirements(config.provision.requirements, config.provision.pip.require_hashes)
                    if config.provision.requirements else None)
    load_ca_certificates(config.provision.ca_certificates)
    prepare_root(state_dir)
    logs = private_dir(state.home(state_dir).logs)
    return _Build(config, hv, name, final, steps, accel_name, requirements, is_shared(state_dir),
                  new_console_log(logs, name))


def _start(build: _Build, undo: ExitStack) -> None:
    """The build directory, this process's, removed if the provisioning fails."""
    work = state.building(state.images(build.config.state_dir), build.name, secrets.token_hex(4))
    # In a shared store the group reads the image (store.py); QEMU only reaches files.
    undo.callback(remove_tree, work)  # holds the share the provisioning guest wrote
    state.claimed_dir(work, shared_dir if build.shared else private_dir)
    link_dir(work / "link")
    build.work = work


def _hold_source(build: _Build, held: ExitStack) -> Layer:
    """The OS layer, built when missing, share-locked until ``held`` closes."""
    layer = _ensure_source(build.config, build.steps)
    if not hold_layer(layer, held):  # 'vmiso gc --layers' removed it just now: build it again
        layer = _ensure_source(build.config, build.steps)
        if not hold_layer(layer, held):
            raise ImageError(f"the OS layer {layer.key} keeps disappearing",
                             "do not run 'vmiso gc --layers' while provisioning")
    return layer


def _keys(build: _Build) -> _Keys:
    with build.steps.step("keys", "client key and pinned host key"):
        keys = _make_keys(build.work)
        if build.shared:  # every member's runs log in with it
            os.chmod(build.work / "client_key", 0o640)
    return keys


def _open_way(build: _Build, layer: Layer, undo: ExitStack) -> _Way:
    """The gateway, forwarding only to what the configuration implies and allows."""
    # A cloud image's apt uses its own sources: read them (without booting it) for the allow-list.
    apt_urls = read_apt_sources(layer, build.work) if build.config.image.cloud_image is not None else []
    allowed = provisioning_allow_list(build.config, apt_urls, warn=True)
    with build.steps.step("proxy", "the gateway, forwarding only to " + ", ".join(map(str, allowed))):
        rules = allow.for_provisioning(allowed, build.config.provision.hosts_file)
        gateway = Gateway.start(rules)
        undo.callback(gateway.close)
    apt_sources = tuple(apt_urls) if build.config.image.cloud_image is not None else (build.config.image.mirror,)
    return _Way(gateway, rules, allowed, apt_sources)


def _provision_guest(build: _Build, layer: Layer, keys: _Keys, way: _Way, undo: ExitStack) -> Path:
    """The guest's part (``boot``, then its own steps); the report share it wrote.  A failure
    names the hosts the gateway refused meanwhile."""
    try:
        return _boot_and_provision(build, layer, keys, way, undo)
    except ProvisionError as err:
        if refused := gateway_record.refused_hosts(way.gateway.record.as_dict(way.rules)):
            err.hint = (f"the gateway refused {gateway_record.named(refused)}: a host not in the allow-list; "
                        f"if the image needs it, add it to {allow.KEY}")
        raise


def _keep_record(build: _Build, way: _Way) -> dict[str, Any]:
    """The gateway's record as the image's (its summary): the VM is gone, nothing more can reach it."""
    way.gateway.close()
    return gateway_record.write_record(way.gateway.record.as_dict(way.rules), way.allowed,
                                       build.work / gateway_record.RECORD)


def _flatten(build: _Build) -> Path:
    with build.steps.step("template", "flatten, hash, make read-only"):
        template = build.work / "template.qcow2"
        try:
            tools.run(tools.qemu_img_convert_argv(build.work / "disk.qcow2", "qcow2", template))
        except ToolError as err:
            raise ProvisionError("template", err.message) from None
        os.chmod(template, 0o444)
    return template


def _check_sealed(build: _Build, template: Path, layer: Layer) -> None:
    with build.steps.step("check", "sshd, its config, vmiso's files and tini in the template, without booting it"):
        sealcheck.check_template(template, layer, build.work)


def _read_startup(build: _Build, template: Path, layer: Layer) -> dict[str, Any]:
    with build.steps.step("inventory", "what runs at every Python start, read from the template"):
        return inventory.read_template(template, layer.root_device, build.work).as_dict()


def _seal(build: _Build, layer: Layer, keys: _Keys, template: Path, report: Path, way: _Way,
          record: dict[str, Any], startup: dict[str, Any]) -> None:
    """The boot files and the manifest beside the template; what only the build needed removed;
    the image moved into the store."""
    work = build.work
    with build.steps.step("hash", "the template's sha256, the boot files"):
        digest = sha256_file(template)
        boot_sha256 = {}
        for source, target in ((layer.kernel, "vmlinuz"), (layer.initramfs, "initramfs.img")):
            shutil.copyfile(source, work / target)
            os.chmod(work / target, 0o444)
            boot_sha256[target] = sha256_file(work / target)
        locked = _lock(build, report, way, record, digest)
        manifest = _manifest(build, layer, keys, template, digest, boot_sha256, report, way, record, startup)
        manifest["lock"] = locked
        manifest["audit"] = _audit(build, manifest["pip"])
        shutil.copyfile(build.console_log, work / "provision.log")
        for leftover in ("disk.qcow2", "seed", "link", "report", "report" + SHARE_FS_SUFFIX, OWNER_FILE):
            if failures := remove_tree(work / leftover):
                raise ImageError(f"cannot remove {work / failures[0].path}: {failures[0].reason}")
        (work / "host_key.pub").write_text(keys.host_public + "\n")
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(work / MANIFEST, 0o644)
        # The directory stays private (workdir.private_dir), or the group's in a shared
        # store: the template holds the guest's SSH host key, and only QEMU and the
        # image's users need to reach it.
        install_dir(work, build.final, state.replaced(build.final))


def _audit(build: _Build, packages: list[dict[str, str]]) -> dict[str, Any] | None:
    """The installed versions checked on the host for known vulnerabilities (None: provision.audit is none);
    what it found, or that it could not check, is said at the end like the refused hosts."""
    service = build.config.provision.audit
    if service == "none":
        return None
    with build.steps.step("audit", f"{len(packages)} distribution(s) against known vulnerabilities ({service}, "
                                   "from the host)"):
        found = audit.with_pip_audit(packages, service).as_dict()
    if found["unavailable"] or found["vulnerable"] or found["not_checked"]:
        for line in audit.lines(found):
            log.warning("image %s: %s", build.name, line.strip())
    return found


def _lock(build: _Build, report: Path, way: _Way, record: dict[str, Any], digest: str) -> dict[str, Any] | None:
    """pylock.toml beside the template, from pip's report, its downloads matched with the gateway's
    record; the manifest's entry for it (None: no requirements, nothing installed)."""
    text = _read_report(report, lock.REPORT_FILE, lock.REPORT_MAX_BYTES)
    if not text:
        if build.requirements is not None:
            log.warning("the guest wrote no pip report: the image has no lock of what pip installed")
        return None
    downloads, problems = lock.read_report(text)
    pip = build.config.provision.pip
    explained = lock.explain(downloads, [row["host"] for row in record["contacted"]],
                             [pip.index_url or allow.DEFAULT_INDEX, *pip.extra_index_urls], [
                                 f"{a.host}:{a.port}" for url in way.apt_sources
                                 if (a := allow.url_host(url, "an apt source"))])
    (build.work / lock.LOCK_FILE).write_text(lock.lock_text(downloads, image=build.name, template_sha256=digest))
    os.chmod(build.work / lock.LOCK_FILE, 0o444)
    for url in explained["unexplained_downloads"]:
        log.warning("pip reports a download from %s, a host the gateway never connected to", url)
    for host in explained["unexplained_hosts"]:
        log.warning("the gateway connected to %s, which no pip download, package index or apt source "
                    "explains: install-time code reached it (see 'vmiso images show %s')", host, build.name)
    return {"file": lock.LOCK_FILE, "sha256": sha256_file(build.work / lock.LOCK_FILE),
            "distributions": len(downloads), "sdists": sorted(d.name for d in downloads if d.kind == "sdist"),
            "not_locked": problems, **explained}


def _manifest(build: _Build, layer: Layer, keys: _Keys, template: Path, digest: str, boot_sha256: dict[str, str],
              report: Path, way: _Way, record: dict[str, Any], startup: dict[str, Any]) -> dict[str, Any]:
    requirements = build.requirements
    return {
        "name": build.name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sha256": digest,
        "template": template.name,
        # What boots is checked like the template (store.boot_files).
        "kernel_sha256": boot_sha256["vmlinuz"],
        "initramfs_sha256": boot_sha256["initramfs.img"],
        "guest_protocol": GUEST_PROTOCOL,
        "source": _source(build.config, layer),
        "root_device": layer.root_device,
        "kernel": (layer.path / "kernel-release").read_text().strip(),
        "python": _read_report(report, "python.txt").strip(),
        "pip": _pairs(_read_report(report, "pip-freeze.txt"), "=="),
        "apt": _pairs(_read_report(report, "dpkg.txt"), "\t"),
        "requirements": {
            "file": str(requirements.path) if requirements else None,
            "sha256": sha256_file(requirements.path) if requirements else None,
            "hashed": requirements.has_hashes if requirements else False,
        },
        "gateway": {
            "record": gateway_record.RECORD,
            "sha256": sha256_file(build.work / gateway_record.RECORD),
            "allow_list": [str(a) for a in way.allowed],
            "refused": [item["host"] for item in record["refused"]],
        },
        # Read from the template whose sha256 is above: 'images verify' covers it.
        "startup": startup,
        "host_key": keys.host_public,
        "accel": build.accel,
        "vmiso": __version__,
    }


# --- the guest's part -------------------------------------------------------------------


def _boot_and_provision(build: _Build, layer: Layer, keys: _Keys, way: _Way, undo: ExitStack) -> Path:
    """Run cloud-init and provision.sh in a VM whose only way out is the gateway; return the report."""
    overlay = _overlay(build, layer)
    # What install-time code can write to the host: bounded by the kernel like a run's /out.
    report = bounded_share(build.work / "report", max_bytes=REPORT_SHARE_BYTES, max_files=REPORT_SHARE_FILES)
    seed, kernel, initrd = _seed(build, layer, keys)
    domain = f"{NAME_PREFIX}provision-{build.name}-{secrets.token_hex(3)}"
    spec = DomainSpec(
        name=domain, memory_mib=build.config.provision.memory_mib, cpus=build.config.vm.cpus, accel=build.accel,
        tcg_cpu_features=build.config.vm.tcg_cpu_features,  # what builds from source may compile for
        disks=(Disk(overlay, backing=((layer.rootfs, layer.rootfs_format),)), Disk(seed, format="raw", readonly=True)),
        console_log=build.console_log,
        boot=KernelBoot(kernel, initrd, f"root={layer.root_device} rw console=ttyS0 ds=nocloud"),
        shares=(Share(report, "vmiso-report", readonly=False),),
        ssh_socket=build.work / "link" / "ssh.sock",  # no network device: the gateway is reached over this link
        metadata={"kind": "provision", "workdir": str(build.work)},
    )
    # The SSH link that carries the gateway lasts while the VM runs, however its loop ends.
    with build.steps.step("boot", "provisioning VM (no network device), cloud-init"), ExitStack() as link:
        build.hv.start_transient(domain, domain_xml(spec))
        undo.callback(build.hv.destroy, domain)
        last = _follow_guest(build, domain, report, lambda: _serve_way(build, domain, keys, way, link))
    if _read_report(report, "status").strip() != "ok":
        failed = _read_report(report, "failed-step").strip() or last or "boot"
        raise ProvisionError(failed, "the VM stopped before provisioning finished", str(build.console_log))
    return report


def _overlay(build: _Build, layer: Layer) -> Path:
    overlay = build.work / "disk.qcow2"
    # 4 KiB clusters, the guest filesystem's block: a discard of any free block then
    # reaches the overlay, and what provisioning deleted reads as zeros (see provision.sh).
    tools.run(tools.qemu_img_overlay_argv(layer.rootfs, overlay, backing_format=layer.rootfs_format,
                                          cluster_size=4096))
    return overlay


def _seed(build: _Build, layer: Layer, keys: _Keys) -> tuple[Path, Path, Path]:
    """(the seed image, the kernel, the initrd) the provisioning VM boots with."""
    config, requirements = build.config, build.requirements
    cloud = config.image.cloud_image is not None
    # A recipe's layer has vmiso's guest files and packages already; a cloud image gets them now.
    apt_packages = (*CLOUD_PACKAGES, *config.provision.apt_packages) if cloud else config.provision.apt_packages
    seed_dir = private_dir(build.work / "seed")  # QEMU must reach seed.iso; the rest is 0600
    inputs = SeedInputs(
        instance_id=f"vmiso-{build.name}-{secrets.token_hex(4)}",
        hostname="vmiso",
        host_key_private=keys.host_private,
        host_key_public=keys.host_public,
        authorized_key=keys.client_public,
        ca_pems=load_ca_certificates(config.provision.ca_certificates),
        requirements=requirements.text if requirements else "",
        apt_packages=apt_packages,
        guest_files=guest_files() if cloud else (),
        pip=config.provision.pip,
        gateway_port=allow.GUEST_PORT,
        require_hashes=bool(config.provision.pip.require_hashes
                            or (config.provision.pip.require_hashes is None
                                and requirements is not None and requirements.has_hashes)),
    )
    seed = write_seed(inputs, seed_dir)
    root_only(layer.rootfs)  # a backing file: QEMU reads it, and must not be able to write it
    # libvirt hands the files it boots to QEMU's user: give it copies, never the layer's own.
    kernel, initrd = seed_dir / "vmlinuz", seed_dir / "initrd.img"
    shutil.copyfile(layer.kernel, kernel)
    shutil.copyfile(layer.initrd, initrd)
    return seed, kernel, initrd


def _serve_way(build: _Build, domain: str, keys: _Keys, way: _Way, link: ExitStack) -> None:
    """The guest waits on its gateway port: connect over the SSH link and serve that port with the gateway."""
    session = ssh.connect(build.work / "link" / "ssh.sock", name=domain, host_key=keys.host_public,
                          client_key=keys.client_private, user=RUN_USER, deadline=time.monotonic() + 120,
                          alive=lambda: build.hv.is_running(domain))
    link.callback(session.close)
    served = session.serve_guest_ports(way.gateway.routes(), way.gateway.busy)
    link.callback(served.close)


def _follow_guest(build: _Build, domain: str, report: Path, open_way: Callable[[], None]) -> str | None:
    """Follow the guest's steps on its console until the VM stops: each becomes a step of ours, with
    what the guest does as its status; ``open_way`` is called when the guest waits for its gateway.
    The last step the guest began (None: it began none)."""
    steps, timeout = build.steps, build.config.provision.timeout
    console = ConsoleWatcher(build.console_log)
    step_log: ConsoleWatcher | None = None  # the current guest step's log, for its activity
    shown = None
    deadline = time.monotonic() + timeout
    current = None
    while True:
        running = build.hv.is_running(domain)
        for kind, step in console.poll():
            if kind == "FAIL":
                tail = tools.log_tail(report / f"{step}.log", 12) or tools.log_tail(build.console_log, 12)
                raise ProvisionError(step, f"the guest reported a failure: {tail}", str(build.console_log))
            if step in GUEST_STEPS and step != current:
                steps.finish("boot" if current is None else current)
                current = step
                steps.start(step, "inside the VM")
                if step == "gateway":
                    open_way()
                step_log, shown = ConsoleWatcher(report / f"{step}.log", STEP_LOG_READ_BYTES), None
        if step_log is not None:
            step_log.poll()
        activity = console.activity if step_log is None else step_log.activity
        if activity and activity != shown:
            steps.status(current or "boot", activity)
            shown = activity
        if not running:
            break
        if time.monotonic() > deadline:
            raise ProvisionError(current or "boot", f"not finished within provision.timeout ({timeout} s)",
                                 str(build.console_log))
        time.sleep(FOLLOW_POLL)
    if current is not None:
        steps.finish(current)
    return current


# --- the OS layer ---------------------------------------------------------------------------


def _source(config: Config, layer: Layer) -> dict[str, Any]:
    cloud = config.image.cloud_image
    if cloud is not None:
        return {"cloud_image": str(cloud.path), "sha256": cloud.sha256, "layer": layer.key}
    return {"recipe": config.image.recipe, "mirror": config.image.mirror, "layer": layer.key}


def _ensure_source(config: Config, steps: Steps) -> Layer:
    """The OS layer to provision from: the recipe's, or the cloud image's.

    Layers are cached in this user's own directory; an analyst also uses root's
    cached layer, which every user of the host trusts already (root built it).
    """
    cloud = config.image.cloud_image
    key = cloud_key(cloud) if cloud is not None else layer_key(load_recipe(config.image.recipe), config.image.mirror)
    home = _layer_home(config.state_dir, key)
    cached = (state.Home(home).layers / key).exists()
    if cloud is not None:
        # The verified copy, its raw form while it is read, then overlay and template.
        needed = SPACE_FROM_CACHED_LAYER + (0 if cached else 3 * cloud.path.stat().st_size)
        check_free_space(home, needed)
        return ensure_cloud_layer(home, cloud, steps)
    check_free_space(home, SPACE_FROM_CACHED_LAYER if cached else SPACE_WITH_LAYER)
    return ensure_layer(home, config.image.recipe, config.image.mirror, steps)


def _layer_home(state_dir: Path, key: str) -> Path:
    home = state.home(state_dir)
    root = state.root_home(state_dir)
    if home != root and not (home.layers / key).exists():
        try:
            if (root.layers / key).stat().st_uid == 0:
                return root.path
        except OSError:
            pass
    return home.path


