"""vmiso.yaml -> frozen, validated dataclasses.

The file is read with ``yaml.safe_load`` only when asked (never at import time).
Every error names the key's full path (``provision.requirements``) and, for an
unknown key, the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .domain import TCG_WITHHELD
from .errors import ConfigError
from .network import allow

ACCELS = ("auto", "kvm", "tcg")
CA_MODES = ("host", "none")
DEFAULT_STATE_DIR = Path("/var/lib/vmiso")
DEFAULT_URI = "qemu:///system"
AUDIT_SERVICES = ("pypi", "osv", "none")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_APT_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$")


def parse_size(value: int | str, where: str) -> int:
    """``1073741824``, ``"1GiB"`` or ``"512 MiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size such as 1GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: a size cannot be negative ({value})")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ConfigError(f"{where}: {value!r} is not a size; write e.g. 1073741824, 512MiB or 1GiB")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def check_apt_packages(names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        if not _APT_NAME.match(name):
            raise ConfigError(
                f"provision.apt_packages: {name!r} is not a Debian package name",
                "write names such as 'libxml2' or 'libxml2=2.9.14+dfsg-1.3'",
            )
    return names


def check_name(name: str, what: str = "image name") -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not valid",
            "use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class CloudImage:
    """An existing qcow2 cloud image used instead of a recipe."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class PipOptions:
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    # None: use --require-hashes exactly when the requirements carry --hash lines.
    require_hashes: bool | None = None


@dataclass(frozen=True)
class ImageConfig:
    name: str = "default"
    recipe: str = "debian-12"
    mirror: str = "http://deb.debian.org/debian"
    cloud_image: CloudImage | None = None


@dataclass(frozen=True)
class ProvisionConfig:
    apt_packages: tuple[str, ...] = ()
    requirements: Path | None = None
    pip: PipOptions = field(default_factory=PipOptions)
    # "host": the host's locally added CAs (/usr/local/share/ca-certificates);
    # "none": trust nothing extra; or a list of PEM files.
    ca_certificates: str | tuple[Path, ...] = "host"
    timeout: int = 1800
    memory_mib: int = 1024
    # Hosts (HOST or HOST:PORT; port 443 when none is given) the provisioning VM's
    # gateway may forward to besides those the index URLs and the mirror imply.
    allow_hosts: tuple[str, ...] = ()
    # Names the gateway looks up here before DNS, in /etc/hosts format (None: /etc/hosts):
    # for a mirror the host's resolver does not know.  Loopback and link-local addresses
    # are refused whatever a name resolves to.
    hosts_file: Path | None = None
    # Where the installed versions are checked for known vulnerabilities and malicious releases at the
    # end of provisioning, from the host, through pip-audit: "pypi", "osv" or "none".
    audit: str = "pypi"


@dataclass(frozen=True)
class VmConfig:
    memory_mib: int = 512
    cpus: int = 2
    # Under TCG, CPU features vmiso withholds because QEMU emulates them wrongly
    # (domain.TCG_WITHHELD) that this config's guests are offered anyway.
    tcg_cpu_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    timeout: int = 3600
    boot_timeout: int = 300
    output_max_bytes: int = 1024**3
    output_max_files: int = 10000
    # What the inputs (-i) may hold, all together: staged as a copy in the run's directory.
    input_max_bytes: int = 4 * 1024**3
    input_max_files: int = 100_000
    # The job's /tmp: an ext4 filesystem of this size on a sparse file of the run's own.
    scratch: int = 2 * 1024**3
    # A networked run (vmiso.network.gateway): HOST or HOST:PORT (443 when none is given) that the job
    # may reach through HTTP(S)_PROXY, and LOCALPORT:HOST:PORT joined to the job's
    # 127.0.0.1:LOCALPORT; both empty: no network at all.  --allow-host/--allow-tcp add to them.
    allow_hosts: tuple[str, ...] = ()
    allow_tcp: tuple[str, ...] = ()
    # Names the run's gateway looks up here before DNS, in /etc/hosts format (None: DNS and
    # /etc/hosts, as this host resolves them).
    hosts_file: Path | None = None


@dataclass(frozen=True)
class Config:
    image: ImageConfig = field(default_factory=ImageConfig)
    provision: ProvisionConfig = field(default_factory=ProvisionConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    run: RunConfig = field(default_factory=RunConfig)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    libvirt_uri: str = DEFAULT_URI
    state_dir: Path = DEFAULT_STATE_DIR
    # Where the commands that can act on a node (run, batch, images, pool, gc, doctor) act:
    # "ssh://[USER@]NODE[:PORT]" (vmiso.node); unset: this machine.  --host (or VMISO_HOST) given
    # overrides it, --host local included.  Checked where it is used (vmiso.node.openssh.parse_target),
    # before anything is done.
    host: str | None = None


# Keys whose values are sizes and may be written with units.
_SIZE_KEYS = {"output_max_bytes", "input_max_bytes", "filesystem_size", "scratch"}
MIN_SCRATCH = 64 * 1024**2


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", bool: "true or false", Path: "a path"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str, base_dir: Path) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        given = [o for o in options if o is not type(None)]
        if len(given) == 1:  # an optional value: its own error says more than "expected ..."
            return _convert(given[0], value, where, base_dir)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where, base_dir)
            except ConfigError:
                pass
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{where}[{i}]", base_dir) for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where, base_dir)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if where.rsplit(".", 1)[-1] in _SIZE_KEYS:
            return parse_size(value, where)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else base_dir / path
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this module


class ConfigProblems(ConfigError):
    """Several problems in one file, all said at once (one try, not one per problem)."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problems: " + "; ".join(
            p.message + (f" ({p.hint})" if p.hint else "") for p in problems))


