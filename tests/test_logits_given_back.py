"""An encoder's runner gives back the logits of llama.cpp's output buffer (runner.engine): llama.cpp
zeroes n_vocab floats for every token of the largest decode and never writes them for a model
without an output projection."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import llama_cpp
import numpy as np
import psutil
import pytest
from llama_cpp import _internals as internals

from daemon.options import LlamaParams
from daemon.runner.engine import EmbeddingEngine, writes_no_logits
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


def _pages_in_memory(address: int, length: int) -> int:
    """How many pages of [address, address + length) are in memory, as the kernel says (mincore)."""
    start = address // mmap.PAGESIZE * mmap.PAGESIZE
    pages = -(-(address + length - start) // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    assert LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * mmap.PAGESIZE), vector) == 0
    return sum(byte & 1 for byte in vector)


LIBC = ctypes.CDLL(None, use_errno=True)
DOCUMENT = " ".join(["the quick brown fox jumps over the lazy dog near the river bank"] * 36)


def test_the_logits_stay_given_back_decode_after_decode_even_if_llama_cpp_zeroes_them_again(
    minilm_gguf: Path,
) -> None:
    """In the runner's own engine: after the 1st, 2nd and 10th decode of a long document the
    logits rows are out of memory, also after something zeroed them between decodes (what a
    llama.cpp that clears its output buffer at every decode would do), and the vectors never move."""
    params = LlamaParams(
        n_gpu_layers=0, main_gpu=0, use_mmap=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1,
        n_threads_batch=1, limit_tokens=512, batch_tokens=512,
    )  # fmt: skip
    engine = EmbeddingEngine(str(minilm_gguf), params)
    try:
        [tokens] = engine.tokenize(DOCUMENT, truncate=False).windows
        context = engine._main.context.ctx
        first = engine.embed_batch([tokens])
        logits = ctypes.addressof(llama_cpp.llama_get_logits(context).contents)
        embeddings = ctypes.addressof(llama_cpp.llama_get_embeddings(context).contents)
        # The logits rows end where the embeddings begin: 30,522 floats for each of the decode's tokens.
        assert embeddings - logits == 4 * 30522 * len(tokens)
        rows_pages = (embeddings - logits) // mmap.PAGESIZE
        assert rows_pages > 10_000  # 55 MiB
        for decode in range(2, 11):
            # At most the two pages the rows share with what lies beside them stay.
            assert _pages_in_memory(logits, embeddings - logits) <= 2, f"before decode {decode}"
            ctypes.memset(logits, 0, embeddings - logits)  # zeroed again: every page back in memory
            assert _pages_in_memory(logits, embeddings - logits) >= rows_pages
            assert np.array_equal(engine.embed_batch([tokens]), first)
        assert _pages_in_memory(logits, embeddings - logits) <= 2
    finally:
        engine.close()


def test_a_long_document_leaves_the_runner_without_its_logits_and_the_vectors_unchanged(
    tmp_path: Path, minilm_gguf: Path
) -> None:
    """The runner's memory after the 1st, 2nd and 10th decode of a long document grows by far less
    than the logits llama.cpp zeroed for it (55 MiB): each of those decodes gave them back."""
    with running_daemon(tmp_path / "home", {"all-minilm": minilm_gguf}, {}) as daemon:

        def embed(text: str) -> tuple[np.ndarray, int]:
            status, body = post_json(daemon.url + "/api/embed", {"model": "all-minilm", "input": text})
            assert status == 200, body
            return np.array(body["embeddings"][0]), body["prompt_eval_count"]

        short_before, _ = embed("why is the sky blue?")
        [pid] = daemon.runner_pids()
        rss_before = psutil.Process(pid).memory_info().rss
        vectors = []
        for decode in range(1, 11):
            vector, tokens = embed(DOCUMENT)
            vectors.append(vector)
            if decode in (1, 2, 10):
                grown = psutil.Process(pid).memory_info().rss - rss_before
                logits_bytes = 4 * 30522 * tokens  # what llama.cpp zeroed for this decode: 55 MiB
                print(f"decode {decode}: {tokens} tokens, the runner grew by {grown / MIB:.1f} MiB")
                assert tokens > 400
                assert grown < logits_bytes / 4, f"decode {decode}"
        # Decodes after it (shorter, and as long) give the same vectors as before.
        assert np.allclose(embed("why is the sky blue?")[0], short_before, atol=1e-6)
        assert all(np.allclose(vector, vectors[0], atol=1e-6) for vector in vectors)
        assert daemon.runner_pids() == [pid]
