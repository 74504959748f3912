"""The quick lane: a runner's second llama.cpp context answers short inputs while its main context
decodes long ones (see batching.quick_lane_opens), with the vectors the main context gives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from daemon.gguf_info import read_gguf_facts
from daemon.memory import ModelShape, compute_buffer_bytes, output_buffer_bytes, quick_lane_bytes
from daemon.options import QUICK_LANE_SEQUENCES, QUICK_LANE_TOKENS, LoadOptions, llama_params
from daemon.runner.client import EmbedResult, RunnerProcess

DOCUMENT = " ".join(
    f"passage {index}: the sky appears blue because molecules in the air scatter short wavelengths of sunlight"
    for index in range(24)
)  # about 450 tokens: one main decode each
QUERIES = [f"why is the sky blue? ({index})" for index in range(64)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def start(gguf: Path, quick_lane: bool) -> RunnerProcess:
    load = LoadOptions(0, 0, 2, 0, 0, True, quick_lane=quick_lane)
    return await RunnerProcess.start(gguf, llama_params(load, 512, 6, n_vocab=30522), "all-minilm", 60.0)


async def queries_while_documents_decode(runner: RunnerProcess) -> tuple[list[EmbedResult], EmbedResult]:
    """One request of 12 documents, and one query at a time until it is answered."""
    documents = asyncio.create_task(runner.embed([DOCUMENT] * 12, True))
    answered = []
    for query in QUERIES:
        if documents.done():
            break
        answered.append(await runner.embed([query], True))
    return answered, await documents


@pytest.mark.parametrize("quick_lane", [True, False])
async def test_queries_are_answered_on_the_quick_lane_while_documents_decode(
    minilm_gguf: Path, quick_lane: bool
) -> None:
    runner = await start(minilm_gguf, quick_lane)
    try:
        alone = await runner.embed(QUERIES[:8], True)
        answered, documents = await queries_while_documents_decode(runner)
    finally:
        await runner.stop(5.0)
    assert documents.vectors.shape == (12, 384)
    assert runner.facts is not None
    quick_decodes = sum(len(result.quick_decodes) for result in answered) + len(documents.quick_decodes)
    if not quick_lane:
        assert runner.facts.quick_lane_tokens == 0 and quick_decodes == 0
        return
    assert runner.facts.quick_lane_tokens == QUICK_LANE_TOKENS
    # Its buffers, as llama.cpp logged them, are what the memory estimate counts for it.
    logged = runner.facts.llama_buffer_bytes
    shape = ModelShape.of(read_gguf_facts(minilm_gguf), minilm_gguf.stat().st_size)
    assert 0.99 < output_buffer_bytes(shape, QUICK_LANE_SEQUENCES) / logged["quick_output"] < 1.01  # at load
    compute = compute_buffer_bytes(shape, QUICK_LANE_TOKENS, QUICK_LANE_SEQUENCES, QUICK_LANE_TOKENS)
    assert 0.99 < compute / logged["quick_compute"] < 1.01
    assert quick_lane_bytes(shape, QUICK_LANE_TOKENS) == output_buffer_bytes(shape, QUICK_LANE_TOKENS) + compute
    # Queries went through the quick lane while documents held the main context...
    assert quick_decodes >= 1 and len(answered) >= 2
    # ...with the vectors the main context gives them (two threads there, one here).
    for index, result in enumerate(answered[:8]):
        assert cosine(result.vectors[0], alone.vectors[index]) > 0.99999


async def test_a_request_mixing_short_and_long_inputs_keeps_its_rows(minilm_gguf: Path) -> None:
    texts = [DOCUMENT, "why is the sky blue?", DOCUMENT + " again", "hello", DOCUMENT[:300], "a"]
    runner = await start(minilm_gguf, True)
    try:
        one_by_one = np.stack([(await runner.embed([text], True)).vectors[0] for text in texts])
        # Two such requests at once: their short inputs may take the quick lane beside the documents.
        together = await asyncio.gather(runner.embed(texts, True), runner.embed(texts[::-1], True))
    finally:
        await runner.stop(5.0)
    for row, expected in enumerate(one_by_one):
        assert cosine(together[0].vectors[row], expected) > 0.99999
        assert cosine(together[1].vectors[len(texts) - 1 - row], expected) > 0.99999
