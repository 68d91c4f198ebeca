"""How an OS layer is built, root or not: the namespace mmdebstrap runs in, the fakeroot
session that packs its tarball, and the subordinate ids a user needs (no mmdebstrap here:
tests/test_layer_unprivileged.py builds a real layer)."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmiso import tools
from vmiso.errors import ProvisionError, ToolError
from vmiso.host.workdir import remove_tree
from vmiso.image import layer
from vmiso.image.layer import GUEST_FILES, namespace_ids, subordinate_start


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


def owner_and_mode(image: Path, path: str) -> tuple[int, int, int, str]:
    """(uid, gid, mode without its type bits, type) of ``path`` in the image."""
    fields = debugfs(image, f'stat "{path}"').split()
    kind = fields[fields.index("Type:") + 1]
    return (int(fields[fields.index("User:") + 1]), int(fields[fields.index("Group:") + 1]),
            int(fields[fields.index("Mode:") + 1], 8), kind)


def entry(name: str, kind: bytes = tarfile.DIRTYPE, mode: int = 0o755, uid: int = 0, gid: int = 0,
          data: bytes = b"", **extra: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size = kind, mode, uid, gid, len(data)
    for key, value in extra.items():
        setattr(info, key, value)
    return info, data


def write_tarball(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    # As mmdebstrap writes its own: numeric owners, ./dev's device nodes among the entries.
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def test_a_tarball_is_packed_with_its_owners_devices_and_setuid_bits_and_the_guest_files(tmp_path):
    tarball = tmp_path / "root.tar"
    write_tarball(tarball, [
        entry("./"), entry("./dev"),
        entry("./dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
        entry("./etc"), entry("./etc/ssh"),
        entry("./etc/ssh/ssh_host_ed25519_key", tarfile.REGTYPE, 0o600, data=b"a host key from postinst"),
        entry("./etc/passwd", tarfile.REGTYPE, 0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"),
        entry("./usr"), entry("./usr/bin"),
        entry("./usr/bin/su", tarfile.REGTYPE, 0o4755, data=b"#!/bin/sh\n"),
        entry("./var"), entry("./var/lib"), entry("./var/lib/apt"), entry("./var/lib/apt/lists"),
        entry("./var/lib/apt/lists/partial", mode=0o700, uid=42),
        entry("./var/log"), entry("./var/log/journal", mode=0o2755, gid=999),
        entry("./bin", tarfile.SYMTYPE, 0o777, linkname="usr/bin"),
    ])
    root, image = tmp_path / "root", tmp_path / "rootfs.img"
    root.mkdir()
    mkfs = tools.mkfs_ext4_argv(source_dir=root, image=image, size_bytes=32 * 1024**2, label="vmiso-root")
    tools.run(tools.pack_layer_argv(tarball=tarball, root=root, files=layer._guest_file_sources(), mkfs=mkfs,
                                    user_namespace=namespace_ids() is not None), name="fakeroot")

    assert owner_and_mode(image, "/dev/null") == (0, 0, 0o666, "character")
    assert "Device major/minor number: 01:03" in debugfs(image, "stat /dev/null")
    assert owner_and_mode(image, "/usr/bin/su") == (0, 0, 0o4755, "regular")
    assert owner_and_mode(image, "/etc/passwd") == (0, 0, 0o644, "regular")
    assert owner_and_mode(image, "/var/lib/apt/lists/partial") == (42, 0, 0o700, "directory")
    assert owner_and_mode(image, "/var/log/journal") == (0, 999, 0o2755, "directory")
    assert owner_and_mode(image, "/bin")[3] == "symlink"
    assert owner_and_mode(image, "/")[:2] == (0, 0)
    for inside, mode in GUEST_FILES.values():
        assert owner_and_mode(image, "/" + inside) == (0, 0, mode, "regular")
        # The directories made for them are root's too.
        assert owner_and_mode(image, "/" + str(Path(inside).parent))[:2] == (0, 0)
    assert "ssh_host_" not in debugfs(image, "ls /etc/ssh")
    # What fakeroot left on disk is plain files and directories that this user removes.
    assert (root / "dev/null").is_file()
    assert remove_tree(root) == []


def test_the_layer_namespace_has_a_tmp_of_its_own():
    marker = f"vmiso-layer-test-{secrets.token_hex(4)}"
    script = f'stat -f -c %T /tmp; echo "$TMPDIR"; id -u; touch /tmp/{marker}; ls /tmp'
    argv = tools.layer_namespace_argv(["sh", "-c", script], sub_ids=namespace_ids())
    out = tools.run(argv).split()
    assert out == ["tmpfs", "/tmp", "0", marker]
    assert not (Path("/tmp") / marker).exists()


def processes(argv: list[str]) -> list[int]:
    """Pids of the processes that run exactly ``argv``."""
    cmdline = b"".join(arg.encode() + b"\0" for arg in argv)
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == cmdline:
                found.append(int(entry.name))
        except OSError:
            pass  # it ended meanwhile
    return found


def running(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())  # a zombie's is empty
    except OSError:
        return False


@pytest.mark.parametrize("step", ["mmdebstrap", "fakeroot"])
def test_every_process_of_a_step_dies_with_vmiso_even_by_sigkill(step):
    # Two sleeps that nothing waits for; fakeroot's own daemon leaves the session besides.
    sleep = ["sleep", f"3000.{secrets.randbelow(10**9):09d}"]
    work = " ".join(sleep) + " & " + " ".join(sleep)
    if step == "mmdebstrap":
        argv = tools.layer_namespace_argv(["sh", "-c", work], sub_ids=namespace_ids())
    else:
        argv = tools.pack_layer_argv(tarball=Path("/nonexistent"), root=Path("/nonexistent"), files=[],
                                     mkfs=[], user_namespace=namespace_ids() is not None)
        argv = [*argv[:argv.index("sh")], "sh", "-c", work]
    # A stand-in for vmiso: it starts the step and is killed.
    vmiso = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen(sys.argv[1:]); time.sleep(600)", *argv])
    try:
        deadline = time.monotonic() + 20
        while len(processes(sleep)) < 2:
            assert time.monotonic() < deadline, "the step's processes did not start"
            time.sleep(0.1)
        namespace = os.readlink(f"/proc/{processes(sleep)[0]}/ns/pid")
        assert namespace != os.readlink("/proc/self/ns/pid")
        fakeds = [pid for pid in processes(["/usr/bin/faked-sysv"]) + processes(["/usr/bin/faked-tcp"])
                  if os.readlink(f"/proc/{pid}/ns/pid") == namespace]
        assert len(fakeds) == (step == "fakeroot")
        # Its System V queues are in the step's ipc namespace: they go with it, not with faked.
        assert all(os.readlink(f"/proc/{pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc") for pid in fakeds)
    finally:
        vmiso.kill()
        vmiso.wait()
    deadline = time.monotonic() + 10
    while processes(sleep) or [pid for pid in fakeds if running(pid)]:
        assert time.monotonic() < deadline, f"still running: {processes(sleep)} {fakeds}"
        time.sleep(0.1)


def test_subordinate_ranges_are_found_by_name_or_uid_and_must_be_long_enough(tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("bob:100000:65536\nalice:165536:1000\n# note\n1234:300000:65536\nalice:400000:65536\n")
    assert subordinate_start(subuid, "alice", 1234) == 300000
    assert subordinate_start(subuid, "bob", 99) == 100000
    assert subordinate_start(subuid, "carol", 98) is None
    assert subordinate_start(tmp_path / "missing", "alice", 1234) is None


@pytest.fixture
def analyst(monkeypatch, tmp_path):
    """This process as the analyst alice (uid 1234), with her ranges in tmp_path's files."""
    monkeypatch.setattr(layer.os, "geteuid", lambda: 1234)
    monkeypatch.setattr(layer.pwd, "getpwuid", lambda uid: SimpleNamespace(pw_name="alice"))
    monkeypatch.setattr(layer.tools, "which", lambda program: f"/usr/bin/{program}")
    (tmp_path / "subuid").write_text("alice:100000:65536\n")
    (tmp_path / "subgid").write_text("alice:200000:65536\n")
    return tmp_path


