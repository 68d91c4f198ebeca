"""The command line: the only place that prints, parses flags and turns errors into exit codes."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from . import __version__, config as config_mod
from .errors import EXIT_INTERRUPTED, EXIT_VMISO, Interrupted, VmisoError
from .progress import Steps
from .terminal import InteractiveFilter, SafeStream, for_terminal, neutralize

if TYPE_CHECKING:
    from .node.client import SshNode

log = logging.getLogger("vmiso")


class _Group(click.Group):
    """Converts every error to one line and an exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmisoError as err:
            # Messages may quote what a guest wrote (names, log lines): never raw.
            click.echo(f"vmiso: error: {neutralize(err.message)}", err=True)
            if err.hint:
                click.echo(f"vmiso: {neutralize(err.hint)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("vmiso: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # anything unexpected is a bug: say so, briefly
            click.echo(f"vmiso: internal error: {type(err).__name__}: {neutralize(str(err))}", err=True)
            if log.isEnabledFor(logging.INFO):  # -v
                click.echo(neutralize(traceback.format_exc()), err=True, nl=False)
            else:
                click.echo("vmiso: run with -v for the traceback", err=True)
            ctx.exit(EXIT_VMISO)


def _say(text: str) -> None:
    """Print a line that may quote what a guest wrote (names, versions, leftovers)."""
    click.echo(neutralize(text))


class _SafeFormatter(logging.Formatter):
    """Log lines may quote what a guest wrote: show its control characters, never send them."""

    def format(self, record: logging.LogRecord) -> str:
        return neutralize(super().format(record))


# Loggers whose warnings -q does not hide: that a run's VM is less isolated than
# KVM would keep it (TCG) is not noise.
_ALWAYS_WARN = ("vmiso.accel",)


def _setup_logging(verbose: int, quiet: bool) -> None:
    # -v: what vmiso does, step by step (INFO); -vv: debugging detail (the programs it runs).
    level = (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.ERROR if quiet
             else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("vmiso: %(levelname)s: %(message)s"))
    # On the root logger: paramiko's messages quote what the guest's sshd sent
    # (a hostile banner, say), so they too go through the escaping formatter.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("vmiso").setLevel(level)
    for name in _ALWAYS_WARN:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    # paramiko is chatty: at warnings unless -vvv
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose > 2 else logging.NOTSET)


class _LiveLine:
    """One line at the bottom of a terminal, drawn in place with a carriage return and erased with
    erase-line before anything else is written; cut to the terminal's width, since a line that
    wrapped could not be gone back over."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._shown = False

    def erase(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False

    def show(self, text: str) -> None:
        self.erase()
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns or 80  # 0: a terminal that says none
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            width = 80
        self._stream.write(text[:max(width - 1, 10)])
        self._stream.flush()
        self._shown = True


class _Progress:
    """Prints the core's step events on stderr (see vmiso.progress).

    A step's start, its notes and its failure are one timestamped line each, on a
    pipe, a file or a terminal alike (unless not ``lines``).  When ``live`` and
    stderr is a terminal (only then), a status line under them shows the open
    step's elapsed time and what it is doing right now (the guest's phase, the
    package pip installs), redrawn every ``interval`` seconds with a carriage
    return and erase-line, and erased before anything else is written.  Once a
    step of ``last`` starts (a job's "exec": its own output comes next), the status
    line is erased for good: nothing is drawn over or after the job's output.  Use
    it as a context manager when live.
    """

    def __init__(self, quiet: bool, live: bool = False, stream: TextIO | None = None,
                 interval: float = 0.5, *, lines: bool = True, last: tuple[str, ...] = ()) -> None:
        self._quiet = quiet
        self._lines = lines
        self._last = last
        self._done_drawing = False
        self._stream = stream if stream is not None else sys.stderr
        # A dumb terminal (Emacs' shell, some CI consoles) knows no erase-line.
        self._live = live and not quiet and self._stream.isatty() and os.environ.get("TERM") != "dumb"
        self._interval = interval
        self._lock = threading.RLock()
        self._open: dict[str, float] = {}  # open steps in start order -> monotonic start
        self._status: dict[str, str] = {}
        self._live_line = _LiveLine(self._stream)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, event: str, step: str, detail: str, elapsed: float) -> None:
        if self._quiet:
            return
        with self._lock:
            self._erase()
            if event == "start":
                if step in self._last:
                    self._done_drawing = True
                self._line(f"[{elapsed:7.1f}s] {step}" + (f": {detail}" if detail else ""))
                self._open[step] = time.monotonic()
                self._status.pop(step, None)
            elif event == "note":
                self._line(f"[{elapsed:7.1f}s] {step}: {detail}")
            elif event == "fail":
                self._line(f"[{elapsed:7.1f}s] {step} FAILED")
            elif event == "status":
                self._status[step] = detail
            if event in ("done", "fail"):
                self._open.pop(step, None)
                self._status.pop(step, None)
            self._draw()

    def __enter__(self) -> _Progress:
        if self._live:
            self._ticker = threading.Thread(target=self._tick, name="vmiso-progress", daemon=True)
            self._ticker.start()
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._before_log)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._before_log)
        with self._lock:
            self._erase()

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                self._erase()
                self._draw()

    def _before_log(self, _record: logging.LogRecord) -> bool:
        with self._lock:  # the next tick draws the status line again, under the message
            self._erase()
        return True

    def message(self, text: str) -> None:
        """One of vmiso's own lines, written under the status line (which is drawn again after)."""
        with self._lock:
            self._erase()
            click.echo(neutralize(text), file=self._stream)
            self._draw()

    def _line(self, text: str) -> None:
        if not self._lines:
            return
        # Details may quote what an image or a guest holds (a cloud image's kernel release).
        click.echo(neutralize(text), file=self._stream)

    def _erase(self) -> None:
        self._live_line.erase()

    def _draw(self) -> None:
        if not self._live or not self._open or self._stop.is_set() or self._done_drawing:
            return
        step = next(reversed(self._open))
        seconds = int(time.monotonic() - self._open[step])
        text = f"  {step} {seconds // 60}:{seconds % 60:02d}"
        if self._status.get(step):
            text += f"  {neutralize(self._status[step])}"
        self._live_line.show(text)


def _progress_printer(quiet: bool) -> _Progress:
    """Plain timestamped lines."""
    return _Progress(quiet)


def _job_progress(ctx: click.Context) -> _Progress:
    """A job's progress (run, shell): on a terminal, one live status line (the step and its
    elapsed time) until the job starts, then nothing of vmiso's between the job's bytes;
    the step lines with -v; nothing at all with -q, or on a pipe without -v."""
    quiet, verbose = ctx.obj["quiet"], ctx.obj.get("verbose", 0)
    return _Progress(quiet, live=True, lines=verbose >= 1, last=("exec",))


def _load(ctx: click.Context, config_path: Path | None, **overrides: Any) -> config_mod.Config:
    """The config; one whose ``host:`` names a node is refused by a command that cannot act there yet."""
    config = config_mod.override(config_mod.load(config_path), **overrides)
    command = ctx.find_root().invoked_subcommand
    if config.host is not None and ctx.obj.get("host") is None and command not in _ON_NODES:
        from .errors import ConfigError

        raise ConfigError(f"{config_path} sets host: {config.host}, and 'vmiso {command}' cannot act on a node yet "
                          f"(only {_on_nodes_text()}); nothing was done",
                          "give --host local (or VMISO_HOST=local) to act on this machine, or run it on the node")
    return config


def _node_of(ctx: click.Context, config: config_mod.Config | None) -> str | None:
    """The node this command acts on: the one --host (or VMISO_HOST) names, else the config's
    ``host:``; None for this machine (also --host local)."""
    given = ctx.obj.get("host")
    if given is not None:
        return None if given == LOCAL_HOST else given
    if config is None or config.host is None:
        return None
    from .node.openssh import parse_target

    parse_target(config.host, "host:")  # a bad one is refused before anything is done
    return config.host


def _on_nodes_text() -> str:
    return ", ".join(sorted(c for c in _ON_NODES if not c.startswith("_")))


def _config_or_node(ctx: click.Context, config_path: Path | None,
                    **overrides: Any) -> tuple[config_mod.Config | None, str | None]:
    """(this machine's config with ``overrides``, None), or (the config that named the node, if one did,
    the node this command acts on).  This machine's settings given for a node are refused."""
    given = ctx.obj.get("host")
    config = _load(ctx, config_path) if given is None or given == LOCAL_HOST else None
    node = _node_of(ctx, config)
    if node is None:
        assert config is not None
        return config_mod.override(config, **overrides), None
    local = [flag for flag, value in (("-c", config_path if config is None else None),
                                      *((f"--{k.replace('_', '-')}", v) for k, v in overrides.items()))
             if value is not None]
    if local:
        from .errors import ConfigError

        raise ConfigError(f"{', '.join(local)} name this machine's settings; the node reads its own configuration",
                          "leave them out when acting on a node (or run the command on the node itself)")
    return config, node


def _ssh_node(ctx: click.Context, node: str) -> SshNode:
    """The node at ``node`` (an ssh:// address), reached with the analyst's ssh and --remote-vmiso."""
    from .node.client import SshNode
    from .node.openssh import parse_target

    return SshNode(parse_target(node), ctx.obj.get("remote_vmiso") or "vmiso")


def _on_node(ctx: click.Context, node: str, argv: list[str]) -> NoReturn:
    """``vmiso ARGV`` on ``node``, with the node's own configuration: what it prints shown here as it
    comes, neutralized (the node's words are shown, never obeyed); its exit status this command's."""
    out, err = SafeStream(sys.stdout.buffer), SafeStream(sys.stderr.buffer)

    def shown(stream: SafeStream) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return write
    try:
        code = _ssh_node(ctx, node).command(argv, shown(out), shown(err))
    finally:
        out.finish()
        err.finish()
    ctx.exit(code)


_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
    help="vmiso.yaml to read (default: built-in defaults)")
