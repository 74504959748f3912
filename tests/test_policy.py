"""Table tests of the pure policy functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.api.common import parse_keep_alive_s
from daemon.config import Settings
from daemon.errors import ContextExceeded, InvalidEmbedding, InvalidInput, InvalidModelName, UnknownModel
from daemon.memory import EvictionCandidate, MemoryProbe, estimate_runner_bytes, fits, pick_victim
from daemon.names import canonical_name
from daemon.options import LoadOptions, context_limit, llama_params, n_gpu_layers, parse_options, resolve_load_options
from daemon.runner.batching import fit_tokens, special_token_split, take_batch
from daemon.vectors import finish_embeddings, normalize_rows

# -- truncation -------------------------------------------------------------------------------------

CLS, SEP = 101, 102


@pytest.mark.parametrize(
    ("tokens", "limit", "expected", "cut"),
    [
        ([CLS, 1, 2, 3, SEP], 5, [CLS, 1, 2, 3, SEP], False),
        ([CLS, 1, 2, 3, SEP], 9, [CLS, 1, 2, 3, SEP], False),
        ([CLS, 1, 2, 3, SEP], 4, [CLS, 1, 2, SEP], True),
        ([CLS, 1, 2, 3, SEP], 3, [CLS, 1, SEP], True),
        ([CLS, SEP], 2, [CLS, SEP], False),
    ],
)
def test_fit_tokens_keeps_the_beginning_and_both_special_tokens(
    tokens: list[int], limit: int, expected: list[int], cut: bool
) -> None:
    assert fit_tokens(tokens, 1, 1, limit, truncate=True) == (expected, cut)


def test_fit_tokens_refuses_when_truncation_is_off() -> None:
    with pytest.raises(ContextExceeded, match="the input length exceeds the context length"):
        fit_tokens([CLS, 1, 2, SEP], 1, 1, 3, truncate=False)


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_fit_tokens_refuses_a_limit_that_cannot_hold_the_specials_and_a_token(limit: int) -> None:
    with pytest.raises(ContextExceeded, match="input after truncation exceeds maximum context length"):
        fit_tokens([CLS, 1, 2, SEP], 1, 1, limit, truncate=True)


def test_fit_tokens_without_trailing_specials() -> None:
    assert fit_tokens([1, 2, 3, 4], 0, 0, 2, truncate=True) == ([1, 2], True)


@pytest.mark.parametrize(
    ("with_specials", "without", "expected"),
    [
        ([CLS, 5, SEP], [5], (1, 1)),
        ([CLS, 5, 6], [5, 6], (1, 0)),
        ([5, 6, SEP], [5, 6], (0, 1)),
        ([5, 6], [5, 6], (0, 0)),
        ([CLS, 9, SEP], [5], (2, 0)),  # the tokenizer changed the text's own tokens
    ],
)
def test_special_token_split(with_specials: list[int], without: list[int], expected: tuple[int, int]) -> None:
    assert special_token_split(with_specials, without) == expected


@pytest.mark.parametrize(
    ("lengths", "budget", "max_sequences", "expected"),
    [
        ([], 128, 64, 0),
        ([10, 10, 10], 128, 64, 3),
        ([100, 20, 10], 128, 64, 2),
        ([100, 30, 10], 128, 64, 1),  # arrival order is kept: no skipping ahead
        ([500, 10], 128, 64, 1),  # one input longer than the budget goes alone
        ([10] * 10, 1000, 4, 4),
        ([64, 64, 1], 128, 64, 2),
    ],
)
def test_take_batch(lengths: list[int], budget: int, max_sequences: int, expected: int) -> None:
    assert take_batch(lengths, budget, max_sequences) == expected


# -- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_gpu", "blocks", "expected"),
    [(-1, 12, -1), (-5, 12, -1), (0, 12, 0), (4, 12, 4), (13, 12, 13), (99, 12, 13), (5, 0, 5)],
)
def test_num_gpu_maps_to_n_gpu_layers(num_gpu: int, blocks: int, expected: int) -> None:
    assert n_gpu_layers(num_gpu, blocks) == expected


@pytest.mark.parametrize(
    ("num_ctx", "trained", "expected"),
    [(0, 512, 512), (128, 512, 128), (8192, 512, 512), (4096, 8192, 4096), (0, 8192, 8192), (0, 0, 512)],
)
def test_context_limit_is_num_ctx_capped_at_the_trained_context(num_ctx: int, trained: int, expected: int) -> None:
    assert context_limit(num_ctx, trained) == expected


def test_llama_params_size_the_ubatch_for_the_longest_input_and_keep_the_budget() -> None:
    params = llama_params(LoadOptions(0, 128, 2, -1, 1, False), 512, 6)
    assert (params.n_ctx, params.n_batch, params.n_ubatch) == (512, 512, 512)
    assert (params.batch_tokens, params.limit_tokens) == (128, 512)
    assert (params.n_gpu_layers, params.main_gpu, params.use_mmap, params.n_threads) == (-1, 1, False, 2)
    small = llama_params(LoadOptions(16, 256, 2, 0, 0, True), 512, 6)
    assert (small.n_ubatch, small.limit_tokens, small.batch_tokens) == (256, 16, 256)


def test_request_options_override_the_settings() -> None:
    settings = Settings(home=Path("/tmp"), batch_tokens=200, num_thread=3, num_gpu=-1)
    assert resolve_load_options(settings, {}) == LoadOptions(0, 200, 3, -1, 0, True)
    options = {"num_ctx": 64, "num_batch": 32, "num_thread": 1, "num_gpu": 0, "main_gpu": 2, "use_mmap": False}
    assert resolve_load_options(settings, options) == LoadOptions(64, 32, 1, 0, 2, False)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, {}),
        ({}, {}),
        ({"num_ctx": 2048.0}, {"num_ctx": 2048}),
        ({"temperature": 0.5, "unknown": 1}, {}),
        ({"use_mmap": False, "num_gpu": -1}, {"use_mmap": False, "num_gpu": -1}),
        ({"num_ctx": None, "num_gpu": None, "temperature": None}, {}),
    ],
)
def test_parse_options_accepts(raw: Any, expected: dict[str, Any]) -> None:
    assert parse_options(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"num_ctx": "1"},
        {"num_ctx": -1},
        {"num_batch": 0},
        {"use_mmap": "no"},
        {"main_gpu": 0.5},
        {"main_gpu": -1},
        {"num_batch": 10**9},
        {"num_thread": 100_000},
    ],
)
def test_parse_options_refuses(raw: Any) -> None:
    with pytest.raises(InvalidInput):
        parse_options(raw)


# -- keep_alive -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        (-1, -1.0),
        (-300, -1.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("-1m", -1.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        (1e308, -1.0),
        ("200000h", 720_000_000.0),
        ("2000000h", -1.0),
    ],
)
def test_keep_alive_values(raw: Any, expected: float | None) -> None:
    assert parse_keep_alive_s(raw) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("raw", ["300", "5x", "", "m", True, [], {}])
def test_keep_alive_refusals(raw: Any) -> None:
    with pytest.raises(InvalidInput):
        parse_keep_alive_s(raw)


# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("all-minilm", "all-minilm:latest"),
        ("All-MiniLM:Latest", "all-minilm:latest"),
        ("  nomic-embed-text:v1.5 ", "nomic-embed-text:v1.5"),
        ("hf.co/owner/repo:Q8_0", "hf.co/owner/repo:q8_0"),
    ],
)
def test_canonical_names(name: str, expected: str) -> None:
    assert canonical_name(name) == expected


@pytest.mark.parametrize("name", ["..", "a/../b", "/etc/passwd", "a//b", "a:b:c", "x\n", "é", "a" * 201, "-x"])
def test_names_that_are_refused(name: str) -> None:
    with pytest.raises(InvalidModelName):
        canonical_name(name)


def test_an_empty_name_is_an_unknown_model() -> None:
    with pytest.raises(UnknownModel, match="model '' not found"):
        canonical_name("")


# -- memory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([], None),
        ([EvictionCandidate("a", True, 1.0, 10)], None),
        ([EvictionCandidate("a", False, 5.0, 10), EvictionCandidate("b", False, 2.0, 10)], "b"),
        ([EvictionCandidate("a", False, 5.0, 10), EvictionCandidate("b", True, 2.0, 10)], "a"),
    ],
)
def test_pick_victim_is_the_idle_model_unused_longest(
    candidates: list[EvictionCandidate], expected: str | None
) -> None:
    victim = pick_victim(candidates)
    assert (victim.name if victim else None) == expected


@pytest.mark.parametrize(("required", "available", "reserve", "expected"), [(10, 20, 5, True), (10, 14, 5, False)])
def test_fits(required: int, available: int, reserve: int, expected: bool) -> None:
    assert fits(required, available, reserve) is expected


def test_estimate_grows_with_the_model_and_the_ubatch() -> None:
    base = estimate_runner_bytes(100 << 20, 512, 384, 512)
    assert estimate_runner_bytes(200 << 20, 512, 384, 512) - base == 100 << 20
    assert estimate_runner_bytes(100 << 20, 512, 384, 2048) > base


def test_the_probe_honours_a_cgroup_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(str(1 << 30))
    (tmp_path / "memory.current").write_text(str(256 << 20))
    snapshot = MemoryProbe(tmp_path).snapshot()
    assert snapshot.available_bytes <= (1 << 30) - (256 << 20)
    assert snapshot.total_bytes <= 1 << 30
    (tmp_path / "memory.max").write_text("max")
    assert MemoryProbe(tmp_path).snapshot().total_bytes > 1 << 30


# -- vectors ----------------------------------------------------------------------------------------


def test_normalize_rows_leaves_a_zero_row_zero() -> None:
    rows = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_are_refused(bad: float) -> None:
    with pytest.raises(InvalidEmbedding):
        finish_embeddings(np.array([[1.0, bad]], np.float32), None)


def test_dimensions_cut_and_renormalise() -> None:
    out = finish_embeddings(np.array([[3.0, 4.0, 12.0]], np.float32), 2)
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)
