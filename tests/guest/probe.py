"""Runs inside a vmiso clone for the VM tests: streams, probes isolation, writes outputs.

argv: JSON list of [address, port] pairs that must all be unreachable.
"""
import errno
import json
import os
import socket
import sys
import time

results = {}


def attempt(label, action):
    try:
        action()
        results[label] = "ALLOWED"
    except OSError as err:
        results[label] = errno.errorcode.get(err.errno, str(err)) if err.errno else type(err).__name__


print("out-1", flush=True)
time.sleep(1.5)
print("err-1", file=sys.stderr, flush=True)
time.sleep(1.5)
print("out-2", flush=True)

# The input share is read-only, and the job is not root.
attempt("write-input", lambda: open("/in/data.csv", "a").write("tampered"))
attempt("create-in-input", lambda: open("/in/new-file", "w").write("x"))
results["uid"] = os.getuid()
results["cwd"] = os.getcwd()
results["env"] = {k: os.environ.get(k) for k in ("VMISO_IN", "VMISO_OUT")}
results["python"] = sys.executable
results["input"] = open("/in/data.csv").read()

# No network: no DNS, no route anywhere, not even to the host.
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
for address, port in json.loads(sys.argv[1]):
    attempt(f"tcp {address}:{port}",
            lambda a=address, p=port: socket.create_connection((a, p), timeout=5).close())
results["interfaces"] = sorted(name for _, name in socket.if_nameindex())

import tabulate  # noqa: E402  (the provisioned package, from the venv)

results["tabulate"] = tabulate.__version__
results["random"] = open("/dev/urandom", "rb").read(16).hex()

out = os.environ["VMISO_OUT"]
os.makedirs(os.path.join(out, "sub"))
with open(os.path.join(out, "sub", "table.txt"), "w") as f:
    f.write(tabulate.tabulate([[1, 2]], headers=["a", "b"]))
os.symlink("/etc/passwd", os.path.join(out, "link"))
os.mkfifo(os.path.join(out, "fifo"))
with open(os.path.join(out, "suid"), "w") as f:
    f.write("x")
os.chmod(os.path.join(out, "suid"), 0o4755)
# What git and direnv would run on the analyst's host when they enter the output.
os.makedirs(os.path.join(out, "sub", ".git", "hooks"))
with open(os.path.join(out, "sub", ".git", "config"), "w") as f:
    f.write("[core]\n\tfsmonitor = touch /tmp/owned\n")
with open(os.path.join(out, ".envrc"), "w") as f:
    f.write("touch /tmp/owned\n")
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(results, f)
print(json.dumps(results), flush=True)
sys.exit(3)
