"""Checks on the project's shape: the core stays free of click, the Vagrantfile stays valid."""

import os
import re
import subprocess
import sys

import pytest

CORE = ["vmiso.config", "vmiso.domain", "vmiso.hypervisor", "vmiso.image.seed", "vmiso.ssh", "vmiso.plan", "vmiso.run",
        "vmiso.host.inputs", "vmiso.host.outputs", "vmiso.host.tree", "vmiso.host.reaper", "vmiso.host.workdir",
        "vmiso.doctor", "vmiso.clones", "vmiso.clones.warm", "vmiso.clones.pool.server", "vmiso.clones.pool.client",
        "vmiso.image.provision", "vmiso.image.store", "vmiso.image.layer", "vmiso.image.initramfs",
        "vmiso.image.cloud", "vmiso.accel", "vmiso.batch.plan", "vmiso.batch.record", "vmiso.batch.engines",
        "vmiso.batch.runner", "vmiso.batch.slurm", "vmiso.node.client", "vmiso.node.server", "vmiso.node.transfer",
        "vmiso.node.protocol"]


def test_core_imports_without_click():
    code = ("import sys; sys.modules['click'] = None\n"
            + "".join(f"import {m}\n" for m in CORE))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_one_module_per_outside_dependency(repo):
    owners = {"libvirt": {"hypervisor.py"}, "paramiko": {"ssh.py"}, "click": {"cli.py"}, "yaml": {"config.py"},
              "cyclonedx": {"sbom.py"}, "packageurl": {"sbom.py"},
              "subprocess": {"tools.py", "sharemount.py", "openssh.py"}}  # sharemount.py is a program of its own;
    # openssh.py runs the analyst's own ssh, a long-lived link rather than an argv list
    for path in (repo / "vmiso").rglob("*.py"):
        text = path.read_text()
        for module, allowed in owners.items():
            if re.search(rf"^\s*(import|from)\s+{module}\b", text, re.MULTILINE) and path.name not in allowed:
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
               "vmiso.clones.warm", "vmiso.host.reaper", "vmiso.host.workdir", "vmiso.clones.clone",
               "vmiso.host.inputs"]
    code = ("import sys; sys.modules['libvirt'] = None\n" + "".join(f"import {m}\n" for m in modules)
            + "assert 'vmiso.hypervisor' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_state_directory_is_spelled_in_one_module(repo):
    # vmiso.host.state owns every path of the state directory; the others ask it.  (resources.py
    # names vmiso's own data files, "images/" of the source tree, not the state directory's.)
    folder = re.compile(r'/ "(runs|warm|pools|layers|images|users|logs|sha256)"|"\.(building|removing|replaced)-')
    for path in (repo / "vmiso").rglob("*.py"):
        if path.relative_to(repo / "vmiso").as_posix() in ("host/state.py", "resources.py"):
            continue
        found = folder.search(path.read_text())
        assert found is None, f"{path} spells {found.group(0)!r}: ask vmiso.host.state"


def _module_imports(repo) -> dict[str, set[str]]:
    """vmiso's modules -> the vmiso modules each imports when it is imported (not inside a function,
    not under TYPE_CHECKING)."""
    import ast

    modules = {}
    for path in (repo / "vmiso").rglob("*.py"):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        package = parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, package)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # the module's own statements only
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else base)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vmiso"):
                found.add(node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_itself_back(repo):
    graph = _module_imports(repo)

    def cycle_from(start: str, at: str, seen: list[str]) -> list[str] | None:
        for nxt in sorted(graph[at]):
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None
    for module in sorted(graph):
        cycle = cycle_from(module, module, [module])
        assert cycle is None, " -> ".join(cycle)


def test_the_configuration_imports_nothing_while_it_checks(repo):
    # The allow-lists' parsing is apart from the gateway (vmiso.network.allow): config.py, a leaf
    # that every wing reads, needs no import inside a function to check its keys.
    import ast

    tree = ast.parse((repo / "vmiso" / "config.py").read_text())
    lazy = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))]
    assert lazy == []
    assert "vmiso.network.gateway" not in _module_imports(repo)["vmiso.config"]


# The wings (packages) and the modules at the top of vmiso/: what README's "How vmiso is built"
# describes.  A new module goes into a wing, or is a leaf for one more outside dependency.
WINGS = {"batch", "clones", "host", "image", "network", "node"}
TOP = {"__init__", "__main__", "cli", "terminal", "doctor", "plan", "run", "execution",  # commands, run
       "config", "hypervisor", "ssh", "tools", "domain", "accel", "resources",  # leaves
       "errors", "progress"}  # shared by every wing


def test_the_layout_shows_the_wings(repo):
    root = repo / "vmiso"
    wings = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    top = {p.stem for p in root.glob("*.py")}
    assert (wings, top) == (WINGS, TOP)
    readme = (repo / "README.md").read_text()
    built = readme[readme.index("## How vmiso is built"):]
    built = built[:built.index("\n## ", 1)]
    for name in sorted(WINGS):
        assert f"{name}/" in built, name
    for name in sorted(TOP - {"__init__", "__main__"}):
        assert f"{name}.py" in built, name
