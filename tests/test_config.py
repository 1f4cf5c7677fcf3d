"""Config: embedded defaults, TOML keys as documented, MIRROR_* overrides, errors naming keys."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror import config as cfg


def write(tmp_path, text):
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return str(path)


def test_embedded_defaults_serve_docker_hub_from_local_folder():
    config = cfg.load(None, environ={})
    assert config.server.listen == "0.0.0.0:5000"
    assert config.storage.root == "./data"
    assert config.default_upstream.name == "docker.io"
    assert config.default_upstream.url == "https://registry-1.docker.io"
    assert [u.name for u in config.upstreams] == [
        "docker.io", "quay.io", "ghcr.io", "registry.k8s.io", "gcr.io"]


def test_documented_keys_work_exactly_as_written(tmp_path):
    path = write(tmp_path, """
[server]
listen = "127.0.0.1:5000"
[storage]
root = "/var/lib/mirror"
[[upstreams]]
name = "docker.io"
url = "https://registry-1.docker.io"
username = "someone"
password = "secret"
default = true
""")
    config = cfg.load(path, environ={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 5000)
    assert config.storage.root == "/var/lib/mirror"
    (hub,) = config.upstreams
    assert (hub.username, hub.secret(), hub.default) == ("someone", "secret", True)
    assert hub.adds_library and hub.tag_ttl == 300


def test_shipped_config_file_loads():
    config = cfg.load("conf/mirror.toml", environ={})
    assert config.default_upstream.name == "docker.io"


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:5000"\n'
                           '[[upstreams]]\nname = "docker.io"\nurl = "https://x.test"\n')
    config = cfg.load(path, environ={
        "MIRROR_SERVER_LISTEN": "127.0.0.1:6000",
        "MIRROR_UPSTREAM_DOCKER_IO_PASSWORD": "from-env",
        "MIRROR_UPSTREAM_DOCKER_IO_TAG_TTL": "90s",
        "MIRROR_UPSTREAM_DOCKER_IO_DEFAULT": "true",
    })
    assert config.server.port == 6000
    assert config.upstreams[0].secret() == "from-env"
    assert config.upstreams[0].tag_ttl == 90
    assert config.upstreams[0].default


def test_password_from_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    path = write(tmp_path, f'[[upstreams]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n'
                           f'password_file = "{secret}"\n')
    assert cfg.load(path, environ={}).upstreams[0].secret() == "s3cret"


@pytest.mark.parametrize("text, environ, named", [
    ('[server]\nlisen = "x"\n', {}, "server.lisen"),
    ('[srever]\n', {}, "srever"),
    ('[server]\nlisten = "nope"\n', {}, "server.listen"),
    ('[[upstreams]]\nname = "q"\nurl = "ftp://q"\n', {}, "upstreams[0].url"),
    ('[[upstreams]]\nname = "q"\nurl = "https://q"\ntag_ttl = "soon"\n', {}, "upstreams[0].tag_ttl"),
    ('[[upstreams]]\nname = "Q!"\nurl = "https://q"\n', {}, "upstreams[0]"),
    ('[[upstreams]]\nname = "q"\nurl = "https://q"\nbogus = 1\n', {}, "upstreams[0].bogus"),
    ('[limits]\nupstream_requests = 0\n', {}, "limits.upstream_requests"),
    ('', {"MIRROR_STORAGE_ROOOT": "/x"}, "MIRROR_STORAGE_ROOOT"),
    ('', {"MIRROR_STORAGEROOT": "/x"}, "MIRROR_STORAGEROOT"),
    ('', {"MIRROR_UPSTREAM_DOCKR_IO_PASSWORD": "x"}, "MIRROR_UPSTREAM_DOCKR_IO_PASSWORD"),
    ('[[upstreams]]\nname = "a"\nurl = "https://a"\ndefault = true\n'
     '[[upstreams]]\nname = "b"\nurl = "https://b"\ndefault = true\n', {}, "default"),
    ('[server\n', {}, "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, environ, named):
    with pytest.raises(cfg.ConfigError, match=None) as caught:
        cfg.load(write(tmp_path, text), environ=environ)
    assert named in str(caught.value)


# -- secrets never shown ---------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://user:s3cr3tpw@registry.example",
                                 "https://user@registry.example",
                                 "https://:s3cr3tpw@registry.example:5000/v2"])
def test_credentials_in_an_upstream_url_are_refused_without_echoing_them(tmp_path, url):
    path = write(tmp_path, f'[[upstreams]]\nname = "docker.io"\nurl = "{url}"\n')
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(path, environ={})
    message = str(caught.value)
    assert "upstreams[0]" in message and "username and password" in message
    assert "MIRROR_UPSTREAM_DOCKER_IO_PASSWORD" in message
    assert "s3cr3tpw" not in message and "user@" not in message


def test_credentials_in_an_upstream_url_from_the_environment_are_refused(tmp_path):
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(None, environ={"MIRROR_UPSTREAM_QUAY_IO_URL": "https://bot:s3cr3tpw@quay.io"})
    assert "username and password" in str(caught.value)
    assert "s3cr3tpw" not in str(caught.value)


def test_an_upstream_built_in_code_cannot_carry_credentials_in_its_url():
    # The startup line and the status page print the url: it must never hold a secret.
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.Upstream("docker.io", "http://user:s3cr3tpw@127.0.0.1:1")
    assert "s3cr3tpw" not in str(caught.value)


def test_an_at_sign_outside_the_authority_is_not_userinfo():
    up = cfg.Upstream("x.io", "https://registry.example/v2/a@b")
    assert up.url == "https://registry.example/v2/a@b"


def test_a_numeric_password_is_refused_without_being_shown(tmp_path):
    path = write(tmp_path, '[[upstreams]]\nname = "docker.io"\nurl = "https://r.example"\n'
                           'password = 31337424242\n')
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(path, environ={})
    assert "upstreams[0].password" in str(caught.value)
    assert "31337424242" not in str(caught.value)


def test_a_bad_url_is_shown_without_its_userinfo(tmp_path):
    path = write(tmp_path, '[[upstreams]]\nname = "q.io"\nurl = "ftp://registry.example"\n')
    with pytest.raises(cfg.ConfigError, match="ftp://registry.example"):
        cfg.load(path, environ={})
    assert cfg._without_userinfo("ftp://u:s3cr3tpw@h/p@q") == "ftp://h/p@q"


def toml_value(value) -> str:
    """Just enough TOML for the values below (tomllib reads, it does not write)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return "{" + ", ".join(f'{k} = "{v}"' for k, v in value.items()) + "}"


