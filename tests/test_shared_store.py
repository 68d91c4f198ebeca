"""The shared image store against a hostile member: what root's vmiso does with what a member made.

A member owns their images and their entries in the store (it is sticky, not
theirs to write elsewhere), so they can shape both: symbolic links, modes,
planted names.  Root's vmiso (every root run reaps and verifies) must never
follow, chown or write through any of it.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from vmiso.errors import ImageError
from vmiso.host import reaper
from vmiso.image import store

from fakes import make_image
from vmharness import make_state_root, remove_tree

MEMBER = "vmiso-test"
pytestmark = [pytest.mark.root(reason="gives files to a member, mounts"),
              pytest.mark.hostsetup(reason="the group vmiso and its member vmiso-test")]


@pytest.fixture
def state():
    root = make_state_root()
    try:
        state = root / "state"
        (state / "images").mkdir(parents=True)
        os.chown(state / "images", 0, grp.getgrnam("vmiso").gr_gid)
        os.chmod(state / "images", 0o3775)
        yield state
    finally:  # a setup that failed half-way too
        for point in reversed(sorted(p for p in _mounts() if p.startswith(str(root)))):
            subprocess.run(["umount", "--lazy", point], check=False)
        remove_tree(root)


def _mounts() -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]


def members_image(state: Path) -> store.Image:
    image = make_image(state, "theirs")
    entry = pwd.getpwnam(MEMBER)
    for path in [image.path, *image.path.iterdir()]:
        os.chown(path, entry.pw_uid, -1, follow_symlinks=False)
    for path in (image.template, image.kernel, image.initramfs):
        path.chmod(0o444)  # as provisioning leaves them
    return image


def test_root_never_chowns_or_follows_what_a_members_link_points_at(state, tmp_path):
    image = members_image(state)
    precious = tmp_path / "shadow"
    precious.write_text("root's secret\n")
    precious.chmod(0o600)
    image.kernel.unlink()
    image.kernel.symlink_to(precious)
    os.chown(image.kernel, pwd.getpwnam(MEMBER).pw_uid, -1, follow_symlinks=False)
    with pytest.raises(ImageError, match="is a symbolic link"):
        store.verify(image)
    st = precious.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), precious.read_text()) == (0, 0o600, "root's secret\n")


def test_root_leaves_a_members_writable_file_to_them(state):
    image = members_image(state)
    image.template.chmod(0o666)
    with pytest.raises(ImageError, match=f"ask the image's owner \\({MEMBER}\\)"):
        store.verified_sha256(image)
    assert stat.S_IMODE(image.template.stat().st_mode) == 0o666  # not root's to put right


def test_root_keeps_its_hash_cache_out_of_a_directory_a_member_shapes(state):
    image = members_image(state)
    image.path.chmod(0o2777)  # the member lets anyone write there, and plants a name
    planted = image.path / ".sha256-cache.json"
    victim = state.parent / "victim"
    victim.write_text("victim's data\n")
    planted.symlink_to(victim)
    digest = store.verified_sha256(image)
    assert victim.read_text() == "victim's data\n"
    own = state / "sha256" / "theirs.sha256-cache.json"
    assert json.loads(own.read_text())["template.qcow2"]["sha256"] == digest
    assert store.verified_sha256(image) == digest  # the cache serves next time


def test_a_members_link_in_the_store_is_never_reaped_or_unmounted_below(state):
    target = state.parent / "target"
    (target / "m").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vmiso-test-tmpfs", str(target / "m")], check=True)
    link = state / "images" / ".building-evil"
    link.symlink_to(target)
    os.chown(link, pwd.getpwnam(MEMBER).pw_uid, -1, follow_symlinks=False)
    other = state / "images" / ".building-theirs"  # a member's dead build: theirs to clean
    other.mkdir()
    os.chown(other, pwd.getpwnam(MEMBER).pw_uid, -1)
    assert reaper.find(None, state) == []
    reaper.clean(None, state)
    assert str(target / "m") in _mounts() and link.is_symlink() and other.is_dir()
