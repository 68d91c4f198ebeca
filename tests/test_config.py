from pathlib import Path

import pytest

from vmiso import config
from vmiso.errors import ConfigError


def test_defaults_without_a_file():
    cfg = config.load(None, env={})
    assert cfg.accel == "auto"
    assert cfg.state_dir == Path("/var/lib/vmiso")
    assert cfg.run.output_max_bytes == 1024**3


def test_example_config_loads_with_relative_paths(repo):
    cfg = config.load(repo / "examples" / "vmiso.yaml", env={})
    assert cfg.image.name == "example"
    assert cfg.provision.requirements == repo / "examples" / "requirements.txt"
    assert cfg.provision.ca_certificates == "host"
    assert cfg.run.output_max_bytes == 1024**3


def test_unknown_key_names_path_and_nearest(write):
    path = write("v.yaml", "provision:\n  requirement: r.txt\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert "provision.requirement" in str(err.value)
    assert "did you mean 'requirements'" in str(err.value)


def test_unknown_top_level_key(write):
    with pytest.raises(ConfigError, match="unknown key 'acel'.*did you mean 'accel'"):
        config.load(write("v.yaml", "acel: tcg\n"), env={})


def test_wrong_type_names_path(write):
    with pytest.raises(ConfigError, match=r"provision\.requirements: expected a path, got 42"):
        config.load(write("v.yaml", "provision:\n  requirements: 42\n"), env={})
    with pytest.raises(ConfigError, match=r"vm\.cpus: expected an integer"):
        config.load(write("v.yaml", "vm:\n  cpus: two\n"), env={})
    with pytest.raises(ConfigError, match=r"provision\.apt_packages: expected a list"):
        config.load(write("v.yaml", "provision:\n  apt_packages: curl\n"), env={})


def test_bad_yaml_names_line(write):
    with pytest.raises(ConfigError, match=r"v.yaml: YAML syntax error at line 2, column 9"):
        config.load(write("v.yaml", "vm:\n  cpus: : 1\n"), env={})


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Path("/nonexistent/vmiso.yaml"), env={})


def test_accel_choices_and_env(write):
    path = write("v.yaml", "accel: kvm\n")
    assert config.load(path, env={}).accel == "kvm"
    assert config.load(path, env={"VMISO_ACCEL": "tcg"}).accel == "tcg"
    with pytest.raises(ConfigError, match="VMISO_ACCEL"):
        config.load(path, env={"VMISO_ACCEL": "fast"})
    with pytest.raises(ConfigError, match="accel: expected one of auto, kvm, tcg"):
        config.load(write("w.yaml", "accel: fast\n"), env={})


def test_sizes_with_units(write):
    cfg = config.load(write("v.yaml", "run:\n  output_max_bytes: 512MiB\n"), env={})
    assert cfg.run.output_max_bytes == 512 * 1024**2
    with pytest.raises(ConfigError, match="run.output_max_bytes"):
        config.load(write("w.yaml", "run:\n  output_max_bytes: lots\n"), env={})


def test_ca_certificates_forms(write):
    cfg = config.load(write("v.yaml", "provision:\n  ca_certificates: [a.pem]\n"), env={})
    assert cfg.provision.ca_certificates == (cfg.provision.ca_certificates[0],)
    assert cfg.provision.ca_certificates[0].name == "a.pem"
    with pytest.raises(ConfigError, match="ca_certificates"):
        config.load(write("w.yaml", "provision:\n  ca_certificates: all\n"), env={})


def test_flags_override_file(write):
    cfg = config.load(write("v.yaml", "vm:\n  cpus: 2\n"), env={})
    cfg = config.override(cfg, **{"vm.cpus": 1, "accel": "tcg", "state_dir": None})
    assert cfg.vm.cpus == 1 and cfg.accel == "tcg" and cfg.state_dir == Path("/var/lib/vmiso")


def test_image_name_checked(write):
    with pytest.raises(ConfigError, match="image.name"):
        config.load(write("v.yaml", "image:\n  name: ../etc\n"), env={})


