"""Token vectors (TEI's POST /embed_all): through the daemon, every token's vector of each input, as
llama.cpp's own pooling-NONE decode gives them (llama-cpp-python's Llama(pooling_type=NONE)), on
the real all-MiniLM and a tiny XLM-RoBERTa."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from daemon.convert import convert_hf_directory
from daemon.runner.batching import OVERDUE_AFTER_DECODES, QueuedRequest, take_batch
from tests.conftest import MakeClient
from tests.tiny_models import make_transformers_xlm_roberta_dir

Client = TestClient[Any, Any]
TEXTS = ["why is the sky blue?", "the sky is blue because the air scatters blue light more than red light"]


@pytest.fixture(scope="module")
def xlm_roberta_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("token-vectors")
    directory = make_transformers_xlm_roberta_dir(root / "xlmr", pooling="cls", seed=3)
    path = root / "xlmr.gguf"
    convert_hf_directory(directory, path, "f32", "xlmr")
    return path


def pooling_none_llama(path: Path) -> llama_cpp.Llama:
    """llama-cpp-python's own model with pooling NONE: the reference for token vectors."""
    return llama_cpp.Llama(
        str(path),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        n_threads=1,
        verbose=False,
    )


def reference_token_vectors(path: Path, texts: list[str]) -> Iterator[np.ndarray]:
    """llama.cpp's own per-token vectors (pooling NONE), one text a decode."""
    model = pooling_none_llama(path)
    try:
        for text in texts:
            tokens = model.tokenize(text.encode(), add_bos=True, special=False)
            vectors = np.asarray(model.embed(text, normalize=False), dtype=np.float64)
            assert len(vectors) == len(tokens)  # the reference itself: one vector a token
            yield vectors
    finally:
        model.close()


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


