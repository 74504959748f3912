"""Runner lifecycle through the daemon: crashes, reloads on new options, concurrency, memory."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Settings
from daemon.errors import InsufficientMemory
from daemon.memory import MemorySnapshot
from daemon.options import LoadOptions, llama_params, thread_share
from daemon.runner.client import RunnerProcess
from daemon.scheduler import Scheduler
from daemon.store import ModelStore
from tests.conftest import MakeClient, scheduler_of, wait_until
from tests.test_api_embed import embed

Client = TestClient[Any, Any]


@pytest.mark.parametrize("death", [signal.SIGKILL, signal.SIGABRT])  # kill -9, and what GGML_ASSERT raises
async def test_a_runner_dying_mid_request_gives_a_clean_error_and_the_next_request_a_fresh_runner(
    tiny_client: Client, death: signal.Signals
) -> None:
    await embed(tiny_client, {"model": "tiny"})
    runner = scheduler_of(tiny_client).loaded()[0].runner
    os.kill(runner.pid, signal.SIGSTOP)  # hold the request inside the runner
    held = asyncio.create_task(embed(tiny_client, {"model": "tiny", "input": ["hello", "world"]}))
    await wait_until(lambda: runner.in_flight == 1)
    os.kill(runner.pid, death)
    if death != signal.SIGKILL:
        # A stopped process acts on SIGABRT only once continued (SIGKILL needs no help, and the
        # killed process may be reaped already).
        os.kill(runner.pid, signal.SIGCONT)
    status, body = await held
    assert status == 500
    assert death.name in body["error"]

    status, body = await embed(tiny_client, {"model": "tiny", "input": "hello"})
    assert status == 200
    [loaded] = scheduler_of(tiny_client).loaded()
    assert loaded.runner.pid != runner.pid


async def test_a_runner_dying_while_idle_is_replaced_on_the_next_request(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny"})
    runner = scheduler_of(tiny_client).loaded()[0].runner
    os.kill(runner.pid, signal.SIGKILL)
    await asyncio.wait_for(runner.exited.wait(), timeout=10)
    assert scheduler_of(tiny_client).loaded() == []
    status, _ = await embed(tiny_client, {"model": "tiny", "input": "hello"})
    assert status == 200


async def test_a_load_failure_is_a_clean_error(make_client: MakeClient, tiny_gguf: Path, tmp_path: Path) -> None:
    client = await make_client({"tiny": tiny_gguf})
    # Corrupt the tensor data behind the header: the header still says embedding model.
    blob = scheduler_of(client)._store.get("tiny").blob_path
    data = bytearray(blob.read_bytes())
    blob.write_bytes(bytes(data[: len(data) // 2]))
    status, body = await embed(client, {"model": "tiny", "input": "hello"})
    assert status == 500
    assert "failed to load tiny:latest" in body["error"]
    assert scheduler_of(client).loaded() == []


async def test_options_reload_only_for_a_longer_context_or_another_placement(tiny_client: Client) -> None:
    long_text = " ".join(["word"] * 100)  # more than the tiny model's 64-token context
    await embed(tiny_client, {"model": "tiny", "input": "hello"})
    [loaded] = scheduler_of(tiny_client).loaded()
    first_pid = loaded.runner.pid
    # Same effective context (num_ctx above the trained 64 is 64), threads and budget: one runner.
    for options in ({"num_ctx": 64}, {"num_ctx": 4096}, {"num_thread": 1}, {"num_batch": 128}, {}):
        status, _ = await embed(tiny_client, {"model": "tiny", "input": "hello", "options": options})
        assert status == 200
        assert scheduler_of(tiny_client).loaded()[0].runner.pid == first_pid, options
    # A shorter context is cut per request, on the same runner.
    response = await tiny_client.post(
        "/api/embed", json={"model": "tiny", "input": long_text, "options": {"num_ctx": 16}}
    )
    assert (await response.json())["prompt_eval_count"] == 16
    assert response.headers["X-Emberd-Truncated-Inputs"] == "1"
    response = await tiny_client.post("/api/embed", json={"model": "tiny", "input": long_text})
    assert (await response.json())["prompt_eval_count"] == 64
    assert scheduler_of(tiny_client).loaded()[0].runner.pid == first_pid
    # Another placement needs new weights: a reload, after the requests in flight.
    await embed(tiny_client, {"model": "tiny", "input": "hello", "options": {"use_mmap": False}})
    [reloaded] = scheduler_of(tiny_client).loaded()
    assert reloaded.runner.pid != first_pid
    await asyncio.wait_for(loaded.runner.exited.wait(), timeout=10)


async def test_a_runner_loaded_with_a_short_context_reloads_for_a_longer_one(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny", "input": "hello", "options": {"num_ctx": 16}})
    [short] = scheduler_of(tiny_client).loaded()
    assert short.params.limit_tokens == 16
    await embed(tiny_client, {"model": "tiny", "input": "hello"})
    [full] = scheduler_of(tiny_client).loaded()
    assert full.runner.pid != short.runner.pid and full.params.limit_tokens == 64


async def test_num_thread_and_num_batch_apply_to_the_live_runner(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny", "input": "hello"})
    [loaded] = scheduler_of(tiny_client).loaded()
    await embed(tiny_client, {"model": "tiny", "input": "hello", "options": {"num_thread": 1, "num_batch": 8}})
    assert (loaded.threads, loaded.load.num_thread, loaded.load.batch_tokens) == (1, 1, 8)
    four = ["a b c", "d e f", "g h i", "j k l"]  # 5 tokens each, special tokens included

    async def decodes_for(options: dict[str, int]) -> float:
        before = await decode_count(tiny_client)
        status, body = await embed(tiny_client, {"model": "tiny", "input": four, "options": options})
        assert status == 200 and len(body["embeddings"]) == 4
        return await decode_count(tiny_client) - before

    assert await decodes_for({"num_batch": 8}) == 4  # a budget of 8 tokens: one input a decode
    assert await decodes_for({}) == 1  # the default budget again: all four in one decode
    assert loaded.load.num_thread == 0 and loaded.threads >= 1  # automatic threads again
    assert scheduler_of(tiny_client).loaded()[0] is loaded


async def decode_count(client: Client) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith('emberd_decode_sequences_count{model="tiny:latest"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("num_gpu", [-1, 0, 999])
async def test_a_build_without_a_gpu_loads_every_layer_on_the_cpu_and_reports_no_vram(
    tiny_client: Client, num_gpu: int
) -> None:
    # This machine's llama.cpp is a CPU build: whatever num_gpu asks, no device is found, so the
    # runner offloads nothing and /api/ps says so.
    status, _ = await embed(tiny_client, {"model": "tiny", "input": "hello", "options": {"num_gpu": num_gpu}})
    assert status == 200
    [loaded] = scheduler_of(tiny_client).loaded()
    assert loaded.params.n_gpu_layers == 0
    assert loaded.runner.facts is not None
    assert loaded.runner.facts.gpu_offload is False
    assert loaded.runner.facts.device_name == ""
    [entry] = (await (await tiny_client.get("/api/ps")).json())["models"]
    assert (entry["size_vram"], entry["gpu_layers"], entry["gpu_device"]) == (0, 0, "")
    assert entry["size"] == loaded.counted_bytes > 0


async def test_concurrent_requests_are_all_answered_with_their_own_vectors(tiny_client: Client) -> None:
    texts = [f"hello {'world ' * (i % 7)}{i}" for i in range(48)]
    expected = {}
    for text in texts[:6]:
        expected[text] = (await embed(tiny_client, {"model": "tiny", "input": text}))[1]["embeddings"][0]
    answers = await asyncio.gather(*(embed(tiny_client, {"model": "tiny", "input": text}) for text in texts))
    assert all(status == 200 for status, _ in answers)
    for text, (_, body) in zip(texts, answers, strict=True):
        if text in expected:
            assert np.dot(body["embeddings"][0], expected[text]) == pytest.approx(1.0, abs=1e-5)
    assert scheduler_of(tiny_client).admitted == 0


class FixedMemory:
    def __init__(self, available_bytes: int) -> None:
        self.available_bytes = available_bytes

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(self.available_bytes, self.available_bytes)


async def _start_runner(model: Any, params: Any) -> RunnerProcess:
    return await RunnerProcess.start(model.blob_path, params, model.name, 60.0)


async def test_an_idle_model_is_evicted_when_the_next_one_does_not_fit(tmp_path: Path, tiny_gguf: Path) -> None:
    settings = Settings(home=tmp_path, max_loaded_models=1)
    store = ModelStore(tmp_path)
    store.open()
    store.create("first", tiny_gguf)
    store.create("second", tiny_gguf)
    scheduler = Scheduler(settings, store, _start_runner, FixedMemory(1 << 40))  # type: ignore[arg-type]
    try:
        async with scheduler.lease("first", {}, None):
            pass
        first = scheduler.loaded()[0].runner
        async with scheduler.lease("second", {}, None):
            assert [loaded.name for loaded in scheduler.loaded()] == ["second:latest"]
        assert not first.alive
    finally:
        await scheduler.close(5.0)


async def test_a_model_that_cannot_fit_is_refused_with_507(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, memory_reserve_mib=1 << 30)  # reserve 1 PiB
    status, body = await embed(client, {"model": "tiny", "input": "hello"})
    assert status == 507
    assert "GiB is available" in body["error"]


async def test_insufficient_memory_error_from_the_scheduler(tmp_path: Path, tiny_gguf: Path) -> None:
    store = ModelStore(tmp_path)
    store.open()
    store.create("tiny", tiny_gguf)
    scheduler = Scheduler(Settings(home=tmp_path), store, _start_runner, FixedMemory(1024))  # type: ignore[arg-type]
    with pytest.raises(InsufficientMemory):
        async with scheduler.lease("tiny", {}, None):
            pass
    await scheduler.close(1.0)


async def test_runner_reports_its_facts(tiny_gguf: Path) -> None:
    params = llama_params(LoadOptions(0, 256, 1, 0, 0, True), 64, 2)
    runner = await RunnerProcess.start(tiny_gguf, params, "tiny", 60.0)
    try:
        assert runner.facts is not None
        assert (runner.facts.n_embd, runner.facts.trained_context, runner.facts.limit_tokens) == (32, 64, 64)
        assert runner.facts.pid == runner.pid
        # What llama.cpp says it allocated: the weights (about the file) and its buffers.
        buffers = runner.facts.llama_buffer_bytes
        assert set(buffers) >= {"model", "output", "compute"}
        assert 0.5 < buffers["model"] / tiny_gguf.stat().st_size < 1.01  # logged to 0.01 MiB
        result = await runner.embed([], True)
        assert result.vectors.shape == (0, 32)
    finally:
        await runner.stop(5.0)
    assert not runner.alive


async def test_a_renewed_context_gives_the_same_vectors(tiny_gguf: Path) -> None:
    params = llama_params(LoadOptions(0, 256, 1, 0, 0, True), 64, 2)
    runner = await RunnerProcess.start(tiny_gguf, params, "tiny", 60.0)
    texts = ["why is the sky blue?", "hello world " * 20]
    try:
        before = await runner.embed(texts, True)
        assert runner.largest_decode_tokens == max(tokens for tokens, _sequences in before.decodes) > 0
        await runner.renew_context()
        assert runner.largest_decode_tokens == 0
        after = await runner.embed(texts, True)
    finally:
        await runner.stop(5.0)
    np.testing.assert_allclose(after.vectors, before.vectors, rtol=1e-5, atol=1e-6)


async def test_busy_runners_share_the_cpus_and_a_lone_one_gets_them_all(tmp_path: Path, tiny_gguf: Path) -> None:
    store = ModelStore(tmp_path)
    store.open()
    for name in ("first", "second", "pinned"):
        store.create(name, tiny_gguf)
    scheduler = Scheduler(Settings(home=tmp_path), store, _start_runner, FixedMemory(1 << 40), cpus=4)  # type: ignore[arg-type]

    def threads() -> dict[str, int]:
        return {loaded.name.split(":")[0]: loaded.threads for loaded in scheduler.loaded()}

    try:
        async with scheduler.lease("first", {}, -1) as first:
            assert threads() == {"first": 4}
            async with scheduler.lease("second", {}, -1) as second:
                assert threads() == {"first": 2, "second": 2}
                async with scheduler.lease("pinned", {"num_thread": 1}, -1):
                    assert threads() == {"first": 2, "second": 2, "pinned": 1}  # explicit: left alone
                results = await asyncio.gather(
                    first.loaded.runner.embed(["hello"], True), second.loaded.runner.embed(["world"], True)
                )
                assert all(result.vectors.shape == (1, 32) for result in results)
            assert threads()["first"] == 4
    finally:
        await scheduler.close(5.0)


@pytest.mark.parametrize(("cpus", "busy", "share"), [(2, 0, 2), (2, 1, 2), (2, 2, 1), (2, 5, 1), (8, 3, 2), (1, 1, 1)])
def test_thread_share(cpus: int, busy: int, share: int) -> None:
    assert thread_share(cpus, busy) == share


async def test_a_slow_load_does_not_hold_up_requests_for_a_loaded_model(tmp_path: Path, tiny_gguf: Path) -> None:
    store = ModelStore(tmp_path)
    store.open()
    store.create("loaded", tiny_gguf)
    store.create("slow", tiny_gguf)
    release_slow_load = asyncio.Event()
    slow_load_started = asyncio.Event()

    async def start_runner(model: Any, params: Any) -> RunnerProcess:
        if model.name == "slow:latest":
            slow_load_started.set()
            await release_slow_load.wait()  # a load that takes as long as the test wants
        return await _start_runner(model, params)

    scheduler = Scheduler(Settings(home=tmp_path), store, start_runner, FixedMemory(1 << 40))  # type: ignore[arg-type]
    try:
        async with scheduler.lease("loaded", {}, -1):
            pass

        async def lease_slow() -> None:
            async with scheduler.lease("slow", {}, -1):
                pass

        slow = asyncio.create_task(lease_slow())
        await slow_load_started.wait()
        async with scheduler.lease("loaded", {}, -1) as lease:  # answered while "slow" still loads
            assert (await lease.loaded.runner.embed(["hello"], True)).vectors.shape == (1, 32)
        assert not slow.done()
        release_slow_load.set()
        await slow
    finally:
        await scheduler.close(5.0)


async def test_a_slow_load_holds_up_neither_loaded_models_nor_their_unload(tmp_path: Path, tiny_gguf: Path) -> None:
    store = ModelStore(tmp_path)
    store.open()
    store.create("loaded", tiny_gguf)
    store.create("slow", tiny_gguf)
    release = asyncio.Event()
    starts: list[str] = []

    async def start(model: Any, params: Any) -> RunnerProcess:
        starts.append(model.name)
        if model.name == "slow:latest":
            await release.wait()  # a load that takes as long as the test wants
        return await _start_runner(model, params)

    scheduler = Scheduler(Settings(home=tmp_path), store, start, FixedMemory(1 << 40))  # type: ignore[arg-type]
    try:
        async with scheduler.lease("loaded", {}, None):
            pass

        async def use_slow() -> None:
            async with scheduler.lease("slow", {}, None):
                pass

        cold = [asyncio.ensure_future(use_slow()) for _ in range(3)]
        await wait_until(lambda: starts.count("slow:latest") == 1)
        async with asyncio.timeout(10):  # neither waits for the slow load
            async with scheduler.lease("loaded", {}, None):
                pass
            assert await scheduler.unload("loaded") is True
        assert not cold[0].done()
        release.set()
        await asyncio.gather(*cold)
        assert starts.count("slow:latest") == 1  # three cold requests, one load
    finally:
        release.set()
        await scheduler.close(5.0)
