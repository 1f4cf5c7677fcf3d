"""Config: embedded defaults, TOML keys as documented, MIRROR_* overrides, errors naming keys."""

import pytest

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