def _build(cls: type, data: Any, where: str, base_dir: Path) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the file'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    problems: list[ConfigError] = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(names)
            problems.append(ConfigError(f"unknown key '{path}'", hint))
            continue
        try:
            values[key] = _convert(hints[key], value, path, base_dir)
        except ConfigProblems as err:
            problems.extend(err.problems)
        except ConfigError as err:
            problems.append(err)
    for f in dataclasses.fields(cls):
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            path = f"{where}.{f.name}" if where else f.name
            problems.append(ConfigError(f"missing key '{path}'", f"{where or 'the file'} needs it"))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigProblems(problems)
    return cls(**values)


def from_mapping(cls: type, data: Any, where: str, base_dir: Path) -> Any:
    """Build dataclass ``cls`` from parsed YAML with the same checks as vmiso.yaml."""
    return _build(cls, data, where, base_dir)


def dump_yaml(data: Any, **options: Any) -> str:
    """``yaml.safe_dump`` of ``data`` (built as dicts and lists, never assembled from strings)."""
    text: str = yaml.safe_dump(data, **options)
    return text


def load_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of ``path``, with errors that name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None


def _validate(config: Config) -> Config:
    check_name(config.image.name, "image.name")
    if config.image.cloud_image and not _SHA256_RE.match(config.image.cloud_image.sha256):
        raise ConfigError("image.cloud_image.sha256: expected 64 lower-case hex digits")
    check_apt_packages(config.provision.apt_packages)
    ca = config.provision.ca_certificates
    if isinstance(ca, str) and ca not in CA_MODES:
        raise ConfigError(
            f"provision.ca_certificates: {ca!r} is not valid",
            "write 'host', 'none', or a list of PEM files",
        )
    if config.provision.audit not in AUDIT_SERVICES:
        raise ConfigError(f"provision.audit: {config.provision.audit!r} is not valid",
                          "write " + ", ".join(f"'{s}'" for s in AUDIT_SERVICES))
    _check_gateway(config)
    _check_run_network(config)
    _check_tcg_cpu_features(config.vm.tcg_cpu_features)
    for key, value, low in (
        ("vm.memory_mib", config.vm.memory_mib, 128),
        ("vm.cpus", config.vm.cpus, 1),
        ("provision.memory_mib", config.provision.memory_mib, 256),
        ("provision.timeout", config.provision.timeout, 60),
        ("run.timeout", config.run.timeout, 1),
        ("run.boot_timeout", config.run.boot_timeout, 5),
        ("run.output_max_files", config.run.output_max_files, 1),
        ("run.output_max_bytes", config.run.output_max_bytes, 1024**2),  # /out's filesystem has 1 MiB to spare
        ("run.scratch", config.run.scratch, MIN_SCRATCH),
        ("run.input_max_files", config.run.input_max_files, 1),
        ("run.input_max_bytes", config.run.input_max_bytes, 0),
    ):
        check_at_least(key, value, low)
    return config


