"""Requests are admitted before their bodies are read: a queue slot, and their bodies' bytes within
bodies_in_flight. Past it the answer is a 503 with Retry-After at once, while the body is still
unsent; many large bodies at once do not grow the daemon by their sum. Raw sockets, so a body can
be held back."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.api.common import LIFECYCLE, body_fits
from daemon.config import load_settings
from daemon.errors import InvalidConfig
from tests.conftest import MakeClient, wait_until

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("held_bytes", "more_bytes", "budget_bytes", "fits"),
    [
        (0, 10, 10, True),
        (5, 5, 10, True),
        (5, 6, 10, False),
        (0, 11, 10, False),
        (10**12, 10**12, 0, True),  # 0: no budget
    ],
)
def test_a_body_fits_while_the_bodies_held_stay_within_the_budget(
    held_bytes: int, more_bytes: int, budget_bytes: int, fits: bool
) -> None:
    assert body_fits(held_bytes, more_bytes, budget_bytes) is fits


def test_the_budget_is_a_size_setting_at_least_max_body_bytes() -> None:
    assert load_settings({}).bodies_in_flight_bytes == 128 * MIB
    assert load_settings({"EMBERD_BODIES_IN_FLIGHT": "64MiB"}).bodies_in_flight_bytes == 64 * MIB
    assert load_settings({"EMBERD_BODIES_IN_FLIGHT": "0"}).bodies_in_flight_bytes == 0
    with pytest.raises(InvalidConfig, match="bodies_in_flight"):
        load_settings({"EMBERD_BODIES_IN_FLIGHT": "16MiB"})  # max_body_bytes is 32 MiB


def padded_body(size: int, model: str = "tiny") -> bytes:
    """An embed request of exactly `size` bytes (an unknown key holds the padding)."""
    start = orjson.dumps({"model": model, "input": "hello", "pad": ""})
    return start[:-2] + b"x" * (size - len(start)) + start[-2:]


class RawClient:
    """One HTTP/1.1 connection whose body is sent when the test says so."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send_head(self, path: str, content_length: int | None) -> None:
        length = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{length}\r\n\r\n"
        self.writer.write(head.encode())
        await self.writer.drain()

    async def send(self, data: bytes, piece_bytes: int = 64 * 1024) -> None:
        """Bytes of the body, a piece at a time (the transport's buffer stays small)."""
        view = memoryview(data)
        for start in range(0, len(view), piece_bytes):
            self.writer.write(view[start : start + piece_bytes])
            await self.writer.drain()

    async def send_chunk(self, data: bytes) -> None:
        self.writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], Any]:
        async with asyncio.timeout(30):  # a deadline for a daemon that never answers, not a timing check
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, orjson.loads(body)

    def close(self) -> None:
        self.writer.close()


async def test_bodies_past_the_budget_get_a_503_with_retry_after_before_they_are_sent(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_body_bytes=MIB, bodies_in_flight_bytes=2 * MIB)
    port = client.port
    lifecycle = client.server.app[LIFECYCLE]
    admitted = [await RawClient.open(port) for _ in range(2)]
    refused: list[RawClient] = []
    try:
        for raw in admitted:  # two whole bodies fit: they are admitted, and wait for their bodies
            await raw.send_head("/api/embed", MIB)
        await wait_until(lambda: lifecycle.body_bytes == 2 * MIB)
        for path in ("/api/embed", "/v1/embeddings", "/api/tokenize", "/api/show"):
            raw = await RawClient.open(port)
            refused.append(raw)
            await raw.send_head(path, 1024)  # not one byte of the body is sent
            status, headers, body = await raw.answer()
            assert status == 503 and headers["retry-after"] == "1", (path, status, body)
            message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
            assert "bodies_in_flight" in message and str(2 * MIB) in message, message
            if path.startswith("/v1/"):
                assert body["error"]["type"] == "api_error"
        assert lifecycle.body_bytes == 2 * MIB  # the refused held nothing
        for raw in admitted:  # the admitted bodies arrive: both are served
            await raw.send(padded_body(MIB))
        for raw in admitted:
            status, _headers, body = await raw.answer()
            assert status == 200 and len(body["embeddings"]) == 1, body
        await wait_until(lambda: lifecycle.body_bytes == 0)
    finally:
        for raw in admitted + refused:
            raw.close()
    response = await client.post("/api/embed", data=padded_body(MIB))  # room again
    assert response.status == 200


async def test_a_chunked_body_is_counted_as_it_is_read_and_refused_when_it_passes_the_budget(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_body_bytes=3 * MIB // 2, bodies_in_flight_bytes=2 * MIB)
    lifecycle = client.server.app[LIFECYCLE]
    holder, chunked = await RawClient.open(client.port), await RawClient.open(client.port)
    try:
        await holder.send_head("/api/embed", MIB)
        await wait_until(lambda: lifecycle.body_bytes == MIB)
        await chunked.send_head("/api/embed", None)
        await chunked.send_chunk(b" " * (600 * 1024))
        await wait_until(lambda: lifecycle.body_bytes == MIB + 600 * 1024)
        await chunked.send_chunk(b" " * (600 * 1024))  # 2.2 MiB held with it: past the budget
        status, headers, body = await chunked.answer()
        assert status == 503 and headers["retry-after"] == "1", body
        assert "bodies_in_flight" in body["error"]
        await wait_until(lambda: lifecycle.body_bytes == MIB)  # what it held is given back
    finally:
        holder.close()
        chunked.close()


async def test_a_queue_full_503_says_when_to_retry(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_queue=1)
    holder = await RawClient.open(client.port)
    try:
        await holder.send_head("/api/embed", 64)  # admitted: it holds the queue's one slot
        await wait_until(lambda: client.server.app[LIFECYCLE].body_bytes == 64)
        response = await client.post("/api/embed", json={"model": "tiny", "input": "hi"})
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert "maximum pending requests exceeded" in (await response.json())["error"]
    finally:
        holder.close()


def peak_rss_bytes() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) * 1024


async def test_many_large_bodies_at_once_do_not_grow_the_daemon_by_their_sum(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    body_bytes, clients = 8 * MIB, 16
    client = await make_client({"tiny": tiny_gguf}, max_body_bytes=body_bytes, bodies_in_flight_bytes=body_bytes)
    body = padded_body(body_bytes, model="absent")  # one object, sent by every client: a 404 once read
    raws = [await RawClient.open(client.port) for _ in range(clients)]

    async def post(raw: RawClient) -> int:
        await raw.send_head("/api/embed", body_bytes)
        sending = asyncio.ensure_future(raw.send(body))
        status, _headers, _answer = await raw.answer()  # a refusal comes before the body is sent
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        raw.close()
        return status

    Path("/proc/self/clear_refs").write_text("5")  # the peak of this process (the daemon's) from here
    before_bytes = peak_rss_bytes()
    statuses = await asyncio.gather(*(post(raw) for raw in raws))
    grown_bytes = peak_rss_bytes() - before_bytes
    assert 404 in statuses and set(statuses) <= {404, 503}, statuses
    # Read as they came, the 16 bodies were held at once: 128 MiB, and copies of them.
    assert grown_bytes < clients * body_bytes // 2, f"peak grew by {grown_bytes / MIB:.0f} MiB"
