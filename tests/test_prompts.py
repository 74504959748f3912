"""Named query/document prompts: from /api/create, a sentence-transformers directory, or an alias;
picked per request with prompt_name (or input_type on /v1/embeddings), never applied unasked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from daemon.api.app import DEFAULT_MODELS_FILE
from daemon.errors import InvalidInput
from daemon.hub import load_aliases
from daemon.prompts import (
    ModelPrompts,
    apply_prompt,
    check_prompts,
    choose_prompt,
    parse_prompt_option,
    read_sentence_transformers_prompts,
)
from tests.conftest import MakeClient
from tests.tiny_models import make_tiny_bert_dir

Client = TestClient[Any, Any]
PROMPTS = ModelPrompts({"query": "q: ", "document": "d: "})


@pytest.mark.parametrize(
    ("prompts", "prompt_name", "input_type", "expected"),
    [
        (PROMPTS, None, None, ""),  # never applied unasked: default vectors stay Ollama's
        (PROMPTS, "query", None, "q: "),
        (PROMPTS, None, "query", "q: "),
        (PROMPTS, None, "search_document", "d: "),  # Cohere's name
        (ModelPrompts(), None, "query", ""),  # a model without a query prompt needs none
        (ModelPrompts({"query": "q: "}, "query"), None, None, "q: "),  # the model's default
        (ModelPrompts({"query": "q: "}, "query"), "query", "document", "q: "),  # prompt_name wins
    ],
)
def test_choose_prompt(prompts: ModelPrompts, prompt_name: str | None, input_type: str | None, expected: str) -> None:
    assert choose_prompt(prompts, prompt_name, input_type) == expected


@pytest.mark.parametrize(
    ("prompt_name", "input_type", "message"),
    [
        ("passage", None, "unknown prompt_name 'passage'; this model's prompts: document, query"),
        (None, "question", "input_type must be one of"),
    ],
)
def test_choose_prompt_refuses_unknown_names(prompt_name: str | None, input_type: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        choose_prompt(PROMPTS, prompt_name, input_type)


def test_apply_prompt_check_prompts_and_the_prompt_option() -> None:
    assert apply_prompt("q: ", ["a", [1, 2]]) == ["q: a", [1, 2]]  # token ids are a model input already
    assert parse_prompt_option("query=search_query: ") == ("query", "search_query: ")
    assert parse_prompt_option("doc=a=b") == ("doc", "a=b")
    with pytest.raises(InvalidInput):
        parse_prompt_option("no-equals-sign")
    with pytest.raises(InvalidInput, match="default_prompt_name"):
        check_prompts({"query": "q"}, "document", "create")
    with pytest.raises(InvalidInput, match="prompts must map"):
        check_prompts({"query": 5}, None, "create")


def test_the_aliases_that_need_prompts_carry_them() -> None:
    aliases = load_aliases(DEFAULT_MODELS_FILE)
    queries = {name: alias.prompts.prompts.get("query") for name, alias in aliases.items()}
    assert queries["nomic-embed-text:latest"] == "search_query: "
    assert aliases["nomic-embed-text:latest"].prompts.prompts["document"] == "search_document: "
    assert queries["bge-small-en-v1.5:latest"] == "Represent this sentence for searching relevant passages: "
    assert queries["qwen3-embedding:latest"].startswith("Instruct: ") and queries["qwen3-embedding:latest"].endswith(
        "\nQuery:"
    )
    assert aliases["embeddinggemma:latest"].prompts.prompts == {
        "query": "task: search result | query: ",
        "document": "title: none | text: ",
        "classification": "task: classification | query: ",
        "clustering": "task: clustering | query: ",
    }
    assert queries["all-minilm:latest"] is None  # its card has no prompts
    assert all(alias.prompts.default_name is None for alias in aliases.values())


def test_a_sentence_transformers_directory_keeps_its_prompts(tmp_path: Path) -> None:
    directory = make_tiny_bert_dir(tmp_path / "st")
    config = {"prompts": {"query": "query: ", "passage": "passage: ", "empty": ""}, "default_prompt_name": None}
    (directory / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert read_sentence_transformers_prompts(directory) == ModelPrompts({"query": "query: ", "passage": "passage: "})
    assert read_sentence_transformers_prompts(tmp_path) == ModelPrompts()


async def embed(client: Client, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post("/api/embed", json=body)
    return response.status, await response.json()


async def test_a_request_picks_a_prompt_by_name_and_counts_its_tokens(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({})
    body = {"model": "tiny", "from": str(tiny_gguf), "prompts": {"query": "why ", "document": "the "}}
    assert (await client.post("/api/create", json={**body, "stream": False})).status == 200
    status, plain = await embed(client, {"model": "tiny", "input": "sky is blue"})
    assert status == 200
    status, asked = await embed(client, {"model": "tiny", "input": "sky is blue", "prompt_name": "query"})
    _, spelled = await embed(client, {"model": "tiny", "input": "why sky is blue"})
    assert status == 200 and asked["embeddings"] == spelled["embeddings"] != plain["embeddings"]
    assert asked["prompt_eval_count"] == plain["prompt_eval_count"] + 1  # "why" is one token

    response = await client.post("/v1/embeddings", json={"model": "tiny", "input": "sky", "input_type": "document"})
    openai = await response.json()
    _, document = await embed(client, {"model": "tiny", "input": "the sky"})
    assert np.allclose(openai["data"][0]["embedding"], document["embeddings"][0], atol=1e-6)
    response = await client.post("/v1/embeddings", json={"model": "tiny", "input": "sky", "prompt_name": "query"})
    assert response.status == 200

    status, refused = await embed(client, {"model": "tiny", "input": "sky", "prompt_name": "passage"})
    assert (status, refused["error"]) == (400, "unknown prompt_name 'passage'; this model's prompts: document, query")
    show = await (await client.post("/api/show", json={"model": "tiny"})).json()
    assert show["prompts"] == {"query": "why ", "document": "the "}


async def test_a_default_prompt_applies_when_none_is_named(make_client: MakeClient, tiny_dir: Path) -> None:
    client = await make_client({})
    body = {"model": "tiny", "from": str(tiny_dir), "prompts": {"query": "why "}, "default_prompt_name": "query"}
    assert (await client.post("/api/create", json={**body, "stream": False})).status == 200
    plain = {"model": "plain", "from": str(tiny_dir), "stream": False}  # the same file, no prompts
    assert (await client.post("/api/create", json=plain)).status == 200
    _, default = await embed(client, {"model": "tiny", "input": "sky"})
    _, spelled = await embed(client, {"model": "plain", "input": "why sky"})
    assert default["embeddings"] == spelled["embeddings"]
    bad = {"model": "x", "from": str(tiny_dir), "prompts": {"query": "q"}, "default_prompt_name": "other"}
    response = await client.post("/api/create", json={**bad, "stream": False})
    assert response.status == 400