_accel_option = click.option("--accel", type=click.Choice(config_mod.ACCELS),
                             help="override 'accel' (also VMISO_ACCEL)")
_state_option = click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
                             help="override 'state_dir'")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True,
              help="-v: a line per step, tracebacks for internal errors; -vv: debugging detail")
@click.option("-q", "--quiet", is_flag=True, help="only errors (and the warning that a VM runs under TCG)")
@click.option("--host", envvar="VMISO_HOST", metavar="ssh://[USER@]NODE[:PORT]",
              help="act on NODE, reached with your own ssh (also VMISO_HOST, and the config's host:; default "
                   "and 'local': this machine); so far run, batch, images, pool, gc and doctor")
@click.option("--remote-vmiso", envvar="VMISO_REMOTE_VMISO", metavar="COMMAND",
              help="the node's vmiso, e.g. /opt/vmiso/venv/bin/vmiso (also VMISO_REMOTE_VMISO; default: vmiso)")
@click.version_option(__version__, "-V", "--version", prog_name="vmiso", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, host: str | None, remote_vmiso: str | None) -> None:
    """Run Python programs you cannot audit in disposable, offline VMs."""
    _setup_logging(verbose, quiet)
    host = host or None  # VMISO_HOST= (empty): unset
    if host is not None and host != LOCAL_HOST and ctx.invoked_subcommand not in _ON_NODES:
        from .errors import ConfigError

        raise ConfigError(f"--host is not supported for 'vmiso {ctx.invoked_subcommand}' yet (only for "
                          f"{_on_nodes_text()}); nothing was done",
                          "run it on the node itself, or without --host (and VMISO_HOST) for this machine")
    ctx.obj = {"quiet": quiet, "verbose": verbose, "host": host, "remote_vmiso": remote_vmiso}


# The commands --host takes to a node (the hidden ones run on the node itself and ignore it).
_ON_NODES = frozenset({"run", "images", "doctor", "gc", "pool", "batch", "_node", "_watchdog"})
LOCAL_HOST = "local"  # --host local: this machine, whatever the config's host: says


@cli.command()
@_config_option
@_accel_option
@_state_option
@click.option("--name", help="image name (default: image.name from the config)")
@click.option("--replace", is_flag=True, help="rebuild an image that exists already")
@click.pass_context
def provision(ctx: click.Context, config_path: Path | None, accel: str | None, state_dir: Path | None,
              name: str | None, replace: bool) -> None:
    """Build a sealed, read-only template: OS layer, then cloud-init and pip with network."""
    from .hypervisor import connected
    from .image.provision import provision as do_provision
    from .image.store import summary

    config = _load(ctx, config_path, accel=accel, state_dir=state_dir)
    with _Progress(ctx.obj["quiet"], live=True) as printer, connected(config.libvirt_uri) as hv:
        steps = Steps(printer)
        image = do_provision(config, hv, name=name, replace=replace, steps=steps)
    info = summary(image)
    click.echo(f"provisioned {info['name']} in {steps.elapsed():.0f} s: sha256 {info['sha256']}")


