"""A stand-in for ``vmiso run`` in the batch's fast tests: what its argv asks, done on the host.

    python batchfake.py run --image NAME --json RECORD -o OUT [...] -i PATH... -- COMMAND...

The task's own input (the last -i) says what the job does, on its first line:
``exit N`` (the job exits N), ``error`` (vmiso's own failure: 125 and the record's
``error``), ``flaky MARKER`` (an error while MARKER does not exist, which it then
makes), ``sleep S`` (runs S seconds; SIGTERM ends it as a run's job, 143), ``signal``
(killed by SIGKILL: 137).  Anything else: the job exits 0.  Like vmiso run, it
refuses an output directory that is not new or empty, writes its outputs with a
MANIFEST, and the record to a new file.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from vmiso.host.inputs import input_digest

TEMPLATE = os.environ.get("BATCHFAKE_SHA256", "f" * 64)


def main(argv: list[str]) -> int:
    assert argv[0] == "run", argv
    dash = argv.index("--")
    options, command = argv[1:dash], argv[dash + 1:]
    record_path = output = None
    inputs: list[Path] = []
    index = 0
    while index < len(options):
        flag = options[index]
        if flag in ("--json", "-o", "-i", "--image", "--timeout", "--memory", "--cpus", "-e", "-c", "--accel",
                    "--state-dir", "--scratch", "--env-file", "--allow-host", "--allow-tcp"):
            value = options[index + 1]
            index += 2
            if flag == "--json":
                record_path = Path(value)
            elif flag == "-o":
                output = Path(value)
            elif flag == "-i":
                inputs.append(Path(value))
        else:
            index += 1
    assert record_path is not None and output is not None
    record_fd = os.open(record_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    if output.exists() and any(output.iterdir()):
        return _finish(record_fd, command, inputs, 125, error=f"--output {output} is not empty")
    directive = inputs[-1].read_text().split("\n")[0].split() if inputs[-1].is_file() else []
    print(f"argv {json.dumps(argv)}", flush=True)
    print(f"job {' '.join(command)} starts", flush=True)
    print("on stderr", file=sys.stderr, flush=True)
    code, sig, error = 0, None, None
    kind = directive[0] if directive else "ok"
    if kind == "exit":
        code = int(directive[1])
    elif kind == "error":
        code, error = 125, "the guest did not come up"
    elif kind == "flaky":
        marker = Path(directive[1])
        if not marker.exists():
            marker.touch()
            code, error = 125, "the guest did not come up"
    elif kind == "signal":
        code, sig = 137, "SIGKILL"
    elif kind == "sleep":
        stopped: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
        deadline = time.monotonic() + float(directive[1])
        while time.monotonic() < deadline and not stopped:
            time.sleep(0.05)
        if stopped:
            code, sig = 143, "SIGTERM"
    if error is None:
        output.mkdir(exist_ok=True)
        (output / "result.txt").write_text(f"{' '.join(command)}\n")
        digest = hashlib.sha256((output / "result.txt").read_bytes()).hexdigest()
        (output / "MANIFEST").write_text(f"{digest}  result.txt\n")
    return _finish(record_fd, command, inputs, code, sig=sig, error=error)


def _finish(record_fd: int, command: list[str], inputs: list[Path], code: int, *, sig: str | None = None,
            error: str | None = None) -> int:
    record = {"schema": 1, "command": command, "sha256": TEMPLATE, "boot": "warm", "exit_code": code,
              "signal": sig, "error": error,
              "inputs": [{"name": p.resolve().name, "sha256": input_digest(p)} for p in inputs]}
    with os.fdopen(record_fd, "w") as f:
        json.dump(record, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
