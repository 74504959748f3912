"""Pages of other sites: a browser's cross-origin "simple" request (text/plain, no preflight) is
refused with 403 before its body is read; curl, SDKs and pages of emberd's own origin are not."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon.api.access import cross_origin_refused
from tests.conftest import MakeClient

Client = TestClient[Any, Any]
EVIL = "http://evil.example"


@pytest.mark.parametrize(
    ("origin", "fetch_site", "host", "cors_origins", "refused"),
    [
        (None, None, "localhost:11434", (), False),  # curl, SDKs, the README's examples
        (None, "none", "localhost:11434", (), False),  # the user typed the URL
        (None, "same-origin", "localhost:11434", (), False),
        (None, "cross-site", "localhost:11434", (), True),  # a cross-site <img> or form GET
        (EVIL, None, "localhost:11434", (), True),
        (EVIL, "cross-site", "localhost:11434", (), True),
        ("https://evil.example:11434", None, "localhost:11434", (), True),
        ("null", None, "localhost:11434", (), True),  # a sandboxed frame or a file:// page
        ("garbage", None, "localhost:11434", (), True),
        ("http://localhost:11434.evil.example", None, "localhost:11434", (), True),
        ("http://localhost.evil.example", None, "localhost:11434", (), True),
        ("http://user@localhost:3000", None, "localhost:11434", (), True),
        ("app://emberd", None, "localhost:11434", (), True),
        # Loopback pages on any port, as Ollama allows.
        ("http://localhost:3000", "cross-site", "localhost:11434", (), False),
        ("http://127.0.0.1:8080", None, "localhost:11434", (), False),
        ("https://127.0.0.1", None, "embed.lan", (), False),
        ("http://[::1]:5173", None, "localhost:11434", (), False),
        ("http://LOCALHOST", None, "localhost:11434", (), False),
        # The request's own origin: scheme and Host, default ports included.
        ("http://embed.lan:11434", "same-origin", "embed.lan:11434", (), False),
        ("http://embed.lan", None, "embed.lan:80", (), False),
        ("http://EMBED.lan:80", None, "embed.lan", (), False),
        ("http://embed.lan:11435", None, "embed.lan:11434", (), True),
        ("https://embed.lan:11434", None, "embed.lan:11434", (), True),  # another scheme, another origin
        ("http://embed.lan", None, None, (), True),
        # cors_origins, exact or "*".
        (EVIL, "cross-site", "localhost:11434", (EVIL,), False),
        ("http://evil.example:81", None, "localhost:11434", (EVIL,), True),
        (EVIL, None, "localhost:11434", ("*",), False),
        ("null", None, "localhost:11434", ("*",), False),
    ],
)
def test_cross_origin_refused(
    origin: str | None, fetch_site: str | None, host: str | None, cors_origins: tuple[str, ...], refused: bool
) -> None:
    assert cross_origin_refused(origin, fetch_site, "http", host, cors_origins) is refused


TEXT_PLAIN = {"Origin": EVIL, "Content-Type": "text/plain"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/embed", '{"model": "tiny", "input": "a"}'),
        ("/api/pull", '{"model": "hf.co/someone/model"}'),
        ("/api/create", '{"model": "x", "from": "/etc/passwd"}'),
        ("/api/delete", '{"model": "tiny"}'),
        ("/v1/embeddings", '{"model": "tiny", "input": "a"}'),
    ],
)
async def test_a_page_of_another_site_changes_nothing_and_learns_nothing(
    make_client: MakeClient, tiny_gguf: Path, path: str, body: str
) -> None:
    client = await make_client({"tiny": tiny_gguf})
    response = await client.post(path, data=body, headers=TEXT_PLAIN)
    assert response.status == 403
    document = await response.json()
    message = document["error"]["message"] if path.startswith("/v1/") else document["error"]
    assert "another origin" in message and "passwd" not in message
    tags = await (await client.get("/api/tags")).json()
    assert [model["name"] for model in tags["models"]] == ["tiny:latest"]  # not deleted, nothing pulled


async def test_the_same_requests_without_an_origin_or_from_a_local_page_are_served(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf})
    body = '{"model": "tiny", "input": "a"}'
    for headers in ({"Content-Type": "text/plain"}, {"Origin": "http://localhost:3000", "Content-Type": "text/plain"}):
        response = await client.post("/api/embed", data=body, headers=headers)
        assert response.status == 200, await response.text()
        assert len((await response.json())["embeddings"]) == 1
    own_origin = f"http://{client.host}:{client.port}"
    response = await client.post(
        "/api/embed", data=body, headers={"Origin": own_origin, "Host": f"{client.host}:{client.port}"}
    )
    assert response.status == 200


async def test_cross_site_is_refused_before_the_body_is_read(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf})
    reader, writer = await asyncio.open_connection(client.host, client.port)
    # The headers promise 10 MiB that never come: a server that reads the body first would wait.
    writer.write(
        b"POST /api/embed HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n"
        b'Content-Type: text/plain\r\nContent-Length: 10485760\r\n\r\n{"model": '
    )
    try:
        await writer.drain()
        async with asyncio.timeout(30):
            status_line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 403 "), status_line
