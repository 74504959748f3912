"""A client that leaves before its answer takes its work with it: the runner drops the sequences it
has not decoded yet (what the runner reports decoding, every frame it sends recorded), and the
daemon answers the leavers 499."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from daemon.options import LoadOptions, llama_params
from daemon.runner.client import RunnerProcess
from daemon.store import ModelStore
from tests.live import post_json, read_metrics, running_daemon, wait_for

PASSAGE = (
    "The sky appears blue because molecules in the atmosphere scatter shorter wavelengths of sunlight "
    "more strongly than longer ones, an effect described by Lord Rayleigh."
)
PASSAGES = [f"{PASSAGE} [{i}]" for i in range(64)]
LEAVERS = 8


def sample(url: str, name: str, **labels: str) -> float:
    return read_metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def send_and_keep_open(port: int, body: dict[str, object]) -> socket.socket:
    payload = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /api/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    connection.sendall(head.encode() + payload)
    return connection


class FrameLog:
    """Every frame a runner sends, answered or not: what it decoded is known even for requests whose
    answer nobody awaits any more."""

    def __init__(self, runner: RunnerProcess) -> None:
        self.results: list[dict[str, Any]] = []
        dispatch = runner._dispatch

        def recording(header: dict[str, Any], payload: bytes) -> None:
            if header["type"] == "result":
                self.results.append(header)
            dispatch(header, payload)

        runner._dispatch = recording  # type: ignore[method-assign]

    def sequences_decoded(self) -> int:
        return sum(sequences for result in self.results for _, sequences in result["decodes"] + result["quick_decodes"])


async def start_minilm(gguf: Path, quick_lane: bool = True) -> tuple[RunnerProcess, FrameLog]:
    load = LoadOptions(0, 0, 2, 0, 0, True, quick_lane=quick_lane)
    runner = await RunnerProcess.start(gguf, llama_params(load, 512, 6, n_vocab=30522), "all-minilm", 60.0)
    return runner, FrameLog(runner)


async def test_a_runner_never_decodes_the_inputs_of_requests_cancelled_before_their_turn(minilm_gguf: Path) -> None:
    runner, frames = await start_minilm(minilm_gguf)
    try:
        await runner.embed(PASSAGES[:2], True)  # warm up
        first = asyncio.create_task(runner.embed(PASSAGES, True))
        leavers = [asyncio.create_task(runner.embed(PASSAGES, True)) for _ in range(LEAVERS)]
        await asyncio.sleep(0)  # the requests are written to the runner
        for leaver in leavers:
            leaver.cancel()  # their clients left: the runner is told to drop them
        await first
        for leaver in leavers:
            with pytest.raises(asyncio.CancelledError):
                await leaver
        after = await runner.embed(["why is the sky blue?"], True)  # its frame reports what ran before it
    finally:
        await runner.stop(5.0)
    answered = {result["id"] for result in frames.results}
    assert len(answered) == 3  # the warm-up, the first and the last: no leaver was answered
    assert after.vectors.shape == (1, 384)
    # Every decode the runner ran is in some frame: the warm-up's 2 sequences, the first request's 64
    # and the last's 1. The leavers were cancelled before any decode of theirs could start...
    # or within the first request's first decodes, which take them along at most as far as they go.
    decoded = frames.sequences_decoded()
    assert 67 <= decoded < 67 + LEAVERS * len(PASSAGES) // 4, decoded


def test_requests_whose_clients_left_are_answered_499_and_the_daemon_serves_on(
    tmp_path: Path, minilm_gguf: Path
) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("all-minilm", minilm_gguf)
    with running_daemon(home, {}, {}) as daemon:
        port = int(daemon.url.rsplit(":", 1)[1])
        embed = daemon.url + "/api/embed"
        post_json(embed, {"model": "all-minilm", "input": PASSAGES})  # load and warm up
        model = "all-minilm:latest"
        decoded_before = sample(daemon.url, "emberd_decode_sequences_sum", model=model)

        leavers = [send_and_keep_open(port, {"model": "all-minilm", "input": PASSAGES}) for _ in range(LEAVERS)]
        wait_for(lambda: sample(daemon.url, "emberd_requests_admitted") == LEAVERS)
        for connection in leavers:
            connection.close()  # gone before the answer: 8 x 64 passages nobody will read
        status, body = post_json(embed, {"model": "all-minilm", "input": "why is the sky blue?"})
        assert (status, len(body["embeddings"])) == (200, 1)
        wait_for(lambda: sample(daemon.url, "emberd_requests_total", route="/api/embed", status="499") == LEAVERS)
        wait_for(lambda: sample(daemon.url, "emberd_requests_admitted") == 0)
        # (Decodes are reported with answers: what a runner decodes for a request nobody awaits is
        # not in the metrics, so the runner's own frames prove the work dropped, above.)
        assert sample(daemon.url, "emberd_decode_sequences_sum", model=model) > decoded_before
