"""server.offline: the mirror never contacts an upstream and serves what it holds."""

from mirror import config as cfg
from tests.test_budget import pull, settle


async def test_offline_serves_what_it_holds_and_dials_nobody(start_mirror, http, upstream,
                                                            tmp_path):
    online = await start_mirror(root=tmp_path / "edge", tag_ttl=0)
    await pull(http, online, "library/alpine", "3.19")
    await settle(online)
    await online.server.close()
    upstream.proxy.reset()
    upstream.tokens.reset()
    edge = await start_mirror(root=tmp_path / "edge", tag_ttl=0,
                              server=cfg.Server(listen="127.0.0.1:0", offline=True))
    await pull(http, edge, "library/alpine", "3.19")  # tag TTL long past: served all the same
    async with http.get(f"{edge.url}/v2/team/app/manifests/2.0") as resp:
        assert resp.status == 503 and b"offline" in await resp.read()
    async with http.get(f"{edge.url}/v2/team/app/blobs/sha256:{'1' * 64}") as resp:
        assert resp.status == 503
    assert upstream.proxy.requests == [] and upstream.tokens.requests == []
