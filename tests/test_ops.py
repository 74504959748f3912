"""/healthz, /readyz and /metrics: what load balancers and Prometheus read."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from daemon.api.common import LIFECYCLE, STORE
from tests.conftest import REPO, MakeClient, scheduler_of, wait_until
from tests.hub_server import FakeHub

Client = TestClient[Any, Any]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Client) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_answers_name_emberd_as_the_server(tiny_client: Client) -> None:
    for response in (await tiny_client.get("/api/version"), await tiny_client.post("/api/embed", json={})):
        assert response.headers["Server"].startswith("emberd/"), response.headers["Server"]


async def test_healthz_answers_without_touching_the_store(tiny_client: Client) -> None:
    shutil.rmtree(tiny_client.server.app[STORE].models_dir)  # a store gone bad is not a dead process
    response = await tiny_client.get("/healthz")
    assert (response.status, await response.json()) == (200, {"status": "alive"})


async def test_readyz_follows_the_lifecycle(tiny_client: Client) -> None:
    lifecycle = tiny_client.server.app[LIFECYCLE]
    response = await tiny_client.get("/readyz")
    assert (response.status, await response.json()) == (503, {"status": "starting"})
    lifecycle.ready = True
    assert (await tiny_client.get("/readyz")).status == 200
    lifecycle.draining = True
    response = await tiny_client.get("/readyz")
    assert (response.status, await response.json()) == (503, {"status": "draining"})


async def test_request_counters_grow_by_what_was_sent(tiny_client: Client) -> None:
    before = await scrape(tiny_client)
    for _ in range(3):
        assert (await tiny_client.post("/api/embed", json={"model": "tiny", "input": ["a", "b c"]})).status == 200
    assert (await tiny_client.post("/api/embed", json={"model": "nope", "input": "a"})).status == 404
    assert (await tiny_client.get("/v1/models/tiny")).status == 200
    after = await scrape(tiny_client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("emberd_requests_total", route="/api/embed", status="200") == 3
    assert grew("emberd_requests_total", route="/api/embed", status="404") == 1
    assert grew("emberd_requests_total", route="/v1/models/{model}", status="200") == 1
    model = "tiny:latest"
    assert grew("emberd_request_inputs_count", model=model) == 3
    assert grew("emberd_request_inputs_sum", model=model) == 6
    assert grew("emberd_request_tokens_sum", model=model) == 3 * (3 + 4)  # [CLS] a [SEP], [CLS] b c [SEP]
    assert grew("emberd_request_queue_seconds_count", model=model) == 3
    assert grew("emberd_request_inference_seconds_count", model=model) == 3
    assert grew("emberd_decode_sequences_sum", model=model) == 6  # every sequence went through a decode
    assert grew("emberd_decode_tokens_sum", model=model) == 21
    assert value(after, "emberd_model_loads_total", model=model) == 1
    assert value(after, "emberd_model_load_seconds_count", model=model) == 1
    assert value(after, "emberd_models_loaded") == 1
    assert value(after, "emberd_runner_memory_bytes", model=model) > 10_000_000
    assert value(after, "emberd_runner_gpu_memory_bytes", model=model) == 0  # a CPU build
    assert value(after, "emberd_queue_depth", model=model) == 0


async def test_truncation_unloads_and_crashes_are_counted(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf})
    long_text = " ".join(["word"] * 200)  # the tiny model's context is 64 tokens
    assert (await client.post("/api/embed", json={"model": "tiny", "input": [long_text, "a"]})).status == 200
    assert (await client.post("/api/embed", json={"model": "tiny", "keep_alive": 0})).status == 200
    assert (await client.post("/api/embed", json={"model": "tiny", "input": "a"})).status == 200
    [entry] = scheduler_of(client).loaded()
    os.kill(entry.runner.pid, signal.SIGKILL)
    await wait_until(lambda: not scheduler_of(client).loaded())
    samples = await scrape(client)
    model = "tiny:latest"
    assert value(samples, "emberd_truncated_inputs_total", model=model) == 1
    assert value(samples, "emberd_model_unloads_total", model=model, reason="requested") == 1
    assert value(samples, "emberd_model_unload_seconds_count", model=model, reason="requested") == 1
    assert value(samples, "emberd_model_loads_total", model=model) == 2
    assert value(samples, "emberd_runner_crashes_total", model=model) == 1


async def test_queue_depth_shows_requests_waiting_in_a_runner(tiny_client: Client) -> None:
    assert (await tiny_client.post("/api/embed", json={"model": "tiny"})).status == 200
    [entry] = scheduler_of(tiny_client).loaded()
    os.kill(entry.runner.pid, signal.SIGSTOP)
    try:
        held = [
            asyncio.ensure_future(tiny_client.post("/api/embed", json={"model": "tiny", "input": "x"}))
            for _ in range(3)
        ]
        await wait_until(lambda: entry.runner.in_flight == 3)
        samples = await scrape(tiny_client)
        assert value(samples, "emberd_queue_depth", model="tiny:latest") == 3
        assert value(samples, "emberd_requests_admitted") == 3
    finally:
        os.kill(entry.runner.pid, signal.SIGCONT)
    assert [(await request).status for request in held] == [200, 200, 200]


async def test_bytes_pulled_from_the_hub_are_counted(
    make_client: MakeClient, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    client = await make_client({}, hub_endpoint=fake_hub.url)
    response = await client.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False})
    assert response.status == 200
    samples = await scrape(client)
    assert value(samples, "emberd_pulled_bytes_total") == len(quant_files["tiny-embed-Q8_0.gguf"])
