"""Runs inside a vmiso clone for the VM tests: a job that tries every shape of tree on /out.

argv[1]: "flood" fills /out every way it can and prints how far each got;
"deep" leaves a chain of directories far past PATH_MAX with a file at the bottom.
"""
import errno
import json
import os
import sys


def until_full(make_one):
    count = 0
    try:
        while count < 10**7:
            make_one(count)
            count += 1
    except OSError as err:
        return count, errno.errorcode.get(err.errno, str(err))
    return count, "never full"


def chain(name, depth):
    """Directories inside directories, by descriptor as a hostile job would: no path limit."""
    fd = os.open("/out", os.O_RDONLY | os.O_DIRECTORY)
    made = 0
    try:
        while made < depth:
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            made += 1
        out = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"the bottom")
        os.close(out)
        return made, "ok"
    except OSError as err:
        return made, errno.errorcode.get(err.errno, str(err))
    finally:
        os.close(fd)


if sys.argv[1] == "flood":
    results = {}
    with open("/out/big", "wb", buffering=0) as f:
        results["bytes"] = until_full(lambda i: f.write(b"x" * 65536))
    os.unlink("/out/big")
    results["empty_dirs"] = until_full(lambda i: os.mkdir(f"/out/e{i}"))
    for name in os.listdir("/out"):
        os.rmdir(f"/out/{name}")
    # Left in place: /out ends full of inodes.  (QEMU's 9p server stops a path at 64 KiB
    # with ENOENT, so 100-byte names reach the limit first.)
    results["deep_chain"] = chain("d" * 100, 10**6)
    stat = os.statvfs("/out")
    results["df"] = [stat.f_blocks * stat.f_frsize, stat.f_files]
    print(json.dumps(results), flush=True)
else:
    print(json.dumps(chain("deeper-than-path-max-" * 4, 600)), flush=True)
