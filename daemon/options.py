"""Runner options: Ollama's request `options` + the daemon's settings -> how llama.cpp is loaded.

Pure functions only, so the mapping (num_gpu -> n_gpu_layers and friends) is table-tested on any
machine, GPU or not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from daemon.config import Settings
from daemon.errors import InvalidInput

log = logging.getLogger(__name__)

# Options that change how a runner is loaded, and the JSON type each must have.
_LOAD_OPTION_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_batch": int,
    "num_thread": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
}
# Generation options Ollama clients send along; meaningless for embeddings, accepted silently.
_IGNORED_OPTIONS = {
    "temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "num_predict", "num_keep",
    "repeat_last_n", "repeat_penalty", "presence_penalty", "frequency_penalty", "stop",
    "penalize_newline", "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z", "low_vram",
    "f16_kv", "vocab_only", "use_mlock", "numa", "logits_all", "embedding_only",
}  # fmt: skip


# A runner's n_seq_max is min(n_batch, this): llama.cpp's output buffer starts at n_seq_max rows of
# n_vocab floats, all touched at once (30 MiB for all-MiniLM at 256 rows, 7.5 MiB at 64).
MAX_SEQUENCES_PER_DECODE = 64
# The quick lane: a second llama.cpp context of this many tokens (and at most this many sequences),
# on one thread, that decodes short inputs while the main context runs a long decode, so a search
# box's query does not wait for a 400-token document (see batching.quick_lane_opens). Its buffers cost
# about 9 MiB for all-MiniLM.
QUICK_LANE_TOKENS = 64
QUICK_LANE_SEQUENCES = 16

_OPTION_MAXIMUMS = {"num_batch": 16384, "num_thread": 512}


@dataclass(frozen=True)
class LoadOptions:
    """A request's runner options over the daemon's defaults. Only some of them fix a runner
    (see needs_new_runner); threads and the token budget change on a live one."""

    num_ctx: int  # 0 = the model's trained context
    batch_tokens: int  # token budget of one llama.cpp decode; 0 = automatic (auto_batch_tokens)
    num_thread: int  # 0 = automatic: the scheduler shares the CPUs among busy runners
    num_gpu: int  # layers to offload; -1 = all
    main_gpu: int
    use_mmap: bool
    quick_lane: bool = True  # a second context for short inputs while a long decode runs


def available_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def parse_options(raw: Any) -> dict[str, Any]:
    """Validate a request's `options` object; unknown keys are logged and dropped."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput("options must be an object")
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue  # clients (LangChain) send every option, null meaning "unset", as Go reads it
        expected = _LOAD_OPTION_TYPES.get(key)
        if expected is None:
            if key not in _IGNORED_OPTIONS:
                log.info("ignoring unknown option %r", key)
            continue
        if expected is int:
            # JSON has one number type; Ollama accepts 2048.0 for an int option, so do we.
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f'option "{key}" must be an integer, got {type(value).__name__}')
        elif not isinstance(value, bool):
            raise InvalidInput(f'option "{key}" must be true or false, got {type(value).__name__}')
        options[key] = value
    for key in ("num_ctx", "num_batch", "num_thread", "main_gpu"):
        if options.get(key, 0) < 0:
            raise InvalidInput(f'option "{key}" must not be negative')
    if options.get("num_batch") == 0:
        raise InvalidInput('option "num_batch" must be positive')
    # Bounds that keep one request from making a runner allocate or spawn without limit.
    for key, maximum in _OPTION_MAXIMUMS.items():
        if options.get(key, 0) > maximum:
            raise InvalidInput(f'option "{key}" must be at most {maximum}')
    return options


def resolve_load_options(settings: Settings, options: Mapping[str, Any]) -> LoadOptions:
    """Request options over the daemon's defaults."""
    num_thread = options.get("num_thread") or settings.num_thread
    return LoadOptions(
        num_ctx=options.get("num_ctx", settings.num_ctx),
        batch_tokens=options.get("num_batch", settings.batch_tokens),
        num_thread=num_thread,
        num_gpu=options.get("num_gpu", settings.num_gpu),
        main_gpu=options.get("main_gpu", settings.main_gpu),
        use_mmap=options.get("use_mmap", settings.use_mmap),
        quick_lane=settings.quick_lane,
    )


def context_limit(num_ctx: int, trained_context: int) -> int:
    """Tokens one input may have: num_ctx capped at the trained context (no hidden 2048 cap)."""
    if trained_context <= 0:
        return num_ctx if num_ctx > 0 else 512
    if num_ctx <= 0:
        return trained_context
    return min(num_ctx, trained_context)


def n_gpu_layers(num_gpu: int, block_count: int) -> int:
    """Ollama's num_gpu (layers, -1 = all) as llama.cpp's n_gpu_layers (-1 = all)."""
    if num_gpu < 0:
        return -1
    # +1 covers the output layer, which llama.cpp counts as a layer of its own.
    return min(num_gpu, block_count + 1) if block_count > 0 else num_gpu