# A value distinctive enough that finding it in a message can only mean it was echoed.
MARK = "Zq7"
secret_values = st.one_of(
    st.integers(min_value=10**9, max_value=10**18),
    st.floats(min_value=1e9, max_value=1e18, allow_nan=False),
    st.booleans(),
    st.lists(st.text(alphabet="abcxyz", min_size=4, max_size=8).map(lambda t: MARK + t),
             min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["k", "v"]),
                    st.text(alphabet="abcxyz", min_size=4, max_size=8).map(lambda t: MARK + t),
                    min_size=1),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["username", "password", "password_file"]), value=secret_values)
def test_no_config_error_echoes_a_credential_value(tmp_path, key, value):
    path = write(tmp_path, '[[upstreams]]\nname = "q.io"\nurl = "https://q.example"\n'
                           f"{key} = {toml_value(value)}\n")
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(path), environ={})
    message = str(caught.value)
    assert f"upstreams[0].{key}" in message
    shown = [str(value), repr(value)] + ([str(v) for v in value] if isinstance(value, list)
                                         else [str(v) for v in value.values()]
                                         if isinstance(value, dict) else [])
    assert not any(s in message for s in shown if s not in ("True", "False")), message
    assert "True" not in message and "False" not in message


# -- realm_hosts -----------------------------------------------------------------------

def test_docker_hubs_token_host_is_a_realm_host_by_default(tmp_path):
    (hub,) = [u for u in cfg.load(None, environ={}).upstreams if u.name == "docker.io"]
    assert hub.realm_hosts == ("auth.docker.io",)
    # A docker.io table written by hand (as in conf/mirror.toml) still logs in there...
    path = write(tmp_path, '[[upstreams]]\nname = "docker.io"\n'
                           'url = "https://registry-1.docker.io"\ndefault = true\n'
                           '[[upstreams]]\nname = "quay.io"\nurl = "https://quay.io"\n')
    hub, quay = cfg.load(path, environ={}).upstreams
    assert hub.realm_hosts == ("auth.docker.io",) and quay.realm_hosts == ()
    # ...unless it says otherwise.
    path = write(tmp_path, '[[upstreams]]\nname = "docker.io"\n'
                           'url = "https://registry-1.docker.io"\nrealm_hosts = []\n')
    assert cfg.load(path, environ={}).upstreams[0].realm_hosts == ()


def test_realm_hosts_from_file_and_environment(tmp_path):
    path = write(tmp_path, '[[upstreams]]\nname = "r.example"\nurl = "https://r.example"\n'
                           'realm_hosts = ["auth.r.example", "127.0.0.1:5001"]\n')
    assert cfg.load(path, environ={}).upstreams[0].realm_hosts == (
        "auth.r.example", "127.0.0.1:5001")
    config = cfg.load(path, environ={"MIRROR_UPSTREAM_R_EXAMPLE_REALM_HOSTS": "a.example"})
    assert config.upstreams[0].realm_hosts == ("a.example",)


