"""vmiso as an installed tool: the sdist and wheel that ``python -m build`` makes,
and a wheel installed into a fresh venv, used from a directory with no checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from vmiso import __version__

from vmharness import REPO, on_a_terminal, vmiso_domains, write_config


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing that points back at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "VMISO_DATA_DIR", "PYTHONHOME")}
    return dict(env, VMISO_ACCEL="tcg", PYTHONUNBUFFERED="1", **extra)


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """``python -m build``: an sdist, then a wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def wheel_venv(dist, tmp_path_factory) -> Path:
    """A fresh venv, outside the checkout, with the wheel and its dependencies installed."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    # Without a pip of its own (ensurepip's copy takes seconds to install); this pip fills it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    wheel = next(dist.glob("vmiso-*.whl"))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
                           "--disable-pip-version-check", str(wheel)], capture_output=True,
                          text=True, timeout=900, cwd=venv.parent, env=_clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with no checkout in it or above it."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert not any((parent / "pyproject.toml").exists() for parent in (work, *work.parents))
    return work


def _python(venv: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=_clean_env(**env))


def test_wheel_carries_the_package_and_its_data(dist):
    wheel = next(dist.glob("vmiso-*.whl"))
    assert wheel.name == f"vmiso-{__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"vmiso/{name}" for name in _files(REPO / "vmiso") if name.endswith(".py")}
    expected |= {f"vmiso/_data/images/{name}" for name in _files(REPO / "images")}
    expected |= {f"vmiso/_data/cloud_init/{name}" for name in _files(REPO / "cloud-init")}
    assert expected - names == set()
    assert not [n for n in names if not n.startswith(("vmiso/", f"vmiso-{__version__}.dist-info/"))]
    # The sdist is the whole source: the data where the design has it, and what tests it.
    sdist = next(dist.glob("vmiso-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for needed in ("images/debian-12.yaml", "images/guest/initramfs-init", "cloud-init/provision.sh",
                   "tests/golden/run-domain.xml", "tests/guest/probe.py", "examples/vmiso.yaml",
                   "scripts/setup-host", "pyproject.toml", "MANIFEST.in"):
        assert needed in members
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]


def test_installed_wheel_finds_its_data(wheel_venv, elsewhere):
    code = ("import json, vmiso\n"
            "from vmiso.resources import data_dirs\n"
            "from vmiso.image.layer import layer_key, load_recipe\n"
            "images, cloud_init = data_dirs()\n"
            "print(json.dumps({'package': vmiso.__file__, 'images': str(images), "
            "'cloud_init': str(cloud_init), 'key': layer_key(load_recipe('debian-12'), 'M')}))\n")
    done = _python(wheel_venv, code, elsewhere)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    site = Path(found["package"]).parent
    assert site.is_relative_to(wheel_venv)
    assert Path(found["images"]) == site / "_data/images"
    assert Path(found["cloud_init"]) == site / "_data/cloud_init"
    # The same bytes as the checkout: an OS layer cached by one is reused by the other.
    from vmiso.image.layer import layer_key, load_recipe
    assert found["key"] == layer_key(load_recipe("debian-12"), "M")
    # VMISO_DATA_DIR still wins, and a wrong one says where vmiso looked.
    done = _python(wheel_venv, code, elsewhere, VMISO_DATA_DIR=str(REPO))
    assert json.loads(done.stdout)["images"] == str(REPO / "images")
    done = _python(wheel_venv, code, elsewhere, VMISO_DATA_DIR=str(elsewhere))
    assert done.returncode != 0 and f"not under {elsewhere}" in done.stderr


def test_checkout_and_editable_install_read_the_source_tree():
    from vmiso.resources import cloud_init_dir, images_dir
    assert (images_dir(), cloud_init_dir()) == (REPO / "images", REPO / "cloud-init")


def test_installed_vmiso_names_its_version(wheel_venv, elsewhere):
    done = subprocess.run([str(wheel_venv / "bin/vmiso"), "--version"], capture_output=True, text=True,
                          cwd=elsewhere, env=_clean_env(), timeout=60)
    assert done.returncode == 0 and done.stdout == f"vmiso {__version__}\n"



def test_installed_vmiso_doctor_checks_its_data(wheel_venv, elsewhere):
    # Before, a plain 'pip install' passed 'vmiso doctor' and then failed at 'vmiso provision'.
    def doctor(**env: str) -> str:
        return subprocess.run([str(wheel_venv / "bin/vmiso"), "doctor"], capture_output=True, text=True,
                              cwd=elsewhere, env=_clean_env(**env), timeout=120).stdout
    site = next(wheel_venv.glob("lib/python3*/site-packages/vmiso"))
    assert f"[ok  ] data: {site}/_data/images, {site}/_data/cloud_init\n" in doctor()
    assert f"[FAIL] data: vmiso's data (images/, cloud-init/) is not under {elsewhere}\n" in \
        doctor(VMISO_DATA_DIR=str(elsewhere))




@pytest.mark.vm
def test_wheel_installed_outside_the_checkout_provisions_and_runs(wheel_venv, vm_root, elsewhere):
    """``pip install`` of the wheel, then ``vmiso provision`` and ``vmiso run`` with no checkout in sight.

    The state directory is the session's: the OS layer cached there (the same bytes
    from the wheel as from the checkout) is reused, so only the cloud-init boot runs.
    """
    state = vm_root / "state"
    config = write_config(elsewhere, state, image={"name": "from-wheel"})
    vmiso_bin = str(wheel_venv / "bin/vmiso")
    env = _clean_env(TERM="xterm")
    started = time.monotonic()
    try:
        code, stdout, terminal = on_a_terminal([vmiso_bin, "provision", "-c", str(config)], elsewhere, env,
                                                timeout=2400)
        provisioned = time.monotonic() - started
        assert code == 0, terminal[-4000:]
        assert stdout.startswith("provisioned from-wheel in ")
        manifest = json.loads((state / "images/from-wheel/manifest.json").read_text())
        assert {"name": "tabulate", "version": "0.9.0"} in manifest["pip"]
        # The terminal saw the live status line: a ticking clock, the guest's boot
        # and pip's package; and nothing of it is left once erased.
        assert "\r\x1b[K" in terminal
        assert re.search(r"  boot \d+:\d\d  (starting |cloud-init )", terminal), terminal[-4000:]
        assert re.search(r"  pip \d+:\d\d  (collecting|downloading|installing) tabulate", terminal), \
            terminal[-4000:]
        assert len(set(re.findall(r"  boot (\d+:\d\d)", terminal))) > 10  # the clock ticks between events
        job = elsewhere / "job.py"
        job.write_text("import os, tabulate\n"
                       "table = tabulate.tabulate([[1, 2]], headers=['a', 'b'])\n"
                       "print(table)\n"
                       "open(os.path.join(os.environ['VMISO_OUT'], 'table.txt'), 'w').write(table)\n")
        started_run = time.monotonic()
        done = subprocess.run([vmiso_bin, "run", "-c", str(config), "-i", str(job), "-o", str(elsewhere / "out"),
                               "--json", str(elsewhere / "run.json"), "--", "python", "job.py"],
                              capture_output=True, text=True, timeout=900, cwd=elsewhere, env=env)
        ran = time.monotonic() - started_run
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0].split() == ["a", "b"]
        assert (elsewhere / "out/table.txt").read_text().startswith("  a    b")
        record = json.loads((elsewhere / "run.json").read_text())
        assert record["image"] == "from-wheel" and record["exit_code"] == 0
        activities = dict.fromkeys(re.findall(r"  (\S+) \d+:\d\d  ([^\r\n]+?)(?=\r|\n|$)", terminal))
        print(f"\nwheel VM test: provision {provisioned:.0f} s, run {ran:.1f} s ({record['boot']}); "
              f"statuses seen: {[f'{step}: {what}' for step, what in activities]}")
    finally:
        subprocess.run([vmiso_bin, "images", "-c", str(config), "rm", "from-wheel"], capture_output=True,
                       cwd=elsewhere, env=env, timeout=120)
    assert not (state / "images/from-wheel").exists()
    assert vmiso_domains(state) == []