def check_at_least(key: str, value: int, low: int) -> int:
    """``value``, or ConfigError naming ``key`` when it is below ``low``."""
    if value < low:
        raise ConfigError(f"{key}: {value} is too small (at least {low})")
    return value


def _check_tcg_cpu_features(features: tuple[str, ...]) -> None:
    for i, name in enumerate(features):
        if name not in TCG_WITHHELD:
            close = difflib.get_close_matches(name, list(TCG_WITHHELD), n=1)
            raise ConfigError(
                f"vm.tcg_cpu_features[{i}]: {name!r} is not a feature vmiso withholds",
                (f"did you mean {close[0]!r}? " if close else "")
                + "it lists only what vmiso takes from QEMU's max CPU: " + ", ".join(TCG_WITHHELD)
                + "; every other feature TCG emulates is offered already")


def _check_gateway(config: Config) -> None:
    pip = config.provision.pip
    if pip.index_url is not None:
        allow.check_no_credentials(pip.index_url, "provision.pip.index_url")
    for i, url in enumerate(pip.extra_index_urls):
        allow.check_no_credentials(url, f"provision.pip.extra_index_urls[{i}]")
    provisioning_allow_list(config)  # every URL and provision.allow_hosts entry parses
    hosts_file = config.provision.hosts_file
    if hosts_file is not None and not hosts_file.is_file():
        raise ConfigError(f"provision.hosts_file: {hosts_file} is not a file",
                          "name a file in /etc/hosts format (ADDRESS NAME...), or leave the key out")


def provisioning_allow_list(config: Config, apt_urls: typing.Iterable[str] = (), *,
                            warn: bool = False) -> tuple[allow.Allowed, ...]:
    """What ``config``'s provisioning gateway forwards to (``apt_urls``: a cloud image's own sources)."""
    pip = config.provision.pip
    return allow.provisioning(index_url=pip.index_url, extra_index_urls=pip.extra_index_urls,
                              mirror=config.image.mirror if config.image.cloud_image is None else None,
                              allow_hosts=config.provision.allow_hosts, apt_urls=apt_urls, warn=warn)


def _check_run_network(config: Config) -> None:
    allow.rules(config.run.allow_hosts, config.run.allow_tcp, None)
    hosts_file = config.run.hosts_file
    if hosts_file is not None and not hosts_file.is_file():
        raise ConfigError(f"run.hosts_file: {hosts_file} is not a file",
                          "name a file in /etc/hosts format (ADDRESS NAME...), or leave the key out")


def load(path: Path | None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or use the defaults when None), then apply ``VMISO_ACCEL``."""
    env = os.environ if env is None else env
    if path is None:
        config = Config()
    else:
        if not Path(path).exists():
            raise ConfigError(f"config file {path} does not exist", "pass -c with an existing vmiso.yaml")
        config = _build(Config, load_yaml(path), "", Path(path).resolve().parent)
    accel = env.get("VMISO_ACCEL")
    if accel:
        if accel not in ACCELS:
            raise ConfigError(f"VMISO_ACCEL={accel!r} is not valid", "use auto, kvm or tcg")
        config = dataclasses.replace(config, accel=typing.cast(Literal["auto", "kvm", "tcg"], accel))
    return _validate(config)


def override(config: Config, **changes: Any) -> Config:
    """Apply command-line flags.  Keys are dotted paths: ``{"vm.cpus": 1}``; None means unset."""
    for dotted, value in changes.items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        if section:
            inner = dataclasses.replace(getattr(config, section), **{key: value})
            config = dataclasses.replace(config, **{section: inner})
        else:
            config = dataclasses.replace(config, **{key: value})
    return _validate(config)
