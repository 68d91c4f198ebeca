"""The command line through click's runner: exit codes, messages, the --json record.

The library functions behind each command are replaced by small fakes; libvirt is
its test:///default driver, which boots nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vmiso import cli
from vmiso.clones import warm
from vmiso.errors import GuestError, Interrupted, RunTimeout, VmisoError
from vmiso.network import allow, gateway as egress
from vmiso.run import RunResult


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "vmiso.yaml"
    path.write_text(yaml.safe_dump({"accel": "tcg", "libvirt_uri": "test:///default",
                                    "state_dir": str(tmp_path / "state")}))
    return path


@pytest.fixture(autouse=True)
def keep_process_state():
    """The CLI sets up logging and handlers for SIGINT, SIGTERM and SIGHUP; the test process
    keeps its own (pytest's Ctrl-C must still stop the session, not one test)."""
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    loggers = [logging.getLogger(name) for name in ("vmiso", "paramiko", "vmiso.accel")]
    saved = [(lg, lg.level, lg.handlers[:]) for lg in loggers]
    yield
    for sig, handler in signals.items():
        signal.signal(sig, handler)
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


def invoke(*args: str):
    return CliRunner().invoke(cli.cli, list(args), catch_exceptions=False)


class Seen(list):
    """The plans a fake run saw, and the pseudo-terminal each asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.terminals: list = []


def fake_run(monkeypatch, outcome):
    """Make 'vmiso run' call ``outcome(plan)`` instead of booting a VM."""
    seen = Seen()

    def run(plan, hv, stdout, stderr, steps, stdin=None, interruption=None, terminal=None, on_published=None):
        seen.append(plan)
        seen.terminals.append(terminal)
        with steps.step("exec", "the job"):
            stdout.write(b"job output\n")
            return outcome(plan)
    monkeypatch.setattr("vmiso.run.run", run)
    return seen


def result(exit_code: int = 0, **changes) -> RunResult:
    return RunResult(run_id="abc", image="default", sha256="0" * 64, command=("python", "job.py"),
                     exit_code=exit_code, boot="warm", memory_mib=512, scratch_bytes=2 * 1024**3, **changes)


def test_run_exits_with_the_job_code_and_records_it(monkeypatch, config, tmp_path):
    requests = fake_run(monkeypatch, lambda request: result(3))
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(config), "--json", str(record), "--cold", "--memory", "1024",
                  "-i", str(config), "--", "python", "job.py")
    assert done.exit_code == 3
    assert "job output" in done.stdout
    assert requests[0].command == ("python", "job.py") and not requests[0].warm
    assert requests[0].memory_mib == 1024 and requests[0].inputs == (config,)
    data = json.loads(record.read_text())
    assert data["exit_code"] == 3 and data["boot"] == "warm" and data["command"] == ["python", "job.py"]


def test_scratch_reaches_the_run_through_its_plan_as_memory_does(monkeypatch, config):
    plans = fake_run(monkeypatch, lambda plan: result(0))
    done = invoke("run", "-c", str(config), "--scratch", "128MiB", "--timeout", "9", "--", "true")
    assert done.exit_code == 0
    assert plans[0].scratch_bytes == 128 * 1024**2 and plans[0].timeout == 9
    too_small = invoke("run", "-c", str(config), "--scratch", "1MiB", "--", "true")
    assert too_small.exit_code == 125
    assert "vmiso: error: run.scratch: 1048576 is too small (at least 67108864)" in too_small.stderr
    assert len(plans) == 1  # refused before anything ran


def test_run_says_which_signal_killed_the_job(monkeypatch, config):
    fake_run(monkeypatch, lambda request: result(137, signal="SIGKILL"))
    done = invoke("run", "-c", str(config), "--", "python", "job.py")
    assert done.exit_code == 137
    assert "killed by SIGKILL (most likely the guest's out-of-memory killer" in done.stderr
    assert "this run had 512 MiB" in done.stderr


@pytest.mark.parametrize(("error", "code"), [(RunTimeout("too long", "raise --timeout"), 124),
                                             (GuestError("no SSH"), 125)])
def test_a_failed_run_is_recorded_with_its_exit_code(monkeypatch, config, tmp_path, error, code):
    def fail(request):
        raise error
    fake_run(monkeypatch, fail)
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(config), "--json", str(record), "--", "true")
    assert done.exit_code == code
    assert f"vmiso: error: {error.message}" in done.stderr
    data = json.loads(record.read_text())
    assert data["exit_code"] == code and data["error"] == str(error) and "exec" in data["timings"]


def test_an_interrupted_run_is_recorded_with_exit_code_130(monkeypatch, config, tmp_path):
    def interrupt(request):
        raise KeyboardInterrupt
    fake_run(monkeypatch, interrupt)
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(config), "--json", str(record), "--", "true")
    assert done.exit_code == 130 and "vmiso: interrupted" in done.stderr
    data = json.loads(record.read_text())
    assert data["exit_code"] == 130 and data["error"] == "interrupted"


def test_an_internal_error_is_short_and_recorded(monkeypatch, config, tmp_path):
    def bug(request):
        raise ZeroDivisionError("oops")
    fake_run(monkeypatch, bug)
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(config), "--json", str(record), "--", "true")
    assert done.exit_code == 125
    assert "internal error: ZeroDivisionError: oops" in done.stderr and "run with -v" in done.stderr
    assert json.loads(record.read_text())["exit_code"] == 125
    verbose = invoke("-v", "run", "-c", str(config), "--", "true")
    assert "Traceback" in verbose.stderr


def test_run_never_overwrites_the_json_record(monkeypatch, config, tmp_path):
    fake_run(monkeypatch, lambda request: result(0))
    record = tmp_path / "run.json"
    record.write_text("mine")
    done = invoke("run", "-c", str(config), "--json", str(record), "--", "true")
    assert done.exit_code == 125 and "exists already" in done.stderr
    assert record.read_text() == "mine"


def test_a_json_record_in_a_missing_directory_is_refused_before_the_run(monkeypatch, config, tmp_path):
    requests = fake_run(monkeypatch, lambda request: result(0))
    done = invoke("run", "-c", str(config), "--json", str(tmp_path / "no" / "run.json"), "--", "true")
    assert done.exit_code == 125 and "its directory does not exist" in done.stderr
    assert requests == []  # no run started, so no job's exit code lost


def test_the_json_record_goes_to_the_file_opened_at_the_start(monkeypatch, config, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    record = tmp_path / "run.json"

    def swap(request):  # another local user, while the job runs
        os.rename(record, tmp_path / "moved.json")
        record.symlink_to(victim)
        return result(7)
    fake_run(monkeypatch, swap)
    done = invoke("run", "-c", str(config), "--json", str(record), "--", "true")
    assert done.exit_code == 7
    assert victim.read_text() == "mine"
    assert json.loads((tmp_path / "moved.json").read_text())["exit_code"] == 7


def test_env_name_alone_takes_the_value_from_vmisos_environment(monkeypatch, config):
    requests = fake_run(monkeypatch, lambda request: result(0))
    monkeypatch.setenv("API_TOKEN", "s3cret value")
    done = invoke("run", "-c", str(config), "-e", "API_TOKEN", "-e", "MODE=fast", "--", "true")
    assert done.exit_code == 0, done.stderr
    assert requests[0].env == (("API_TOKEN", "s3cret value"), ("MODE", "fast"))


def test_env_name_alone_that_is_unset_is_a_clear_error(monkeypatch, config):
    requests = fake_run(monkeypatch, lambda request: result(0))
    monkeypatch.delenv("API_TOKEN", raising=False)
    done = invoke("run", "-c", str(config), "-e", "API_TOKEN", "--", "true")
    assert done.exit_code == 125 and requests == []
    assert "-e API_TOKEN: API_TOKEN is not set in vmiso's environment" in done.stderr
    assert "export API_TOKEN first" in done.stderr


def test_an_env_file_line_without_a_value_is_refused(monkeypatch, config, tmp_path):
    fake_run(monkeypatch, lambda request: result(0))
    env_file = tmp_path / "job.env"
    env_file.write_text("# comment\nMODE=fast\nTOKEN\n")
    done = invoke("run", "-c", str(config), "--env-file", str(env_file), "--", "true")
    assert done.exit_code == 125 and "line 3: 'TOKEN' has no '='" in done.stderr


def test_quiet_hides_warnings_but_not_that_the_vm_runs_under_tcg(capsys):
    from vmiso import accel

    cli._setup_logging(0, True)
    logging.getLogger("vmiso.run").warning("cold boot: no warm state")
    assert accel.resolve("tcg") == "tcg"
    err = capsys.readouterr().err
    assert "cold boot" not in err
    assert f"vmiso: WARNING: {accel.TCG_WARNING}" in err


def test_sigterm_becomes_an_interruption():
    with pytest.raises(VmisoError) as err:
        cli._raise_interrupt(signal.SIGTERM, None)
    assert err.value.exit_code == 130


def test_images_warm_gives_the_reason_even_with_q(monkeypatch, config, tmp_path):
    # The reason used to be a warning, which -q hides, and the error said 'see the warning above'.
    image = tmp_path / "state" / "images" / "x"
    image.mkdir(parents=True)
    (image / "manifest.json").write_text(json.dumps({"sha256": "0" * 64}))
    (image / "template.qcow2").write_bytes(b"")

    def build(hv, image, key, steps, *, boot_timeout):
        raise GuestError("the clone was not ready to be saved in time")
    monkeypatch.setattr(warm, "build", build)
    done = invoke("-q", "images", "-c", str(config), "warm", "x")
    assert done.exit_code == 125
    assert "could not make a warm state for x: the clone was not ready to be saved in time" in done.stderr
    assert "warning above" not in done.stderr


def image_in(state: Path, name: str = "x", **manifest) -> Path:
    path = state / "images" / name
    path.mkdir(parents=True)
    files = {"template.qcow2": b"template", "vmlinuz": b"kernel", "initramfs.img": b"initramfs"}
    for file, content in files.items():
        (path / file).write_bytes(content)
    digests = {key: hashlib.sha256(files[file]).hexdigest()
               for key, file in (("sha256", "template.qcow2"), ("kernel_sha256", "vmlinuz"),
                                 ("initramfs_sha256", "initramfs.img"))}
    (path / "manifest.json").write_text(json.dumps({"name": name, **digests, **manifest}))
    return path


def test_run_reports_refused_outputs(monkeypatch, config):
    from vmiso.host.outputs import OutputReport

    report = OutputReport(refused=[("link", "a symbolic link")])
    fake_run(monkeypatch, lambda request: result(0, outputs=report))
    done = invoke("run", "-c", str(config), "--", "true")
    assert done.exit_code == 0 and "vmiso: refused output link: a symbolic link" in done.stderr


def test_provision_prints_the_new_image_and_its_progress(monkeypatch, config, tmp_path):
    state = tmp_path / "state"

    def provision(cfg, hv, *, name, replace, steps):
        with steps.step("keys", "client key"):
            steps.note("keys", "made")
        from vmiso.image.store import Image
        return Image(name, image_in(state, name, created="2026-01-01T00:00:00+00:00"))
    monkeypatch.setattr("vmiso.image.provision.provision", provision)
    done = invoke("provision", "-c", str(config), "--name", "new")
    assert done.exit_code == 0
    assert f"provisioned new in 0 s: sha256 {hashlib.sha256(b'template').hexdigest()}" in done.stdout
    assert "keys: client key" in done.stderr and "keys: made" in done.stderr


def overwrite(path: Path, content: bytes) -> None:
    """As the owner of an image's file would: verifying made it read-only, which stops
    anyone but root from writing it as it is."""
    path.chmod(0o644)
    path.write_bytes(content)


def test_images_lists_verifies_and_removes(config, tmp_path):
    state = tmp_path / "state"
    assert "no images; build one with 'vmiso provision'" in invoke("images", "-c", str(config)).stdout
    image_in(state, "recipe", pip=[{"name": "tabulate", "version": "0.9.0"}, {"name": "pip", "version": "23"}],
             source={"recipe": "debian-12", "mirror": "http://m/debian"})
    image_in(state, "cloud", source={"cloud_image": "/c.qcow2", "sha256": "c" * 64})
    listing = invoke("images", "-c", str(config)).stdout
    assert "packages: tabulate==0.9.0" in listing and "pip==" not in listing
    assert "source: recipe debian-12 from http://m/debian" in listing
    assert f"source: cloud image /c.qcow2 (sha256 {'c' * 64})" in listing
    rows = json.loads(invoke("images", "-c", str(config), "--json").stdout)
    assert [row["name"] for row in rows] == ["cloud", "recipe"]
    assert "cloud: OK sha256" in invoke("images", "-c", str(config), "verify", "cloud").stdout
    kernel = state / "images" / "cloud" / "vmlinuz"
    overwrite(kernel, b"kernal")  # same size, and its old mtime put back: only ctime tells
    os.utime(kernel, ns=(0, 0))
    changed = invoke("images", "-c", str(config), "verify", "cloud")
    assert changed.exit_code == 125 and "image cloud: vmlinuz was changed" in changed.stderr
    overwrite(kernel, b"kernel")
    overwrite(state / "images" / "cloud" / "template.qcow2", b"changed")
    changed = invoke("images", "-c", str(config), "verify", "cloud")
    assert changed.exit_code == 125 and "image cloud: template was changed" in changed.stderr
    assert invoke("images", "-c", str(config), "rm", "cloud").stdout == "removed cloud\n"
    assert [row["name"] for row in json.loads(invoke("images", "-c", str(config), "--json").stdout)] == ["recipe"]


def test_gc_removes_leftovers(config, tmp_path):
    orphan = tmp_path / "state" / "runs" / "dead"
    orphan.mkdir(parents=True)
    done = invoke("gc", "-c", str(config))
    assert done.exit_code == 0 and "removed run directory dead" in done.stdout and not orphan.exists()
    assert "nothing to remove" in invoke("gc", "-c", str(config)).stdout


def test_gc_says_what_it_could_not_remove_and_removes_the_rest(config, tmp_path, monkeypatch):
    runs = tmp_path / "state" / "runs"
    (runs / "stuck" / "out").mkdir(parents=True)
    (runs / "stuck" / "out" / "kept").write_text("x")
    (runs / "dead").mkdir()
    real_unlink = os.unlink

    def unlink(name, *, dir_fd=None):  # as in an immutable directory (chattr +i)
        if name == "kept":
            raise PermissionError(1, "Operation not permitted")
        real_unlink(name, dir_fd=dir_fd)
    monkeypatch.setattr(os, "unlink", unlink)
    done = invoke("gc", "-c", str(config))
    assert done.stdout == "removed run directory dead\n"
    assert done.stderr == "vmiso: could not remove run directory stuck: stuck/out/kept: Operation not permitted\n"
    assert done.exit_code == 1  # something is left: a script can tell


def test_doctor_marks_each_check_and_fails_when_one_fails(monkeypatch, config):
    from vmiso.doctor import Check

    checks = [Check("qemu-img", True, "/usr/bin/qemu-img"), Check("accel", True, "TCG", "use KVM", warning=True)]
    monkeypatch.setattr("vmiso.doctor.run_checks", lambda cfg: checks)
    done = invoke("doctor", "-c", str(config))
    assert done.exit_code == 0
    assert "[ok  ] qemu-img: /usr/bin/qemu-img" in done.stdout and "[warn] accel: TCG" in done.stdout
    assert "fix: use KVM" in done.stdout
    checks.append(Check("libvirt", False, "no daemon", "start it"))
    failed = invoke("doctor", "-c", str(config))
    assert failed.exit_code == 1 and "[FAIL] libvirt: no daemon" in failed.stdout


def test_a_bad_config_is_one_line_and_125(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("acel: tcg\n")
    done = invoke("images", "-c", str(path))
    assert done.exit_code == 125
    assert done.stderr == "vmiso: error: unknown key 'acel'\nvmiso: did you mean 'accel'?\n"


def test_main_exits_130_when_interrupted_outside_a_command(monkeypatch):
    def interrupted(**kwargs):
        raise Interrupted("vmiso was asked to stop (SIGTERM)")
    monkeypatch.setattr(cli, "cli", interrupted)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 130


def test_shell_and_run_t_give_the_job_a_pseudo_terminal(monkeypatch, config):
    seen = fake_run(monkeypatch, lambda request: result(exit_code=7))
    monkeypatch.setenv("TERM", "screen-256color")
    done = invoke("shell", "-c", str(config))
    assert done.exit_code == 7
    assert seen[-1].command == ("bash",)
    assert seen.terminals[-1].term == "screen-256color" and len(seen.terminals[-1].size()) == 2
    done = invoke("run", "-c", str(config), "-t", "--", "python", "-i")
    assert seen[-1].command == ("python", "-i") and seen.terminals[-1] is not None
    invoke("run", "-c", str(config), "--", "true")
    assert seen.terminals[-1] is None


def test_images_show_prints_what_the_gateway_let_through_and_refused(config, tmp_path):
    state = tmp_path / "state"
    record = {"allow_list": ["pypi.org:443"], "connections": [
        {"time": 1.0, "method": "CONNECT", "host": "pypi.org", "port": 443, "allowed": True, "status": 200,
         "result": "TCP_TUNNEL", "bytes_from_guest": 900, "bytes_to_guest": 12000},
        {"time": 2.0, "method": "CONNECT", "host": "evil.example", "port": 443, "allowed": False,
         "status": 403, "result": "TCP_DENIED", "bytes_from_guest": 110, "bytes_to_guest": 3300}]}
    data = json.dumps(record).encode()
    path = image_in(state, "gw", gateway={"record": "gateway.json", "sha256": hashlib.sha256(data).hexdigest(),
                                          "allow_list": ["pypi.org:443"], "refused": ["evil.example:443"]})
    (path / "gateway.json").write_bytes(data)
    shown = invoke("images", "-c", str(config), "show", "gw")
    assert shown.exit_code == 0, shown.stderr
    assert "contacted: \n  pypi.org:443: 1 connection(s), 900 bytes from the guest, 12000 to it" in shown.stdout
    assert "refused: \n  evil.example:443: 1 connection(s)" in shown.stdout
    as_json = json.loads(invoke("images", "-c", str(config), "show", "gw", "--json").stdout)
    assert [h["host"] for h in as_json["gateway"]["refused"]] == ["evil.example:443"]
    (path / "gateway.json").write_bytes(data.replace(b"evil", b"good"))  # the record no longer matches
    changed = invoke("images", "-c", str(config), "show", "gw")
    assert changed.exit_code == 125 and "does not match the sha256 in the manifest" in changed.stderr


def _network_record(refused_host: str = "telemetry.example.net") -> dict:
    rules = allow.for_run((), (), None, ["api.example.org"], ())
    record = egress.Record()
    reached = record.open("proxy", 3128)
    reached.update(method="CONNECT", host="api.example.org", port=443, outcome="contacted", allowed=True,
                   bytes_from_guest=2048, bytes_to_guest=3 * 2**20)
    tried = record.open("proxy", 3128)
    tried.update(method="CONNECT", host=refused_host, port=443, outcome="refused",
                 reason="not in this run's --allow-host")
    return record.as_dict(rules)


def test_a_networked_run_says_what_it_reached_and_names_what_was_refused(monkeypatch, config, tmp_path):
    seen = fake_run(monkeypatch, lambda request: result(network=_network_record("tele\x1b[2Jmetry.example.net")))
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(config), "--allow-host", "api.example.org",
                  "--allow-tcp", "5432:db.example.org:5432", "--json", str(record), "--", "python", "job.py")
    assert done.exit_code == 0
    assert seen[0].network.listed() == ["api.example.org:443"]
    assert [str(r) for r in seen[0].network.tcp] == ["5432:db.example.org:5432"]
    assert "vmiso: network: reached api.example.org:443 (1x, 2.0 KiB sent, 3.0 MiB received)\n" in done.stderr
    # The guest chose the name: shown, not obeyed.
    assert ("vmiso: the job tried to reach tele^[[2Jmetry.example.net:443, refused: not in this run's "
            "--allow-host\n") in done.stderr
    assert json.loads(record.read_text())["network"]["contacted"][0]["host"] == "api.example.org:443"
    quiet = invoke("-q", "run", "-c", str(config), "--allow-host", "api.example.org", "--", "python", "job.py")
    assert "network: reached" not in quiet.stderr and "the job tried to reach" in quiet.stderr


def test_a_networked_run_that_fails_still_records_and_names_its_refusals(monkeypatch, config, tmp_path):
    def timed_out(request):
        err = RunTimeout("the job ran longer than 5 s; the VM was destroyed")
        err.record = result(network=_network_record()).failed(err, err.exit_code)  # as run.run attaches it
        raise err
    fake_run(monkeypatch, timed_out)
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(config), "--allow-host", "api.example.org", "--json", str(record), "--",
                  "python", "job.py")
    assert done.exit_code == 124
    assert "the job tried to reach telemetry.example.net:443, refused" in done.stderr
    assert json.loads(record.read_text())["network"]["refused"][0]["host"] == "telemetry.example.net:443"


@pytest.mark.parametrize("flag, message", [
    (["--allow-host", "10.0.0.1"], "--allow-host[0]: '10.0.0.1' is an IP address"),
    (["--allow-tcp", "22:db.example.org:5432"], "--allow-tcp[0]: '22' cannot be the job's local port"),
])
def test_a_bad_allow_flag_is_refused_before_a_vm_starts(monkeypatch, flag, message):
    seen = fake_run(monkeypatch, lambda request: result())
    done = invoke("run", *flag, "--", "true")
    assert done.exit_code == 125 and message in done.stderr and seen == []


def test_a_run_refused_before_its_config_is_read_keeps_the_record_shape(tmp_path, write):
    from vmiso.run import RECORD_KEYS

    bad = write("bad.yaml", "run:\n  timout: 5\n")
    record = tmp_path / "run.json"
    done = invoke("run", "-c", str(bad), "--json", str(record), "--", "python", "job.py")
    assert done.exit_code == 125 and "timout" in done.stderr
    data = json.loads(record.read_text())
    assert set(data) == set(RECORD_KEYS) and data["schema"] == 1 and data["exit_code"] == 125
    assert "timout" in data["error"] and data["command"] == ["python", "job.py"] and data["image"] is None


def test_images_summarises_long_package_lists_and_show_says_whether_they_were_pinned(config, tmp_path):
    state = tmp_path / "state"
    many = [{"name": f"package-{i:02}", "version": "1.0"} for i in range(40)]
    image_in(state, "big", pip=many, requirements={"file": "/r.txt", "sha256": "r" * 64, "hashed": False})
    image_in(state, "pinned", pip=many[:2], requirements={"file": "/r.txt", "sha256": "r" * 64, "hashed": True})
    listing = invoke("images", "-c", str(config)).stdout
    line = next(text for text in listing.splitlines() if "packages: " in text)  # big's, listed first
    assert len(line) < 160 and "more ('vmiso images show big')" in line
    assert "owner: " in listing and "who may remove" not in listing
    assert "package-39==1.0" in invoke("images", "-c", str(config), "show", "big").stdout  # all of them there
    assert "requirements: not hash-pinned" in invoke("images", "-c", str(config), "show", "big").stdout
    assert "requirements: hash-pinned" in invoke("images", "-c", str(config), "show", "pinned").stdout


def test_a_run_says_where_it_was_refused_at_most_ten_times_and_how_many_were_refused_unread(monkeypatch, config):
    rules = allow.for_run((), (), None, ["api.example.org"], ())
    record = egress.Record()
    for n in range(12):
        tried = record.open("proxy", 3128)
        tried.update(method="CONNECT", host=f"host{n:02}.example.net", port=443, outcome="refused",
                     reason="not in this run's --allow-host")
    garbled = record.open("proxy", 3128)
    garbled.update(outcome="malformed", reason="not an HTTP request")
    record.busy(3128)
    record.busy(3128)
    fake_run(monkeypatch, lambda request: result(network=record.as_dict(rules)))
    done = invoke("run", "-c", str(config), "--allow-host", "api.example.org", "--", "python", "job.py")
    assert done.exit_code == 0
    tried = [line for line in done.stderr.splitlines() if line.startswith("vmiso: the job tried to reach")]
    assert tried[:2] == ["vmiso: the job tried to reach host00.example.net:443, refused: not in this run's "
                         "--allow-host", "vmiso: the job tried to reach host01.example.net:443, refused: not in "
                         "this run's --allow-host"]
    assert len(tried) == 10  # the guest chose how many: the analyst's terminal is not flooded
    assert "vmiso: ... and 3 more refused places (see --json)\n" in done.stderr  # 12 hosts and the garbled one
    assert ("vmiso: the job opened more connections at once than the gateway serves; 2 of them were refused "
            "unread\n") in done.stderr


def test_a_run_that_failed_explains_what_vmiso_knows_about_it(monkeypatch, config):
    fake_run(monkeypatch, lambda request: result(1, hints=("the job ran out of room in /tmp: raise --scratch",)))
    done = invoke("run", "-c", str(config), "--", "python", "job.py")
    assert done.exit_code == 1 and "vmiso: the job ran out of room in /tmp: raise --scratch\n" in done.stderr


def test_an_env_file_that_cannot_be_read_is_named_before_a_run(monkeypatch, config, tmp_path):
    plans = fake_run(monkeypatch, lambda request: result(0))
    done = invoke("run", "-c", str(config), "--env-file", str(tmp_path / "missing.env"), "--", "true")
    assert done.exit_code == 125 and f"vmiso: error: cannot read --env-file {tmp_path / 'missing.env'}: " in done.stderr
    (tmp_path / "latin1.env").write_bytes(b"NAME=caf\xe9\n")
    done = invoke("run", "-c", str(config), "--env-file", str(tmp_path / "latin1.env"), "--", "true")
    assert done.exit_code == 125 and "cannot read --env-file" in done.stderr and "can't decode byte 0xe9" in done.stderr
    assert plans == []


def test_images_show_lists_the_code_that_runs_at_every_python_start_shown_not_obeyed(config, tmp_path):
    startup = {"pth": [{"path": "/opt/vmiso/venv/lib/python3.11/site-packages/ev\x1b[2Jil.pth",
                        "executes": ["import os"]}],
               "startup_modules": [{"path": "/opt/vmiso/venv/lib/python3.11/site-packages/sitecustomize.py"}],
               "native": [], "unlisted": [], "tampered": []}
    image_in(tmp_path / "state", "inv", startup=startup)
    shown = invoke("images", "-c", str(config), "show", "inv")
    assert shown.exit_code == 0, shown.stderr
    assert "1 .pth file(s) run code at every Python start: ev^[[2Jil.pth (import os)" in shown.stdout
    assert "\x1b" not in shown.stdout
    assert "start-up modules: /opt/vmiso/venv/lib/python3.11/site-packages/sitecustomize.py" in shown.stdout
    image_in(tmp_path / "state", "old")  # provisioned before vmiso read the template
    assert "start-up code: not inventoried" in invoke("images", "-c", str(config), "show", "old").stdout


def test_gc_layers_removes_the_cached_os_layers_that_no_provisioning_holds(config, tmp_path):
    from contextlib import ExitStack

    from vmiso.host import state as layout
    from vmiso.image.layer import Layer, hold_layer

    layers = layout.home(tmp_path / "state").layers
    for key in ("a" * 16, "b" * 16):
        layer = Layer(key, layers / key)
        layer.path.mkdir(parents=True)
        layer.rootfs.write_bytes(os.urandom(2 * 1024**2))
    with ExitStack() as held:
        assert hold_layer(layer, held)  # b's: a provisioning uses it
        done = invoke("gc", "-c", str(config), "--layers")
    assert done.exit_code == 0, done.stderr
    assert f"removed OS layer {'a' * 16} (2 MiB)\n" in done.stdout
    assert f"kept OS layer {'b' * 16}: a provisioning is using it\n" in done.stdout
    assert sorted(p.name for p in layers.iterdir()) == ["b" * 16]
    assert invoke("gc", "-c", str(config)).stdout == "nothing to remove\n"  # the layers only with --layers


def test_pool_status_and_stop_say_when_no_pool_runs(config):
    assert invoke("pool", "status", "-c", str(config)).stdout == (
        "no pool is running; start one: vmiso pool start --image NAME\n")
    assert json.loads(invoke("pool", "status", "-c", str(config), "--json").stdout) == []
    assert invoke("pool", "stop", "-c", str(config)).stdout == "no pool is running\n"
    assert invoke("pool", "stop", "-c", str(config), "--image", "x").stdout == "no pool for x is running\n"


def test_a_pool_that_cannot_start_says_why(config, tmp_path):
    # The pool's process (vmiso pool start --foreground, started by this one) finds no image and ends.
    done = invoke("pool", "start", "-c", str(config), "--image", "missing")
    assert done.exit_code == 125
    # Its error, said once ("vmiso: error: " used to be said twice).
    assert "\nvmiso: error: the pool for missing did not start: no image named 'missing' in " in done.stderr
    assert "ready" not in done.stdout


def _startup(**changes) -> dict:
    site = "/opt/vmiso/venv/lib/python3.11/site-packages"
    startup = {"pth": [{"path": f"{site}/distutils-precedence.pth", "sha256": "1" * 64,
                        "executes": ["import os; ..."]}],
               "startup_modules": [],
               "native": [{"path": f"{site}/numpy/core/_multiarray_umath.so", "sha256": "2" * 64, "size": 9,
                           "distribution": "numpy-1.26.4"},
                          {"path": f"{site}/yaml/_yaml.so", "sha256": "3" * 64, "size": 9,
                           "distribution": "PyYAML-6.0.1"}],
               "unlisted": [], "tampered": [], "entry_points": [], "unreadable": []}
    for key, value in changes.items():
        startup[key] = value
    return startup


def _record(*hosts: str) -> tuple[dict, bytes]:
    data = json.dumps({"allow_list": ["pypi.org:443", "files.pythonhosted.org:443"], "connections": [
        {"time": 1.0, "method": "CONNECT", "host": h, "port": 443, "allowed": True, "status": 200,
         "bytes_from_guest": 9, "bytes_to_guest": 99} for h in hosts]}).encode()
    return {"record": "gateway.json", "sha256": hashlib.sha256(data).hexdigest()}, data


def test_images_diff_names_what_an_upgrade_adds_changes_and_runs_at_start(config, tmp_path):
    state, site = tmp_path / "state", "/opt/vmiso/venv/lib/python3.11/site-packages"
    old_gateway, old_data = _record("pypi.org")
    old = image_in(state, "old", sha256="a" * 64, created="2026-11-01T00:00:00+00:00", python="Python 3.11.2",
                   pip=[{"name": "numpy", "version": "1.26.4"}, {"name": "PyYAML", "version": "6.0.1"},
                        {"name": "six", "version": "1.16.0"}],
                   apt=[{"name": "python3", "version": "3.11.2-1+b1"}], startup=_startup(), gateway=old_gateway)
    (old / "gateway.json").write_bytes(old_data)
    new_gateway, new_data = _record("pypi.org", "files.pythonhosted.org", "evil\x1b[2J.example")
    new = image_in(state, "new", created="2026-12-01T00:00:00+00:00", python="Python 3.11.2",
                   # pip reports a name as its metadata spells it: pyyaml is PyYAML
                   pip=[{"name": "numpy", "version": "2.1.0"}, {"name": "pyyaml", "version": "6.0.1"},
                        {"name": "requests", "version": "2.32.3"}],
                   apt=[{"name": "python3", "version": "3.11.2-1+b1"}],
                   startup=_startup(
                       pth=[*_startup()["pth"], {"path": f"{site}/probe.pth", "sha256": "4" * 64,
                                                 "executes": ["import probe_probe"]}],
                       native=[{"path": f"{site}/numpy/core/_multiarray_umath.so", "sha256": "5" * 64, "size": 9,
                                "distribution": "numpy-2.1.0"},
                               {"path": f"{site}/yaml/_yaml.so", "sha256": "6" * 64, "size": 9,
                                "distribution": "PyYAML-6.0.1"}],
                       unlisted=[f"{site}/planted.py"],
                       tampered=[{"path": f"{site}/requests/api.py", "distribution": "requests-2.32.3",
                                  "why": "its sha256 differs from RECORD's"}]),
                   gateway=new_gateway)
    (new / "gateway.json").write_bytes(new_data)

    shown = invoke("images", "-c", str(config), "diff", "old", "new")
    assert shown.exit_code == 1, shown.stderr  # they differ, as diff(1) says it
    out = shown.stdout
    assert "python packages: 1 added, 1 removed, 1 changed\n  + requests==2.32.3\n  - six==1.16.0\n" \
           "  ~ numpy 1.26.4 -> 2.1.0\n" in out
    assert "debian packages" not in out  # the same on both sides
    assert f"  + .pth file {site}/probe.pth (runs import probe_probe at every Python start)" in out
    assert "  ~ 1 native extension(s) changed with their package's version" in out
    assert f"  ~ native extension {site}/yaml/_yaml.so changed within the same PyYAML-6.0.1" in out
    assert f"  + file in no package {site}/planted.py" in out
    assert f"  + file that differs from its RECORD {site}/requests/api.py" in out
    assert "provisioning new only reached: evil^[[2J.example:443, files.pythonhosted.org:443" in out
    assert "\x1b" not in out

    as_json = json.loads(invoke("images", "-c", str(config), "diff", "old", "new", "--json").stdout)
    assert as_json["differ"] and not as_json["same_template"]
    assert as_json["pip"]["changed"] == [{"name": "numpy", "from": "1.26.4", "to": "2.1.0"}]
    assert [e["path"] for e in as_json["startup"]["pth"]["added"]] == [f"{site}/probe.pth"]
    assert as_json["gateway"]["contacted"] == {"only_a": [], "only_b": ["evil\x1b[2J.example:443",
                                                                        "files.pythonhosted.org:443"]}

    same = invoke("images", "-c", str(config), "diff", "new", "new")
    assert same.exit_code == 0 and "no differences in packages, start-up code or hosts reached (the same " \
                                   "template)" in same.stdout
    image_in(state, "unread", pip=[{"name": "numpy", "version": "2.1.0"}])  # before vmiso read templates
    assert "start-up code: not compared" in invoke("images", "-c", str(config), "diff", "new", "unread").stdout
    missing = invoke("images", "-c", str(config), "diff", "new", "nothere")
    assert missing.exit_code == 125 and "nothere" in missing.stderr


def test_images_sbom_prints_the_templates_cyclonedx_document(config, tmp_path):
    image_in(tmp_path / "state", "s", created="2026-12-01T00:00:00+00:00",
             pip=[{"name": "tabulate", "version": "0.9.0"}], apt=[{"name": "python3", "version": "3.11.2-1+b1"}])
    shown = invoke("images", "-c", str(config), "sbom", "s")
    assert shown.exit_code == 0, shown.stderr
    bom = json.loads(shown.stdout)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    assert {c["purl"] for c in bom["components"]} == {"pkg:pypi/tabulate@0.9.0", "pkg:deb/debian/python3@3.11.2-1%2Bb1"}
    missing = invoke("images", "-c", str(config), "sbom", "nothere")
    assert missing.exit_code == 125 and "nothere" in missing.stderr


def test_images_audit_checks_against_osv_advisories_on_disk_and_show_prints_the_provisionings(config, tmp_path):
    from test_audit import ADVISORIES

    osv = tmp_path / "osv"
    osv.mkdir()
    for i, record in enumerate(ADVISORIES):
        (osv / f"{i}.json").write_text(json.dumps(record))
    recorded = {"source": "pip-audit (pypi)", "checked": "2026-12-01T10:00:00+00:00", "vulnerable": [],
                "not_checked": [], "unavailable": "no network: ConnectionError"}
    image_in(tmp_path / "state", "a", pip=[{"name": "requests", "version": "2.19.0"},
                                           {"name": "tabulate", "version": "0.9.0"}], audit=recorded)
    found = invoke("images", "-c", str(config), "audit", "a", "--osv", str(osv))
    assert found.exit_code == 1, found.stderr  # something known
    assert "known vulnerabilities: 1 in 2 package(s) checked (OSV advisories in" in found.stdout
    assert "  requests==2.19.0: PYSEC-2018-28 (CVE-2018-18074), fixed in 2.20.0" in found.stdout
    clean = tmp_path / "clean"
    clean.mkdir()  # only an advisory about another package: checked, none known
    (clean / "other.json").write_text(json.dumps({**ADVISORIES[0], "id": "PYSEC-0000-1", "affected": [
        {**ADVISORIES[0]["affected"][0], "package": {"ecosystem": "PyPI", "name": "not-installed"}}]}))
    assert invoke("images", "-c", str(config), "audit", "a", "--osv", str(clean)).exit_code == 0
    empty = tmp_path / "empty"  # nothing to check against is never a pass
    empty.mkdir()
    nothing = invoke("images", "-c", str(config), "audit", "a", "--osv", str(empty))
    assert nothing.exit_code == 3 and "not checked (no advisory about a PyPI package in" in nothing.stdout
    shown = invoke("images", "-c", str(config), "show", "a").stdout
    assert ("known vulnerabilities: not checked (no network: ConnectionError; pip-audit (pypi), checked "
            "2026-12-01T10:00:00+00:00)") in shown
    assert shown.index("known vulnerabilities") < shown.index("packages:")  # with what matters, first


def test_images_diff_counts_a_packages_native_extensions_and_names_one_in_no_package(config, tmp_path):
    site = "/opt/vmiso/venv/lib/python3.11/site-packages"
    natives = [{"path": f"{site}/numpy/_{i}.so", "sha256": str(i) * 64, "size": 1, "distribution": "numpy-2.1.0"}
               for i in range(3)]
    image_in(tmp_path / "state", "with", sha256="a" * 64, startup=_startup(native=[
        *natives, {"path": f"{site}/planted.so", "sha256": "9" * 64, "size": 1, "distribution": None}]))
    image_in(tmp_path / "state", "without", startup=_startup(native=[]))
    out = invoke("images", "-c", str(config), "diff", "with", "without").stdout
    assert "  - 3 native extension(s) of numpy-2.1.0\n" in out
    assert f"  - native extension {site}/planted.so (in no package's RECORD)\n" in out
