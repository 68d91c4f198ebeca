"""Private means private: other local users cannot reach what a run stages, and QEMU only what it must.

Each check runs a real process as another user (setpriv), as an attacker on the
same host would: paths are no secret, since QEMU's command line names them.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmiso.clones.clone import make_clone_dir
from vmiso.host import workdir
from vmiso.host.inputs import InputLimits, stage_inputs

PROBE = """
import os, sys
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        print("read", end=" ")
    except OSError as err:
        print(type(err).__name__, end=" ")
"""
LIST = """
import os, sys
try:
    os.listdir(sys.argv[1])
    print("listed")
except OSError as err:
    print(type(err).__name__)
"""


def as_user(user: str, code: str, *paths: Path) -> str:
    entry = pwd.getpwnam(user)
    done = subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
                           sys.executable, "-I", "-c", code, *map(str, paths)],
                          capture_output=True, text=True, check=True, cwd="/")
    return done.stdout.strip()


@pytest.fixture
def a_run(tmp_path):
    """A run directory as vmiso makes one, with an input staged, below a traversable root
    (pytest's own is its user's alone)."""
    root = Path(tempfile.mkdtemp(prefix="vmiso-privacy-", dir="/var/tmp"))
    try:
        root.chmod(0o711)
        data = tmp_path / "secret.csv"
        data.write_text("the analyst's data\n")
        clone = make_clone_dir(root / "runs" / "0123456789ab", output_limits=(1024**2, 10))
        stage_inputs((data,), clone.inputs, InputLimits(10**6, 10))
        (clone.path / "seed.iso").write_text("a private key")  # as write_seed leaves it: 0644 by umask
        yield clone
    finally:  # a setup that failed half-way too
        assert workdir.remove_tree(root) == []


@pytest.mark.root(reason="reads as other users (setpriv)")
def test_another_user_cannot_reach_staged_inputs_or_anything_in_a_run(a_run):
    nobody = as_user("nobody", PROBE, a_run.inputs / "secret.csv", a_run.path / "seed.iso",
                     a_run.path / "owner.json")
    assert nobody == "PermissionError PermissionError PermissionError"
    assert as_user("nobody", LIST, a_run.path.parent) == "PermissionError"
    assert as_user("nobody", LIST, a_run.outputs) == "PermissionError"


@pytest.mark.root(reason="reads as other users (setpriv)")
def test_qemu_reaches_what_it_serves_but_cannot_list_the_run(a_run):
    qemu = workdir.QEMU_USER
    assert as_user(qemu, PROBE, a_run.inputs / "secret.csv") == "read"
    assert as_user(qemu, LIST, a_run.path) == "PermissionError"
    assert as_user(qemu, LIST, a_run.path.parent) == "PermissionError"
    assert as_user(qemu, LIST, a_run.outputs) == "listed"  # the writable share is QEMU's own


@pytest.mark.root(reason="reads as other users (setpriv)")
def test_an_older_store_s_open_directory_becomes_private_without_locking_qemu_out(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="vmiso-privacy-", dir="/var/tmp"))
    try:
        root.chmod(0o711)
        runs = root / "runs"
        runs.mkdir(mode=0o711)  # as vmiso left it before runs were private
        (runs / "f").write_text("x")
        (runs / "f").chmod(0o644)
        workdir.private_dir(runs)
        assert as_user("nobody", PROBE, runs / "f") == "PermissionError"
        assert as_user(workdir.QEMU_USER, PROBE, runs / "f") == "read"
    finally:
        assert workdir.remove_tree(root) == []


@pytest.mark.root(reason="gives a file to QEMU's user")
def test_a_template_left_writable_by_qemu_is_made_root_s_again_before_it_is_trusted(tmp_path, caplog):
    from vmiso.image import store

    template = tmp_path / "template.qcow2"
    template.write_bytes(b"template")
    uid, gid = workdir.qemu_ids()
    os.chown(template, uid, gid)  # what libvirt left behind when it relabelled backing chains
    template.chmod(0o644)
    digest = store.sha256_file(template)
    assert store.check_file(template, digest, what="template", fix="") == digest
    st = template.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o444)
    assert f"was not its owner's and read-only (uid {uid}, mode 644)" in caplog.text


def test_files_without_a_recorded_sha256_or_missing_are_refused_unread(tmp_path, monkeypatch):
    from vmiso.errors import ImageError
    from vmiso.image import store

    big = tmp_path / "scratch.img"
    big.write_bytes(b"x")
    monkeypatch.setattr(store, "_hash_stable", lambda path: pytest.fail("hashed a file it must refuse"))
    with pytest.raises(ImageError, match="has no recorded sha256"):
        store.check_file(big, None, what="warm state slot-0: scratch.img", fix="remake it")
    with pytest.raises(ImageError, match="slot-0: state.save is missing"):
        store.check_file(tmp_path / "state.save", "0" * 64, what="warm state slot-0: state.save", fix="remake it")
