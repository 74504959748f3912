"""Inputs longer than the context, embedded in overlapping windows and pooled (opt-in), on the
real all-MiniLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from daemon.runner.batching import split_windows
from tests.conftest import MakeClient
from tests.test_minilm import cosine

LONG_TEXT = " ".join(f"the sky over harbour {i} turns blue at noon and grey at dusk" for i in range(170))


async def test_a_long_input_is_pooled_from_its_windows_and_a_short_one_is_unchanged(
    make_client: MakeClient, minilm_gguf: Path
) -> None:
    client = await make_client({"all-minilm": minilm_gguf}, openai_token_ids="model")

    async def post(path: str, body: dict[str, Any]) -> Any:
        response = await client.post(path, json=body)
        assert response.status == 200, await response.text()
        return await response.json()

    tokens = (await post("/api/tokenize", {"model": "all-minilm", "content": LONG_TEXT}))["tokens"]
    assert len(tokens) > 2000
    pooled = await post("/api/embed", {"model": "all-minilm", "input": LONG_TEXT, "split_long_inputs": True})
    windows = split_windows(tokens, 1, 1, 512)
    assert pooled["windows"] == [len(windows)] and len(windows) >= 5
    assert pooled["prompt_eval_count"] == sum(len(window) for window in windows)

    # The windows embedded one by one (as token ids, which get the special tokens again).
    by_window = await post("/v1/embeddings", {"model": "all-minilm", "input": [w[1:-1] for w in windows]})
    vectors = np.array([item["embedding"] for item in by_window["data"]])
    mean = np.mean(vectors, axis=0)
    vector = pooled["embeddings"][0]
    assert cosine(vector, mean) > cosine(vector, vectors[0])
    assert cosine(vector, mean) > 0.99
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5  # normalised

    # Without the field, a long input is cut at the context as before.
    cut = await post("/api/embed", {"model": "all-minilm", "input": LONG_TEXT})
    assert cut["prompt_eval_count"] == 512 and "windows" not in cut
    assert cosine(cut["embeddings"][0], vectors[0]) > 0.99999

    # A text that fits gives exactly the vector it gives today, in one window.
    short = {"model": "all-minilm", "input": ["why is the sky blue?", LONG_TEXT]}
    split = await post("/api/embed", {**short, "split_long_inputs": True})
    plain = await post("/api/embed", {**short, "input": short["input"][:1]})
    assert split["embeddings"][0] == plain["embeddings"][0]
    assert split["windows"] == [1, len(windows)]
    openai = await post("/v1/embeddings", {"model": "all-minilm", "input": LONG_TEXT, "split_long_inputs": True})
    assert openai["data"][0]["windows"] == len(windows)
