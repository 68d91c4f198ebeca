"""What the job sees under /in: every entry with its mode and mtime, each input's digest as the host
records it (vmiso.host.inputs: a file's sha256; a directory's, of its files' sha256sum lines sorted
by path bytes), how long a walk of /in and of the same tree on tmpfs take, and what writing to /in
or remounting it read-write gets.  Prints one JSON object."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root):
    lines = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            lines.append((os.fsencode(os.path.relpath(path, root)), file_sha256(path)))
    digest = hashlib.sha256()
    for rel, sha in sorted(lines):
        digest.update(sha.encode() + b"  " + rel + b"\n")
    return digest.hexdigest()


def walk(root):
    started, total = time.monotonic(), 0
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                total += len(f.read())
    return time.monotonic() - started, total


def attempt(action):
    try:
        action()
        return "ALLOWED"
    except OSError as err:
        return errno.errorcode.get(err.errno, str(err.errno))


results = {"cwd": os.getcwd(), "digests": {}, "entries": {}}
walked = sys.argv[1] if len(sys.argv) > 1 else ""
if walked:  # first, while nothing of /in is in the guest's page cache
    results["walk_in"], total_in = walk(os.path.join("/in", walked))
    shutil.copytree(os.path.join("/in", walked), "/dev/shm/walked")
    results["walk_tmpfs"], total_mem = walk("/dev/shm/walked")
    assert total_in == total_mem
for name in sorted(os.listdir("/in")):
    path = os.path.join("/in", name)
    results["digests"][name] = tree_sha256(path) if os.path.isdir(path) else file_sha256(path)
for directory, dirs, files in os.walk("/in"):
    for name in dirs + files:
        path = os.path.join(directory, name)
        st = os.lstat(path)
        results["entries"][os.path.relpath(path, "/in")] = [oct(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_size]
with open("/proc/self/mounts") as f:
    mounts = [line.split() for line in f]
mounted = [fields for fields in mounts if fields[1] == "/in"]
bound = [fields for fields in mounts if fields[1].startswith("/in/")]
results["shares"] = sorted(fields[0] for fields in mounts if fields[2] == "9p")
results["mount"] = [fields[2:4] for fields in mounted]
results["bound"] = {fields[1]: fields[2:4] for fields in bound}  # the large files, from their share
device = "/dev/" + os.path.basename(mounted[0][0])  # a cold clone mounted it as /root/dev/vdX
results["raw_write"] = attempt(lambda: open(device, "r+b").close())
results["write"] = attempt(lambda: open("/in/new-file", "w").write("x"))
results["mkdir"] = attempt(lambda: os.mkdir("/in/new-dir"))
results["write_bound"] = {point: attempt(lambda p=point: open(p.replace("\\040", " "), "r+b").close())
                          for point in results["bound"]}
remount = subprocess.run(["mount", "-o", "remount,rw", "/in"], capture_output=True, text=True)
results["remount"] = [remount.returncode, remount.stderr.strip()[-200:]]
print(json.dumps(results))