@pytest.mark.parametrize("family", ["minilm", "xlm-roberta"])
async def test_token_vectors_are_llama_cpps_own(
    make_client: MakeClient, minilm_gguf: Path, xlm_roberta_gguf: Path, family: str
) -> None:
    path = minilm_gguf if family == "minilm" else xlm_roberta_gguf
    client = await make_client({"model": path})
    response = await client.post("/embed_all", json={"model": "model", "inputs": TEXTS})
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert len(answer) == len(TEXTS)
    for got, expected in zip(answer, reference_token_vectors(path, TEXTS), strict=True):
        vectors = np.asarray(got, dtype=np.float64)
        assert vectors.shape == expected.shape  # as many tokens as llama.cpp's, special tokens included
        assert cosines(vectors, expected).min() >= 0.9999
        assert np.allclose(np.linalg.norm(vectors, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-2)
    # A single string is one input; normalize gives unit rows; the pooled route still pools.
    response = await client.post("/embed_all", json={"model": "model", "inputs": TEXTS[0], "normalize": True})
    [single] = await response.json()
    assert np.allclose(np.linalg.norm(np.asarray(single), axis=1), 1.0, atol=1e-5)
    assert np.allclose(cosines(np.asarray(single), np.asarray(answer[0])), 1.0, atol=1e-6)
    pooled = await client.post("/api/embed", json={"model": "model", "input": TEXTS})
    assert len((await pooled.json())["embeddings"][0]) == len(single[0])


async def test_token_vectors_share_the_runner_with_pooled_requests(make_client: MakeClient, minilm_gguf: Path) -> None:
    """Both kinds at once on one runner: each gets its own kind (they never share a decode; packed
    beside other sequences, the values move in the fourth decimal, as pooled vectors do)."""
    import asyncio

    client = await make_client({"model": minilm_gguf})
    pooled_alone = await (await client.post("/api/embed", json={"model": "model", "input": TEXTS})).json()
    tokens_alone = await (await client.post("/embed_all", json={"model": "model", "inputs": TEXTS})).json()
    answers = await asyncio.gather(
        *(
            client.post("/embed_all", json={"model": "model", "inputs": TEXTS})
            if index % 2
            else client.post("/api/embed", json={"model": "model", "input": TEXTS})
            for index in range(8)
        )
    )
    for index, response in enumerate(answers):
        body = await response.json()
        if index % 2:
            for got, alone in zip(body, tokens_alone, strict=True):
                assert cosines(np.asarray(got), np.asarray(alone)).min() >= 0.9999
        else:
            pooled = np.asarray(body["embeddings"])
            assert pooled.shape == (len(TEXTS), 384)
            assert cosines(pooled, np.asarray(pooled_alone["embeddings"])).min() >= 0.9999


async def test_long_inputs_are_cut_or_refused_in_teis_error_body(make_client: MakeClient, minilm_gguf: Path) -> None:
    client = await make_client({"model": minilm_gguf})
    long_text = "the sky is blue " * 300
    refused = await client.post("/embed_all", json={"model": "model", "inputs": long_text})
    assert refused.status == 400
    body = await refused.json()
    assert body["error_type"] == "Validation" and "context" in body["error"]
    cut = await client.post("/embed_all", json={"model": "model", "inputs": [long_text], "truncate": True})
    assert cut.status == 200
    [vectors] = await cut.json()
    assert len(vectors) == 512  # all-MiniLM's context, [CLS] and [SEP] included
    for body_json, status in (
        ({"model": "missing", "inputs": "a"}, 404),
        ({"model": "model"}, 400),
        ({"model": "model", "inputs": 3}, 400),
    ):
        response = await client.post("/embed_all", json=body_json)
        assert response.status == status
        assert set(await response.json()) == {"error", "error_type"}


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        # The first turn's kind (pooled or token vectors) takes the decode; the other waits.
        ([QueuedRequest([5, 5]), QueuedRequest([4], tokens=True)], [0, 1]),
        ([QueuedRequest([3, 3]), QueuedRequest([4], tokens=True), QueuedRequest([6])], [2, 0, 1]),
        ([QueuedRequest([4], tokens=True), QueuedRequest([4, 4], tokens=True)], [1, 2]),
        # An overdue request of the other kind goes first, alone with its kind.
        ([QueuedRequest([3]), QueuedRequest([9], passed_over=OVERDUE_AFTER_DECODES, tokens=True)], [0, 1]),
    ],
)
def test_pooled_and_token_requests_never_share_a_decode(requests: list[QueuedRequest], expected: list[int]) -> None:
    assert take_batch(requests, batch_tokens=64, max_sequences=8) == expected


def llama_token_vectors_of_ids(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's own per-token vectors (pooling NONE) of a token list decoded as it is."""
    model = pooling_none_llama(path)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for index, token in enumerate(ids):
            batch.token[index] = token
            batch.pos[index] = index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = True
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(model.ctx, batch) == 0
        pointer = llama_cpp.llama_get_embeddings(model.ctx)
        return np.array(pointer[: len(ids) * model.n_embd()], dtype=np.float64).reshape(len(ids), model.n_embd())
    finally:
        llama_cpp.llama_batch_free(batch)
        model.close()


@pytest.mark.parametrize("direction", ["right", "Left"])
async def test_a_cut_input_keeps_the_end_teis_truncation_direction_says(
    make_client: MakeClient, minilm_gguf: Path, direction: str
) -> None:
    """TEI's truncation_direction: right (the default) keeps an input's start, left its end; the
    special tokens stay at both ends. The vectors are llama.cpp's of exactly the tokens kept."""
    client = await make_client({"model": minilm_gguf})
    text = "the air scatters blue light " * 120 + "why is the sky blue?"
    response = await client.post(
        "/embed_all", json={"model": "model", "inputs": text, "truncate": True, "truncation_direction": direction}
    )
    assert response.status == 200, await response.text()
    [vectors] = await response.json()
    tokenized = await client.post("/api/tokenize", json={"model": "model", "content": text})
    ids = (await tokenized.json())["tokens"]
    kept = ids[:511] + ids[-1:] if direction == "right" else ids[:1] + ids[-511:]
    expected = llama_token_vectors_of_ids(minilm_gguf, kept)
    assert len(vectors) == 512
    assert cosines(np.asarray(vectors, dtype=np.float64), expected).min() >= 0.9999
