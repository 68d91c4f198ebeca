"""The command line: the only place that prints, parses flags and turns errors into exit codes."""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import config as config_mod
from .errors import EXIT_INTERRUPTED, EXIT_VMISO, Interrupted, VmisoError
from .progress import Steps

log = logging.getLogger("vmiso")


class _Group(click.Group):
    """Converts every error to one line and an exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmisoError as err:
            click.echo(f"vmiso: error: {err.message}", err=True)
            if err.hint:
                click.echo(f"vmiso: {err.hint}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("vmiso: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # anything unexpected is a bug: say so, briefly
            click.echo(f"vmiso: internal error: {type(err).__name__}: {err}", err=True)
            if log.isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            else:
                click.echo("vmiso: run with -v for the traceback", err=True)
            ctx.exit(EXIT_VMISO)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmiso: %(levelname)s: %(message)s"))
    root = logging.getLogger("vmiso")
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbose:
        # paramiko and libvirt are chatty; keep them at warnings unless -vv
        logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def _progress_printer(quiet: bool):
    def listener(event: str, step: str, detail: str, elapsed: float) -> None:
        if quiet:
            return
        if event == "start":
            click.echo(f"[{elapsed:7.1f}s] {step}" + (f": {detail}" if detail else ""), err=True)
        elif event == "note":
            click.echo(f"[{elapsed:7.1f}s] {step}: {detail}", err=True)
        elif event == "fail":
            click.echo(f"[{elapsed:7.1f}s] {step} FAILED", err=True)
    return listener


def _load(ctx: click.Context, config_path: Path | None, **overrides: Any) -> config_mod.Config:
    return config_mod.override(config_mod.load(config_path), **overrides)


_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
    help="vmiso.yaml to read (default: built-in defaults)")
_accel_option = click.option("--accel", type=click.Choice(config_mod.ACCELS),
                             help="override 'accel' (also VMISO_ACCEL)")
_state_option = click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
                             help="override 'state_dir'")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="more detail; tracebacks for internal errors")
@click.option("-q", "--quiet", is_flag=True, help="only errors")
@click.version_option(package_name="vmiso")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run Python programs you cannot audit in disposable, offline VMs."""
    _setup_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet, "verbose": verbose}


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
    steps = Steps(_progress_printer(ctx.obj["quiet"]))
    with connected(config.libvirt_uri) as hv:
        image = do_provision(config, hv, name=name, replace=replace, steps=steps)
    info = summary(image)
    click.echo(f"provisioned {info['name']} in {steps.elapsed():.0f} s: sha256 {info['sha256']}")


@cli.group(invoke_without_command=True)
@_config_option
@_state_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def images(ctx: click.Context, config_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """List templates (subcommands: rm, verify)."""
    ctx.obj["config"] = _load(ctx, config_path, state_dir=state_dir)
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
    click.echo(f"{'NAME':<20} {'SIZE':>9} {'CREATED':<26} SHA256")
    for row in rows:
        click.echo(f"{row['name']:<20} {row['size'] / 1024**2:>7.0f}MB {row['created'] or '?':<26} {row['sha256']}")
        packages = ", ".join(f"{p['name']}=={p['version']}" for p in row["packages"]
                             if p["name"] not in ("pip", "setuptools", "wheel"))
        click.echo(f"{'':<20} packages: {packages or '-'}")
        source = row["source"]
        if "cloud_image" in source:
            click.echo(f"{'':<20} source: cloud image {source['cloud_image']} (sha256 {source['sha256']})")
        elif "recipe" in source:
            click.echo(f"{'':<20} source: recipe {source['recipe']} from {source['mirror']}")


@images.command("rm")
@click.argument("name")
@click.pass_context
def images_rm(ctx: click.Context, name: str) -> None:
    """Remove an image."""
    from .image.store import remove_image

    remove_image(ctx.obj["config"].state_dir, name)
    click.echo(f"removed {name}")


@images.command("verify")
@click.argument("name")
@click.pass_context
def images_verify(ctx: click.Context, name: str) -> None:
    """Re-hash an image's template and compare with its manifest."""
    from .image.store import get_image, verify

    digest = verify(get_image(ctx.obj["config"].state_dir, name))
    click.echo(f"{name}: OK sha256 {digest}")


@cli.command(context_settings={"allow_interspersed_args": False})
@_config_option
@_accel_option
@_state_option
@click.option("--image", help="template to clone (default: image.name from the config)")
@click.option("-i", "--input", "inputs", multiple=True, type=click.Path(path_type=Path, exists=False),
              help="file or directory to copy in, read-only, under /in (repeatable)")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="new or empty directory that receives /out after checks")
@click.option("--timeout", type=click.IntRange(min=1), help="seconds the job may run (wall clock)")
@click.option("--memory", type=click.IntRange(min=128), help="guest memory in MiB")
@click.option("--cpus", type=click.IntRange(min=1), help="guest vCPUs")
@click.option("--scratch", metavar="SIZE",
              help="room for the job's /tmp on disk, e.g. 8GiB (default: run.scratch, 2GiB)")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="write a record of the run (timings, exit code, output manifest) here")
