import pytest
import yaml

from vmiso.config import PipOptions
from vmiso.errors import ConfigError
from vmiso.image.seed import SeedInputs, provision_env, render_meta_data, render_user_data


def inputs(**changes) -> SeedInputs:
    values = dict(
        instance_id="vmiso-x-1", hostname="vmiso",
        host_key_private="-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
        host_key_public="ssh-ed25519 AAAAhost vmiso", authorized_key="ssh-ed25519 AAAAclient vmiso",
        ca_pems=("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",),
        requirements="six==1.16.0\n", apt_packages=("libgomp1",),
    )
    values.update(changes)
    return SeedInputs(**values)


def test_user_data_is_cloud_config_with_keys_and_cas():
    text = render_user_data(inputs())
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["ssh_keys"]["ed25519_public"] == "ssh-ed25519 AAAAhost vmiso"
    assert data["ssh_deletekeys"] is True
    assert data["ca_certs"]["trusted"][0].startswith("-----BEGIN CERTIFICATE-----")
    (user,) = data["users"]
    assert user["name"] == "vmiso" and user["ssh_authorized_keys"] == ["ssh-ed25519 AAAAclient vmiso"]
    assert "sudo" not in user
    files = {f["path"]: f for f in data["write_files"]}
    assert files["/var/lib/vmiso/requirements.txt"]["content"] == "six==1.16.0\n"
    assert files["/var/lib/vmiso/provision.sh"]["permissions"] == "0755"
    assert files["/var/lib/vmiso/provision.env"]["permissions"] == "0600"


def test_no_cas_means_no_ca_certs_key():
    data = yaml.safe_load(render_user_data(inputs(ca_pems=())))
    assert "ca_certs" not in data


def test_hostile_requirement_text_stays_a_string():
    nasty = "six\nruncmd: [rm -rf /]\n'\"\n{{x}}: !!python/object"
    data = yaml.safe_load(render_user_data(inputs(requirements=nasty)))
    files = {f["path"]: f for f in data["write_files"]}
    assert files["/var/lib/vmiso/requirements.txt"]["content"] == nasty
    assert data["runcmd"] == [["/bin/sh", "/var/lib/vmiso/provision.sh"]]


def test_meta_data():
    assert yaml.safe_load(render_meta_data(inputs())) == {"instance-id": "vmiso-x-1", "local-hostname": "vmiso"}


def test_provision_env_quotes_values():
    env = provision_env(inputs(pip=PipOptions(index_url="https://idx.example/simple?a=1&b='2'",
                                              extra_index_urls=("https://a", "https://b")),
                               require_hashes=True))
    assert "export APT_PACKAGES=libgomp1\n" in env
    assert "export PIP_INDEX_URL='https://idx.example/simple?a=1&b='\"'\"'2'\"'\"''\n" in env
    assert "export PIP_EXTRA_INDEX_URL='https://a https://b'\n" in env
    assert "export PIP_REQUIRE_HASHES=1\n" in env
    assert "PIP_TRUSTED_HOST" not in env  # an https index keeps its certificate check


def test_a_plain_http_index_is_trusted_by_host_and_port_only():
    # By name alone pip would also skip the certificate check of https://mirror.example.
    env = provision_env(inputs(pip=PipOptions(index_url="http://mirror.example/simple",
                                              extra_index_urls=("http://mirror.example:8080/simple",
                                                                "http://mirror.example:8080/other",
                                                                "https://mirror.example/simple"))))
    assert "export PIP_INDEX_URL=http://mirror.example:80/simple\n" in env
    assert ("export PIP_EXTRA_INDEX_URL='http://mirror.example:8080/simple http://mirror.example:8080/other "
            "https://mirror.example/simple'\n") in env
    assert "export PIP_TRUSTED_HOST='mirror.example:80 mirror.example:8080'\n" in env


def test_provision_env_refuses_bad_package_names():
    with pytest.raises(ConfigError, match="not a Debian package name"):
        provision_env(inputs(apt_packages=("curl; reboot",)))


def test_guest_files_of_a_cloud_image_keep_their_text_and_mode():
    from vmiso.image.layer import guest_files
    data = yaml.safe_load(render_user_data(inputs(guest_files=guest_files())))
    files = {f["path"]: f for f in data["write_files"]}
    link = files["/usr/local/lib/vmiso/ssh-link"]
    assert link["permissions"] == "0755" and link["content"].startswith("#!")
    assert files["/etc/ssh/sshd_config.vmiso"]["permissions"] == "0644"
    assert "/usr/local/lib/vmiso/ssh-link" not in {f["path"] for f in user_data_files(inputs())}


def user_data_files(seed: SeedInputs) -> list[dict]:
    return yaml.safe_load(render_user_data(seed))["write_files"]
