"""Checks on the project's shape: the core stays free of click, the Vagrantfile stays valid."""

import os
import re
import subprocess
import sys

import pytest

CORE = ["vmiso.config", "vmiso.domain", "vmiso.hypervisor", "vmiso.seed", "vmiso.ssh", "vmiso.run",
        "vmiso.inputs", "vmiso.outputs", "vmiso.tree", "vmiso.reaper", "vmiso.workdir", "vmiso.warm", "vmiso.doctor",
        "vmiso.image.provision", "vmiso.image.store", "vmiso.image.layer", "vmiso.image.initramfs",
        "vmiso.image.cloud", "vmiso.accel"]


def test_core_imports_without_click():
    code = ("import sys; sys.modules['click'] = None\n"
            + "".join(f"import {m}\n" for m in CORE))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_one_module_per_outside_dependency(repo):
    owners = {"libvirt": {"hypervisor.py"}, "paramiko": {"ssh.py"}, "click": {"cli.py"},
              "subprocess": {"tools.py", "sharemount.py"}}  # sharemount.py is a program of its own
    for path in (repo / "vmiso").rglob("*.py"):
        text = path.read_text()
        for module, allowed in owners.items():
            if f"import {module}" in text and path.name not in allowed:
                pytest.fail(f"{path} imports {module}; only {allowed} may")


def test_core_never_prints_or_exits(repo):
    for path in (repo / "vmiso").rglob("*.py"):
        if path.name in ("cli.py", "__main__.py", "sharemount.py"):  # the last: a program of its own
            continue
        text = path.read_text()
        assert not re.search(r"(?<![\w.])print\(", text) and "sys.exit" not in text, path


@pytest.mark.hostsetup(reason="vagrant, which it installs")
def test_vagrantfile_validates(repo):
    done = subprocess.run(["vagrant", "validate"], cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


def _tool(name: str) -> str:
    """The linter from the venv that runs the tests (scripts/setup-host --test installs it)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e '.[test]'")
    return path


def test_ruff_passes(repo):
    done = subprocess.run([_tool("ruff"), "check", "."], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_passes(repo):
    done = subprocess.run([_tool("mypy")], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_benchmark_floor_boots_under_the_accelerator_runs_use(repo, tmp_path):
    # 'accel: auto' runs use KVM where it works; the floor they are compared with must too.
    sys.path.insert(0, str(repo / "bench"))
    try:
        import bench
    finally:
        sys.path.remove(str(repo / "bench"))
    from vmiso import config
    from vmiso.image.store import Image

    image = Image("x", tmp_path)
    auto = config.load(None, env={})
    spec = bench.floor_spec(auto, "floor", image, tmp_path / "i", tmp_path / "o", tmp_path, kvm_check=lambda: None)
    assert spec.accel == "kvm"
    tcg = config.load(None, env={"VMISO_ACCEL": "tcg"})
    assert bench.floor_spec(tcg, "floor", image, tmp_path / "i", tmp_path / "o", tmp_path).accel == "tcg"


def test_image_code_imports_without_libvirt():
    # Only hypervisor.py talks to libvirt; the image store, layers and provisioning are
    # handed a connection. (vmiso.image used to import the reaper, and through it libvirt.)
    modules = ["vmiso.image.store", "vmiso.image.layer", "vmiso.image.cloud", "vmiso.image.provision",
               "vmiso.warm", "vmiso.reaper", "vmiso.workdir", "vmiso.clone", "vmiso.inputs"]
    code = ("import sys; sys.modules['libvirt'] = None\n" + "".join(f"import {m}\n" for m in modules)
            + "assert 'vmiso.hypervisor' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
