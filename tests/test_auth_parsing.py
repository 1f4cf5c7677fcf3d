"""WWW-Authenticate parsing and where upstream credentials may go (credentials_allowed)."""

from yarl import URL

from mirror import config as cfg
from mirror.upstream.auth import credentials_allowed, parse_challenges


def test_every_challenge_in_one_header_is_parsed():
    header = ('Basic realm="Quay", Bearer realm="https://quay.io/v2/auth",'
              'service="quay.io",scope="repository:a/b:pull"')
    challenges = parse_challenges([header])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[1].params == {"realm": "https://quay.io/v2/auth", "service": "quay.io",
                                    "scope": "repository:a/b:pull"}


def test_challenges_across_headers_and_escapes():
    challenges = parse_challenges(['Bearer realm="https://a/t",service="x\\"y"', "Basic realm=r"])
    assert challenges[0].params["service"] == 'x"y'
    assert challenges[1].scheme == "basic" and challenges[1].params == {"realm": "r"}


def allowed(realm: str, url: str, realm_hosts: tuple[str, ...] = ()) -> bool:
    return credentials_allowed(URL(realm), cfg.Upstream("u", url, realm_hosts=realm_hosts))


def test_credentials_go_to_the_upstreams_own_origin():
    assert allowed("https://ghcr.io/token", "https://ghcr.io")
    assert allowed("https://quay.io:443/v2/auth", "https://quay.io")
    assert allowed("http://127.0.0.1:8/token", "http://127.0.0.1:8")


def test_credentials_never_go_to_another_port_or_scheme_of_the_same_host():
    assert not allowed("http://127.0.0.1:9/token", "http://127.0.0.1:8")
    assert not allowed("http://ghcr.io/token", "https://ghcr.io")
    assert not allowed("https://ghcr.io:8443/token", "https://ghcr.io")


def test_sharing_the_last_two_dns_labels_is_not_enough():
    # What same_site() allowed: the same "domain" by its last two labels.
    assert not allowed("https://evil.co.uk/token", "https://registry.example.co.uk")
    assert not allowed("https://attacker.azurecr.io/oauth2/token", "https://myreg.azurecr.io")
    assert not allowed("https://auth.docker.io/token", "https://registry-1.docker.io")
    assert not allowed("http://127.0.0.2/token", "http://127.0.0.1")


def test_a_listed_realm_host_gets_them_on_its_default_port_over_tls():
    hub = ("auth.docker.io",)
    assert allowed("https://auth.docker.io/token", "https://registry-1.docker.io", hub)
    assert allowed("https://AUTH.docker.io/token", "https://registry-1.docker.io", hub)
    assert not allowed("http://auth.docker.io/token", "https://registry-1.docker.io", hub)
    assert not allowed("https://auth.docker.io:8443/token", "https://registry-1.docker.io", hub)
    assert not allowed("https://evil.auth.docker.io/token", "https://registry-1.docker.io", hub)
    assert not allowed("https://auth.docker.io.evil/token", "https://registry-1.docker.io", hub)


def test_a_listed_host_and_port_matches_only_that_port():
    assert allowed("http://127.0.0.1:5001/token", "http://127.0.0.1:5000", ("127.0.0.1:5001",))
    assert not allowed("http://127.0.0.1:5002/token", "http://127.0.0.1:5000", ("127.0.0.1:5001",))
    assert allowed("https://[::1]:5001/t", "https://[::1]:5000", ("[::1]:5001",))


def test_odd_realms_get_no_credentials():
    for realm in ("file:///etc/passwd", "ftp://ghcr.io/token", "/token", "https:///token"):
        assert not allowed(realm, "https://ghcr.io", ("ghcr.io",)), realm


def test_docker_hub_lists_its_token_host_by_default():
    (hub,) = [u for u in cfg.DEFAULT_UPSTREAMS if u.name == "docker.io"]
    assert credentials_allowed(URL("https://auth.docker.io/token"), hub)
    assert not credentials_allowed(URL("https://auth.docker.io.evil.com/token"), hub)