@cli.group(invoke_without_command=True)
@_config_option
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def images(ctx: click.Context, config_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """List templates (subcommands: rm, show, verify, warm)."""
    config, node = _config_or_node(ctx, config_path, state_dir=state_dir)
    if node is not None:
        _node_images(ctx, node, as_json)
        return
    ctx.obj["config"] = config
    if ctx.invoked_subcommand is not None:
        return
    from .image.store import list_images, summary

    rows = [summary(i) for i in list_images(ctx.obj["config"].state_dir)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no images; build one with 'vmiso provision'")
        return
    # Package names and versions come from the guest (pip freeze, written while
    # install-time code ran): shown, never obeyed, like everything a guest wrote.
    _say(f"{'NAME':<20} {'SIZE':>9} {'CREATED':<26} SHA256")
    for row in rows:
        _say(f"{row['name']:<20} {row['size'] / 1024**2:>7.0f}MB {row['created'] or '?':<26} {row['sha256']}")
        _say(f"{'':<20} packages: {_packages_line(row['packages'], row['name'])}")
        _say(f"{'':<20} owner: {row['owner']}")
        source = row["source"]
        if "cloud_image" in source:
            _say(f"{'':<20} source: cloud image {source['cloud_image']} (sha256 {source['sha256']})")
        elif "recipe" in source:
            _say(f"{'':<20} source: recipe {source['recipe']} from {source['mirror']}")


def _node_images(ctx: click.Context, host: str, as_json: bool) -> None:
    """``vmiso --host NODE images``: the node's images and their digests (the list only, so far)."""
    from .errors import ConfigError

    if ctx.invoked_subcommand is not None:
        from .node.server import COMMANDS

        if ctx.invoked_subcommand in (COMMANDS["images"] or ()):
            ctx.obj["node"] = host  # the subcommand runs there
            return
        raise ConfigError(f"--host is not supported for 'vmiso images {ctx.invoked_subcommand}' yet (only for the "
                          "list, show, verify, warm and rm); nothing was done", "run it on the node itself")
    rows = _ssh_node(ctx, host).images()
    if as_json:
        click.echo(json.dumps([dict(row, host=host) for row in rows], indent=2))
        return
    if not rows:
        _say(f"no images on {host}")
        return
    _say(f"{'NAME':<20} {'SIZE':>9} {'CREATED':<26} SHA256  (on {host})")
    for row in rows:
        _say(f"{row['name']:<20} {row['size'] / 1024**2:>7.0f}MB {row['created'] or '?':<26} {row['sha256'] or '?'}")


def _packages_line(packages: list[dict[str, str]], image: str, width: int = 90) -> str:
    """The image's distributions (pip's own left out) in one line of about ``width`` characters:
    as many as fit, then how many more and where to see them all."""
    names = [f"{p['name']}=={p['version']}" for p in packages if p["name"] not in ("pip", "setuptools", "wheel")]
    shown: list[str] = []
    for name in names:
        if shown and len(", ".join([*shown, name])) > width:
            break
        shown.append(name)
    more = len(names) - len(shown)
    return (", ".join(shown) or "-") + (f" and {more} more ('vmiso images show {image}')" if more else "")


@images.command("rm")
@click.argument("name")
@click.pass_context
def images_rm(ctx: click.Context, name: str) -> None:
    """Remove an image."""
    from .host import reaper
    from .image.store import remove_image

    if node := ctx.obj.get("node"):
        _on_node(ctx, node, ["images", "rm", name])

    state_dir = ctx.obj["config"].state_dir
    remove_image(state_dir, name)
    reaper.collect(None, state_dir)  # this user's warm states of it, among what is left over
    click.echo(f"removed {name}")


@images.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def images_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """One image: its manifest's summary and what its provisioning's gateway let through or refused."""
    from .image.inventory import summary_lines
    from .image.store import get_image, summary
    from .network.record import image_record

    if node := ctx.obj.get("node"):
        _on_node(ctx, node, ["images", "show", name, *(["--json"] if as_json else [])])

    image = get_image(ctx.obj["config"].state_dir, name)
    info = summary(image)
    info["gateway"] = image_record(image.path, image.manifest())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    _say(f"{info['name']}: sha256 {info['sha256']}, created {info['created'] or '?'}")
    if info["startup"] is None:
        _say("start-up code: not inventoried (provisioned before vmiso read it; provision again)")
    else:
        for line in summary_lines(info["startup"]):
            _say(line)
    if info["audit"] is not None:
        from .image.audit import lines as audit_lines

        for line in audit_lines(info["audit"]):
            _say(line)
        _say(f"  ('vmiso images audit {name}' checks again now)")
    packages = ", ".join(f"{p['name']}=={p['version']}" for p in info["packages"])
    _say(f"packages: {packages or '-'}")
    if info["hashed"] is not None:
        _say("requirements: " + ("hash-pinned: pip checked every file it installed against them" if info["hashed"]
                                 else "not hash-pinned: pip installed whatever the index served then; a "
                                      "hash-pinned file (pip-compile --generate-hashes, uv pip compile "
                                      "--generate-hashes) makes the template reproducible"))
    _say_lock(info["lock"], requirements=info["hashed"] is not None)
    gateway = info["gateway"]
    if gateway is None:
        _say("gateway: no record (provisioned before vmiso kept one)")
        return
    _say(f"gateway record: {gateway['record']} (sha256 {gateway['sha256']}, checked)")
    _say("allowed: " + (", ".join(gateway["allow_list"]) or "-"))
    for title, key in (("contacted", "contacted"), ("refused", "refused"), ("failed", "failed")):
        rows = gateway[key]
        _say(f"{title}: {'-' if not rows else ''}")
        for row in rows:
            _say(f"  {row['host']}: {row['connections']} connection(s), {row['bytes_from_guest']} bytes "
                 f"from the guest, {row['bytes_to_guest']} to it")
    _say(f"empty: {gateway['empty']} connection(s) that sent nothing")


def _say_lock(lock: dict[str, Any] | None, *, requirements: bool) -> None:
    if lock is None:
        if requirements:
            _say("lock: none (provisioned before vmiso made one; provision again for pylock.toml)")
        return
    sdists = lock["sdists"]
    _say(f"lock: {lock['file']}, {lock['distributions']} distribution(s) pinned by sha256 ({len(sdists)} built in "
         f"the VM from sdists{': ' + ', '.join(sdists) if sdists else ''})")
    for problem in lock["not_locked"]:
        _say(f"not locked: {problem}")
    if lock["unexplained_downloads"]:
        _say("downloads the gateway never saw: " + ", ".join(lock["unexplained_downloads"]))
    if lock["unexplained_hosts"]:
        _say("reached, and explained by no download, index or apt source: " + ", ".join(lock["unexplained_hosts"]))


@images.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def images_diff(ctx: click.Context, a: str, b: str, as_json: bool) -> None:
    """What image B adds, removes or changes against image A: Python and Debian packages, code that
    runs at every Python start, native extensions, files in no package, hosts provisioning reached.
    Exit status 0 when nothing differs, 1 when something does (as diff(1))."""
    from .image import diff
    from .image.store import get_image
    from .network.record import image_record

    state_dir = ctx.obj["config"].state_dir
    sides = []
    for name in (a, b):
        image = get_image(state_dir, name)
        manifest = image.manifest()
        sides.append((manifest, image_record(image.path, manifest)))
    found = diff.compare(sides[0][0], sides[1][0], sides[0][1], sides[1][1])
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        _say(f"A {a}: sha256 {found['a']['sha256']}, created {found['a']['created'] or '?'}")
        _say(f"B {b}: sha256 {found['b']['sha256']}, created {found['b']['created'] or '?'}")
        for line in diff.lines(found):
            _say(line)
        if not found["differ"]:
            _say("no differences in packages, start-up code or hosts reached"
                 + (" (the same template)" if found["same_template"] else ""))
    ctx.exit(1 if found["differ"] else 0)


@images.command("sbom")
@click.argument("name")
@click.pass_context
def images_sbom(ctx: click.Context, name: str) -> None:
    """The image's SBOM as CycloneDX 1.6 JSON: its Python distributions (with their native extensions and
    the SBOMs their wheels carried), its Debian packages, native extensions in no package."""
    from .image.sbom import sbom_json
    from .image.store import get_image

    click.echo(sbom_json(get_image(ctx.obj["config"].state_dir, name).manifest()))


@images.command("audit")
@click.argument("name")
@click.option("--osv", "osv_path", type=click.Path(path_type=Path, exists=True),
              help="OSV advisories on disk (a directory of OSV JSON files, or OSV's PyPI all.zip): no network")
@click.option("--service", type=click.Choice(["pypi", "osv"]), default="pypi", show_default=True,
              help="what pip-audit asks, without --osv")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def images_audit(ctx: click.Context, name: str, osv_path: Path | None, service: str, as_json: bool) -> None:
    """Check the image's Python distributions for known vulnerabilities and malicious releases, now, on this
    host.  Exit status 0: none known; 1: some found; 3: not everything could be checked."""
    from .image import audit
    from .image.store import get_image

    packages = get_image(ctx.obj["config"].state_dir, name).manifest().get("pip", [])
    found = (audit.with_osv_files(packages, osv_path) if osv_path is not None
             else audit.with_pip_audit(packages, service)).as_dict()
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        for line in audit.lines(found):
            _say(line)
    ctx.exit(1 if found["vulnerable"] else 3 if found["unavailable"] or found["not_checked"] else 0)


@images.command("verify")
@click.argument("name")
@click.pass_context
def images_verify(ctx: click.Context, name: str) -> None:
    """Re-hash an image's template and compare with its manifest."""
    from .image.store import get_image, verify

    if node := ctx.obj.get("node"):
        _on_node(ctx, node, ["images", "verify", name])

    digest = verify(get_image(ctx.obj["config"].state_dir, name))
    click.echo(f"{name}: OK sha256 {digest}")


_JOB_OPTIONS = [
    _config_option,
    _accel_option,
    _state_option,
    click.option("--image", help="template to clone (default: image.name from the config, 'default' without one)"),
    click.option("-i", "--input", "inputs", multiple=True, type=click.Path(path_type=Path, exists=False),
                 help="file or directory to copy in, read-only, under /in (repeatable)"),
    click.option("-o", "--output", type=click.Path(path_type=Path),
                 help="new or empty directory that receives /out after checks"),
    click.option("--timeout", type=click.IntRange(min=1), help="seconds the job may run (wall clock)"),
    click.option("--memory", type=click.IntRange(min=128), help="guest memory in MiB"),
    click.option("--cpus", type=click.IntRange(min=1), help="guest vCPUs"),
    click.option("--scratch", metavar="SIZE",
                 help="room for the job's /tmp on disk, e.g. 8GiB (default: run.scratch, 2GiB)"),
    click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
                 help="write a record of the run (timings, exit code, output manifest) here"),
    click.option("--cold", is_flag=True, help="boot the clone from scratch even when a warm state exists"),
    click.option("--accept-tool-files", is_flag=True,
                 help="also copy outputs that host tools run code from (.git/, .hg/, .envrc, .vscode/, ...)"),
    click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY[=VALUE]",
                 help="set a variable for the job (repeatable); KEY alone passes this environment's value "
                      "(kept off vmiso's command line: use it for secrets); nothing else of it reaches the job"),
    click.option("--env-file", type=click.Path(path_type=Path, dir_okay=False),
                 help="variables for the job, one KEY=VALUE a line ('#' comments; values taken as written)"),
    click.option("-p", "--publish", multiple=True, type=click.IntRange(1, 65535), metavar="PORT",
                 help="let this host reach the job's 127.0.0.1:PORT on a loopback port vmiso prints, "
                      "while the job runs (repeatable); e.g. a notebook server"),
    click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST[:PORT]",
                 help="let the job reach this service (port 443 unless given) through HTTP(S)_PROXY, and "
                      "nothing else (repeatable; adds to run.allow_hosts); every connection is recorded"),
    click.option("--allow-tcp", "allow_tcp", multiple=True, metavar="LOCALPORT:HOST:PORT",
                 help="join the job's 127.0.0.1:LOCALPORT to HOST:PORT, resolved and connected on this host "
                      "(repeatable; adds to run.allow_tcp): for a database or broker that takes no proxy"),
    click.option("--raw", is_flag=True,
                 help="pass the job's output to a terminal unchanged (by default its control characters "
                      "and escape sequences are shown, not obeyed; with a pseudo-terminal, those that "
                      "reach beyond the screen are dropped; pipes and files always get raw bytes)"),
]


