"""An encoder's runner gives back the logits of llama.cpp's output buffer (runner.engine): llama.cpp
zeroes n_vocab floats for every token of the largest decode and never writes them for a model
without an output projection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
from llama_cpp import _internals as internals

from daemon.runner.engine import writes_no_logits
from tests.live import post_json, running_daemon
from tests.tiny_models import make_tiny_causal_gguf

MIB = 1 << 20


@pytest.mark.parametrize(
    ("model", "on_gpu", "expected"),
    [
        ("tiny bert", False, True),  # bert.attention.causal = false
        ("tiny bert", True, False),  # a GPU's output buffer may be pinned host memory
        ("causal", False, False),  # a causal model's decode writes its logits
    ],
)
def test_only_an_encoder_on_a_cpu_writes_no_logits(
    tmp_path: Path, tiny_gguf: Path, model: str, on_gpu: bool, expected: bool
) -> None:
    path = tiny_gguf if model == "tiny bert" else make_tiny_causal_gguf(tmp_path / "causal.gguf")
    params = internals.llama_cpp.llama_model_default_params()
    params.vocab_only = True
    loaded = internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        assert writes_no_logits(loaded, on_gpu) is expected
    finally:
        loaded.close()


def test_a_long_document_leaves_the_runner_without_its_logits_and_the_vectors_unchanged(
    tmp_path: Path, minilm_gguf: Path
) -> None:
    document = " ".join(["the quick brown fox jumps over the lazy dog near the river bank"] * 36)
    with running_daemon(tmp_path / "home", {"all-minilm": minilm_gguf}, {}) as daemon:

        def embed(text: str) -> tuple[np.ndarray, int]:
            status, body = post_json(daemon.url + "/api/embed", {"model": "all-minilm", "input": text})
            assert status == 200, body
            return np.array(body["embeddings"][0]), body["prompt_eval_count"]

        short_before, _ = embed("why is the sky blue?")
        [pid] = daemon.runner_pids()
        rss_before = psutil.Process(pid).memory_info().rss
        long_vector, tokens = embed(document)
        grown = psutil.Process(pid).memory_info().rss - rss_before
        logits_bytes = 4 * 30522 * tokens  # what llama.cpp zeroed for this decode: 55 MiB
        print(f"{tokens} tokens: the runner grew by {grown / MIB:.1f} MiB; its logits were {logits_bytes / MIB:.1f}")
        assert tokens > 400
        assert grown < logits_bytes / 4
        # Decodes after it (shorter, and as long) give the same vectors as before.
        assert np.allclose(embed("why is the sky blue?")[0], short_before, atol=1e-6)
        assert np.allclose(embed(document)[0], long_vector, atol=1e-6)
        assert daemon.runner_pids() == [pid]