@click.option("--cold", is_flag=True, help="boot the clone from scratch even when a warm state exists")
@click.argument("command", nargs=-1, required=True)
@click.pass_context
def run(ctx: click.Context, config_path: Path | None, accel: str | None, state_dir: Path | None,
        image: str | None, inputs: tuple[Path, ...], output: Path | None, timeout: int | None,
        memory: int | None, cpus: int | None, scratch: str | None, json_path: Path | None, cold: bool,
        command: tuple[str, ...]) -> None:
    """Run COMMAND in a disposable, offline clone of an image.

    \b
    Inside the guest: inputs under /in (read-only, also the working directory),
    outputs to /out, /tmp (and TMPDIR) on a scratch disk of the run's own, the
    image's venv first on PATH.  vmiso exits with the job's exit code, or
    128 + N when signal N killed it; 124 means the timeout struck, 125 an error
    of vmiso or the VM, 130 an interruption.
    """
    from .hypervisor import connected
    from .run import RunRequest, run as do_run

    scratch_bytes = None if scratch is None else config_mod.parse_size(scratch, "--scratch")
    config = _load(ctx, config_path, accel=accel, state_dir=state_dir, **{"run.scratch": scratch_bytes})
    request = RunRequest(command=command, image=image or config.image.name, inputs=inputs, output=output,
                         timeout=timeout, memory_mib=memory, cpus=cpus, warm=not cold)
    if json_path is not None and json_path.exists():
        raise VmisoError(f"--json {json_path} exists already; vmiso never overwrites files")
    steps = Steps(_progress_printer(ctx.obj["quiet"] or ctx.obj.get("verbose", 0) == 0))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    record: dict[str, Any] = {"command": list(command), "image": request.image}
    try:
        with connected(config.libvirt_uri) as hv:
            result = do_run(config, hv, request, sys.stdout.buffer, sys.stderr.buffer, steps)
        record = result.as_dict()
    except VmisoError as err:
        record.update(exit_code=err.exit_code, error=str(err), timings=dict(steps.timings))
        raise
    except KeyboardInterrupt:
        record.update(exit_code=EXIT_INTERRUPTED, error="interrupted", timings=dict(steps.timings))
        raise
    except Exception as err:
        record.update(exit_code=EXIT_VMISO, error=f"internal error: {type(err).__name__}: {err}",
                      timings=dict(steps.timings))
        raise
    finally:
        if json_path is not None:
            json_path.write_text(json.dumps(record, indent=2) + "\n")
    if result.outputs is not None:
        for path, reason in result.outputs.refused:
            click.echo(f"vmiso: refused output {path}: {reason}", err=True)
    if (killed := result.signal_message()) is not None:
        what, hint = killed
        click.echo(f"vmiso: {what}" + (f" ({hint})" if hint else ""), err=True)
    ctx.exit(result.exit_code)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise Interrupted("vmiso was asked to stop (SIGTERM)")


@cli.command()
@_config_option
@_state_option
@click.option("--layers", is_flag=True,
              help="Also remove the cached OS layers (provisioning rebuilds them when needed).")
@click.pass_context
def gc(ctx: click.Context, config_path: Path | None, state_dir: Path | None, layers: bool) -> None:
    """Remove VMs, overlays and directories that a killed vmiso left behind."""
    from . import reaper
    from .hypervisor import connected
    from .image.layer import remove_cached_layers

    config = _load(ctx, config_path, state_dir=state_dir)
    with connected(config.libvirt_uri) as hv:
        removed = reaper.collect(hv, config.state_dir)
    for item in removed:
        click.echo(f"removed {item.kind} {item.name}")
    freed, kept = remove_cached_layers(config.state_dir) if layers else ([], [])
    for layer in freed:
        click.echo(f"removed OS layer {layer.key} ({layer.size / 1024**2:.0f} MiB)")
    for layer in kept:
        click.echo(f"kept OS layer {layer.key}: a provisioning is using it")
    if not removed and not freed:
        click.echo("nothing to remove")


@cli.command()
@_config_option
@_accel_option
@_state_option
@click.pass_context
def doctor(ctx: click.Context, config_path: Path | None, accel: str | None, state_dir: Path | None) -> None:
    """Check the host: QEMU, libvirt, accelerator, tools, space, permissions, leftovers."""
    from .doctor import run_checks

    config = _load(ctx, config_path, accel=accel, state_dir=state_dir)
    failed = 0
    for check in run_checks(config):
        mark = "ok  " if check.ok and not check.warning else "warn" if check.ok else "FAIL"
        click.echo(f"[{mark}] {check.name}: {check.detail}")
        if check.fix:
            click.echo(f"       fix: {check.fix}")
        failed += not check.ok
    ctx.exit(1 if failed else 0)


@images.command("warm")
@click.argument("name")
@click.pass_context
def images_warm(ctx: click.Context, name: str) -> None:
    """Boot and save clones of an image so that runs restore them instead of booting."""
    from .errors import ImageError
    from .hypervisor import connected
    from .image.store import get_image
    from .warm import make_warm_state

    config = ctx.obj["config"]
    image = get_image(config.state_dir, name)
    steps = Steps(_progress_printer(ctx.obj["quiet"]))
    with connected(config.libvirt_uri) as hv:
        try:
            make_warm_state(config, hv, image, steps)
        except VmisoError as err:  # said here, in the error itself: -q hides warnings
            raise ImageError(f"could not make a warm state for {name}: {err.message}", err.hint) from None
    click.echo(f"{name}: warm state ready in {steps.elapsed():.0f} s")


def main() -> None:
    try:
        cli(prog_name="vmiso")
    except Interrupted:
        sys.exit(EXIT_INTERRUPTED)