def _job_options(command: Any) -> Any:
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


@cli.command(context_settings={"allow_interspersed_args": False})
@_job_options
@click.option("-t", "--tty", is_flag=True, help="give the job a pseudo-terminal (for interactive programs)")
@click.argument("command", nargs=-1, required=True)
@click.pass_context
def run(ctx: click.Context, /, command: tuple[str, ...], tty: bool, **options: Any) -> None:
    """Run COMMAND in a disposable clone of an image: offline, unless --allow-host or
    --allow-tcp names a service it may reach.

    \b
    Example (vmiso's options, then --, then the job's command line):
        vmiso run -i data.csv -o results/ -- python job.py data.csv

    \b
    Inside the guest: inputs under /in (read-only, also the working directory),
    outputs to /out, /tmp (and TMPDIR) on a scratch disk of the run's own, the
    image's venv first on PATH.  vmiso exits with the job's exit code, or
    128 + N when signal N killed it; 124 means the timeout struck, 125 an error
    of vmiso or the VM, 130 an interruption, 2 a usage error (a bad flag).
    """
    _run_job(ctx, command, tty=tty, **options)


@cli.command(context_settings={"allow_interspersed_args": False})
@_job_options
@click.argument("command", nargs=-1)
@click.pass_context
def shell(ctx: click.Context, /, command: tuple[str, ...], **options: Any) -> None:
    """An interactive shell (or COMMAND) on a pseudo-terminal in a disposable clone, offline unless told.

    \b
    The same clone, shares, limits, timeout and cleanup as 'vmiso run'; outputs in
    /out are checked and copied (-o) when the shell exits, and vmiso exits with
    the shell's exit code.
    """
    _run_job(ctx, command or ("bash",), tty=True, **options)


def _run_job(ctx: click.Context, command: tuple[str, ...], *, tty: bool, config_path: Path | None,
             accel: str | None, state_dir: Path | None, image: str | None, inputs: tuple[Path, ...],
             output: Path | None, timeout: int | None, memory: int | None, cpus: int | None,
             scratch: str | None, json_path: Path | None, cold: bool, accept_tool_files: bool,
             env_pairs: tuple[str, ...], env_file: Path | None, publish: tuple[int, ...],
             allow_hosts: tuple[str, ...], allow_tcp: tuple[str, ...], raw: bool) -> None:
    from .execution import JobIO, execution_for
    from .host.outputs import open_record
    from .plan import RunRequest, plan_run
    from .run import Interruption, RunResult

    # The record (--json) has one shape whatever happens; what is known before the config is read.
    before = RunResult(None, image, None, command, EXIT_VMISO)
    # Opened once, now: a bad path is refused before a VM starts, and the record goes to
    # this file at the end whatever is put at the path meanwhile.
    record_fd = open_record(json_path) if json_path is not None else None
    steps = Steps()
    try:
        scratch_bytes = None if scratch is None else config_mod.parse_size(scratch, "--scratch")
        config = _load(ctx, config_path, accel=accel, state_dir=state_dir)
        env = _env_file(env_file) if env_file is not None else []
        env += [_env_option(pair) for pair in env_pairs]
        plan = plan_run(config, RunRequest(
            command=command, image=image, inputs=inputs, output=output, timeout=timeout, memory_mib=memory,
            cpus=cpus, scratch_bytes=scratch_bytes, warm=not cold, env=tuple(env),
            accept_tool_files=accept_tool_files, publish=publish, allow_hosts=allow_hosts, allow_tcp=allow_tcp,
            host=_node_of(ctx, config), remote_vmiso=ctx.obj.get("remote_vmiso")))
        before = RunResult.before_run(plan)
        session = _Session.for_job(tty=tty, raw=raw)
        printer = _job_progress(ctx)
        steps = Steps(session.around(printer))
        # The first Ctrl-C or SIGTERM while the job runs is the job's (it may clean up and
        # write its results); the second, or one before the job runs, stops vmiso at once.
        interruption = Interruption()

        def on_signal(signum: int, frame: object) -> None:
            if not interruption.request(signal.Signals(signum)):
                _raise_interrupt(signum, frame)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, _raise_interrupt)  # the terminal was closed
        with session, printer:
            io = JobIO(session.stdout, session.stderr, session.stdin, session.terminal,
                       lambda guest, where: printer.message(_published_text(guest, where)))
            result = execution_for(plan).execute(plan, io, steps, interruption)
        record = result.as_dict()
    except VmisoError as err:
        before.timings = dict(steps.timings)
        record = err.record or before.failed(err, err.exit_code)
        if record["network"] is not None:
            _say_network(record["network"], quiet=ctx.obj["quiet"])
        raise
    except KeyboardInterrupt:
        before.timings = dict(steps.timings)
        record = before.failed(KeyboardInterrupt("interrupted"), EXIT_INTERRUPTED)
        raise
    except Exception as err:
        before.timings = dict(steps.timings)
        record = before.failed(RuntimeError(f"internal error: {type(err).__name__}: {err}"), EXIT_VMISO)
        raise
    finally:
        if record_fd is not None:
            with os.fdopen(record_fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=2) + "\n")
    if result.outputs is not None:
        for path, reason in result.outputs.refused:
            click.echo(f"vmiso: refused output {neutralize(path)}: {neutralize(reason)}", err=True)
    if (killed := result.signal_message()) is not None:
        what, hint = killed
        click.echo(f"vmiso: {what}" + (f" ({hint})" if hint else ""), err=True)
    for line in result.hints:  # vmiso's own words here; a node's (--host) are its to choose
        click.echo(f"vmiso: {neutralize(line)}", err=True)
    if result.network is not None:
        _say_network(result.network, quiet=ctx.obj["quiet"])
    ctx.exit(result.exit_code)


