"""The one error hierarchy of vmiso.

Every failure that a user can act on is a ``VmisoError`` whose message says what
failed and what to do next.  The CLI turns these into one line and an exit code;
nothing else in the library prints or exits.
"""

from __future__ import annotations

from typing import Any

# Exit codes of vmiso's own outcomes, chosen as timeout(1) and docker-run(1) do so
# that scripts can tell them apart from the job's own exit code.
EXIT_TIMEOUT = 124
EXIT_VMISO = 125
EXIT_INTERRUPTED = 130


class VmisoError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = EXIT_VMISO
    # A run's record (vmiso.run.RECORD_KEYS) up to the failure, when a run failed: what it had
    # learnt (its template, inputs, network), what it had written (a timeout's outputs).
    record: dict[str, Any] | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(VmisoError):
    """The configuration file or a command-line value is wrong."""


class ToolError(VmisoError):
    """An outside program (qemu-img, mmdebstrap, ...) failed or is missing."""

    def __init__(self, message: str, hint: str | None = None, *, program: str | None = None) -> None:
        super().__init__(message, hint)
        self.program = program  # the program that failed, when one did


class HypervisorError(VmisoError):
    """libvirt refused or failed an operation."""


class AccelError(VmisoError):
    """The requested accelerator cannot be used."""


class ImageError(VmisoError):
    """An image is missing, damaged, or could not be built."""


class ProvisionError(ImageError):
    """A provisioning step failed; the message names the step and its log."""

    def __init__(self, step: str, message: str, log_path: str | None = None,
                 hint: str | None = None) -> None:
        text = f"provisioning failed at step '{step}': {message}"
        if log_path:
            text += f" (log: {log_path})"
        super().__init__(text, hint)
        self.step = step
        self.log_path = log_path


class PoolError(VmisoError):
    """A pool could not be started, reached or stopped, or did not hand a clone over."""


class GuestError(VmisoError):
    """The guest did not come up, or the link to it broke."""


class OutputError(VmisoError):
    """The guest's output broke a rule (limits, file types, names)."""


class RunTimeout(VmisoError):
    """The job ran past its wall-clock limit."""

    exit_code = EXIT_TIMEOUT


class Interrupted(VmisoError):
    """The user interrupted vmiso (Ctrl-C)."""

    exit_code = EXIT_INTERRUPTED
