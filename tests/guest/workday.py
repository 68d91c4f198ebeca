"""A data job's day, run in the guest: NumPy, the wall clock, a large temporary file.

Prints its start time at once, then one JSON line of results.
Usage: python workday.py TEMP_MIB
"""
import hashlib
import json
import os
import sys
import tempfile
import time

started = time.time()
print(json.dumps({"started": started}), flush=True)

import numpy as np  # noqa: E402  (after the clock reading, which must be taken first)

results = {"started": started, "numpy": np.__version__}
a = np.arange(1, 1001, dtype=np.float64)
results["dot"] = float(a @ a)
results["solve"] = np.linalg.solve(np.array([[4.0, 1.0], [2.0, 3.0]]), np.array([1.0, 2.0])).round(6).tolist()
inputs = [os.path.join(os.environ["VMISO_IN"], name) for name in os.listdir(os.environ["VMISO_IN"])]
# Every file of a many-file input, by content: the cached /in share must serve exact bytes.
digests = {}
for directory, _, files in os.walk(os.path.join(os.environ["VMISO_IN"], "many")):
    for name in files:
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            digests[os.path.relpath(path, os.environ["VMISO_IN"])] = hashlib.sha256(f.read()).hexdigest()
results["many"] = digests
results["input_mtime_ahead"] = max(os.stat(path).st_mtime for path in inputs) - time.time()
results["tmpdir"] = tempfile.gettempdir()
fs = os.statvfs(results["tmpdir"])
results["tmp_size"] = fs.f_blocks * fs.f_frsize
with open("/proc/meminfo") as f:
    results["mem_total"] = int(f.readline().split()[1]) * 1024
chunk = bytes(range(256)) * 4096
size_mib = int(sys.argv[1])
with tempfile.TemporaryFile() as f:
    for _ in range(size_mib):
        f.write(chunk)
    f.flush()
    f.seek(0)
    same = all(f.read(len(chunk)) == chunk for _ in range(size_mib))
results["tmp_bytes_read_back"] = size_mib * len(chunk) if same else 0
print(json.dumps(results), flush=True)
