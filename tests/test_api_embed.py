"""/api/embed on a real daemon (real socket, real runner child, real llama.cpp) with a tiny model:
every row of the status matrix in API.md, and the behaviours around it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from daemon.api.common import STORE
from daemon.store import ModelStore
from tests.conftest import MakeClient, scheduler_of, wait_until
from tests.tiny_models import make_header_only_gguf

Client = TestClient[Any, Any]


async def embed(client: Client, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    if raw is not None:
        response = await client.post("/api/embed", data=raw)
    else:
        response = await client.post("/api/embed", json=body)
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    return response.status, await response.json()


# -- the happy path ---------------------------------------------------------------------------------


async def test_single_string_gives_one_unit_vector_and_the_documented_fields(tiny_client: Client) -> None:
    status, body = await embed(tiny_client, {"model": "tiny", "input": "why is the sky blue?"})
    assert status == 200
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == "tiny"
    [vector] = body["embeddings"]
    assert len(vector) == 32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert body["load_duration"] > 0  # this request loaded the model
    assert body["total_duration"] >= body["load_duration"]
    assert body["prompt_eval_count"] > 2


async def test_batch_keeps_input_order_and_counts_tokens(tiny_client: Client) -> None:
    texts = ["why is the sky blue?", "hello world", "grass is green"]
    _, together = await embed(tiny_client, {"model": "tiny", "input": texts})
    alone = [(await embed(tiny_client, {"model": "tiny", "input": text}))[1] for text in texts]
    for vector, single in zip(together["embeddings"], alone, strict=True):
        assert np.dot(vector, single["embeddings"][0]) == pytest.approx(1.0, abs=1e-5)
    assert together["prompt_eval_count"] == sum(single["prompt_eval_count"] for single in alone)
    assert together["load_duration"] > 0  # the first request loaded the model
    assert all(single["load_duration"] == 0 for single in alone)


async def test_model_name_is_echoed_as_sent_and_case_insensitive(tiny_client: Client) -> None:
    status, body = await embed(tiny_client, {"model": "TINY:latest", "input": "hello"})
    assert status == 200
    assert body["model"] == "TINY:latest"


@pytest.mark.parametrize("empty_input", ["", [], None])
async def test_empty_input_preloads_and_answers_exactly_the_idiom(tiny_client: Client, empty_input: Any) -> None:
    request: dict[str, Any] = {"model": "tiny"}
    if empty_input is not None:
        request["input"] = empty_input
    status, body = await embed(tiny_client, request)
    assert (status, body) == (200, {"model": "tiny", "embeddings": []})
    assert [loaded.name for loaded in scheduler_of(tiny_client).loaded()] == ["tiny:latest"]


async def test_a_list_holding_an_empty_string_is_embedded(tiny_client: Client) -> None:
    status, body = await embed(tiny_client, {"model": "tiny", "input": [""]})
    assert status == 200
    assert len(body["embeddings"]) == 1
    assert body["prompt_eval_count"] == 2  # [CLS] [SEP]


async def test_dimensions_keeps_the_first_values_renormalised(tiny_client: Client) -> None:
    _, full = await embed(tiny_client, {"model": "tiny", "input": "hello"})
    _, cut = await embed(tiny_client, {"model": "tiny", "input": "hello", "dimensions": 8})
    expected = np.array(full["embeddings"][0][:8])
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(cut["embeddings"][0], expected, atol=1e-6)
    for full_width in (0, 32):  # 0: unset, as Go's zero value
        _, same = await embed(tiny_client, {"model": "tiny", "input": "hello", "dimensions": full_width})
        assert len(same["embeddings"][0]) == 32
    for refused in (-3, 33, 1000):  # a clear 400, not the full width in silence
        status, body = await embed(tiny_client, {"model": "tiny", "input": "hello", "dimensions": refused})
        assert (status, body["error"]) == (400, f"dimensions must be between 1 and the model's 32, got {refused}")


# -- truncation -------------------------------------------------------------------------------------

LONG_TEXT = " ".join(["hello world"] * 40)  # 80 words: more than the tiny model's 64-token context


async def test_truncation_keeps_the_beginning_and_reports_the_cut(tiny_client: Client) -> None:
    response = await tiny_client.post("/api/embed", json={"model": "tiny", "input": [LONG_TEXT, "hello"]})
    body = await response.json()
    assert response.status == 200
    assert response.headers["X-Emberd-Truncated-Inputs"] == "1"
    assert body["prompt_eval_count"] == 64 + 3  # full context, plus [CLS] hello [SEP]
    # The cut happened at the end: the beginning of the text decides the vector.
    _, prefix = await embed(tiny_client, {"model": "tiny", "input": " ".join(["hello world"] * 31)})
    assert np.dot(body["embeddings"][0], prefix["embeddings"][0]) == pytest.approx(1.0, abs=1e-5)


async def test_num_ctx_lowers_the_limit(tiny_client: Client) -> None:
    request = {"model": "tiny", "input": "hello world hello", "options": {"num_ctx": 4}}
    response = await tiny_client.post("/api/embed", json=request)
    body = await response.json()
    assert response.status == 200
    assert body["prompt_eval_count"] == 4
    assert response.headers["X-Emberd-Truncated-Inputs"] == "1"


async def test_truncate_false_refuses_an_input_over_the_limit(tiny_client: Client) -> None:
    status, body = await embed(tiny_client, {"model": "tiny", "input": LONG_TEXT, "truncate": False})
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})


async def test_a_limit_too_small_for_the_special_tokens_is_refused(tiny_client: Client) -> None:
    request = {"model": "tiny", "input": "hello world", "options": {"num_ctx": 2}}
    status, body = await embed(tiny_client, request)
    assert (status, body) == (400, {"error": "input after truncation exceeds maximum context length"})


# -- the status matrix ------------------------------------------------------------------------------


async def test_empty_body(tiny_client: Client) -> None:
    assert await embed(tiny_client, None, raw=b"") == (400, {"error": "missing request body"})


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"model": "tiny",}'])
async def test_malformed_json(tiny_client: Client, raw: bytes) -> None:
    status, body = await embed(tiny_client, None, raw=raw)
    assert status == 400
    assert body["error"].startswith("invalid JSON")


async def test_a_body_that_is_not_an_object(tiny_client: Client) -> None:
    assert await embed(tiny_client, ["tiny"]) == (400, {"error": "request body must be a JSON object"})


@pytest.mark.parametrize("request_body", [{"input": "hello"}, {"model": "", "input": "hello"}])
async def test_missing_or_empty_model(tiny_client: Client, request_body: dict[str, Any]) -> None:
    assert await embed(tiny_client, request_body) == (404, {"error": "model '' not found"})


async def test_model_not_present(tiny_client: Client) -> None:
    status, body = await embed(tiny_client, {"model": "nomic-embed-text", "input": "hello"})
    assert (status, body) == (404, {"error": 'model "nomic-embed-text" not found, try pulling it first'})


@pytest.mark.parametrize(
    "bad_input", [42, 1.5, True, {"text": "hello"}, [["hello"]], [1, 2, 3], [[101, 102]], ["ok", 7]]
)
async def test_invalid_input_type_is_refused_before_loading(tiny_client: Client, bad_input: Any) -> None:
    assert await embed(tiny_client, {"model": "tiny", "input": bad_input}) == (400, {"error": "invalid input type"})
    assert scheduler_of(tiny_client).loaded() == []


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/abs/path", "a/../b", "bad\x00name", "tab\tname", "x" * 201, "spa ce"]
)
async def test_names_that_could_escape_the_store(tiny_client: Client, name: str) -> None:
    status, body = await embed(tiny_client, {"model": name, "input": "hello"})
    assert status == 400
    assert "invalid model name" in body["error"]


async def test_queue_full_answers_503_and_the_held_request_still_completes(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_queue=1)
    await embed(client, {"model": "tiny"})  # preload
    runner = scheduler_of(client).loaded()[0].runner
    os.kill(runner.pid, signal.SIGSTOP)  # the runner holds the first request until we let it go
    try:
        held = asyncio.create_task(embed(client, {"model": "tiny", "input": "hello"}))
        await wait_until(lambda: runner.in_flight == 1)
        status, body = await embed(client, {"model": "tiny", "input": "hello"})
        assert (status, body) == (503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
    finally:
        os.kill(runner.pid, signal.SIGCONT)
    status, body = await held
    assert status == 200
    assert len(body["embeddings"]) == 1


async def test_a_model_without_pooling_is_refused_with_501_before_loading(tiny_client: Client, tmp_path: Path) -> None:
    store: ModelStore = tiny_client.server.app[STORE]
    partial = make_header_only_gguf(store.tmp_dir / "chat.gguf.partial")
    store.publish("chat-model", partial, "0" * 64, "test")
    status, body = await embed(tiny_client, {"model": "chat-model", "input": "hello"})
    assert status == 501
    assert "not an embedding model" in body["error"]
    assert scheduler_of(tiny_client).loaded() == []


async def test_get_is_not_allowed(tiny_client: Client) -> None:
    response = await tiny_client.get("/api/embed")
    assert response.status == 405
    assert "error" in await response.json()


async def test_nan_in_a_vector_is_a_400(make_client: MakeClient, nan_gguf: Path) -> None:
    client = await make_client({"nan": nan_gguf})
    assert await embed(client, {"model": "nan", "input": "hello"}) == (
        400,
        {"error": "embedding contains NaN or Inf values"},
    )


async def test_body_over_the_size_limit_is_a_413(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_body_bytes=1024)
    status, body = await embed(client, {"model": "tiny", "input": "x" * 4096})
    assert status == 413
    assert "error" in body


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("truncate", "yes", "truncate must be true or false"),
        ("dimensions", "8", "dimensions must be an integer"),
        ("dimensions", True, "dimensions must be an integer"),
        ("model", 7, "model must be a string"),
        ("options", [1], "options must be an object"),
    ],
)
async def test_fields_of_the_wrong_type(tiny_client: Client, field: str, value: Any, message: str) -> None:
    request = {"model": "tiny", "input": "hello", field: value}
    assert await embed(tiny_client, request) == (400, {"error": message})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("num_ctx", "2048"),
        ("num_batch", 1.5),
        ("num_thread", True),
        ("num_gpu", "all"),
        ("use_mmap", 1),
        ("num_batch", 10**9),  # would make the runner allocate without limit
        ("num_thread", 10**6),
        ("main_gpu", -2),
    ],
)
async def test_an_option_of_the_wrong_type_is_a_400_naming_it(tiny_client: Client, option: str, value: Any) -> None:
    status, body = await embed(tiny_client, {"model": "tiny", "input": "hello", "options": {option: value}})
    assert status == 400
    assert f'option "{option}"' in body["error"]


async def test_unknown_and_generation_options_are_ignored(tiny_client: Client) -> None:
    options = {"temperature": 0.1, "made_up": [1], "num_ctx": 2048.0}
    status, _ = await embed(tiny_client, {"model": "tiny", "input": "hello", "options": options})
    assert status == 200


# -- keep_alive -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep_alive", "message"),
    [
        ("300", 'time: missing unit in duration "300"'),
        ("5 minutes", 'time: invalid duration "5 minutes"'),
        (True, "keep_alive must be a duration string or a number of seconds"),
        ({"minutes": 5}, "keep_alive must be a duration string or a number of seconds"),
    ],
)
async def test_bad_keep_alive(tiny_client: Client, keep_alive: Any, message: str) -> None:
    assert await embed(tiny_client, {"model": "tiny", "input": "hello", "keep_alive": keep_alive}) == (
        400,
        {"error": message},
    )


async def test_keep_alive_zero_with_no_input_unloads(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny", "input": "hello", "keep_alive": -1})
    runner = scheduler_of(tiny_client).loaded()[0].runner
    assert await embed(tiny_client, {"model": "tiny", "keep_alive": 0}) == (200, {"model": "tiny", "embeddings": []})
    assert scheduler_of(tiny_client).loaded() == []
    await asyncio.wait_for(runner.exited.wait(), timeout=10)


async def test_keep_alive_zero_with_no_input_does_not_load(tiny_client: Client) -> None:
    assert await embed(tiny_client, {"model": "tiny", "keep_alive": "0s"}) == (200, {"model": "tiny", "embeddings": []})
    assert scheduler_of(tiny_client).loaded() == []


async def test_keep_alive_expiry_unloads_an_idle_model(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny", "input": "hello", "keep_alive": 0.2})
    ps = await (await tiny_client.get("/api/ps")).json()
    assert [model["name"] for model in ps["models"]] == ["tiny:latest"]
    await wait_until(lambda: scheduler_of(tiny_client).loaded() == [])


async def test_a_request_without_keep_alive_leaves_the_current_one(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny", "input": "hello", "keep_alive": "-1m"})
    await embed(tiny_client, {"model": "tiny", "input": "hello"})
    [loaded] = scheduler_of(tiny_client).loaded()
    assert loaded.keep_alive_s == -1
    ps = await (await tiny_client.get("/api/ps")).json()
    assert ps["models"][0]["expires_at"].startswith("2318")


# -- small endpoints --------------------------------------------------------------------------------


async def test_root_and_version(tiny_client: Client) -> None:
    response = await tiny_client.get("/")
    assert (response.status, await response.text()) == (200, "Ollama is running")
    assert (await tiny_client.head("/")).status == 200
    version = await (await tiny_client.get("/api/version")).json()
    assert isinstance(version["version"], str) and version["version"]


async def test_generate_with_keep_alive_zero_unloads_as_ollama_stop_does(tiny_client: Client) -> None:
    await embed(tiny_client, {"model": "tiny", "input": "hello", "keep_alive": -1})
    response = await tiny_client.post("/api/generate", json={"model": "tiny", "keep_alive": 0})
    body = await response.json()
    assert response.status == 200
    assert (body["done"], body["done_reason"], body["response"]) == (True, "unload", "")
    assert scheduler_of(tiny_client).loaded() == []
    refused = await tiny_client.post("/api/generate", json={"model": "tiny", "prompt": "write a poem"})
    assert (refused.status, await refused.json()) == (400, {"error": '"tiny" does not support generate'})
    missing = await tiny_client.post("/api/generate", json={"model": "nothing", "keep_alive": 0})
    assert missing.status == 404
