"""The architecture matrix: a tiny random-weight GGUF of every family the pinned llama.cpp embeds with
(tests/family_ggufs.py), served by one live daemon, against llama.cpp's own single-text decode of the
same file through llama-cpp-python: vectors of a packed request, token counts, what truncation keeps,
and how the windows of a long input make its vector. See docs/architectures.md."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from gguf import PoolingType

from daemon.errors import InvalidModelFile
from daemon.gguf_info import read_gguf_facts, sliding_window_layers
from daemon.runner.batching import split_windows
from daemon.vectors import window_share
from tests.family_ggufs import FAMILIES, make_family_gguf
from tests.live import Daemon, running_daemon
from tests.tiny_models import copy_gguf

CONTEXT = 64  # each family's trained context: the daemon's limit, and llama.cpp's context here

# Eight varied inputs, packed into one request: lengths from one word to a sentence, repeated words,
# case, punctuation, and characters outside every tiny vocabulary (unknown tokens or byte fallback).
INPUTS = [
    "the sky is blue",
    "why is the sky blue? why? why?",
    "hello world hello world hello world",
    "green grass, grey dusk and a blue sky over the harbour",
    "a",
    "héllo wörld: naïve café, 漢字 and 😀",
    "The GRASS is Green!",
    "noon turns grey at dusk over the harbour of the world",
]
# Longer than the context in every family's tokens, and long enough for three windows or more.
LONG_TEXT = " ".join(f"the sky over harbour {index} turns blue at noon and grey at dusk" for index in range(12))

# The special tokens each family's tokenizer puts before and after a text (llama.cpp's
# llama-vocab.cpp with the flags its converter writes): what a cut input must keep at both ends.
SPECIALS: dict[str, tuple[list[str], list[str]]] = {
    "bert": (["[CLS]"], ["[SEP]"]),
    "bert-xlm-roberta": (["<s>"], ["</s>"]),
    "nomic-bert": (["[CLS]"], ["[SEP]"]),
    "nomic-bert-moe": (["<s>"], ["</s>"]),
    "jina-bert-v2": (["[CLS]"], ["[SEP]"]),
    "jina-bert-v3": (["<s>"], ["</s>"]),
    "modern-bert": (["[CLS]"], ["[SEP]"]),
    "neo-bert": (["[CLS]"], ["[SEP]"]),
    "eurobert": ([], ["<|end_of_text|>"]),
    "gemma-embedding": (["<bos>"], ["<eos>"]),
    "qwen3": ([], ["<|endoftext|>"]),
    "t5encoder": ([], ["</s>"]),
    "llama-embed": (["<|begin_of_text|>"], []),
}

# Embedding architectures people run that the pinned llama.cpp has no loader for, and its words.
NOT_LOADABLE = {
    "mpnet": "unknown model architecture: 'mpnet'",  # all-mpnet-base-v2, multi-qa-mpnet-base
    "new": "unknown model architecture: 'new'",  # Alibaba's gte-base-en-v1.5, gte-multilingual-base
}


def test_the_matrix_covers_every_family() -> None:
    assert set(SPECIALS) == set(FAMILIES)
    assert {family.pooling for family in FAMILIES.values()} == {PoolingType.MEAN, PoolingType.CLS, PoolingType.LAST}


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


@pytest.fixture(scope="module")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("families")
    files = {name: make_family_gguf(name, directory / f"{name}.gguf", CONTEXT) for name in FAMILIES}
    for architecture in NOT_LOADABLE:
        files[architecture] = copy_gguf(files["bert"], directory / f"{architecture}.gguf", {}, architecture)
    return files


@pytest.fixture(scope="module")
def daemon(family_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the whole matrix, every family in its store; two loaded at once (the tests
    run family by family)."""
    home = tmp_path_factory.mktemp("matrix") / "home"
    loadable = {name: path for name, path in family_files.items() if name not in NOT_LOADABLE}
    with running_daemon(home, loadable, {"EMBERD_MAX_LOADED_MODELS": "2"}) as live:
        yield live