@pytest.mark.parametrize("entry", ["https://auth.docker.io", "auth.docker.io/token",
                                   "Auth.Docker.io", "*.docker.io", "host:port"])
def test_a_realm_host_must_be_a_plain_host(tmp_path, entry):
    path = write(tmp_path, '[[upstreams]]\nname = "r.example"\nurl = "https://r.example"\n'
                           f'realm_hosts = ["{entry}"]\n')
    with pytest.raises(cfg.ConfigError, match=r"upstreams\[0\]\.realm_hosts"):
        cfg.load(path, environ={})


@pytest.mark.parametrize("url", ["http://[bad", "https://registry.example:99999"])
def test_an_unreadable_url_is_a_config_error_naming_the_key(tmp_path, url):
    path = write(tmp_path, f'[[upstreams]]\nname = "docker.io"\nurl = "{url}"\n')
    with pytest.raises(cfg.ConfigError, match=r"upstreams\[0\]\.url"):
        cfg.load(path, environ={})


CLUSTER = """
[storage]
backend = "s3"
local_cache_size = "20GiB"
[storage.s3]
endpoint = "http://minio:9000"
bucket = "images"
prefix = "prod/"
redirect = true
redirect_ttl = "10m"
[cluster]
redis = "redis://:hunter2@redis:6379/0"
name = "east"
"""


def test_cluster_keys_from_the_file_and_the_environment(tmp_path):
    config = cfg.load(write(tmp_path, CLUSTER), environ={
        "MIRROR_STORAGE_S3_ACCESS_KEY": "AKIDEXAMPLE", "MIRROR_STORAGE_S3_SECRET_KEY": "s3cret",
        "MIRROR_CLUSTER_REPLICA": "pod-1", "MIRROR_STORAGE_S3_BUCKET": "other"})
    s3 = config.storage.s3
    assert (config.storage.backend, config.storage.local_cache_size) == ("s3", 20 << 30)
    assert (s3.endpoint, s3.bucket, s3.prefix, s3.redirect, s3.redirect_ttl) == \
        ("http://minio:9000", "other", "prod/", True, 600.0)
    assert (s3.access_key, s3.secret_key) == ("AKIDEXAMPLE", "s3cret")
    assert (config.cluster.redis, config.cluster.name, config.cluster.replica) == \
        ("redis://:hunter2@redis:6379/0", "east", "pod-1")
    # The defaults: one node on its own disk.
    plain = cfg.load(None, environ={})
    assert (plain.storage.backend, plain.cluster.redis, plain.storage.s3.bucket) == \
        ("filesystem", None, "mirror")


@pytest.mark.parametrize("text, environ, message", [
    ('[storage]\nbackend = "s3"\n', {}, "needs cluster.redis"),
    ('[cluster]\nredis = "redis://r:6379"\n', {}, 'needs storage.backend = "s3"'),
    ('[storage]\nbackend = "nfs"\n', {}, 'storage.backend must be "filesystem" or "s3"'),
    ("", {"MIRROR_STORAGE_S3_BUKET": "x"}, "MIRROR_STORAGE_S3_BUKET"),
    ('[storage.s3]\nbukket = "x"\n', {}, "storage.s3.bukket"),
    (CLUSTER.replace("http://minio:9000", "minio:9000"), {}, "storage.s3.endpoint must be"),
    (CLUSTER.replace('name = "east"', 'name = "a b"'), {}, "cluster.name must be"),
])
def test_cluster_config_errors_name_the_key_and_the_fix(tmp_path, text, environ, message):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(write(tmp_path, text), environ=environ)
    assert message in str(e.value)


def test_a_bad_redis_url_is_refused_without_repeating_it(tmp_path):
    text = CLUSTER.replace("redis://:hunter2@redis:6379/0", "http://:hunter2@redis")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(write(tmp_path, text), environ={})
    assert "cluster.redis must be a redis://" in str(e.value)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("command", [["ls"], ["gc"], ["verify"], ["export", "-o", "x.tar", "team/app:v1"]])
def test_commands_for_one_node_refuse_a_cluster_config_instead_of_reading_an_empty_disk(
        tmp_path, command):
    from mirror import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--config", write(tmp_path, CLUSTER), *command])
    assert "works on the filesystem backend only" in str(e.value)
    assert not (tmp_path / "data").exists()  # nothing was created under storage.root


def test_an_upstream_without_url_names_the_missing_key(tmp_path):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(write(tmp_path, '[[upstreams]]\nname = "quay.io"\n'), environ={})
    assert str(e.value) == "upstreams[0].url is required"
