import pytest

from vmiso.errors import ConfigError
from vmiso.image.requirements import load_requirements

H = "--hash=sha256:" + "a" * 64


def test_plain_file(write):
    reqs = load_requirements(write("r.txt", "# comment\nsix==1.16.0\nrequests[socks]>=2 ; python_version>'3'\n"),
                             None)
    assert reqs.count == 2 and not reqs.has_hashes


def test_hashed_with_continuations(write):
    reqs = load_requirements(write("r.txt", f"six==1.16.0 \\\n    {H}\ntabulate==0.9.0 {H}\n"), None)
    assert reqs.count == 2 and reqs.hashed == 2 and reqs.has_hashes


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_requirements(tmp_path / "nope.txt", None)


@pytest.mark.parametrize("line, message", [
    ("-r other.txt", "nested requirement files"),
    ("-e .", "editable installs"),
    ("--find-links /tmp", "find-links"),
    ("./local/pkg", "is not a requirement"),
    ("/abs/path.whl", "is not a requirement"),
    ("--trusted-host x", "unsupported option"),
])
def test_refused_lines_name_line_number(write, line, message):
    path = write("r.txt", f"six\n{line}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_requirements(path, None)
    assert f"{path}:2" in str(err.value)


def test_binary_file(write, tmp_path):
    path = tmp_path / "r.txt"
    path.write_bytes(b"\x89PNG\x00\x01")
    with pytest.raises(ConfigError, match="not UTF-8|not a text file"):
        load_requirements(path, None)


def test_require_hashes_true_needs_every_hash(write):
    with pytest.raises(ConfigError, match="1 of 2 requirements have no --hash"):
        load_requirements(write("r.txt", f"six {H}\ntabulate\n"), True)


def test_mixed_hashes_refused_in_auto(write):
    with pytest.raises(ConfigError, match="1 of 2 requirements have --hash"):
        load_requirements(write("r.txt", f"six {H}\ntabulate\n"), None)