def test_an_analyst_maps_their_subordinate_ids(analyst):
    assert namespace_ids(analyst / "subuid", analyst / "subgid") == (100000, 200000)


def test_root_maps_no_ids(monkeypatch):
    monkeypatch.setattr(layer.os, "geteuid", lambda: 0)
    assert namespace_ids(Path("/nonexistent"), Path("/nonexistent")) is None


def test_missing_subordinate_ids_say_how_to_set_them_up(analyst):
    (analyst / "subgid").write_text("bob:200000:65536\n")
    with pytest.raises(ProvisionError) as err:
        namespace_ids(analyst / "subuid", analyst / "subgid")
    assert f"alice has no range of 65536 subordinate ids in {analyst}/subgid" in err.value.message
    assert err.value.hint == "run scripts/setup-host --user alice as root"


def test_a_missing_newuidmap_says_how_to_install_it(analyst, monkeypatch):
    def which(program: str) -> str:
        if program == "newuidmap":
            raise ToolError("newuidmap is not installed", program=program)
        return f"/usr/bin/{program}"

    monkeypatch.setattr(layer.tools, "which", which)
    with pytest.raises(ProvisionError, match="newuidmap is not installed") as err:
        namespace_ids(analyst / "subuid", analyst / "subgid")
    assert err.value.hint == "run scripts/setup-host --user alice as root"
