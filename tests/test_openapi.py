"""/openapi.json: every route the app registers is documented and every documented route exists,
the document is valid OpenAPI 3.1, its statuses follow the error table, and real answers match its
schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator

from daemon.api import docs, openapi
from daemon.api.app import ERROR_STATUS, build_app
from daemon.api.openai import ENCODING_FORMATS
from daemon.config import Settings
from daemon.convert import OUTPUT_TYPES
from daemon.errors import InvalidInput, UnknownModel
from daemon.options import _LOAD_OPTION_TYPES, _OPTION_MAXIMUMS
from tests.conftest import MakeClient
from tests.openapi_check import Contract

Client = TestClient[Any, Any]
DOCUMENT = openapi.build_document(ERROR_STATUS)
CONTRACT = Contract(DOCUMENT)


def registered_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """The API's routes: all but the docs page and its files (HTML for people, not part of the API)."""
    app = build_app(Settings(home=tmp_path / "home"))
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical not in (docs.DOCS_PATH, docs.DOCS_FILES_PREFIX + "{name}")
    }


def test_every_registered_route_is_documented_and_every_documented_route_is_registered(tmp_path: Path) -> None:
    documented = {(op.method, op.path) for op in CONTRACT.operations}
    registered = registered_routes(tmp_path)
    assert registered - documented == set(), "routes without documentation"
    assert documented - registered == set(), "documented routes the app does not have"
    assert ("GET", "/v1/models/{model}") in documented and ("HEAD", "/") in documented


def test_the_document_is_valid_openapi_3_1() -> None:
    OpenAPIV31SpecValidator(DOCUMENT).validate()
    operation_ids = [op.spec["operationId"] for op in CONTRACT.operations]
    assert len(operation_ids) == len(set(operation_ids))


def test_error_statuses_come_from_the_error_table() -> None:
    for route in openapi.ROUTES:
        responses = DOCUMENT["paths"][route.path][route.method]["responses"]
        for error in route.errors:
            assert str(openapi.status_of(error, ERROR_STATUS)) in responses, (route.path, error)
        assert "403" in responses  # the Host guard is in front of every route
        if route.request is not None:
            assert {"400", "413"} <= set(responses)
    embed = DOCUMENT["paths"]["/api/embed"]["post"]["responses"]
    assert {"400", "401", "403", "404", "413", "500", "501", "503", "507"} <= set(embed)
    assert "UnknownModel" in embed["404"]["description"] and "Overloaded" in embed["503"]["description"]
    assert "401" not in DOCUMENT["paths"]["/healthz"]["get"]["responses"]  # open without a key
    # The document follows the table: another status for a class moves it.
    moved = openapi.build_document([(UnknownModel, 410), (InvalidInput, 400)])
    assert {"410"} <= set(moved["paths"]["/api/show"]["post"]["responses"])
    assert "404" not in moved["paths"]["/api/show"]["post"]["responses"]


def test_error_bodies_follow_the_dialect() -> None:
    def error_ref(path: str, method: str) -> str:
        answer = DOCUMENT["paths"][path][method]["responses"]["404"]
        return str(answer["content"]["application/json"]["schema"]["$ref"])

    assert error_ref("/api/embed", "post").endswith("/Error")
    assert error_ref("/v1/embeddings", "post").endswith("/OpenAIError")
    assert error_ref("/v1/rerank", "post").endswith("/OpenAIError")


def test_enums_and_bounds_match_the_code() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    create = CONTRACT.operation("POST", "/api/create")
    assert create is not None and create.request_schema is not None
    assert create.request_schema["properties"]["quantize"]["enum"] == list(OUTPUT_TYPES)
    assert set(schemas["Options"]["properties"]) == set(_LOAD_OPTION_TYPES)
    for key, maximum in _OPTION_MAXIMUMS.items():
        assert schemas["Options"]["properties"][key]["maximum"] == maximum
    embeddings = CONTRACT.operation("POST", "/v1/embeddings")
    assert embeddings is not None and embeddings.request_schema is not None
    assert embeddings.request_schema["properties"]["encoding_format"]["enum"] == list(ENCODING_FORMATS)


@pytest.fixture
async def client(make_client: MakeClient, tiny_gguf: Path, reranker_gguf: Path) -> Client:
    return await make_client({"tiny": tiny_gguf, "reranker": reranker_gguf}, hub_offline=True)