def _say_network(record: dict[str, Any], *, quiet: bool) -> None:
    """One line for what the job reached (not with -q), and one for each place it was refused
    (always: something tried to phone home); the guest chose those names, shown neutralized."""
    def amount(n: int) -> str:
        return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"
    reached = [f"{neutralize(r['host'])} ({r['connections']}x, {amount(r['bytes_from_guest'])} sent, "
               f"{amount(r['bytes_to_guest'])} received)" for r in record["contacted"]]
    if not quiet:
        click.echo("vmiso: network: " + ("reached " + ", ".join(reached) if reached else "the job reached nothing")
                   + (f"; {len(record['failed'])} allowed place(s) did not answer" if record["failed"] else ""),
                   err=True)
    reasons: dict[str, str] = {}
    busy = 0
    for entry in record["connections"]:
        if entry["method"] == "BUSY":  # refused unread: the gateway served all it may at once
            busy += 1
        elif entry["outcome"] in ("refused", "malformed"):
            target = f"{entry['host']}:{entry['port']}" if entry["port"] is not None else entry["host"]
            reasons.setdefault(target, entry["reason"] or "")
    for target, reason in list(reasons.items())[:10]:
        shown = "a request vmiso could not read" if target == "-" else neutralize(target)
        click.echo(f"vmiso: the job tried to reach {shown}, refused: {neutralize(reason)}", err=True)
    if busy:
        click.echo(f"vmiso: the job opened more connections at once than the gateway serves; {busy} of them "
                   "were refused unread", err=True)
    if len(reasons) > 10:
        click.echo(f"vmiso: ... and {len(reasons) - 10} more refused places (see --json)", err=True)


def _published_text(guest_port: int, where: str) -> str:
    return (f"vmiso: the job's port {guest_port} is at {where} (http://{where}/) while it runs; "
            "what it serves is the guest's, and a browser can send on what it shows")


class _Session:
    """This process's terminal and standard streams, as one job uses them.

    Without a pseudo-terminal: stdout and stderr neutralized on a terminal (unless
    --raw), stdin streamed when it is a pipe or a file.  With one (-t, shell): the
    job's single output stream goes to stdout through the interactive filter, the
    keyboard goes to the job, and while the job runs (from the "exec" step on) the
    terminal is in raw mode, so that keys like Ctrl-C reach the job's terminal.
    """

    def __init__(self, stdout: Any, stderr: Any, stdin: Any, terminal: Any) -> None:
        self.stdout, self.stderr, self.stdin, self.terminal = stdout, stderr, stdin, terminal
        self._saved_mode: list[Any] | None = None
        self._finished = False

    @classmethod
    def for_job(cls, *, tty: bool, raw: bool) -> _Session:
        stdin_is_terminal = sys.stdin is not None and sys.stdin.isatty()
        if not tty:
            return cls(for_terminal(sys.stdout.buffer, is_terminal=sys.stdout.isatty(), raw=raw),
                       for_terminal(sys.stderr.buffer, is_terminal=sys.stderr.isatty(), raw=raw),
                       None if sys.stdin is None or stdin_is_terminal else sys.stdin.buffer, None)
        from .ssh import Terminal

        out: Any = sys.stdout.buffer
        if sys.stdout.isatty() and not raw:
            out = InteractiveFilter(out)
        return cls(out, out, sys.stdin.buffer if sys.stdin is not None else None,
                   Terminal(os.environ.get("TERM") or "xterm-256color", _terminal_size))

    def around(self, listener: Any) -> Any:
        """The progress listener, with the terminal raw while the job runs (the "exec"
        step) and given back, in its ordinary modes, as soon as the job ends."""
        def listen(event: str, step: str, detail: str, elapsed: float) -> None:
            if event in ("done", "fail") and step == "exec":
                self._give_back()
            listener(event, step, detail, elapsed)
            if event == "start" and step == "exec" and self.terminal is not None:
                self._make_raw()
        return listen

    def _make_raw(self) -> None:
        if sys.stdin is not None and sys.stdin.isatty() and self._saved_mode is None:
            import termios
            import tty

            self._saved_mode = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno(), termios.TCSANOW)  # keep what was typed ahead

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self._give_back()

    def _give_back(self) -> None:
        """Once: the screen's modes reset, the terminal's mode restored, and what was typed
        for the job but not read discarded (TCSAFLUSH), so that it never reaches the shell."""
        if self._finished:
            return
        self._finished = True
        for stream in {id(s): s for s in (self.stdout, self.stderr)}.values():
            if isinstance(stream, (SafeStream, InteractiveFilter)):
                stream.finish()
        if self._saved_mode is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSAFLUSH, self._saved_mode)
            self._saved_mode = None


def _terminal_size() -> tuple[int, int]:
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        try:
            size = os.get_terminal_size(stream.fileno())
            return size.columns, size.lines
        except (OSError, ValueError, AttributeError):
            continue
    return 80, 24


