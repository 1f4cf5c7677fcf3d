"""Upload limits and housekeeping: hosted.max_upload_size (413, also on an announced
Content-Length, before the body is read), hosted.max_uploads_per_client (429 until one
finishes), the bytes uploads hold for the disk budget, and an expiry loop that outlives its
own failures."""

import asyncio
import json
import logging
import shutil

import pytest

from mirror import config as cfg
from mirror.keys import UPLOADS
from tests.test_push import absolute, digest_of

KiB, MiB = 1 << 10, 1 << 20


def files(mirror):
    return sorted(p.name for p in (mirror.root / "uploads").iterdir())


async def start(http, mirror, name, expect=202):
    async with http.post(f"{mirror.url}/v2/{name}/blobs/uploads/") as resp:
        assert resp.status == expect, await resp.text()
        if expect != 202:
            return resp.status, resp.headers, json.loads(await resp.read())
        return absolute(mirror, resp.headers["Location"])


def error_of(body: bytes) -> dict:
    return json.loads(body)["errors"][0]


@pytest.fixture
async def limited(start_mirror):
    return await start_mirror(hosted=cfg.Hosted(max_upload_size=MiB, max_uploads_per_client=2))


async def raw_patch(mirror, path: str, length: int, sent: bytes) -> tuple[int, bytes]:
    """A PATCH that announces `length` bytes but sends only `sent`, then waits: an answer
    can only come from a server that judged the Content-Length alone."""
    host, port = mirror.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"PATCH {path} HTTP/1.1\r\nHost: {mirror.host}\r\n"
                 f"Content-Length: {length}\r\nContent-Type: application/octet-stream\r\n"
                 "\r\n".encode() + sent)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split()[1])
    length_line = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    body = await reader.readexactly(int(length_line[0].split(b":")[1])) if length_line else b""
    writer.close()
    return status, body


async def test_chunk_announcing_more_than_max_upload_size_is_413_and_removes_the_upload(
        limited, http):
    mirror = limited
    location = await start(http, mirror, "big/announced")
    status, body = await raw_patch(mirror, location.removeprefix(mirror.url), 2 * MiB,
                                   b"x" * 1024)
    assert status == 413
    error = error_of(body)
    assert error["code"] == "BLOB_UPLOAD_INVALID" and "hosted.max_upload_size" in error["message"]
    assert files(mirror) == []
    async with http.get(location) as resp:
        assert resp.status == 404


async def test_streamed_body_past_max_upload_size_is_413_and_keeps_nothing(limited, http):
    mirror = limited
    location = await start(http, mirror, "big/streamed")

    async def body():  # chunked transfer encoding: no Content-Length to judge it by
        for _ in range(3):
            yield b"y" * (512 * KiB)
    async with http.patch(location, data=body()) as resp:
        assert resp.status == 413
        assert "hosted.max_upload_size" in error_of(await resp.read())["message"]
    assert files(mirror) == []
    assert mirror.server.app[UPLOADS].total_bytes() == 0


async def test_monolithic_push_past_max_upload_size_is_413_with_no_record(limited, http):
    mirror = limited
    data = b"z" * (MiB + 1)
    async with http.post(f"{mirror.url}/v2/big/mono/blobs/uploads/",
                         params={"digest": digest_of(data)}, data=data) as resp:
        assert resp.status == 413
    assert files(mirror) == []
    # Exactly at the limit is fine.
    data = data[:MiB]
    async with http.post(f"{mirror.url}/v2/big/mono/blobs/uploads/",
                         params={"digest": digest_of(data)}, data=data) as resp:
        assert resp.status == 201
    assert mirror.proxy.store.path(digest_of(data)).read_bytes() == data
    assert files(mirror) == []


async def test_too_many_uploads_from_one_client_is_429_until_one_ends(limited, http,
                                                                      start_mirror):
    mirror = limited
    first = await start(http, mirror, "many/a")
    second = await start(http, mirror, "many/b")
    _, headers, body = await start(http, mirror, "many/c", expect=429)
    assert headers["Retry-After"].isdigit()
    assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert "hosted.max_uploads_per_client" in body["errors"][0]["message"]
    assert len(files(mirror)) == 4  # the refused one left nothing
    async with http.delete(first) as resp:
        assert resp.status == 204
    third = await start(http, mirror, "many/c")
    data = b"finished"
    async with http.put(f"{second}?digest={digest_of(data)}", data=data) as resp:
        assert resp.status == 201
    fourth = await start(http, mirror, "many/d")
    # Uploads survive a restart, and so does their count.
    await mirror.server.close()
    again = await start_mirror(root=mirror.root,
                               hosted=cfg.Hosted(max_upload_size=MiB, max_uploads_per_client=2))
    await start(http, again, "many/e", expect=429)
    assert {third.rsplit("/", 1)[1], fourth.rsplit("/", 1)[1]} == \
        {name for name in files(again) if not name.endswith(".json")}


async def test_uploads_in_progress_are_counted_for_the_budget(mirror, http):
    uploads = mirror.server.app[UPLOADS]
    one, two = await start(http, mirror, "budget/one"), await start(http, mirror, "budget/two")
    async with http.patch(one, data=b"a" * (100 * KiB)) as resp:
        assert resp.status == 202
    async with http.patch(two, data=b"b" * (50 * KiB)) as resp:
        assert resp.status == 202
    assert uploads.total_bytes() == 150 * KiB
    async with http.put(f"{one}?digest={digest_of(b'a' * (100 * KiB))}") as resp:
        assert resp.status == 201
    assert uploads.total_bytes() == 50 * KiB


async def test_upload_expiry_outlives_its_own_failure(start_mirror, http, caplog):
    mirror = await start_mirror(hosted=cfg.Hosted(upload_ttl=0.4))
    directory = mirror.root / "uploads"
    shutil.rmtree(directory)  # the next pass fails: its directory is gone
    while "expiring uploads" not in caplog.text:
        await asyncio.sleep(0.05)
    assert any(r.levelno == logging.ERROR and "expiring uploads" in r.getMessage()
               for r in caplog.records)
    directory.mkdir()
    location = await start(http, mirror, "expiry/survivor")
    upload = location.rsplit("/", 1)[1]
    assert upload in files(mirror)
    while upload in files(mirror):  # a later pass of the same loop removes it
        await asyncio.sleep(0.05)
    assert files(mirror) == []
    async with http.get(location) as resp:
        assert resp.status == 404
