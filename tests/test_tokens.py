"""/api/tokenize and /api/detokenize with the model's own tokenizer, on the real all-MiniLM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MINILM_DIR, MakeClient

Client = TestClient[Any, Any]
TEXT = "why is the sky blue?"
VOCAB = (MINILM_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
BARE = [VOCAB.index(word) for word in ["why", "is", "the", "sky", "blue", "?"]]
WITH_SPECIALS = [VOCAB.index("[CLS]"), *BARE, VOCAB.index("[SEP]")]


def runner_processes() -> list[psutil.Process]:
    return [child for child in psutil.Process(os.getpid()).children() if "daemon.runner.worker" in child.cmdline()]


async def post(client: Client, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


@pytest.fixture
async def client(make_client: MakeClient, minilm_gguf: Path) -> Client:
    return await make_client({"all-minilm": minilm_gguf})


async def test_a_model_that_is_not_loaded_tokenizes_without_being_loaded(client: Client) -> None:
    assert await post(client, "/api/tokenize", {"model": "all-minilm", "content": TEXT}) == (
        200,
        {"model": "all-minilm", "tokens": WITH_SPECIALS},
    )
    status, body = await post(client, "/api/tokenize", {"model": "all-minilm", "content": TEXT, "add_special": False})
    assert (status, body["tokens"]) == (200, BARE)
    for tokens in (BARE, WITH_SPECIALS):  # special tokens are left out of the text
        assert await post(client, "/api/detokenize", {"model": "all-minilm", "tokens": tokens}) == (
            200,
            {"model": "all-minilm", "content": TEXT},
        )
    assert (await (await client.get("/api/ps")).json())["models"] == []  # no weights were loaded
    (vocabulary_runner,) = runner_processes()
    model_bytes = (MINILM_DIR / "model.safetensors").stat().st_size
    assert vocabulary_runner.memory_full_info().uss < model_bytes / 2


async def test_a_loaded_model_tokenizes_in_its_own_runner_as_it_embeds(client: Client) -> None:
    status, embedded = await post(client, "/api/embed", {"model": "all-minilm", "input": TEXT})
    assert status == 200
    runners = runner_processes()
    status, body = await post(client, "/api/tokenize", {"model": "all-minilm", "content": TEXT})
    assert (status, len(body["tokens"])) == (200, embedded["prompt_eval_count"])
    assert runner_processes() == runners  # no second process for the tokenizer


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/tokenize", {"model": "all-minilm"}, 400, "content is required"),
        ("/api/tokenize", {"model": "all-minilm", "content": 5}, 400, "content"),
        ("/api/tokenize", {"content": "x"}, 400, "model is required"),
        ("/api/tokenize", {"model": "nope", "content": "x"}, 404, "not found"),
        ("/api/tokenize", {"model": "all-minilm", "content": "x", "add_special": "no"}, 400, "add_special"),
        ("/api/detokenize", {"model": "all-minilm", "tokens": "101"}, 400, "array of integers"),
        ("/api/detokenize", {"model": "all-minilm", "tokens": [101, True]}, 400, "array of integers"),
        ("/api/detokenize", {"model": "all-minilm", "tokens": [len(VOCAB) + 5]}, 400, "outside the model's vocabulary"),
        ("/api/detokenize", {"model": "nope", "tokens": [1]}, 404, "not found"),
    ],
)
async def test_bad_tokenize_requests_get_a_clear_4xx(
    client: Client, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    got_status, got = await post(client, path, body)
    assert got_status == status
    assert message in got["error"]