@dataclass(frozen=True)
class LlamaParams:
    """The llama.cpp model and context parameters a runner is created with."""

    n_gpu_layers: int
    main_gpu: int
    use_mmap: bool
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    limit_tokens: int  # longest single input, special tokens included
    batch_tokens: int  # token budget of one decode
    quick_lane_tokens: int = 0  # the quick lane's context (see QUICK_LANE_TOKENS); 0: no quick lane
    vocab_only: bool = False  # the tokenizer alone: no weights, no context (tokenize/detokenize)
    append_eos: bool = (
        False  # the card ends inputs with EOS (see daemon.prompts); the runner adds it if the GGUF does not
    )


# gguf.PoolingType.LAST (options stays free of the gguf package).
_POOLING_LAST = 3


def splits_across_ubatches(causal_attention: bool, pooling_type: int) -> bool:
    """Whether llama.cpp embeds a sequence exactly when it is decoded over several ubatches.

    Only with causal attention does llama.cpp decode a sequence in parts (earlier tokens stay in the
    KV cache; non-causal attention needs all of them in one ubatch). Its pooling runs per ubatch and
    each ubatch overwrites the sequence's vector, so only LAST pooling (the last ubatch holds the
    last token) survives; MEAN and CLS would pool the last ubatch only (measured: cosine 0.96 for
    MEAN and 0.004 for CLS against the one-ubatch vector, 1.0 for LAST)."""
    return causal_attention and pooling_type == _POOLING_LAST


# The automatic decode budget: at most this many tokens, and fewer for large vocabularies, so that
# llama.cpp's output buffer (n_vocab floats for every token of a decode, touched and kept) stays
# under OUTPUT_BUFFER_BYTES; never fewer than MIN_AUTO_BATCH_TOKENS.
MAX_AUTO_BATCH_TOKENS = 512
MIN_AUTO_BATCH_TOKENS = 128
OUTPUT_BUFFER_BYTES = 32 * 1024 * 1024


def auto_batch_tokens(n_vocab: int) -> int:
    """The decode budget when none is set: the largest power of two up to MAX_AUTO_BATCH_TOKENS whose
    output buffer fits OUTPUT_BUFFER_BYTES (256 for all-MiniLM's 30,522 tokens: 31 MiB, where 512
    held 61 MiB and was no faster), at least MIN_AUTO_BATCH_TOKENS (250k-token vocabularies)."""
    budget = MAX_AUTO_BATCH_TOKENS
    while budget > MIN_AUTO_BATCH_TOKENS and 4 * n_vocab * budget > OUTPUT_BUFFER_BYTES:
        budget //= 2
    return budget


def llama_params(
    load: LoadOptions, trained_context: int, block_count: int, splits: bool = False, n_vocab: int = 0
) -> LlamaParams:
    """`splits`: the model embeds a sequence decoded over several ubatches exactly (see
    splits_across_ubatches). `n_vocab` sizes the automatic decode budget (0: not known)."""
    if load.batch_tokens == 0:
        load = replace(load, batch_tokens=auto_batch_tokens(n_vocab))
    limit = context_limit(load.num_ctx, trained_context)
    # The context and one decode hold the longest input. An encoder sees a whole sequence in one
    # ubatch, so its ubatch must hold it too; the per-decode budget stays small because attention
    # cost grows with its square. A model that splits decodes its longest input in ubatches of the
    # budget instead: its compute buffer is sized for the budget, not for the longest input.
    capacity = max(limit, load.batch_tokens)
    return LlamaParams(
        n_gpu_layers=n_gpu_layers(load.num_gpu, block_count),
        main_gpu=load.main_gpu,
        use_mmap=load.use_mmap,
        n_ctx=capacity,
        n_batch=capacity,
        n_ubatch=load.batch_tokens if splits else capacity,
        n_threads=load.num_thread or available_cpu_count(),
        n_threads_batch=load.num_thread or available_cpu_count(),
        limit_tokens=limit,
        batch_tokens=min(load.batch_tokens, capacity),
        # Only beside a context that holds a whole lane: llama.cpp aborts building a lane smaller than
        # QUICK_LANE_TOKENS, or not a multiple of its sequences (num_ctx 40, num_batch 32), and a
        # context that small decodes quickly anyway.
        quick_lane_tokens=QUICK_LANE_TOKENS if load.quick_lane and capacity >= QUICK_LANE_TOKENS else 0,
    )


def needs_new_runner(loaded: LoadOptions, loaded_limit: int, wanted: LoadOptions, wanted_limit: int) -> bool:
    """Whether a request needs another runner than the loaded one, by effective values: a longer
    context than the runner's, or other weights placement (num_gpu, main_gpu, use_mmap). A shorter
    context is cut per request; threads and the token budget apply to the live runner."""
    placement_loaded = (loaded.num_gpu, loaded.main_gpu, loaded.use_mmap)
    placement_wanted = (wanted.num_gpu, wanted.main_gpu, wanted.use_mmap)
    return wanted_limit > loaded_limit or placement_wanted != placement_loaded


def thread_share(cpus: int, busy_runners: int) -> int:
    """Threads for each automatic runner while `busy_runners` of them work at once.

    Two llama.cpp runners using every core each collapse to a fraction of one runner's throughput
    (measured: 77 passages/s alone, 45/s for two busy runners with 2 threads each, 91/s with 1 each),
    so busy runners split the cores; a runner working alone gets them all.
    """
    return max(1, cpus // max(1, busy_runners))
