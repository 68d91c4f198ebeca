from pathlib import Path

import pytest

from vmiso import tools
from vmiso.errors import ToolError


def test_overlay_argv():
    assert tools.qemu_img_overlay_argv(Path("/t/template.qcow2"), Path("/r/o.qcow2")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "/t/template.qcow2", "/r/o.qcow2"]


def test_mmdebstrap_argv():
    argv = tools.mmdebstrap_argv(suite="bookworm", mirror="http://m/debian", target=Path("/x/root.tar"),
                                 packages=["linux-image-amd64", "python3"])
    assert argv[0] == "mmdebstrap"
    assert "--variant=minbase" in argv and "--mode=unshare" in argv and "--format=tar" in argv
    assert "--include=linux-image-amd64,python3" in argv
    assert argv[-3:] == ["bookworm", "/x/root.tar", "http://m/debian"]


def namespaces(argv: list[str]) -> list[str]:
    """unshare's options in an argv of the OS layer's, checking what comes before them."""
    assert argv[:4] == ["setpriv", "--pdeathsig=KILL", "--", "unshare"]
    options = argv[4:argv.index("--", 4)]
    assert {"--pid", "--fork", "--kill-child=KILL", "--ipc"} <= set(options)  # all die with vmiso
    return options


def test_root_builds_a_layer_in_namespaces_with_no_user_mapping():
    argv = tools.layer_namespace_argv(["mmdebstrap", "bookworm"], sub_ids=None)
    options = namespaces(argv)
    assert "--mount" in options and not [o for o in options if o.startswith("--map")]
    script = argv[argv.index("-c") + 1]
    assert "mount -t tmpfs" in script and "TMPDIR=/tmp" in script
    assert argv[-2:] == ["mmdebstrap", "bookworm"]


def test_a_user_builds_a_layer_as_root_of_a_user_namespace_of_their_subordinate_ids():
    options = namespaces(tools.layer_namespace_argv(["mmdebstrap"], sub_ids=(100000, 200000)))
    assert {"--mount", "--map-user=0", "--map-group=0", f"--map-users=100000,1,{tools.LAYER_IDS}",
            f"--map-groups=200000,1,{tools.LAYER_IDS}"} <= set(options)
    assert tools.LAYER_IDS > 65534  # nobody and nogroup


@pytest.mark.parametrize("user_namespace", [False, True])
def test_pack_layer_argv_runs_one_fakeroot_session(user_namespace):
    mkfs = tools.mkfs_ext4_argv(source_dir=Path("/w/root"), image=Path("/w/rootfs.img"), size_bytes=1 << 30,
                                label="vmiso-root")
    argv = tools.pack_layer_argv(tarball=Path("/w/root.tar"), root=Path("/w/root"),
                                 files=[(Path("/g/ssh-link"), "usr/local/lib/vmiso/ssh-link", 0o755),
                                        (Path("/g/sshd_config.vmiso"), "etc/ssh/sshd_config.vmiso", 0o644)],
                                 mkfs=mkfs, user_namespace=user_namespace)
    # A user needs a user namespace for the pid namespace; it maps them as themself, nobody else.
    assert [o for o in namespaces(argv) if o.startswith("--map")] == (["--map-current-user"] if user_namespace
                                                                      else [])
    session = argv[argv.index("--", 4) + 1:]
    assert session[:6] == ["env", "FAKEROOTDONTTRYCHOWN=1", "fakeroot", "--", "sh", "-c"]
    assert session[7:] == ["sh", "/w/root.tar", "/w/root",
                           "/g/ssh-link", "usr/local/lib/vmiso/ssh-link", "755",
                           "/g/sshd_config.vmiso", "etc/ssh/sshd_config.vmiso", "644", "--", *mkfs]


def test_mkfs_argv_needs_no_mount():
    argv = tools.mkfs_ext4_argv(source_dir=Path("/x/root"), image=Path("/x/r.img"), size_bytes=4 * 1024**3,
                                label="vmiso-root")
    assert argv[:2] == ["mkfs.ext4", "-q"]
    assert argv[argv.index("-d") + 1] == "/x/root"
    assert argv[-2:] == ["/x/r.img", "4194304k"]


def test_genisoimage_volume_is_cidata():
    argv = tools.genisoimage_argv(Path("/s/seed.iso"), [Path("/s/user-data"), Path("/s/meta-data")])
    assert argv[argv.index("-volid") + 1] == "cidata"
    assert argv[-2:] == ["/s/user-data", "/s/meta-data"]


def test_run_reports_failure_with_output(tmp_path):
    with pytest.raises(ToolError, match=r"qemu-img failed with exit code \d+: .*"):
        tools.run(["qemu-img", "info", str(tmp_path / "missing.qcow2")])


def test_missing_program_names_package(monkeypatch):
    monkeypatch.setitem(tools.PACKAGES, "no-such-tool-vmiso", "some-package")
    with pytest.raises(ToolError, match="apt-get install some-package"):
        tools.which("no-such-tool-vmiso")


def test_a_failed_tool_is_named_on_the_error(tmp_path):
    with pytest.raises(ToolError) as err:
        tools.run(["qemu-img", "info", str(tmp_path / "mmdebstrap-missing.qcow2")])
    assert err.value.program == "qemu-img"


def test_a_wrapped_program_is_named_on_the_error():
    with pytest.raises(ToolError, match=r"^qemu-img failed with exit code 1") as err:
        tools.run(["sh", "-c", "exit 1"], name="qemu-img")
    assert err.value.program == "qemu-img"


def test_only_a_failed_mmdebstrap_points_at_the_mirror(tmp_path):
    from vmiso.image.layer import Recipe, layer_failure

    log = tmp_path / "layer.log"
    recipe = Recipe(suite="bookworm")
    mkfs = ToolError(f"mkfs.ext4 failed with exit code 1; its log is {tmp_path}/mmdebstrap.log", program="mkfs.ext4")
    assert layer_failure(mkfs, recipe, "http://m/debian", log).hint is None
    debootstrap = ToolError("mmdebstrap failed with exit code 1", program="mmdebstrap")
    assert "http://m/debian" in layer_failure(debootstrap, recipe, "http://m/debian", log).hint
