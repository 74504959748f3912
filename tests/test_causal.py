"""Causal, last-token-pooled embedders (the qwen3-embedding kind): decoded over several ubatches."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import PoolingType

from daemon.gguf_info import read_gguf_facts
from daemon.memory import ModelShape, compute_buffer_bytes, kv_cache_bytes
from daemon.options import MAX_SEQUENCES_PER_DECODE
from tests.conftest import MakeClient, scheduler_of
from tests.tiny_models import make_tiny_causal_gguf

CONTEXT = 2048
# 1,498 letters (a token each: no merge makes "r" and "w" part of a word here) and the BOS and EOS:
# 1,500 varied tokens, past the 512-token decode budget.
LONG_TEXT = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnopqstuvxyz"), 1498))


@pytest.fixture(scope="module")
def causal_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[PoolingType, Path]:
    directory = tmp_path_factory.mktemp("causal")
    return {
        pooling: make_tiny_causal_gguf(directory / f"causal-{pooling.name.lower()}.gguf", CONTEXT, pooling=pooling)
        for pooling in (PoolingType.LAST, PoolingType.MEAN, PoolingType.CLS)
    }


def llama_cpp_vector(path: Path, text: str, n_ubatch: int) -> tuple[np.ndarray, int]:
    """llama-cpp-python's own embedding of `text` (and its token count), one sequence of one decode."""
    model = llama_cpp.Llama(
        str(path), embedding=True, n_ctx=CONTEXT, n_batch=CONTEXT, n_ubatch=n_ubatch, n_threads=2, verbose=False
    )
    try:
        tokens = len(model.tokenize(text.encode()))
        return np.asarray(model.embed(text, normalize=True), dtype=np.float64), tokens
    finally:
        model.close()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_tiny_causal_model_is_a_causal_last_token_embedder(causal_ggufs: dict[PoolingType, Path]) -> None:
    facts = read_gguf_facts(causal_ggufs[PoolingType.LAST])
    assert facts.is_embedding_model and facts.causal_attention and facts.pooling_name == "last"
    assert (facts.architecture, facts.context_length, facts.head_count, facts.head_count_kv) == ("qwen3", CONTEXT, 4, 2)
    vector, tokens = llama_cpp_vector(causal_ggufs[PoolingType.LAST], "why is the sky blue?", CONTEXT)
    assert np.isfinite(vector).all() and vector.shape == (64,) and tokens == 22  # bytes of the text, BOS, EOS


@pytest.mark.parametrize(
    ("pooling", "exact"),
    # llama.cpp pools each ubatch and overwrites the sequence's vector: the last ubatch holds the last
    # token (LAST is exact), but MEAN averages that ubatch only and CLS takes its first token.
    [(PoolingType.LAST, True), (PoolingType.MEAN, False), (PoolingType.CLS, False)],
)
def test_llama_cpp_splits_a_long_sequence_exactly_for_last_token_pooling_only(
    causal_ggufs: dict[PoolingType, Path], pooling: PoolingType, exact: bool
) -> None:
    whole, tokens = llama_cpp_vector(causal_ggufs[pooling], LONG_TEXT, CONTEXT)
    split, _ = llama_cpp_vector(causal_ggufs[pooling], LONG_TEXT, 512)
    assert tokens == 1500
    assert (cosine(whole, split) > 0.9999) is exact


@pytest.mark.parametrize(("pooling", "n_ubatch"), [(PoolingType.LAST, 512), (PoolingType.MEAN, CONTEXT)])
async def test_a_long_input_is_embedded_in_ubatches_of_the_budget_as_in_one_ubatch(
    make_client: MakeClient, causal_ggufs: dict[PoolingType, Path], pooling: PoolingType, n_ubatch: int
) -> None:
    path = causal_ggufs[pooling]
    client = await make_client({"causal": path}, batch_tokens=512)
    response = await client.post("/api/embed", json={"model": "causal", "input": LONG_TEXT})
    assert response.status == 200
    body = await response.json()
    assert body["prompt_eval_count"] == 1500
    expected, _ = llama_cpp_vector(path, LONG_TEXT, CONTEXT)
    assert cosine(np.asarray(body["embeddings"][0]), expected) > 0.9999

    # One decode of 1,500 tokens (the input alone: longer than the budget)...
    metrics = (await (await client.get("/metrics")).text()).splitlines()
    decoded = {
        line.split("{")[0]: float(line.split()[-1])
        for line in metrics
        if line.startswith(("emberd_decode_tokens_sum", "emberd_decode_tokens_count")) and "causal:latest" in line
    }
    assert decoded == {"emberd_decode_tokens_sum": 1500.0, "emberd_decode_tokens_count": 1.0}
    # ...which llama.cpp took in ubatches of 512 tokens for the last-token model: its context holds the
    # longest input, its compute buffer one 512-token ubatch attending to the whole context.
    entry = scheduler_of(client).loaded()[0]
    facts = entry.runner.facts
    assert facts is not None
    assert (entry.params.n_ctx, entry.params.n_batch, entry.params.n_ubatch) == (CONTEXT, CONTEXT, n_ubatch)
    assert facts.n_ubatch == n_ubatch
    shape = ModelShape.of(read_gguf_facts(path), path.stat().st_size)
    assert facts.llama_buffer_bytes["kv"] == kv_cache_bytes(shape, CONTEXT)
    logged_compute = facts.llama_buffer_bytes["compute"]
    n_seq_max = min(CONTEXT, MAX_SEQUENCES_PER_DECODE)
    assert 0.9 <= compute_buffer_bytes(shape, n_ubatch, n_seq_max, n_kv=CONTEXT) / logged_compute <= 1.15