def test_a_missing_required_key_is_a_config_error_with_its_path(write):
    # cloud_image needs both path and sha256; a missing one used to end in a TypeError.
    path = write("v.yaml", "image:\n  cloud_image:\n    path: x.qcow2\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert "image.cloud_image.sha256" in str(err.value) and "missing" in str(err.value)


def test_a_recipe_without_suite_names_the_file_and_the_key(write):
    from vmiso.image.layer import load_recipe

    recipe = write("r.yaml", "variant: minbase\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(str(recipe))
    assert str(recipe) in str(err.value) and "recipe.suite" in str(err.value)


def test_apt_packages_are_checked_when_the_config_loads(write):
    # Not only when the seed is rendered, after minutes of building the OS layer.
    path = write("v.yaml", "provision:\n  apt_packages: [libxml2, 'x; rm -rf /']\n")
    with pytest.raises(ConfigError, match="provision.apt_packages"):
        config.load(path, env={})
    assert config.load(write("w.yaml", "provision:\n  apt_packages: [libxml2=2.9.14+dfsg-1.3]\n"),
                       env={}).provision.apt_packages == ("libxml2=2.9.14+dfsg-1.3",)


def test_scratch_size_default_units_and_minimum(write):
    assert config.load(None).run.scratch == 2 * 1024**3
    assert config.load(write("a.yaml", "run:\n  scratch: 8GiB\n")).run.scratch == 8 * 1024**3
    with pytest.raises(ConfigError, match="run.scratch: .* is too small"):
        config.load(write("b.yaml", "run:\n  scratch: 1MiB\n"))
    with pytest.raises(ConfigError, match="run.scratch: 'lots' is not a size"):
        config.load(write("c.yaml", "run:\n  scratch: lots\n"))


def test_output_limit_minimum(write):
    # /out's filesystem keeps 1 MiB to spare: a smaller limit could not tell full from empty.
    assert config.load(write("a.yaml", "run:\n  output_max_bytes: 1MiB\n")).run.output_max_bytes == 1024**2
    with pytest.raises(ConfigError, match="run.output_max_bytes: 1000 is too small"):
        config.load(write("b.yaml", "run:\n  output_max_bytes: 1000\n"))


def test_tcg_cpu_features_name_only_what_vmiso_withholds(write):
    assert config.load(None, env={}).vm.tcg_cpu_features == ()
    assert config.load(write("v.yaml", "vm:\n  tcg_cpu_features: [avx2]\n"), env={}).vm.tcg_cpu_features == ("avx2",)
    with pytest.raises(ConfigError, match=r"vm\.tcg_cpu_features\[0\]: 'avx' is not a feature vmiso withholds"
                                          r".*did you mean 'avx2'\?.*offered already"):
        config.load(write("w.yaml", "vm:\n  tcg_cpu_features: [avx]\n"), env={})
    with pytest.raises(ConfigError, match=r"vm\.tcg_cpu_features: expected a list"):
        config.load(write("x.yaml", "vm:\n  tcg_cpu_features: avx2\n"), env={})


def test_input_limits_have_defaults_and_take_sizes(write):
    defaults = config.load(None, env={}).run
    assert (defaults.input_max_bytes, defaults.input_max_files) == (4 * 1024**3, 100_000)
    run = config.load(write("i.yaml", "run:\n  input_max_bytes: 10GiB\n  input_max_files: 5\n"), env={}).run
    assert (run.input_max_bytes, run.input_max_files) == (10 * 1024**3, 5)
    with pytest.raises(ConfigError, match="run.input_max_files: 0 is too small"):
        config.load(write("j.yaml", "run:\n  input_max_files: 0\n"), env={})


def test_every_problem_of_a_file_is_said_at_once(write):
    path = write("v.yaml", "run:\n  timout: 5\n  scratch: lots\nvm:\n  memory_mib: many\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    message = err.value.message
    assert message.startswith("3 problems: ")
    assert "unknown key 'run.timout' (did you mean 'timeout'?)" in message
    assert "run.scratch: 'lots' is not a size" in message and "vm.memory_mib: expected an integer" in message