class Reference:
    """llama.cpp's own embeddings of a family's file, one text (or token list) per decode."""

    def __init__(self, path: Path) -> None:
        self.model = llama_cpp.Llama(
            str(path), embedding=True, n_ctx=CONTEXT, n_batch=CONTEXT, n_ubatch=CONTEXT, n_threads=1, verbose=False
        )

    def tokens(self, text: str) -> list[int]:
        """With the special tokens the model's metadata says its tokenizer adds."""
        return list(self.model.tokenize(text.encode(), add_bos=True, special=False))

    def special(self, piece: str) -> int:
        [token] = self.model.tokenize(piece.encode(), add_bos=False, special=True)
        return int(token)

    def text_vector(self, text: str) -> np.ndarray:
        return np.asarray(self.model.embed(text, normalize=True), dtype=np.float64)

    def token_vector(self, tokens: Sequence[int]) -> np.ndarray:
        """The pooled vector (not normalised) of a token list decoded as it is, one sequence."""
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for index, token in enumerate(tokens):
                batch.token[index] = token
                batch.pos[index] = index
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = 0
                batch.logits[index] = True
            batch.n_tokens = len(tokens)
            context = self.model.ctx
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
            assert llama_cpp.llama_decode(context, batch) == 0
            pointer = llama_cpp.llama_get_embeddings_seq(context, 0)
            return np.array(pointer[: self.model.n_embd()], dtype=np.float64)
        finally:
            llama_cpp.llama_batch_free(batch)

    def close(self) -> None:
        self.model.close()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def reference(family: str, family_files: dict[str, Path]) -> Iterator[Reference]:
    model = Reference(family_files[family])
    yield model
    model.close()


