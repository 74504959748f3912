"""Table tests of the pure policy functions."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.api.common import parse_keep_alive_s
from daemon.config import Settings, parse_size_bytes
from daemon.errors import ContextExceeded, InvalidEmbedding, InvalidInput, InvalidModelName, UnknownModel
from daemon.memory import (
    EvictionCandidate,
    MemoryProbe,
    MemorySnapshot,
    ModelShape,
    ProcessMemory,
    budget_bytes,
    could_ever_fit,
    counted_bytes,
    decode_tokens_needed,
    estimate_runner,
    find_own_cgroup,
    fits,
    given_back_bytes,
    held_after_bytes,
    input_tokens_bound,
    parse_smaps_rollup,
    peak_bytes,
    pick_victim,
    runner_footprint_bytes,
)
from daemon.names import canonical_name
from daemon.options import (
    LoadOptions,
    auto_batch_tokens,
    context_limit,
    llama_params,
    n_gpu_layers,
    needs_new_runner,
    parse_options,
    resolve_load_options,
)
from daemon.runner.batching import (
    OVERDUE_AFTER_DECODES,
    QueuedRequest,
    fit_tokens,
    quick_lane_opens,
    same_bucket,
    special_token_split,
    split_windows,
    take_batch,
    window_overlap_tokens,
    wrap_token_ids,
)
from daemon.runner.client import runner_environment
from daemon.runner.protocol import parse_llama_buffer_log
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


@pytest.mark.parametrize(
    ("tokens", "head", "tail", "limit", "expected"),
    [
        ([CLS, 1, 2, 3, SEP], 1, 1, 4, [CLS, 2, 3, SEP]),
        ([CLS, 1, 2, 3, SEP], 1, 1, 3, [CLS, 3, SEP]),
        ([CLS, 1, 2, 3, 4], 1, 0, 3, [CLS, 3, 4]),  # no tail special (a model without SEP)
        ([1, 2, 3, 4, SEP], 0, 1, 3, [3, 4, SEP]),  # no head special (last-token models)
    ],
)
def test_fit_tokens_keeping_the_end_keeps_the_last_content_tokens_and_both_specials(
    tokens: list[int], head: int, tail: int, limit: int, expected: list[int]
) -> None:
    assert fit_tokens(tokens, head, tail, limit, truncate=True, keep_end=True) == (expected, True)


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


Q = QueuedRequest


@pytest.mark.parametrize(
    ("requests", "budget", "max_sequences", "expected"),
    [
        ([], 128, 64, []),
        ([Q([10, 10, 10])], 128, 64, [3]),
        ([Q([10, 20, 100])], 128, 64, [2]),  # the budget ends the decode
        ([Q([500]), Q([600])], 128, 64, [1, 0]),  # one input longer than the budget goes alone
        ([Q([10] * 10)], 1000, 4, [4]),  # at most max_sequences
        # Requests take turns: a huge request does not hold a 1-input one back.
        ([Q([50] * 4096), Q([50]), Q([50])], 200, 64, [2, 1, 1]),
        # The shortest next sequence goes first: a query is not queued behind a document...
        ([Q([402]), Q([12]), Q([9])], 512, 64, [0, 1, 1]),
        # ...nor packed with it: attention costs the square of a decode's tokens.
        ([Q([12]), Q([402])], 512, 64, [1, 0]),
        ([Q([100]), Q([180]), Q([300])], 1000, 64, [1, 1, 0]),  # longer ones share within a factor of 2
        # A request passed over for OVERDUE_AFTER_DECODES decodes goes first (ageing).
        ([Q([12]), Q([402], passed_over=OVERDUE_AFTER_DECODES)], 512, 64, [0, 1]),
        ([Q([12]), Q([402], passed_over=OVERDUE_AFTER_DECODES - 1)], 512, 64, [1, 0]),
        # Ties go by arrival.
        ([Q([20]), Q([20]), Q([20])], 40, 64, [1, 1, 0]),
        # A batch job's lines (background) wait while an interactive request waits, however short or
        # overdue they are, and take the decodes nobody else wants.
        ([Q([5] * 8, background=True), Q([402])], 512, 64, [0, 1]),
        ([Q([5], background=True, passed_over=OVERDUE_AFTER_DECODES), Q([20])], 512, 64, [0, 1]),
        ([Q([5] * 8, background=True), Q([10] * 2, background=True)], 512, 64, [8, 2]),
        # ...in decodes of at most BACKGROUND_DECODE_TOKENS (128): a query waits for one at most.
        ([Q([20] * 30, background=True)], 512, 64, [6]),
        ([Q([20] * 30)], 512, 64, [25]),
    ],
)
def test_take_batch(requests: list[QueuedRequest], budget: int, max_sequences: int, expected: list[int]) -> None:
    assert take_batch(requests, budget, max_sequences) == expected


def test_take_batch_after_an_overdue_decode_goes_by_length() -> None:
    waiting = [Q([12]), Q([402], passed_over=OVERDUE_AFTER_DECODES), Q([390], passed_over=OVERDUE_AFTER_DECODES)]
    assert take_batch(waiting, 512, 64, overdue_first=True) == [0, 0, 1]  # the shorter overdue one
    assert take_batch(waiting, 512, 64, overdue_first=False) == [1, 0, 0]


@pytest.mark.parametrize(
    ("first", "length", "expected"),
    [
        (10, 30, True),
        (30, 10, True),
        (12, 58, False),
        (64, 128, True),
        (100, 201, False),
        (402, 12, False),
        (300, 150, True),
    ],
)
def test_same_bucket(first: int, length: int, expected: bool) -> None:
    assert same_bucket(first, length) is expected


# -- options ----------------------------------------------------------------------------------------


def test_runner_environment() -> None:
    environment = runner_environment({"PATH": "/bin"})
    assert environment["PATH"] == "/bin" and environment["GGML_NO_BACKTRACE"] == "1"
    assert environment["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert runner_environment({"MALLOC_MMAP_THRESHOLD_": "65536"})["MALLOC_MMAP_THRESHOLD_"] == "65536"  # yours wins


@pytest.mark.parametrize(
    ("threads", "shortest", "quick_lane", "expected"),
    [
        (2, 12, True, False),  # a decode of short sequences: over soon, the quick lane stays closed
        (2, 32, True, False),
        (2, 33, True, True),  # a long decode: queries go to the quick lane meanwhile
        (8, 400, True, True),
        (1, 400, True, False),  # one thread: nothing to share
        (2, 400, False, False),  # no quick lane
    ],
)
def test_quick_lane_opens(threads: int, shortest: int, quick_lane: bool, expected: bool) -> None:
    assert quick_lane_opens(threads, shortest, quick_lane) is expected


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


@pytest.mark.parametrize(
    ("required", "budget", "loaded", "max_memory", "expected"),
    [
        (10, 20, 0, 0, True),
        (10, 9, 0, 0, False),
        (10, 20, 95, 100, False),  # under the budget, but over max_memory beside what is loaded
        (10, 20, 90, 100, True),
        (10, 20, 1000, 0, True),  # no cap
    ],
)
def test_fits(required: int, budget: int, loaded: int, max_memory: int, expected: bool) -> None:
    assert fits(required, budget, loaded, max_memory) is expected


GIB = 1 << 30


@pytest.mark.parametrize(
    ("snapshot", "reserve", "expected"),
    [
        (MemorySnapshot(8 * GIB, 16 * GIB), GIB // 2, 8 * GIB - GIB // 2),  # no cgroup limit: the reserve applies
        # Inside a 1 GiB limit the limit is the budget: a 512 MiB reserve does not shrink it.
        (MemorySnapshot(20 * GIB, GIB, GIB, GIB // 4), GIB // 2, GIB - GIB // 4),
        # The machine itself short of memory still binds.
        (MemorySnapshot(GIB, 4 * GIB, 4 * GIB, 0), GIB // 2, GIB // 2),
        (MemorySnapshot(100, 100, 100, 200), 0, 0),  # over its limit: nothing
    ],
)
def test_budget_bytes(snapshot: MemorySnapshot, reserve: int, expected: int) -> None:
    assert budget_bytes(snapshot, reserve) == expected


@pytest.mark.parametrize(
    ("snapshot", "promised", "cached_weights", "expected"),
    [
        # Growth promised to loaded runners is not handed out again, with or without a cgroup.
        (MemorySnapshot(8 * GIB, 16 * GIB), GIB, 0, 7 * GIB),
        (MemorySnapshot(20 * GIB, 4 * GIB, 4 * GIB, GIB), GIB, 0, 2 * GIB),
        # Mapped weights sit in the page cache psutil calls available; the cgroup counts them as used.
        (MemorySnapshot(8 * GIB, 16 * GIB), 0, 2 * GIB, 6 * GIB),
        (MemorySnapshot(20 * GIB, 4 * GIB, 4 * GIB, GIB), 0, 2 * GIB, 3 * GIB),
        (MemorySnapshot(GIB, 16 * GIB), 2 * GIB, 0, 0),
    ],
)
def test_budget_bytes_leaves_out_promised_growth_and_cached_weights(
    snapshot: MemorySnapshot, promised: int, cached_weights: int, expected: int
) -> None:
    assert budget_bytes(snapshot, 0, promised, cached_weights) == expected


MINILM_SHAPE = ModelShape(file_bytes=45 << 20, n_embd=384, n_ff=1536, n_vocab=30522)
# Figures of MINILM_SHAPE worked out by hand from llama.cpp's buffers (n_batch 512, 64 sequences):
# the output buffer holds 4 x (30,522 + 384) = 123,624 bytes a row; the compute buffer of a ubatch of
# n tokens (padded to p) is 2pn + 4 x 64n + 4 x 2,688n (feed-forward 1,536 + 3 x 384 is its widest).
OUTPUT_ROW = 123_624
# A decode of 512 tokens: 512 rows (63,295,488) and a compute buffer of 6,160,384; one of 8 tokens:
# the context's 64 rows (7,911,936) and 89,088. The growth from the one to the other:
GROWTH_8_TO_512 = 61_454_848


@pytest.mark.parametrize(
    ("measured", "measured_at", "allowance", "expected_growth"),
    [
        (100, 512, 512, 0),  # grown to its allowance: what it holds is all it counts
        (100, 0, 0, 0),
        (100, 8, 512, GROWTH_8_TO_512),
        (100, 512, 128, 0),  # renewed to a smaller allowance, measured before: never below what it holds
    ],
)
def test_counted_bytes_is_what_a_runner_holds_plus_its_growth_within_the_allowance(
    measured: int, measured_at: int, allowance: int, expected_growth: int
) -> None:
    assert counted_bytes(MINILM_SHAPE, 512, measured, measured_at, allowance) == measured + expected_growth


MINILM_GIVING_BACK = dataclasses.replace(MINILM_SHAPE, gives_back_logits=True)
LOGITS_ROW = 4 * 30522  # the logits of one output of all-MiniLM


@pytest.mark.parametrize(
    ("measured", "measured_at", "allowance", "expected_growth"),
    [
        (100, 512, 512, 0),  # what it holds after its decode: the logits were given back
        (100, 0, 0, 0),
        # Growing from 8 tokens to 512: the new buffer's logits are zeroed whole before they go back.
        # Held after 8 tokens: 89,088 of compute and the 64 rows' embeddings (64 x 4 x 384), 187,392.
        (100, 8, 512, 63_295_488 + 6_160_384 - 187_392),
        (100, 512, 128, 0),
    ],
)
def test_a_runner_that_gives_back_its_logits_counts_them_only_for_its_growth(
    measured: int, measured_at: int, allowance: int, expected_growth: int
) -> None:
    assert counted_bytes(MINILM_GIVING_BACK, 512, measured, measured_at, allowance) == measured + expected_growth


# The quick lane of 64 tokens: 64 rows (7,911,936) and a compute buffer of 2 x 64 x 64 + 4 x 64 x 16
# (its 16 sequences) + 4 x 64 x 2,688 (700,416).
QUICK_LANE_64 = 8_612_352


@pytest.mark.parametrize(
    ("measured_at", "allowance", "unused_quick_lane", "expected_bytes"),
    [
        (8, 8, 64, 100 + QUICK_LANE_64),  # loaded, its quick lane not used yet: counted from the start
        (8, 512, 64, 100 + QUICK_LANE_64 + GROWTH_8_TO_512),
        (8, 8, 0, 100),  # the quick lane has decoded: its buffers are in what was measured
        (8, 512, 0, 100 + GROWTH_8_TO_512),
    ],
)
def test_a_quick_lane_that_has_not_decoded_yet_is_counted_at_its_peak(
    measured_at: int, allowance: int, unused_quick_lane: int, expected_bytes: int
) -> None:
    assert counted_bytes(MINILM_SHAPE, 512, 100, measured_at, allowance, 0, unused_quick_lane) == expected_bytes


# What a MINILM_SHAPE runner holds before its buffers: 28 MiB of interpreter, 45 MiB of weights and
# 160 bytes for each of 30,522 tokens.
MINILM_BASE = 29_360_128 + 47_185_920 + 4_883_520
# A decode of 470 tokens: 470 rows, and a compute buffer of 2 x 512 x 470 + 4 x 470 x 64 + 4 x 470 x 2,688.
DECODE_470 = 470 * OUTPUT_ROW + 5_655_040


@pytest.mark.parametrize(
    ("gives_back", "largest", "quick_lane", "expected_rows", "expected_peak"),
    [
        (False, 470, 64, 0, MINILM_BASE + DECODE_470 + QUICK_LANE_64),
        (True, 0, 0, 64, MINILM_BASE + 64 * OUTPUT_ROW),  # before any decode: the context's n_seq_max rows
        (True, 470, 0, 470, MINILM_BASE + DECODE_470),
        (True, 470, 64, 534, MINILM_BASE + DECODE_470 + QUICK_LANE_64),  # and the quick lane's rows
    ],
)
def test_given_back_bytes_are_the_logits_of_the_largest_decode(
    gives_back: bool, largest: int, quick_lane: int, expected_rows: int, expected_peak: int
) -> None:
    shape = dataclasses.replace(MINILM_SHAPE, gives_back_logits=gives_back)
    assert given_back_bytes(shape, 512, largest, quick_lane) == expected_rows * LOGITS_ROW
    assert peak_bytes(shape, 512, largest, 0, quick_lane) == expected_peak  # a peak is a peak either way
    assert held_after_bytes(shape, 512, largest, 0, quick_lane) == expected_peak - expected_rows * LOGITS_ROW


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([], 0),
        (["why"], 3 + 8),
        (["é" * 10, "abc"], 20 + 8),  # UTF-8 bytes: no tokenizer makes more tokens than bytes
        ([[101, 2339, 102], "a"], 3 + 8),
    ],
)
def test_input_tokens_bound(inputs: list[str | list[int]], expected: int) -> None:
    assert input_tokens_bound(inputs) == expected


@pytest.mark.parametrize(
    ("batch", "longest", "capacity", "expected"),
    [
        (512, 20, 8192, 512),  # short inputs: at most one full budget of them
        (512, 8000, 8192, 8000),  # a long one is decoded alone
        (512, 9000, 8192, 8192),  # cut (or refused) at the context
        (512, 20, 256, 256),
    ],
)
def test_decode_tokens_needed(batch: int, longest: int, capacity: int, expected: int) -> None:
    assert decode_tokens_needed(batch, longest, capacity) == expected


SMAPS_ROLLUP = """555c87095000-7fff0869a000 ---p 00000000 00:00 0                          [rollup]
Rss:               90000 kB
Pss:               70000 kB
Shared_Clean:      20000 kB
Private_Clean:     45000 kB
Private_Dirty:     25000 kB
Anonymous:         24000 kB
Swap:                  0 kB
"""


def test_parse_smaps_rollup_and_the_runner_footprint() -> None:
    memory = parse_smaps_rollup(SMAPS_ROLLUP)
    assert memory == ProcessMemory(anonymous_bytes=24000 * 1024, private_bytes=70000 * 1024)
    # Mapped weights count whole (they must stay resident); libraries and other file pages do not.
    assert runner_footprint_bytes(memory, 45 << 20, weights_mapped=True) == 24000 * 1024 + (45 << 20)
    assert runner_footprint_bytes(memory, 45 << 20, weights_mapped=False) == 24000 * 1024


def test_parse_llama_buffer_log() -> None:
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =    43.48 MiB\n",
        "llama_context:        CPU  output buffer size =    30.18 MiB\n",
        "sched_reserve:        CPU compute buffer size =    18.01 MiB\n",
        "~llama_context:        CPU compute buffer size is  18.0059 MiB, matches expectation\n",
        "load_tensors:        CUDA0 model buffer size =   100.00 MiB\n",
    ]
    assert parse_llama_buffer_log(lines) == {
        "model": round(143.48 * (1 << 20)),
        "output": round(30.18 * (1 << 20)),
        "compute": round(18.01 * (1 << 20)),
    }


@pytest.mark.parametrize(
    ("required", "budget", "sizes", "max_memory", "expected"),
    [
        (10, 5, [3, 3], 0, True),  # unloading both makes room
        (10, 5, [2], 0, False),  # even with everything unloaded: refuse, evict nothing
        (10, 100, [], 8, False),  # bigger than max_memory alone
        (10, 0, [], 0, False),
    ],
)
def test_could_ever_fit(required: int, budget: int, sizes: list[int], max_memory: int, expected: bool) -> None:
    candidates = [EvictionCandidate(f"m{i}", False, 0.0, size) for i, size in enumerate(sizes)]
    assert could_ever_fit(required, budget, candidates, max_memory) is expected


def test_the_estimate_grows_with_the_file_the_vocabulary_and_the_decode() -> None:
    shape = ModelShape(file_bytes=50 << 20, n_embd=384, n_ff=1536, n_vocab=30522)
    # MINILM_BASE with 5 MiB more weights, and the context's 64 output rows.
    at_load = 94_584_384
    assert held_after_bytes(shape, 512, 0) == at_load
    assert held_after_bytes(dataclasses.replace(shape, file_bytes=100 << 20), 512, 0) == at_load + (50 << 20)
    # 128 rows and a compute buffer of 2 x 128 x 128 + 4 x 128 x 64 + 4 x 128 x 2,688; then 512 tokens'.
    assert held_after_bytes(shape, 512, 128) == at_load - 64 * OUTPUT_ROW + 128 * OUTPUT_ROW + 1_441_792
    worst = at_load - 64 * OUTPUT_ROW + 63_295_488 + 6_160_384
    assert held_after_bytes(shape, 512, 512) == worst
    estimate = estimate_runner(shape, 512, 512)
    assert (estimate.at_load_bytes, estimate.worst_bytes) == (at_load, worst)
    # Attention's mask grows with the square of the decode: a 32k context is no 32x an 8k one, but
    # far from the 17 GB a per-token-squared f32 estimate once gave (it measured 3.06 GB).
    long = ModelShape(file_bytes=158 << 20, n_embd=768, n_ff=3072, n_vocab=98)
    assert 2.5e9 < estimate_runner(long, 32768, 32768).worst_bytes < 3.5e9


@pytest.mark.parametrize(
    ("text", "unified", "expected"),
    [
        ("0::/system.slice/emberd.service\n", True, (2, "system.slice/emberd.service")),
        ("0::/\n", True, (2, ".")),
        ("0::/x.service\n", False, (2, "unified/x.service")),  # hybrid: v2 mounted under unified/
        ("4:memory:/process_api/abc\n1:cpu:/\n0::/\n", False, (1, "memory/process_api/abc")),
        ("5:cpu,memory:/docker/1\n", False, (1, "memory/docker/1")),
        ("", False, None),
    ],
)
def test_find_own_cgroup(text: str, unified: bool, expected: tuple[int, str] | None, tmp_path: Path) -> None:
    if unified:
        (tmp_path / "cgroup.controllers").write_text("memory\n")
    found = find_own_cgroup(text, tmp_path)
    assert (None if found is None else (found.version, str(found.directory.relative_to(tmp_path)))) == expected


def write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_the_probe_reads_its_own_v2_cgroup_not_the_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write_files(root, {"cgroup.controllers": "memory\n", "memory.max": "max"})
    write_files(root / "system.slice", {"memory.max": str(4 * GIB), "memory.high": "max"})
    service = root / "system.slice" / "emberd.service"
    write_files(
        service,
        {
            "memory.max": str(2 * GIB),
            "memory.high": str(GIB + GIB // 2),  # throttling starts here: the lower one binds
            "memory.current": str(GIB),
            "memory.stat": f"anon {GIB // 2}\nfile {GIB // 4}\ninactive_file {GIB // 8}\n",
        },
    )
    proc_self_cgroup = tmp_path / "cgroup-of-self"
    proc_self_cgroup.write_text("0::/system.slice/emberd.service\n")
    snapshot = MemoryProbe(root, proc_self_cgroup).snapshot()
    assert snapshot.cgroup_limit_bytes == GIB + GIB // 2
    assert snapshot.cgroup_used_bytes == GIB - GIB // 4  # reclaimable page cache does not count
    assert snapshot.cgroup_headroom_bytes == GIB // 2 + GIB // 4
    assert snapshot.total_bytes == GIB + GIB // 2
    (service / "memory.max").write_text("max")
    (service / "memory.high").write_text("max")
    assert MemoryProbe(root, proc_self_cgroup).snapshot().cgroup_limit_bytes == 4 * GIB  # the parent's limit binds
    proc_self_cgroup.write_text("0::/\n")
    assert MemoryProbe(root, proc_self_cgroup).snapshot().cgroup_limit_bytes is None
    # Page cache a runner maps (its weights) is not reclaimable: it counts.
    proc_self_cgroup.write_text("0::/system.slice/emberd.service\n")
    (service / "memory.stat").write_text(f"anon {GIB // 2}\nfile {GIB // 4}\nfile_mapped {GIB // 8}\n")
    assert MemoryProbe(root, proc_self_cgroup).snapshot().cgroup_used_bytes == GIB - GIB // 8


def test_the_probe_reads_a_v1_memory_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    own = root / "memory" / "emberd"
    stat = f"cache 100\nrss {GIB // 8}\nhierarchical_memory_limit {GIB}\ntotal_cache {GIB // 16}\n"
    write_files(own, {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": str(GIB // 4)})
    (own / "memory.stat").write_text(stat)
    proc_self_cgroup = tmp_path / "cgroup-of-self"
    proc_self_cgroup.write_text("4:memory:/emberd\n0::/\n")
    snapshot = MemoryProbe(root, proc_self_cgroup).snapshot()
    assert (snapshot.cgroup_limit_bytes, snapshot.cgroup_used_bytes) == (GIB, GIB // 4 - GIB // 16)
    (own / "memory.stat").write_text(stat.replace(str(GIB), "9223372036854771712"))
    assert MemoryProbe(root, proc_self_cgroup).snapshot().cgroup_limit_bytes is None  # v1's "unlimited"
    (own / "memory.stat").write_text(stat + f"total_mapped_file {GIB // 32}\n")
    assert MemoryProbe(root, proc_self_cgroup).snapshot().cgroup_used_bytes == GIB // 4 - GIB // 32


def test_the_probe_without_a_cgroup_is_the_machine(tmp_path: Path) -> None:
    snapshot = MemoryProbe(tmp_path / "none", tmp_path / "no-proc-file").snapshot()
    assert snapshot.cgroup_limit_bytes is None and snapshot.total_bytes > 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GIB),
        ("4G", 4 * GIB),
        ("4GB", 4_000_000_000),
        ("512MiB", 512 << 20),
        ("0", 0),
        ("1.5g", 3 * GIB // 2),
    ],
)
def test_parse_size_bytes(text: str, expected: int) -> None:
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4 XB", "-1G", "4GiBs"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size_bytes(text)


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


_LOADED = LoadOptions(num_ctx=0, batch_tokens=512, num_thread=0, num_gpu=-1, main_gpu=0, use_mmap=True)


@pytest.mark.parametrize(
    ("changes", "wanted_limit", "expected"),
    [
        ({}, 512, False),
        ({"num_ctx": 256}, 256, False),  # shorter: cut per request
        ({"num_ctx": 512}, 512, False),  # the same effective context
        ({"num_ctx": 1024}, 1024, True),  # longer than the runner's
        ({"num_thread": 1}, 512, False),  # live: llama_set_n_threads
        ({"batch_tokens": 2048}, 512, False),  # live: the runner's own budget
        ({"num_gpu": 0}, 512, True),
        ({"main_gpu": 1}, 512, True),
        ({"use_mmap": False}, 512, True),
    ],
)
def test_needs_new_runner(changes: dict[str, Any], wanted_limit: int, expected: bool) -> None:
    wanted = dataclasses.replace(_LOADED, **changes)
    assert needs_new_runner(_LOADED, 512, wanted, wanted_limit) is expected


@pytest.mark.parametrize(
    ("causal", "pooling", "expected"),
    [
        (True, 3, True),  # LAST: the last ubatch holds the last token
        (True, 1, False),  # MEAN would average the last ubatch only
        (True, 2, False),  # CLS would take the last ubatch's first token
        (True, 0, False),  # NONE: not an embedder
        (False, 3, False),  # non-causal attention needs the whole sequence in one ubatch
        (False, 1, False),
    ],
)
def test_only_causal_last_token_pooling_splits_across_ubatches(causal: bool, pooling: int, expected: bool) -> None:
    from daemon.options import splits_across_ubatches

    assert splits_across_ubatches(causal, pooling) is expected


@pytest.mark.parametrize(
    ("num_ctx", "batch", "trained", "splits", "expected"),
    [
        # (n_ctx, n_batch, n_ubatch, batch_tokens, limit_tokens)
        (0, 512, 2048, True, (2048, 2048, 512, 512, 2048)),  # the ubatch is the budget
        (0, 512, 2048, False, (2048, 2048, 2048, 512, 2048)),  # the ubatch holds the longest input
        (0, 512, 32768, True, (32768, 32768, 512, 512, 32768)),
        (0, 128, 512, True, (512, 512, 128, 128, 512)),
        (256, 512, 2048, True, (512, 512, 512, 512, 256)),  # a context shorter than the budget
        (0, 1024, 512, True, (1024, 1024, 1024, 1024, 512)),
    ],
)
def test_llama_params_split_a_causal_last_token_model_over_ubatches_of_the_budget(
    num_ctx: int, batch: int, trained: int, splits: bool, expected: tuple[int, int, int, int, int]
) -> None:
    params = llama_params(LoadOptions(num_ctx, batch, 2, 0, 0, True), trained, 4, splits)
    assert (params.n_ctx, params.n_batch, params.n_ubatch, params.batch_tokens, params.limit_tokens) == expected


def _qwen3_shape(
    n_embd: int, layers: int, q_width: int, kv_width: int, n_vocab: int = 262, file_bytes: int = 0
) -> ModelShape:
    return ModelShape(file_bytes, n_embd, 2 * n_embd, n_vocab, n_layer=layers, q_width=q_width, kv_width=kv_width)


@pytest.mark.parametrize(
    ("shape", "logged_kv_mib", "logged_compute_mib"),
    [
        # llama.cpp's logged sizes for tests.tiny_models.make_tiny_causal_gguf shapes, n_ctx 2048, n_ubatch 512.
        (_qwen3_shape(64, 2, 64, 64), 0.50, 3.01),  # the defaults
        (_qwen3_shape(64, 8, 512, 1024), 32.0, 7.14),  # 8 heads of 64, as many KV heads
        (_qwen3_shape(256, 2, 64, 64), 0.50, 6.64),  # 2 heads of 32, one KV head
        (_qwen3_shape(256, 2, 256, 256, n_vocab=30262), 2.00, 61.62),  # the logits are the widest stage
    ],
)
def test_a_causal_models_kv_cache_and_compute_buffer_match_what_llama_cpp_allocates(
    shape: ModelShape, logged_kv_mib: float, logged_compute_mib: float
) -> None:
    from daemon.memory import compute_buffer_bytes, kv_cache_bytes

    assert kv_cache_bytes(shape, 2048) == round(logged_kv_mib * (1 << 20))
    assert kv_cache_bytes(shape, 1500) == kv_cache_bytes(shape, 1536)  # padded to 256 cells
    compute = compute_buffer_bytes(shape, 512, 256, n_kv=2048)
    assert 0.95 <= compute / (logged_compute_mib * (1 << 20)) <= 1.15


def test_a_split_decode_grows_the_output_buffer_but_not_the_ubatch() -> None:
    from daemon.memory import kv_cache_bytes

    shape = _qwen3_shape(1024, 28, 2048, 2048, n_vocab=151669, file_bytes=600 << 20)
    encoder = dataclasses.replace(shape, n_layer=0, q_width=0, kv_width=0)
    # The KV cache is held from load on (llama.cpp zeroes it when it makes the context).
    assert kv_cache_bytes(shape, 8192) == 2 * 28 * 2048 * 8192
    assert held_after_bytes(shape, 8192, 0) - held_after_bytes(encoder, 8192, 0) == 939_524_096
    # A decode of 8,192 tokens in ubatches of 512: every token is an output row, but the compute
    # buffer is one ubatch's, its mask over the 8,192 cached tokens.
    split = held_after_bytes(shape, 8192, 8192, n_ubatch=512)
    one_ubatch = held_after_bytes(shape, 8192, 512, n_ubatch=512)
    # 7,680 more output rows of 4 x (151,669 + 1,024) bytes, and the mask's 2 x 7,680 x 512.
    assert split - one_ubatch == 4_690_728_960 + 7_864_320
    assert held_after_bytes(shape, 8192, 8192) - split > 4e9  # what a single 8,192-token ubatch would take
    # A causal model's worst case is a whole batch: 28 MiB, 600 MiB of weights, 160 x 151,669 of vocabulary,
    # the KV cache, 8,192 output rows, a compute buffer of 2 x 8,192 x 512 + 4 x 512 x (151,669 + 1,024).
    assert estimate_runner(shape, 8192, 512).worst_bytes == split == 6_946_844_960
    # An encoder's is one ubatch: 512 rows, 2 x 512 x 512 + 4 x 512 x 64 + 4 x 512 x 6 x 1,024.
    assert estimate_runner(encoder, 8192, 512).worst_bytes == 1_008_726_304


def test_the_shape_of_a_causal_model_has_its_kv_cache_and_an_encoders_has_none(tmp_path: Path) -> None:
    from daemon.gguf_info import read_gguf_facts
    from tests.tiny_models import make_tiny_causal_gguf

    facts = read_gguf_facts(make_tiny_causal_gguf(tmp_path / "causal.gguf", hidden=64, heads=4, kv_heads=2))
    shape = ModelShape.of(facts, 1000)
    assert (shape.n_layer, shape.q_width, shape.kv_width, shape.n_ff, shape.n_vocab) == (2, 64, 64, 128, 262)
    # A manifest from before the attention's shape was kept: plain multi-head attention, the widest.
    old = dataclasses.replace(facts, head_count=0, head_count_kv=0, key_length=0, value_length=0)
    assert (ModelShape.of(old, 1000).q_width, ModelShape.of(old, 1000).kv_width) == (64, 128)
    encoder = dataclasses.replace(facts, causal_attention=False)
    assert (ModelShape.of(encoder, 1000).n_layer, ModelShape.of(encoder, 1000).kv_width) == (0, 0)


@pytest.mark.parametrize(
    ("n_vocab", "expected"),
    [
        (0, 512),  # not known
        (100, 512),  # the tiny test model
        (30522, 256),  # all-MiniLM, nomic-embed-text: 31 MiB of output buffer
        (65536, 128),
        (250002, 128),  # bge-m3: never below the floor
    ],
)
def test_auto_batch_tokens(n_vocab: int, expected: int) -> None:
    assert auto_batch_tokens(n_vocab) == expected


def test_an_automatic_budget_is_resolved_from_the_vocabulary() -> None:
    params = llama_params(LoadOptions(0, 0, 2, 0, 0, True), 512, 6, n_vocab=30522)
    assert (params.batch_tokens, params.n_ubatch, params.limit_tokens) == (256, 512, 512)
    explicit = llama_params(LoadOptions(0, 384, 2, 0, 0, True), 512, 6, n_vocab=30522)
    assert explicit.batch_tokens == 384


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([2339, 2003], [CLS, 2339, 2003, SEP]),  # bare ids are wrapped like a text's tokens
        ([CLS, 2339, 2003, SEP], [CLS, 2339, 2003, SEP]),  # a tokenizer's output is not wrapped again
        ([CLS, 2339], [CLS, 2339, SEP]),
        ([2339, SEP], [CLS, 2339, SEP]),
        ([CLS], [CLS, SEP]),
        ([], [CLS, SEP]),
    ],
)
def test_wrap_token_ids(ids: list[int], expected: list[int]) -> None:
    assert wrap_token_ids(ids, [CLS], [SEP]) == expected


def test_wrap_token_ids_without_special_tokens() -> None:
    assert wrap_token_ids([5, 6], [], []) == [5, 6]


@pytest.mark.parametrize(
    ("length", "limit", "expected_windows"),
    [
        (10, 16, 1),  # fits: itself
        (16, 16, 1),
        (17, 16, 2),  # 15 content tokens, 14 a window, stride 13 (overlap 1)
        (100, 16, 8),
    ],
)
def test_split_windows_cover_the_input_with_overlap(length: int, limit: int, expected_windows: int) -> None:
    tokens = [CLS, *range(1000, 1000 + length - 2), SEP]
    windows = split_windows(tokens, 1, 1, limit)
    assert len(windows) == expected_windows
    assert all(len(window) <= limit and window[0] == CLS and window[-1] == SEP for window in windows)
    contents = [window[1:-1] for window in windows]
    assert sorted({token for content in contents for token in content}) == tokens[1:-1]  # nothing lost
    overlap = window_overlap_tokens(limit - 2)
    for previous, following in itertools.pairwise(contents):
        assert previous[len(previous) - overlap :] == following[:overlap]
    if expected_windows == 1:
        assert windows == [tokens]


def test_window_overlap_is_an_eighth_of_a_window() -> None:
    assert (window_overlap_tokens(510), window_overlap_tokens(14), window_overlap_tokens(7)) == (63, 1, 0)
    with pytest.raises(ContextExceeded):
        split_windows([CLS, 5, 6, SEP], 1, 1, 2)