def _env_pair(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise VmisoError(f"{where}: {text!r} has no '='", f"write {key}=VALUE on that line")
    return key, value


def _env_option(text: str) -> tuple[str, str]:
    """``-e KEY=VALUE``, or ``-e KEY``: the value of KEY in vmiso's own environment (as docker run -e KEY),
    which keeps a secret off vmiso's command line, where every local user can read it."""
    if "=" in text:
        return _env_pair(text, "-e")
    value = os.environ.get(text)
    if value is None:
        raise VmisoError(f"-e {text}: {text} is not set in vmiso's environment, so the job cannot have its value",
                         f"export {text} first, or write -e {text}=VALUE")
    return text, value


def _env_file(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VmisoError(f"cannot read --env-file {path}: {err}") from None
    return [_env_pair(line, f"{path}, line {number}") for number, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(f"vmiso was asked to stop ({signal.Signals(signum).name})")


class _BatchCommand(click.Command):
    """``--each`` takes every path after it, as a shell's glob gives them (``--each data/*.csv``), up to
    the next option or ``--``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        spread, each = [], False
        for index, arg in enumerate(args):
            if arg == "--":
                spread += args[index:]
                break
            if arg == "--each":
                each = True
                continue
            if each and not arg.startswith("-"):
                spread += ["--each", arg]
                continue
            each = False
            spread.append(arg)
        return super().parse_args(ctx, spread)


@cli.command(cls=_BatchCommand, context_settings={"allow_interspersed_args": False})
@_config_option
@_accel_option
@_state_option
@click.option("--image", help="template to clone (default: image.name from the config)")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="the batch's directory: new, or an earlier batch's to resume it")
@click.option("--each", "each", multiple=True, type=click.Path(path_type=Path), metavar="PATH...",
              help="the inputs, one task each, under /in (every path up to the next option or --)")
@click.option("-i", "--input", "inputs", multiple=True, type=click.Path(path_type=Path),
              help="a file or directory every task gets under /in too (repeatable)")
@click.option("-j", "--jobs", type=click.IntRange(min=1),
              help="tasks at once (default: what the cores and the available memory hold; 1 with --host; see README)")
@click.option("--retry", type=click.IntRange(min=0), default=0, show_default=True,
              help="run a task again up to N times when vmiso itself failed it (exit 125); never for the "
                   "job's own exit code")
@click.option("--on", "engine", default="local", show_default=True,
              help="where the tasks run: local (this host, -j at a time) or slurm (one job array, -j "
                   "elements at a time; OUTPUT and the inputs on a filesystem the nodes share)")
@click.option("--timeout", type=click.IntRange(min=1), help="seconds each job may run (wall clock)")
@click.option("--memory", type=click.IntRange(min=128), help="each guest's memory in MiB")
@click.option("--cpus", type=click.IntRange(min=1), help="each guest's vCPUs")
@click.option("--scratch", metavar="SIZE", help="room for each job's /tmp on disk, e.g. 8GiB")
@click.option("--cold", is_flag=True, help="boot every clone from scratch")
@click.option("--accept-tool-files", is_flag=True,
              help="also copy outputs that host tools run code from (.git/, .envrc, ...)")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY[=VALUE]",
              help="set a variable for every job (repeatable); KEY alone passes this environment's value")
@click.option("--env-file", type=click.Path(path_type=Path, dir_okay=False),
              help="variables for every job, one KEY=VALUE a line")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST[:PORT]",
              help="let every job reach this service, and nothing else (as vmiso run's)")
@click.option("--allow-tcp", "allow_tcp", multiple=True, metavar="LOCALPORT:HOST:PORT",
              help="join every job's 127.0.0.1:LOCALPORT to HOST:PORT (as vmiso run's)")
@click.argument("command", nargs=-1, required=True)
@click.pass_context
def batch(ctx: click.Context, /, command: tuple[str, ...], config_path: Path | None, accel: str | None,
          state_dir: Path | None, image: str | None, output: Path, each: tuple[Path, ...],
          inputs: tuple[Path, ...], jobs: int | None, retry: int, engine: str, timeout: int | None,
          memory: int | None, cpus: int | None, scratch: str | None, cold: bool, accept_tool_files: bool,
          env_pairs: tuple[str, ...], env_file: Path | None, allow_hosts: tuple[str, ...],
          allow_tcp: tuple[str, ...]) -> None:
    """Run COMMAND once per input, each in a disposable clone of its own, {} in COMMAND being its name.

    \b
    Example: report.py over every CSV, two VMs at a time, results in results/NAME/:
        vmiso batch -i report.py --each data/*.csv -o results/ -j 2 -- python report.py {}

    \b
    Each task is a 'vmiso run' of its own: its input (and every -i) under /in,
    its /out checked and copied to OUTPUT/NAME/, its output in
    OUTPUT/.batch/NAME.log, its run record in OUTPUT/.batch/NAME.json, and
    every task's in OUTPUT/batch.json.  The same command again resumes: tasks
    that exited 0 on the same template and inputs are skipped.  Exit status: 0
    when every task exited 0, 123 when one did not, 130 when interrupted
    (Ctrl-C or SIGTERM stop the running tasks; run again to resume), 125 when
    the batch could not run, 2 for a usage error.
    """
    from .batch.engines import Stop, engine_for
    from .batch.plan import (
        BatchRequest,
        Resources,
        available_memory_mib,
        check_request,
        default_jobs,
        plan_batch,
    )
    from .batch.runner import run_batch
    from .host.inputs import check_inputs
    from .image.store import get_image, verified_sha256
    from .plan import RunRequest, plan_run

    config = _load(ctx, config_path, accel=accel, state_dir=state_dir)
    node = _node_of(ctx, config)
    scratch_bytes = None if scratch is None else config_mod.parse_size(scratch, "--scratch")
    env = _env_file(env_file) if env_file is not None else []
    env += [_env_option(pair) for pair in env_pairs]  # checked here: a task would fail on each
    # What every task's run will be, checked once before anything is made.
    plan = plan_run(config, RunRequest(
        command=command, image=image, inputs=inputs, timeout=timeout, memory_mib=memory, cpus=cpus,
        scratch_bytes=scratch_bytes, warm=not cold, env=tuple(env), accept_tool_files=accept_tool_files,
        allow_hosts=allow_hosts, allow_tcp=allow_tcp))
    options: list[str] = []
    for flag, path in (("-c", config_path), ("--state-dir", state_dir), ("--env-file", env_file)):
        if path is not None:
            options += [flag, str(path.absolute())]
    given: tuple[tuple[str, object], ...] = (("--accel", accel), ("--timeout", timeout), ("--memory", memory),
                                            ("--cpus", cpus), ("--scratch", scratch))
    for flag, value in given:
        if value is not None:
            options += [flag, str(value)]
    options += ["--cold"] * cold + ["--accept-tool-files"] * accept_tool_files
    for flag, values in (("-e", env_pairs), ("--allow-host", allow_hosts), ("--allow-tcp", allow_tcp)):
        for value in values:
            options += [flag, value]
    request = BatchRequest(command=command, each=each, shared=inputs, output=output, run_options=tuple(options),
                           jobs=jobs, retry=retry, engine=engine, config=config_path, state_dir=state_dir, host=node,
                           remote_vmiso=ctx.obj.get("remote_vmiso"))
    check_request(request)
    if node is not None:
        template_sha256 = _node_template(ctx, node, plan.image)
        jobs = jobs or 1  # the node's room is not known here
    else:
        template_sha256 = verified_sha256(get_image(plan.state_dir, plan.image))
    if jobs is None and engine == "slurm":
        jobs = len(each)  # Slurm places them as its nodes have room
    elif jobs is None:
        jobs = default_jobs(cores=os.cpu_count() or 1, available_mib=available_memory_mib(),
                            memory_mib=plan.memory_mib, cpus=plan.cpus)
    batch_plan = plan_batch(request, image=plan.image, template_sha256=template_sha256, jobs=jobs,
                            resources=Resources(memory_mib=plan.memory_mib, cpus=plan.cpus, timeout=plan.timeout,
                                                boot_timeout=plan.boot_timeout))
    for task in batch_plan.tasks:  # what a run would refuse before it starts, refused for all now
        check_inputs((*batch_plan.shared, task.input), plan.input_limits)
    runner = engine_for(engine, batch_plan)
    stop = Stop()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.request()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = [signal.signal(sig, on_signal) for sig in signals]
    try:
        with _BatchProgress(sys.stderr, stop, quiet=ctx.obj["quiet"], output=batch_plan.layout.root,
                            jobs=jobs) as progress:
            result = run_batch(batch_plan, runner, progress, stop)
    finally:
        for sig, handler in zip(signals, before, strict=True):
            signal.signal(sig, handler)
    _batch_summary(result, batch_plan.layout.root, quiet=ctx.obj["quiet"])
    ctx.exit(result.exit_code)


def _node_template(ctx: click.Context, node: str, image: str) -> str:
    """The sha256 of ``image`` on ``node``, as the node lists it (each task's run record says again
    which template it ran on, and resuming compares that)."""
    from .errors import ImageError

    rows = _ssh_node(ctx, node).images()
    found = [row["sha256"] for row in rows if row["name"] == image]
    if not found or found[0] is None:
        raise ImageError(f"{node} has no image named {image!r}" if not found else
                         f"{node} does not know the sha256 of its image {image!r}",
                         f"see vmiso --host {node} images")
    return str(found[0])


def _task_line(entry: Any) -> str:
    """One finished task, in vmiso's words: its name (the input's, neutralized), what became of it."""
    what = entry.status
    if entry.exit_code is not None:
        what += f", exit {entry.exit_code}"
    if entry.signal:
        what += f" ({entry.signal})"
    details = [d for d in (entry.boot, f"{entry.seconds:.1f} s" if entry.seconds is not None else None) if d]
    return f"{entry.name}: {what}" + (f" [{', '.join(details)}]" if details else "")


class _BatchProgress:
    """A batch's progress on stderr: on a terminal a live line (done, running, failed, rate, time left)
    under a line for each task that did not end well; elsewhere one line per finished task."""

    def __init__(self, stream: TextIO, stop: Any, *, quiet: bool, output: Path, jobs: int,
                 interval: float = 0.5) -> None:
        self._stream, self._stop, self._quiet = stream, stop, quiet
        self._output, self._jobs, self._interval = output, jobs, interval
        self._live = not quiet and stream.isatty() and os.environ.get("TERM") != "dumb"
        self._lock = threading.RLock()
        self._live_line = _LiveLine(self._stream)
        self._total = self._done = self._ran = self._failed = 0
        self._running: set[str] = set()
        self._started = time.monotonic()
        self._stops_said = 0
        self._end = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> _BatchProgress:
        self._ticker = threading.Thread(target=self._tick, name="vmiso-batch-progress", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._say_stops()
            self._erase()

    def _tick(self) -> None:
        while not self._end.wait(self._interval):
            with self._lock:
                self._say_stops()
                self._draw()

    def _say_stops(self) -> None:
        requests = self._stop.requests
        if requests > self._stops_said:
            self._stops_said = requests
            self._line("vmiso: stopping the batch: its running tasks are stopped and clean up; the same command "
                       "resumes it" if requests == 1 else "vmiso: stopping the running tasks at once")

    def _line(self, text: str) -> None:
        self._erase()
        click.echo(neutralize(text), file=self._stream)
        self._draw()

    def planned(self, total: int, skipped: list[str], to_run: list[str]) -> None:
        with self._lock:
            self._total, self._done = total, len(skipped)
            if not self._quiet:
                self._line(f"vmiso: batch of {total} task{'s' * (total != 1)} into {self._output}: "
                           + (f"{len(skipped)} done before, skipped; " if skipped else "")
                           + f"{len(to_run)} to run, {min(self._jobs, max(len(to_run), 1))} at a time")

    def started(self, entry: Any) -> None:
        with self._lock:
            self._running.add(entry.name)
            self._draw()

    def ended(self, entry: Any) -> None:
        with self._lock:
            self._running.discard(entry.name)
            self._ran += 1
            if entry.status == "ok":
                self._done += 1
            else:
                self._failed += 1
            if not self._quiet and (not self._live or entry.status != "ok"):
                self._line(f"vmiso: [{self._done + self._failed}/{self._total}] {_task_line(entry)}")
            else:
                self._draw()

    def _erase(self) -> None:
        self._live_line.erase()

    def _draw(self) -> None:
        if not self._live or self._end.is_set():
            return
        minutes = (time.monotonic() - self._started) / 60
        text = f"  batch: {self._done}/{self._total} done, {len(self._running)} running, {self._failed} failed"
        if self._ran and minutes > 0:
            rate = self._ran / minutes
            left = max(self._total - self._done - self._failed, 0) / rate * 60
            text += f", {rate:.1f}/min, about {int(left) // 60}:{int(left) % 60:02d} left"
        self._live_line.show(text)


def _batch_summary(result: Any, output: Path, *, quiet: bool) -> None:
    """The table of this batch's tasks on stderr, then what to do next."""
    entries = [result.record.tasks[name] for name in result.names]
    skipped = set(result.skipped)
    if not quiet:
        width = min(max([len(e.name) for e in entries] + [4]), 40)
        click.echo(f"{'TASK':<{width}}  {'STATUS':<11} {'EXIT':>4}  {'BOOT':<9} {'TIME':>8}  TRIES  LOG", err=True)
        for e in entries:
            status = "skipped" if e.name in skipped else e.status
            exit_code = "-" if e.exit_code is None else str(e.exit_code)
            seconds = "-" if e.seconds is None else f"{e.seconds:.1f}s"
            log_path = "" if e.status == "ok" or not e.attempts else str(output / e.log)
            click.echo(neutralize(f"{e.name:<{width}}  {status:<11} {exit_code:>4}  {e.boot or '-':<9} "
                                  f"{seconds:>8}  {e.attempts:>5}  {log_path}").rstrip(), err=True)
    else:
        for e in entries:
            if e.status != "ok":
                click.echo(neutralize(f"vmiso: {_task_line(e)} (log: {output / e.log})"), err=True)
    counts = result.record.counts(result.names)
    said = [f"{counts['ok']} ok" + (f" ({len(skipped)} done before)" if skipped else "")]
    said += [f"{n} {status}" for status, n in counts.items() if n and status != "ok"]
    click.echo(f"vmiso: {len(entries)} tasks: {', '.join(said)}; record: {output / 'batch.json'}", err=True)
    if result.interrupted:
        click.echo("vmiso: the batch was interrupted; run the same command again to resume it", err=True)
    elif result.exit_code != 0:
        click.echo("vmiso: run the same command again to run the tasks that did not exit 0 again", err=True)


@cli.command()
@_config_option
@_state_option
@click.option("--layers", is_flag=True,
              help="Also remove the cached OS layers (provisioning rebuilds them when needed).")
@click.pass_context
def gc(ctx: click.Context, config_path: Path | None, state_dir: Path | None, layers: bool) -> None:
    """Remove VMs, overlays and directories that a killed vmiso left behind."""
    from .host import reaper, state
    from .hypervisor import connected
    from .image.layer import remove_cached_layers

    config, node = _config_or_node(ctx, config_path, state_dir=state_dir)
    if node is not None:
        _on_node(ctx, node, ["gc", *(["--layers"] if layers else [])])
    assert config is not None
    with connected(config.libvirt_uri) as hv:
        cleaned = reaper.clean(hv, config.state_dir)
    for item in cleaned.removed:
        _say(f"removed {item.kind} {item.name}")
    freed, kept = remove_cached_layers(state.home(config.state_dir).path) if layers else ([], [])
    for layer in freed:
        click.echo(f"removed OS layer {layer.key} ({layer.size / 1024**2:.0f} MiB)")
    for layer in kept:
        click.echo(f"kept OS layer {layer.key}: a provisioning is using it")
    for item, reason in cleaned.failed:  # each on its own line; the others were removed
        click.echo(neutralize(f"vmiso: could not remove {item.kind} {item.name}: {reason}"), err=True)
    if not cleaned.removed and not freed and not cleaned.failed:
        click.echo("nothing to remove")
    ctx.exit(1 if cleaned.failed else 0)


@cli.command()
@_config_option
@_accel_option
@_state_option
@click.pass_context
def doctor(ctx: click.Context, config_path: Path | None, accel: str | None, state_dir: Path | None) -> None:
    """Check the host: QEMU, libvirt, accelerator, tools, space, permissions, leftovers.

    With --host (or the config's host:): the node's, with its own configuration, after the
    link itself (your ssh logs in, the node's vmiso answers and speaks this one's protocol)."""
    from .doctor import run_checks

    config, host = _config_or_node(ctx, config_path, accel=accel, state_dir=state_dir)
    if host is not None:
        checks = _ssh_node(ctx, host).doctor()
        _say(f"[ok  ] link: {host} answers as a vmiso node; what it finds on itself:")
    else:
        assert config is not None
        checks = run_checks(config)
    failed = 0
    for check in checks:
        mark = "ok  " if check.ok and not check.warning else "warn" if check.ok else "FAIL"
        _say(f"[{mark}] {check.name}: {check.detail}")
        if check.fix:
            _say(f"       fix: {check.fix}")
        failed += not check.ok
    ctx.exit(1 if failed else 0)


@images.command("warm")
@click.argument("name")
@click.pass_context
def images_warm(ctx: click.Context, name: str) -> None:
    """Boot and save clones of an image so that runs restore them instead of booting."""
    from .clones.warm import make_warm_state
    from .errors import ImageError
    from .hypervisor import connected
    from .image.store import get_image

    if node := ctx.obj.get("node"):
        _on_node(ctx, node, ["images", "warm", name])
    config = ctx.obj["config"]
    image = get_image(config.state_dir, name)
    with _Progress(ctx.obj["quiet"], live=True) as printer, connected(config.libvirt_uri) as hv:
        steps = Steps(printer)
        try:
            make_warm_state(config, hv, image, steps)
        except VmisoError as err:  # said here, in the error itself: -q hides warnings
            raise ImageError(f"could not make a warm state for {name}: {err.message}", err.hint) from None
    click.echo(f"{name}: warm state ready in {steps.elapsed():.0f} s")


@cli.group()
def pool() -> None:
    """Preloaded clones: restored and waiting, so that runs start at once (start, stop, status)."""


@pool.command("start")
@_config_option
@_accel_option
@_state_option
@click.option("--image", help="image to preload (default: image.name from the config)")
@click.option("--size", type=click.IntRange(1, 16), default=2, show_default=True,
              help="clones kept ready (each holds its guest's memory; see README)")
@click.option("--foreground", is_flag=True, help="serve in this process until stopped (Ctrl-C, SIGTERM)")
@click.pass_context
def pool_start(ctx: click.Context, config_path: Path | None, accel: str | None, state_dir: Path | None,
               image: str | None, size: int, foreground: bool) -> None:
    """Keep SIZE clones of an image restored and ready: runs and shells of this user take one each.

    \b
    Each clone serves one job and is destroyed with it; the pool refills behind.
    The pool's clones end with its process, however it ends.  Runs use a pool's
    clone when one fits (same memory, CPUs, scratch and output limits), else a warm
    restore, else a cold boot, and say which in --json ("boot").
    """
    config, node = _config_or_node(ctx, config_path, accel=accel, state_dir=state_dir)
    if node is not None:
        _on_node(ctx, node, ["pool", "start", *(["--image", image] if image else []), "--size", str(size),
                             *(["--foreground"] if foreground else [])])
    assert config is not None
    name = image or config.image.name
    if foreground:
        _serve_pool(ctx, config, name, size)
        return
    from .host import state
    from .host.workdir import private_dir
    from .tools import pool_argv, start_server

    argv = pool_argv("start", "--foreground", "--image", name, "--size", str(size))
    if config_path is not None:
        argv += ["-c", str(config_path.resolve())]
    if accel is not None:
        argv += ["--accel", accel]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir.resolve())]
    home = state.home(config.state_dir)
    private_dir(home.pool(name))
    log_path = home.pool_log(name)
    with open(log_path, "ab") as log_file:
        child = start_server(argv, log_file)
    assert child.stdout is not None
    with _Progress(ctx.obj["quiet"], live=True) as printer:
        started = time.monotonic()
        printer("start", "pool", f"{size} clone{'s' if size != 1 else ''} of {name} (log: {log_path})", 0.0)
        line = child.stdout.readline().decode(errors="replace").strip()
        printer("done", "pool", "", time.monotonic() - started)
    child.stdout.close()
    if not line.startswith("ready"):
        child.wait()
        tail = log_path.read_bytes()[-2000:].decode(errors="replace").strip().splitlines()
        errors = [t.removeprefix("vmiso: error: ") for t in tail if t.startswith("vmiso: error: ")]
        raise VmisoError(f"the pool for {name} did not start: {errors[-1] if errors else 'see ' + str(log_path)}")
    click.echo(f"pool of {size} for {name} ready in {time.monotonic() - started:.0f} s (pid {child.pid}); "
               f"stop it with: vmiso pool stop --image {name}")


def _serve_pool(ctx: click.Context, config: config_mod.Config, name: str, size: int) -> None:
    from .clones.pool.server import serve
    from .hypervisor import connected
    from .image.store import get_image

    image = get_image(config.state_dir, name)
    stop = threading.Event()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Set from a thread of its own: the handler may interrupt this thread inside stop.set().
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=stop.set, daemon=True).start())

    def ready(status: Any) -> None:
        click.echo(f"ready: {status.size} clones of {status.image} (pid {status.pid})")
        sys.stdout.flush()
        # Nothing more for whoever started this: a closed pipe must not end the pool.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    with connected(config.libvirt_uri) as hv:
        status = serve(config, hv, image, size, Steps(_progress_printer(ctx.obj["quiet"])), on_ready=ready,
                       stop=stop)
    click.echo(f"pool for {name} stopped: {status.served} clones served, {status.dropped} dropped"
               + (f" ({status.problem})" if status.problem else ""), err=True)


def _pool_targets(config: config_mod.Config, image: str | None) -> list[str]:
    from .clones.pool.client import running

    return [image] if image else running(config.state_dir)


@pool.command("stop")
@_config_option
@_state_option
@click.option("--image", help="the image whose pool to stop (default: every pool of this user)")
@click.pass_context
def pool_stop(ctx: click.Context, config_path: Path | None, state_dir: Path | None, image: str | None) -> None:
    """Stop a pool: its idle clones are destroyed; jobs running on its clones go on."""
    from .clones.pool.client import request

    config, node = _config_or_node(ctx, config_path, state_dir=state_dir)
    if node is not None:
        _on_node(ctx, node, ["pool", "stop", *(["--image", image] if image else [])])
    assert config is not None
    stopped = 0
    for name in _pool_targets(config, image):
        if request(config.state_dir, name, "stop") is not None:
            click.echo(f"pool for {name} stopped")
            stopped += 1
    if not stopped:
        click.echo(f"no pool for {image} is running" if image else "no pool is running")


@pool.command("status")
@_config_option
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def pool_status(ctx: click.Context, config_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """This user's running pools: clones ready, served and dropped."""
    from .clones.pool.client import request

    config, node = _config_or_node(ctx, config_path, state_dir=state_dir)
    if node is not None:
        _on_node(ctx, node, ["pool", "status", *(["--json"] if as_json else [])])
    assert config is not None
    rows = [answer for name in _pool_targets(config, None)
            if (answer := request(config.state_dir, name, "status")) is not None]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no pool is running; start one: vmiso pool start --image NAME")
    for row in rows:
        _say(f"{row['image']}: {row['ready']} of {row['size']} ready, {row['served']} served, "
             f"{row['dropped']} dropped (pid {row['pid']})" + (f"; {row['problem']}" if row["problem"] else ""))


@cli.command("_watchdog", hidden=True)
@click.argument("uri")
@click.argument("name")
@click.argument("run_dir")
@click.argument("seconds", type=float)
@click.pass_context
def watchdog_command(ctx: click.Context, uri: str, name: str, run_dir: str, seconds: float) -> None:
    """The process that destroys a run's VM when its vmiso dies (started by vmiso run)."""
    from .clones.watchdog import main as watch

    ctx.exit(watch(uri, name, run_dir, seconds))


@cli.command("_slurm_element", hidden=True)
@click.argument("element_file", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def slurm_element_command(ctx: click.Context, element_file: Path) -> None:
    """One element of a batch's Slurm job array: its task's vmiso run on this node (vmiso.batch.slurm)."""
    from .batch.slurm import element

    ctx.exit(element(element_file))


@cli.command("_node", hidden=True)
@click.option("-c", "--config", "config_path", envvar="VMISO_CONFIG", type=click.Path(path_type=Path, dir_okay=False),
              help="this node's vmiso.yaml (also VMISO_CONFIG)")
@click.pass_context
def node_command(ctx: click.Context, config_path: Path | None) -> None:
    """The node's side of 'vmiso --host ssh://NODE run': the protocol on stdin and stdout (vmiso.node.server)."""
    import threading

    from .node.server import serve

    # The protocol keeps stdin and stdout to itself: what anything else writes to fd 1 (a child
    # that inherits it) goes to stderr, and nothing else reads the client's frames.
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    config = _load(ctx, config_path)
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def stop() -> None:
        signal.pthread_kill(main_thread, signal.SIGHUP)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    ctx.exit(serve(config, in_fd, out_fd, stop, config_path))


def main() -> None:
    try:
        cli(prog_name="vmiso")
    except Interrupted:
        sys.exit(EXIT_INTERRUPTED)
