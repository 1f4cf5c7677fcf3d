"""WWW-Authenticate parsing and where upstream credentials may go."""

from mirror.upstream.auth import parse_challenges, same_site


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


def test_credentials_only_to_the_upstreams_own_domain():
    assert same_site("https://auth.docker.io/token", "https://registry-1.docker.io")
    assert same_site("https://ghcr.io/token", "https://ghcr.io")
    assert same_site("http://127.0.0.1:9/token", "http://127.0.0.1:8")
    assert not same_site("https://evil.example/token", "https://registry-1.docker.io")
    assert not same_site("http://127.0.0.2/token", "http://127.0.0.1")
