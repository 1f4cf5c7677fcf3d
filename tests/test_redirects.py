"""Where an upstream's redirects (and token realms) may send the mirror: http and https only,
never to link-local, loopback or private addresses unless the upstream is on that kind of
address itself; refused before any connection is made, as a clean 503.

Through a real mirror the upstream is on 127.0.0.1, so it may send us to other loopback
addresses (tests/test_upstream_credentials.py uses 127.0.0.2) but not to 169.254.169.254.
The policy's own cases (a public upstream, host names) are checked on `Destinations`
directly: it resolves names but never connects, so nothing here leaves loopback.
"""

from __future__ import annotations

import json
import logging

import pytest
from yarl import URL

from mirror.errors import Unavailable
from mirror.upstream.destinations import Destinations, kind

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


async def get(http, url):
    async with http.get(url, headers=ACCEPT) as resp:
        return resp.status, await resp.read()


def error(body: bytes) -> dict:
    return json.loads(body)["errors"][0]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://127.0.0.1:70/x",
                                      "ftp://127.0.0.1/x"])
async def test_a_redirect_to_a_non_http_url_is_a_clean_503(mirror, http, upstream, caplog,
                                                          location):
    caplog.set_level(logging.INFO, "mirror")
    upstream.proxy.status(307, headers={"Location": location}, match="/manifests/3.19")
    status, body = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 503
    assert error(body)["code"] == "UNAVAILABLE"
    assert "only http and https are followed" in error(body)["message"]
    assert b"root:" not in body
    assert "Traceback" not in caplog.text
    assert sum("/manifests/3.19" in r.path for r in upstream.proxy.records) >= 1


@pytest.mark.parametrize("location", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fe80::1]/x",
    "http://[::ffff:169.254.169.254]/x",
    "http://10.0.0.1/x",
    "http://192.168.1.1:8080/x",
    "http://100.100.100.200/latest/meta-data/",
])
async def test_a_redirect_to_metadata_or_private_addresses_is_refused_before_connecting(
        start_mirror, http, upstream, location):
    # connect_timeout short, so that even a mirror that did dial out would not hang here.
    mirror = await start_mirror(limits={"connect_timeout": 1.0})
    upstream.proxy.status(307, headers={"Location": location}, match="/manifests/3.19")
    status, body = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 503
    message = error(body)["message"]
    assert "refused before connecting" in message, message
    assert any(k in message for k in ("link-local", "private", "reserved")), message
    # Nothing was stored for the tag: the next request asks the upstream again.
    upstream.proxy.clear_faults()
    status, body = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert (status, body) == (200, upstream.images["library/alpine"].manifest)


async def test_a_blob_redirect_to_the_metadata_service_fails_the_fill_cleanly(mirror, http,
                                                                             upstream):
    alpine = upstream.images["library/alpine"]
    digest = alpine.layer_digests[0]
    upstream.proxy.status(307, headers={"Location": "http://169.254.169.254/x"},
                          match=f"/blobs/{digest}")
    status, body = await get(http, f"{mirror.url}/v2/alpine/blobs/{digest}")
    assert status == 503 and "link-local" in error(body)["message"]
    assert not any(p.name.endswith(digest.partition(":")[2]) for p in mirror.blob_files())


async def test_a_redirect_loop_ends_as_503(mirror, http, upstream):
    upstream.proxy.status(302, headers={"Location": "/v2/library/alpine/manifests/3.19"},
                          match="/manifests/3.19")
    status, body = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 503 and "redirected more than" in error(body)["message"]


# -- the policy itself ---------------------------------------------------------------------

PUBLIC = URL("https://8.8.4.4")  # a public upstream by its address: checked, never dialled


def public_upstream() -> Destinations:
    return Destinations("up", PUBLIC)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("0.0.0.0", "loopback"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("::ffff:169.254.169.254", "link-local"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"),
    ("100.100.100.200", "reserved"), ("224.0.0.1", "reserved"), ("8.8.8.8", "global"),
    ("2606:4700::1111", "global"),
])
def test_address_kinds(address, expected):
    import ipaddress
    assert kind(ipaddress.ip_address(address)) == expected


@pytest.mark.parametrize("target", ["http://127.0.0.1/x", "http://[::1]/x", "http://0.0.0.0/x",
                                    "http://169.254.169.254/x", "http://10.0.0.1/x",
                                    "http://localhost:5000/x"])
async def test_a_public_upstream_may_not_send_us_inward(target):
    with pytest.raises(Unavailable, match="refused before connecting"):
        await public_upstream().targets(URL(target, encoded=True))


async def test_a_public_upstream_may_send_us_to_public_addresses():
    (target,) = await public_upstream().targets(URL("https://8.8.8.8/cdn?sig=a%2Fb", encoded=True))
    assert str(target.url) == "https://8.8.8.8/cdn?sig=a%2Fb" and target.host is None


async def test_a_loopback_upstream_may_use_loopback_but_not_link_local():
    policy = Destinations("up", URL("http://127.0.0.1:5000"))
    assert await policy.targets(URL("http://127.0.0.2:9/x"))
    with pytest.raises(Unavailable, match="link-local"):
        await policy.targets(URL("http://169.254.169.254/latest/meta-data/"))
    with pytest.raises(Unavailable, match="private"):
        await policy.targets(URL("http://192.168.0.1/"))


async def test_a_host_name_is_pinned_to_the_addresses_that_were_checked():
    # Dialled by address, so a second DNS answer cannot differ from the checked one; the
    # name stays in Host and (for https) in TLS, and the path and query stay byte-exact.
    policy = Destinations("up", URL("http://127.0.0.1:5000"))
    targets = await policy.targets(URL("https://localhost:8443/a%2Fb?sig=c%2Fd%3D", encoded=True))
    assert targets
    for t in targets:
        assert t.url.host in ("127.0.0.1", "::1")
        assert t.url.raw_path_qs == "/a%2Fb?sig=c%2Fd%3D" and t.url.port == 8443
        assert t.host == "localhost:8443" and t.tls_name == "localhost"


async def test_the_upstreams_own_origin_is_not_rewritten():
    policy = Destinations("up", URL("http://localhost:5000"))
    (target,) = await policy.targets(URL("http://localhost:5000/v2/x"))
    assert target == type(target)(URL("http://localhost:5000/v2/x"))


@pytest.mark.parametrize("target", ["file:///etc/passwd", "data:text/plain,hi", "ftp://x/y"])
async def test_only_http_and_https(target):
    with pytest.raises(Unavailable, match="only http and https"):
        await public_upstream().targets(URL(target))


async def test_a_cdn_host_is_resolved_once_not_once_per_blob(monkeypatch):
    # Every Docker Hub blob is redirected to its CDN: the answer is reused (as the
    # connector's DNS cache would), and still checked against the policy on every use.
    import asyncio
    loop = asyncio.get_running_loop()
    lookups = []
    real = loop.getaddrinfo

    async def counted(host, *args, **kwargs):
        lookups.append(host)
        return await real(host, *args, **kwargs)
    monkeypatch.setattr(loop, "getaddrinfo", counted)
    policy = Destinations("up", URL("http://127.0.0.1:5000"))
    for n in range(5):
        targets = await policy.targets(URL(f"http://localhost:9000/blob{n}?sig=x"))
        assert all(t.url.host in ("127.0.0.1", "::1") and t.host == "localhost:9000"
                   for t in targets)
    assert lookups == ["localhost"]
    with pytest.raises(Unavailable, match="refused before connecting"):  # checked each use
        await public_upstream().targets(URL("http://localhost:9000/blob"))