def cosine(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def unit(vector: np.ndarray) -> np.ndarray:
    return np.asarray(vector / np.linalg.norm(vector))


def test_the_file_is_the_family_it_says(family: str, family_files: dict[str, Path], reference: Reference) -> None:
    facts = read_gguf_facts(family_files[family])
    spec = FAMILIES[family]
    assert (facts.architecture, facts.pooling_type, facts.causal_attention) == (
        spec.architecture,
        spec.pooling,
        spec.causal,
    )
    assert llama_cpp.llama_pooling_type(reference.model.ctx) == spec.pooling  # as llama.cpp reads it
    head, tail = SPECIALS[family]
    tokens = reference.tokens("the sky")
    assert tokens[: len(head)] == [reference.special(piece) for piece in head]
    assert tokens[len(tokens) - len(tail) :] == [reference.special(piece) for piece in tail]
    assert len(tokens) == len(reference.model.tokenize(b"the sky", add_bos=False)) + len(head) + len(tail)


def test_a_packed_request_gives_llama_cpps_vector_and_token_count_for_each_input(
    family: str, daemon: Daemon, reference: Reference
) -> None:
    status, body = post(daemon.url + "/api/embed", {"model": family, "input": INPUTS})
    assert status == 200, body
    for text, vector in zip(INPUTS, body["embeddings"], strict=True):
        assert cosine(vector, reference.text_vector(text)) >= 0.9999, text
    assert body["prompt_eval_count"] == sum(len(reference.tokens(text)) for text in INPUTS)
    assert all(len(reference.tokens(text)) <= CONTEXT for text in INPUTS)  # none was cut


def test_truncation_keeps_the_special_tokens_the_family_needs(
    family: str, daemon: Daemon, reference: Reference
) -> None:
    head, tail = SPECIALS[family]
    tokens = reference.tokens(LONG_TEXT)
    assert len(tokens) > CONTEXT
    # The cut the family needs, spelled out: its leading specials, the text's first tokens, its
    # trailing specials.
    kept = tokens[: CONTEXT - len(tail)] + [reference.special(piece) for piece in tail]
    assert kept[: len(head)] == [reference.special(piece) for piece in head]
    status, body = post(daemon.url + "/api/embed", {"model": family, "input": LONG_TEXT, "truncate": True})
    assert status == 200, body
    assert body["prompt_eval_count"] == CONTEXT
    expected = reference.token_vector(kept)
    assert cosine(body["embeddings"][0], expected) >= 0.9999
    if tail:  # the cut without its trailing special token is another vector: the test can tell
        assert cosine(body["embeddings"][0], reference.token_vector(tokens[:CONTEXT])) < 0.9999
    status, body = post(daemon.url + "/api/embed", {"model": family, "input": LONG_TEXT, "truncate": False})
    assert status == 400, body


def test_a_long_input_split_into_windows_pools_them_by_the_familys_rule(
    family: str, daemon: Daemon, reference: Reference
) -> None:
    head, tail = SPECIALS[family]
    # A text whose last window is short (half a window at most), so that weighing windows by
    # their tokens and weighing them the same give vectors this test tells apart.
    for sentences in range(9, 25):
        text = " ".join(
            f"the sky over harbour {index} turns blue at noon and grey at dusk" for index in range(sentences)
        )
        windows = split_windows(reference.tokens(text), len(head), len(tail), CONTEXT)
        if len(windows) >= 3 and len(windows[-1]) <= CONTEXT // 2:
            break
    else:
        raise AssertionError("no text with a short last window")
    status, body = post(daemon.url + "/api/embed", {"model": family, "input": text, "split_long_inputs": True})
    assert status == 200, body
    assert body["windows"] == [len(windows)]
    assert body["prompt_eval_count"] == sum(len(window) for window in windows)
    vectors = [reference.token_vector(window) for window in windows]  # llama.cpp's, window by window
    # Mean pooling: every token's vector weighs the same. CLS, last: one token's vector per window,
    # every window weighs the same.
    by_tokens = sum(len(window) * vector for window, vector in zip(windows, vectors, strict=True))
    by_windows = sum(unit(vector) for vector in vectors)
    assert cosine(np.asarray(by_tokens), np.asarray(by_windows)) < 0.9999
    expected = by_tokens if FAMILIES[family].pooling == PoolingType.MEAN else by_windows
    assert cosine(body["embeddings"][0], np.asarray(expected)) >= 0.9999
    assert abs(np.linalg.norm(body["embeddings"][0]) - 1) < 1e-5


def test_window_shares() -> None:
    vector = np.array([3.0, 4.0], dtype=np.float32)
    for pooling, window_tokens, share, weight in [
        (PoolingType.MEAN, 10, [30.0, 40.0], 10.0),  # weighted by its tokens
        (PoolingType.MEAN, 1, [3.0, 4.0], 1.0),
        (PoolingType.CLS, 10, [0.6, 0.8], 1.0),  # its unit vector, one window's weight
        (PoolingType.LAST, 3, [0.6, 0.8], 1.0),
    ]:
        got, got_weight = window_share(vector, window_tokens, pooling)
        np.testing.assert_allclose(got, share, rtol=1e-6)
        assert got_weight == weight
    zero, weight = window_share(np.zeros(2, np.float32), 5, PoolingType.CLS)
    assert zero.tolist() == [0.0, 0.0] and weight == 1.0


def test_architectures_llama_cpp_cannot_load_are_refused_with_its_reason(
    daemon: Daemon, family_files: dict[str, Path]
) -> None:
    """Refused as they would enter the store (a vocabulary-only load, in a runner of its own); one
    stored before that check: tests/test_unloadable_models.py."""
    for architecture, message in NOT_LOADABLE.items():
        body = {"model": architecture, "from": str(family_files[architecture]), "stream": False}
        status, answer = post(daemon.url + "/api/create", body)
        assert status == 400, answer
        assert message in answer["error"], answer


def test_sliding_window_layers_follow_llama_cpps_rule() -> None:
    local, glob = True, False
    cases: list[tuple[int, int | list[bool], bool, list[bool]]] = [
        (2, 6, False, [local, local]),  # gemma-embedding's default pattern, under six layers: all local
        (6, 6, False, [local] * 5 + [glob]),
        (7, 6, False, [local] * 5 + [glob, local]),
        (3, 2, False, [local, glob, local]),
        (2, 1, False, [glob, glob]),
        (2, 0, False, [local, local]),
        (3, 3, True, [glob, local, local]),  # modern-bert: the first of every three is global
        (1, 3, True, [glob]),
        (3, [True, False], False, [local, glob, glob]),  # a per-layer array, short: the rest global
    ]
    for blocks, pattern, dense_first, expected in cases:
        assert sliding_window_layers(blocks, pattern, dense_first) == expected, (blocks, pattern)


ALL_LOCAL: dict[str, tuple[dict[str, Any], str]] = {
    "no pattern key, under six layers": ({"sliding_window_pattern": None}, "all 2 of its layers are local"),
    "pattern array all local": ({"sliding_window_pattern": [True, True]}, "all 2 of its layers are local"),
    "pattern 1: all global": ({"sliding_window_pattern": 1}, "all 2 of its layers are global"),
}


def test_a_gemma_embedding_without_both_kinds_of_layer_is_refused(tmp_path: Path, daemon: Daemon) -> None:
    """llama.cpp loads a gemma-embedding whose layers are all local (or all global), then aborts the
    process at its first decode: GGML_ASSERT(buffer), the unused mask has none. Refused as a 400."""
    for label, (shape, message) in ALL_LOCAL.items():
        path = make_family_gguf("gemma-embedding", tmp_path / f"{label.replace(' ', '-')}.gguf", CONTEXT, **shape)
        with pytest.raises(InvalidModelFile, match=message):
            read_gguf_facts(path)
        status, body = post(daemon.url + "/api/create", {"model": "gemma-bad", "from": str(path), "stream": False})
        assert status == 400, label
        assert message in body["error"] and "would abort at its first decode" in body["error"], body
    # Six layers and no key: the sixth is global; a 1-layer modern-bert with a window has no local one.
    read_gguf_facts(make_family_gguf("gemma-embedding", tmp_path / "six.gguf", sliding_window_pattern=None, layers=6))
    with pytest.raises(InvalidModelFile, match="its one layer is global"):
        read_gguf_facts(make_family_gguf("modern-bert", tmp_path / "one-layer.gguf", layers=1))
