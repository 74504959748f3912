"""A client that leaves before its answer takes its work with it: the runner drops the sequences it
has not decoded yet, and the next request does not wait for them."""

from __future__ import annotations

import json
import socket
import statistics
import time
from pathlib import Path

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


def test_requests_whose_clients_left_are_dropped_and_do_not_delay_the_next(tmp_path: Path, minilm_gguf: Path) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("all-minilm", minilm_gguf)
    with running_daemon(home, {}, {}) as daemon:
        port = int(daemon.url.rsplit(":", 1)[1])
        embed = daemon.url + "/api/embed"
        post_json(embed, {"model": "all-minilm", "input": PASSAGES})  # load and warm up
        alone_s = []
        for _ in range(2):
            started_s = time.perf_counter()
            post_json(embed, {"model": "all-minilm", "input": PASSAGES})
            alone_s.append(time.perf_counter() - started_s)
        one_request_s = statistics.median(alone_s)
        model = "all-minilm:latest"
        decoded_before = sample(daemon.url, "emberd_decode_sequences_sum", model=model)

        leavers = [send_and_keep_open(port, {"model": "all-minilm", "input": PASSAGES}) for _ in range(LEAVERS)]
        wait_for(lambda: sample(daemon.url, "emberd_requests_admitted") == LEAVERS)
        for connection in leavers:
            connection.close()  # gone before the answer: 8 x 64 passages nobody will read
        started_s = time.perf_counter()
        status, body = post_json(embed, {"model": "all-minilm", "input": "why is the sky blue?"})
        short_s = time.perf_counter() - started_s
        assert (status, len(body["embeddings"])) == (200, 1)
        print(f"64 passages alone: {one_request_s * 1e3:.0f} ms; a short request after 8 left: {short_s * 1e3:.0f} ms")
        assert short_s < 2 * one_request_s

        wait_for(lambda: sample(daemon.url, "emberd_requests_admitted") == 0)
        decoded = sample(daemon.url, "emberd_decode_sequences_sum", model=model) - decoded_before
        assert decoded < LEAVERS * len(PASSAGES) / 2  # most of the abandoned work was never done
        wait_for(lambda: sample(daemon.url, "emberd_requests_total", route="/api/embed", status="499") == LEAVERS)
