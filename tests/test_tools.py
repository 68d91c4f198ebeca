from pathlib import Path

import pytest

from vmiso import tools
from vmiso.errors import ToolError


def test_overlay_argv():
    assert tools.qemu_img_overlay_argv(Path("/t/template.qcow2"), Path("/r/o.qcow2")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "/t/template.qcow2", "/r/o.qcow2"]


def test_mmdebstrap_argv():
    argv = tools.mmdebstrap_argv(suite="bookworm", mirror="http://m/debian", target=Path("/x/root"),
                                 packages=["linux-image-amd64", "python3"])
    assert argv[0] == "mmdebstrap"
    assert "--variant=minbase" in argv and "--mode=root" in argv
    assert "--include=linux-image-amd64,python3" in argv
    assert argv[-3:] == ["bookworm", "/x/root", "http://m/debian"]


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
