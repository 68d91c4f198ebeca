"""Inputs are checked before anything is made, then copied; the user's files are never shared."""

from __future__ import annotations

import os
import socket

import pytest

from vmiso.errors import VmisoError
from vmiso.inputs import check_inputs, stage_inputs


def test_inputs_are_copied_with_fixed_modes(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a\n")
    os.chmod(data, 0o600)
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "m.py").write_text("x = 1\n")
    (tree / "inner").symlink_to("sub")  # inside the input: followed, copied as a directory
    staging = tmp_path / "staging"
    staging.mkdir()
    check_inputs((data, tree))
    stage_inputs((data, tree), staging)
    assert (staging / "data.csv").read_text() == "a\n"
    assert (staging / "data.csv").stat().st_mode & 0o777 == 0o644
    assert (staging / "pkg" / "sub").stat().st_mode & 0o777 == 0o755
    assert (staging / "pkg" / "inner" / "m.py").read_text() == "x = 1\n"
    assert not (staging / "pkg" / "inner").is_symlink()


def test_a_link_out_of_an_input_is_refused(tmp_path):
    tree = tmp_path / "pkg"
    tree.mkdir()
    (tree / "secrets").symlink_to("/etc")
    with pytest.raises(VmisoError, match="symbolic link to /etc, outside the input"):
        check_inputs((tree,))


def test_two_inputs_with_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.csv").write_text("")
    (tmp_path / "b" / "x.csv").write_text("")
    with pytest.raises(VmisoError, match="would both appear as /in/x.csv") as err:
        check_inputs((tmp_path / "a" / "x.csv", tmp_path / "b" / "x.csv"))
    assert err.value.hint == "rename one of them"


def test_missing_and_special_inputs_are_refused(tmp_path):
    with pytest.raises(VmisoError, match="does not exist"):
        check_inputs((tmp_path / "missing",))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    try:
        with pytest.raises(VmisoError, match="neither a file nor a directory"):
            check_inputs((tmp_path / "s",))
    finally:
        sock.close()