async def test_the_daemon_serves_the_document(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await response.json() == json.loads(json.dumps(DOCUMENT))
    assert (await client.head("/openapi.json")).status == 200


async def exchange(client: Client, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request whose body must be valid by the document, and whose answer must match it."""
    if body is not None:
        assert CONTRACT.check_request(method, path, body) == [], (method, path, body)
    response = await client.request(method, path, json=body)
    raw = await response.read()
    problems = CONTRACT.check_answer(method, path, response.status, response.headers.get("Content-Type", ""), raw)
    assert problems == [], raw[:300]
    return response.status, raw


async def test_real_answers_match_the_documented_schemas(client: Client, tiny_gguf: Path) -> None:
    passage = "the sky is blue because the air scatters blue light " * 4
    calls: list[tuple[str, str, Any, int]] = [
        ("POST", "/api/embed", {"model": "tiny", "input": ["why is the sky blue?", passage], "keep_alive": "5m"}, 200),
        ("POST", "/api/embed", {"model": "tiny", "input": passage * 4, "split_long_inputs": True}, 200),
        ("POST", "/api/embed", {"model": "tiny"}, 200),  # the preload idiom
        ("POST", "/api/embed", {"model": "tiny", "input": "x", "options": {"num_ctx": None, "num_thread": 1}}, 200),
        ("POST", "/api/embed", {"model": "nope", "input": "x"}, 404),
        ("POST", "/api/embed", {"model": "tiny", "input": passage * 4, "truncate": False}, 400),
        ("POST", "/api/embeddings", {"model": "tiny", "prompt": "why is the sky blue?"}, 200),
        ("POST", "/v1/embeddings", {"model": "tiny", "input": ["a", "b"], "encoding_format": "base64"}, 200),
        ("POST", "/v1/embeddings", {"model": "tiny", "input": [[2339, 374], [1820]], "dimensions": 8}, 200),
        ("POST", "/v1/embeddings", {"model": "tiny", "input": "a", "input_type": "query"}, 200),
        ("POST", "/v1/embeddings", {"model": "nope", "input": "a"}, 404),
        ("POST", "/api/rerank", {"model": "reranker", "query": "q", "documents": ["a", {"text": "b"}]}, 200),
        ("POST", "/v2/rerank", {"model": "reranker", "query": "q", "documents": ["a"], "return_documents": True}, 200),
        ("POST", "/v1/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "top_n": 1}, 400),
        ("POST", "/api/tokenize", {"model": "tiny", "content": "why is the sky blue?", "add_special": False}, 200),
        ("POST", "/api/detokenize", {"model": "tiny", "tokens": [2, 33, 70, 3]}, 200),
        ("GET", "/api/ps", None, 200),
        ("GET", "/api/tags", None, 200),
        ("POST", "/api/show", {"model": "tiny"}, 200),
        ("GET", "/api/version", None, 200),
        ("GET", "/v1/models", None, 200),
        ("GET", "/v1/models/tiny", None, 200),
        ("GET", "/v1/models/hf.co/owner/missing:Q8_0", None, 404),
        ("POST", "/api/pull", {"model": "hf.co/owner/repo:Q8_0"}, 503),  # the Hub is offline
        ("POST", "/api/create", {"model": "copy", "from": str(tiny_gguf)}, 200),  # NDJSON progress
        ("POST", "/api/create", {"model": "copy2", "from": str(tiny_gguf), "stream": False}, 200),
        ("DELETE", "/api/delete", {"model": "copy2"}, 200),
        ("POST", "/api/generate", {"model": "tiny", "keep_alive": 0}, 200),
        ("GET", "/", None, 200),
        ("HEAD", "/", None, 200),
        ("GET", "/healthz", None, 200),
        ("GET", "/readyz", None, 503),  # not marked ready: the app runs without `emberd serve`
        ("GET", "/metrics", None, 200),
    ]
    for method, path, body, expected in calls:
        status, raw = await exchange(client, method, path, body)
        assert status == expected, (method, path, raw[:300])


async def test_error_answers_of_every_kind_match_the_document(client: Client) -> None:
    raw_calls = [
        ("POST", "/api/embed", b""),  # missing body
        ("POST", "/api/embed", b"{"),  # malformed JSON
        ("POST", "/v1/embeddings", b"[]"),  # not an object
        ("POST", "/api/tokenize", b'{"model": "tiny"}'),  # a required field missing
        ("POST", "/api/show", b'{"model": "../../etc"}'),  # an invalid name
    ]
    for method, path, data in raw_calls:
        response = await client.request(method, path, data=data)
        raw = await response.read()
        assert response.status == 400, raw
        assert CONTRACT.check_answer(method, path, 400, response.headers["Content-Type"], raw) == []
    response = await client.get("/api/tags", headers={"Host": "evil.example"})
    assert response.status == 403
    assert CONTRACT.check_answer("GET", "/api/tags", 403, response.headers["Content-Type"], await response.read()) == []


async def test_too_many_inputs_and_a_body_too_large_are_documented(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_inputs=2, max_body_bytes=4096)
    for data in (
        json.dumps({"model": "tiny", "input": ["a", "b", "c"]}),
        json.dumps({"model": "tiny", "input": "a" * 8192}),
    ):
        response = await client.post("/v1/embeddings", data=data)
        raw = await response.read()
        assert response.status == 413, raw
        assert CONTRACT.check_answer("POST", "/v1/embeddings", 413, response.headers["Content-Type"], raw) == []
