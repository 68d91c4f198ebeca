"""The run plan: flags and the configuration resolved once, into the one value a run's steps read."""

from __future__ import annotations

import dataclasses

import pytest

from vmiso import config as config_mod
from vmiso.errors import ConfigError
from vmiso.host.inputs import InputLimits
from vmiso.plan import LOCAL, WATCHDOG_GRACE, RunRequest, plan_run

GiB = 1024**3


def test_without_flags_a_plan_is_the_configuration():
    plan = plan_run(config_mod.load(None, env={}), RunRequest(command=("true",)))
    assert (plan.image, plan.memory_mib, plan.cpus, plan.scratch_bytes, plan.timeout) == ("default", 512, 2, 2 * GiB,
                                                                                           3600)
    assert plan.accel == "auto" and plan.where == LOCAL and plan.warm and not plan.network
    assert plan.output_limits == (GiB, 10000) and plan.input_limits == InputLimits(4 * GiB, 100_000)
    # The timeout is derived once: the job's deadline and its watchdog's read the same value.
    assert plan.watchdog_seconds == plan.boot_timeout + plan.timeout + WATCHDOG_GRACE == 300 + 3600 + 30


def test_flags_win_and_network_flags_add_to_the_configuration(write):
    config = config_mod.load(write("vmiso.yaml", "image: {name: base}\nrun: {allow_hosts: [pypi.org]}\n"), env={})
    plan = plan_run(config, RunRequest(command=("true",), image="other", memory_mib=1024, cpus=1,
                                       scratch_bytes=128 * 1024**2, timeout=9, warm=False,
                                       allow_hosts=("api.example.org",), allow_tcp=("5432:db.example.org:5432",)))
    assert (plan.image, plan.memory_mib, plan.cpus, plan.scratch_bytes, plan.timeout) == ("other", 1024, 1,
                                                                                           128 * 1024**2, 9)
    assert not plan.warm and plan.watchdog_seconds == 300 + 9 + WATCHDOG_GRACE
    assert plan.network.listed() == ["api.example.org:443", "pypi.org:443"]
    assert [str(r) for r in plan.network.tcp] == ["5432:db.example.org:5432"]
    assert plan_run(config, RunRequest(command=("true",))).image == "base"


def test_a_scratch_flag_is_held_to_run_scratch_s_least_size():
    config = config_mod.load(None, env={})
    with pytest.raises(ConfigError, match=r"run.scratch: 1048576 is too small \(at least 67108864\)"):
        plan_run(config, RunRequest(command=("true",), scratch_bytes=1024**2))
    with pytest.raises(ConfigError, match="run.scratch: 0 is too small"):
        plan_run(config, RunRequest(command=("true",), scratch_bytes=0))


def test_a_plan_is_frozen():
    plan = plan_run(config_mod.load(None, env={}), RunRequest(command=("true",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.timeout = 1  # type: ignore[misc]


def test_a_plan_executes_on_this_host_and_nowhere_vmiso_does_not_know():
    from vmiso.execution import ThisHost, execution_for

    plan = plan_run(config_mod.load(None, env={}), RunRequest(command=("true",)))
    assert isinstance(execution_for(plan), ThisHost)
    with pytest.raises(ConfigError, match="a run cannot execute on 'node-1'") as err:
        execution_for(dataclasses.replace(plan, where="node-1"))
    assert "runs execute on this host ('local')" in str(err.value)
