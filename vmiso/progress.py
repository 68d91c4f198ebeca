"""Named, timed steps: the core reports progress through these, never by printing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# (event, step, detail, elapsed seconds since the first step); event is
# "start", "done", "fail", "note" (a message inside a step) or "status" (what a
# step is doing right now, e.g. the package pip is installing: transient, worth
# showing live on a terminal but not worth a line in a log).
Listener = Callable[[str, str, str, float], None]


class Steps:
    def __init__(self, listener: Listener | None = None) -> None:
        self._listener = listener
        self._origin = time.monotonic()
        self.timings: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self._origin

    def note(self, step: str, detail: str) -> None:
        """A message inside a step (e.g. a guest-side phase)."""
        if self._listener:
            self._listener("note", step, detail, self.elapsed())

    def status(self, step: str, detail: str) -> None:
        """What ``step`` is doing right now; replaced by the next status, never logged."""
        if self._listener:
            self._listener("status", step, detail, self.elapsed())

    def start(self, name: str, detail: str = "") -> None:
        self._started[name] = time.monotonic()
        if self._listener:
            self._listener("start", name, detail, self.elapsed())

    def finish(self, name: str, ok: bool = True) -> None:
        started = self._started.pop(name, None)
        if started is None:
            return
        self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - started
        if self._listener:
            self._listener("done" if ok else "fail", name, "", self.elapsed())

    def fail_open(self) -> None:
        """Mark every step still open as failed (the error is on its way up)."""
        for name in list(self._started):
            self.finish(name, ok=False)

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        self.start(name, detail)
        try:
            yield
        except BaseException:
            self.fail_open()
            raise
        self.finish(name)
