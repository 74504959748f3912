"""What a runner takes: its memory at load and at its largest decode, from the model's shape and
llama.cpp's buffers, and the tokens of the decodes that size it. Pure: no I/O, table-tested.

The token counts named here (largest_decode_tokens, allowance_tokens, ...) mean what
daemon.token_counts says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gguf import PoolingType

from daemon.gguf_info import GGUFFacts
from daemon.options import MAX_SEQUENCES_PER_DECODE, QUICK_LANE_SEQUENCES, LlamaParams, LoadOptions

MIB = 1024 * 1024
# A runner is a Python interpreter with numpy and llama.cpp, before any model (measured: the tiny
# model's runner adds 26 MB to its cgroup).
RUNNER_BASE_BYTES = 28 * MIB
# llama.cpp's vocabulary tables, per token (4.5 MiB for all-MiniLM's 30,522 tokens).
VOCAB_BYTES_PER_TOKEN = 160
# Special tokens a tokenizer may add around an input (BERT adds 2, some add a BOS and an EOS).
SPECIAL_TOKENS_BOUND = 8


@dataclass(frozen=True)
class ModelShape:
    """What the footprint estimate needs, all from the GGUF header."""

    file_bytes: int
    n_embd: int
    n_ff: int  # feed-forward width
    n_vocab: int
    # A causal model's attention, for its KV cache and compute buffer (0: an encoder, which has no
    # KV cache: llama.cpp runs it without one).
    n_layer: int = 0
    q_width: int = 0  # query width of a layer: heads x key length
    kv_width: int = 0  # key + value width of a layer, for each cached token
    mean_pooling: bool = False  # pooled through a ubatch_tokens x n_seq_max matrix (a causal model's)
    # The runner hands the logits part of llama.cpp's output buffer back after each decode that grew
    # it (an encoder on a CPU, see runner.engine.writes_no_logits): known from its ready frame.
    gives_back_logits: bool = False

    @classmethod
    def of(cls, facts: GGUFFacts, file_bytes: int) -> ModelShape:
        n_ff = facts.feed_forward_length or 4 * facts.embedding_length  # BERT's usual width, if unknown
        if not facts.causal_attention:
            return cls(file_bytes, facts.embedding_length, n_ff, facts.vocab_size)
        # A manifest written before the attention's shape was kept: plain multi-head attention (no
        # grouped keys), which is the widest cache the model could have.
        heads = facts.head_count or 1
        head_width = facts.embedding_length // heads
        kv_heads = facts.head_count_kv or heads
        key_length = facts.key_length or head_width
        value_length = facts.value_length or head_width
        return cls(
            file_bytes,
            facts.embedding_length,
            n_ff,
            facts.vocab_size,
            n_layer=facts.block_count,
            q_width=heads * key_length,
            kv_width=kv_heads * (key_length + value_length),
            mean_pooling=facts.pooling_type == PoolingType.MEAN,
        )


@dataclass(frozen=True)
class RunnerEstimate:
    at_load_bytes: int  # after load, and while inputs stay short
    worst_bytes: int  # after a decode of n_ubatch tokens: the most the runner can grow to


# llama.cpp pads a KV cache to a multiple of 256 cells, and a ubatch's rows of the mask to 64.
KV_CELL_PAD = 256
UBATCH_PAD = 64


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def kv_cache_bytes(shape: ModelShape, n_ctx: int) -> int:
    """A causal model's KV cache: f16 keys and values for every cell of the context, in every layer.
    llama.cpp zeroes it when the context is made, so all of it is held from load on (measured: a
    context's creation adds what it logs as its KV buffer)."""
    return 2 * shape.n_layer * shape.kv_width * _pad(n_ctx, KV_CELL_PAD)


def compute_buffer_bytes(shape: ModelShape, ubatch_tokens: int, n_seq_max: int, n_kv: int = 0) -> int:
    """llama.cpp's CPU compute buffer (flash attention) for a ubatch of `ubatch_tokens`.

    An encoder (no KV cache): the f16 attention mask (ubatch_tokens x ubatch_tokens padded to 64),
    the pooling matrix (ubatch_tokens x n_seq_max f32) and the activations of the widest stage
    (attention about 6 x n_embd floats a token; feed-forward n_ff + 3 x n_embd). It matched
    llama.cpp's logged size within 0.1%.

    A causal model: the f16 mask over the n_kv cached tokens the ubatch attends to, and the widest
    stage: feed-forward, attention (query, keys and values of the ubatch), or the output projection
    (n_vocab floats a token: llama.cpp computes logits even for embeddings); MEAN pooling adds its
    matrix, as for an encoder. Fitted to llama.cpp's
    logged sizes for qwen3 shapes: within 20%, the vocabulary-bound case within 0.1%; 43% over for
    attention sixteen times wider than the model."""
    padded = _pad(ubatch_tokens, UBATCH_PAD)
    if shape.kv_width == 0:
        widest = max(6 * shape.n_embd, shape.n_ff + 3 * shape.n_embd)
        return 2 * padded * ubatch_tokens + 4 * ubatch_tokens * n_seq_max + 4 * ubatch_tokens * widest
    widest = max(2 * shape.n_ff + 5 * shape.n_embd, 2 * (shape.q_width + shape.kv_width), shape.n_vocab + shape.n_embd)
    pooling = 4 * ubatch_tokens * n_seq_max if shape.mean_pooling else 0
    return 2 * n_kv * padded + pooling + 4 * ubatch_tokens * widest


def output_buffer_bytes(shape: ModelShape, rows: int) -> int:
    """llama.cpp's output buffer: logits (n_vocab floats, allocated even for embeddings) and
    embeddings for `rows` outputs. It starts at n_seq_max rows and grows to the largest decode
    (every token of an embedding decode is an output, however many ubatches it is split into)."""
    return 4 * (shape.n_vocab + shape.n_embd) * rows


def quick_lane_bytes(shape: ModelShape, quick_lane_tokens: int) -> int:
    """The quick lane's context once used (see options.QUICK_LANE_TOKENS): its own output buffer,
    compute buffer and (a causal model) KV cache, for decodes of at most `quick_lane_tokens`; 0 for no
    quick lane. It never grows beyond that: about 9 MiB for all-MiniLM."""
    if not quick_lane_tokens:
        return 0
    return (
        kv_cache_bytes(shape, quick_lane_tokens)
        + output_buffer_bytes(shape, quick_lane_tokens)
        + compute_buffer_bytes(shape, quick_lane_tokens, QUICK_LANE_SEQUENCES, quick_lane_tokens)
    )


def _output_rows(n_batch: int, largest_decode_tokens: int) -> int:
    """The main context's output buffer rows: its n_seq_max at first, then the largest decode."""
    return max(min(n_batch, MAX_SEQUENCES_PER_DECODE), largest_decode_tokens)


def given_back_bytes(shape: ModelShape, n_batch: int, largest_decode_tokens: int, quick_lane_tokens: int = 0) -> int:
    """The logits of the output buffers (main context and quick lane) that a runner which gives
    them back (ModelShape.gives_back_logits) no longer holds after its largest decode."""
    if not shape.gives_back_logits:
        return 0
    return 4 * shape.n_vocab * (_output_rows(n_batch, largest_decode_tokens) + quick_lane_tokens)


def held_after_bytes(
    shape: ModelShape, n_batch: int, largest_decode_tokens: int, n_ubatch: int = 0, quick_lane_tokens: int = 0
) -> int:
    """What a runner holds once its largest decode had `largest_decode_tokens` tokens (0: none yet):
    peak_bytes, less the logits a runner that gives them back handed back after that decode."""
    peak = peak_bytes(shape, n_batch, largest_decode_tokens, n_ubatch, quick_lane_tokens)
    return peak - given_back_bytes(shape, n_batch, largest_decode_tokens, quick_lane_tokens)


def peak_bytes(
    shape: ModelShape, n_batch: int, largest_decode_tokens: int, n_ubatch: int = 0, quick_lane_tokens: int = 0
) -> int:
    """The most a runner holds as its largest decode, of `largest_decode_tokens` tokens (0: none
    yet), runs: the interpreter, the mapped weights, the vocabulary, a causal model's KV cache, the
    output buffer, and the compute buffer as far as that decode touched it. llama.cpp touches its
    buffers lazily and keeps them until the context is renewed or the runner exits; it zeroes the
    whole output buffer each time it grows (see held_after_bytes for what an encoder gives back).

    `n_ubatch` (0: the decode is one ubatch) bounds the compute buffer of a decode that llama.cpp
    splits into ubatches. The context holds n_batch tokens (n_ctx = n_batch: see llama_params).
    `quick_lane_tokens` counts the quick lane's context as used (quick_lane_bytes): a few MiB it
    touches at its first decode, counted from the start."""
    n_seq_max = min(n_batch, MAX_SEQUENCES_PER_DECODE)
    ubatch_tokens = min(largest_decode_tokens, n_ubatch) if n_ubatch else largest_decode_tokens
    # The last ubatch of a decode attends to every token cached before it.
    n_kv = min(_pad(largest_decode_tokens, KV_CELL_PAD), _pad(n_batch, KV_CELL_PAD))
    return (
        RUNNER_BASE_BYTES
        + shape.file_bytes
        + VOCAB_BYTES_PER_TOKEN * shape.n_vocab
        + kv_cache_bytes(shape, n_batch)
        + output_buffer_bytes(shape, _output_rows(n_batch, largest_decode_tokens))
        + compute_buffer_bytes(shape, ubatch_tokens, n_seq_max, n_kv)
        + quick_lane_bytes(shape, quick_lane_tokens)
    )


def estimate_runner(shape: ModelShape, n_batch: int, n_ubatch: int) -> RunnerEstimate:
    """Measured against the cgroup charge with benchmarks/bench_memory.py: 0 to +17% for the tiny
    model, all-MiniLM f16 and q8_0, and generated BERTs of 8k and 32k context. An encoder's largest
    decode is one ubatch; a causal model's is a whole batch, split into ubatches. Both are peaks
    (peak_bytes): what the runner holds as its decodes run."""
    largest = n_batch if shape.kv_width else n_ubatch
    return RunnerEstimate(peak_bytes(shape, n_batch, 0), peak_bytes(shape, n_batch, largest, n_ubatch))


def counted_bytes(
    shape: ModelShape,
    n_batch: int,
    measured_bytes: int,
    largest_decode_tokens: int,
    allowance_tokens: int,
    n_ubatch: int = 0,
    unused_quick_lane_tokens: int = 0,
) -> int:
    """What the scheduler counts for a loaded runner: what it holds now (`measured_bytes`, read
    when its largest decode so far had `largest_decode_tokens` tokens), plus what it may still grow
    to within its allowance, the largest decode memory was set aside for: that decode's peak, since
    the output buffer it grows is zeroed whole before a runner gives its logits back.

    `unused_quick_lane_tokens` is the quick lane of a runner whose quick lane has not decoded yet
    (0: it has, or there is none): llama.cpp touches its buffers at its first decode, so the
    measurement leaves them out, and they are counted here at their peak (quick_lane_bytes) from the
    start, as the load's estimate counted them."""
    quick_lane = quick_lane_bytes(shape, unused_quick_lane_tokens)
    if allowance_tokens <= largest_decode_tokens:
        return measured_bytes + quick_lane
    grown = peak_bytes(shape, n_batch, allowance_tokens, n_ubatch)
    held = held_after_bytes(shape, n_batch, largest_decode_tokens, n_ubatch)
    return measured_bytes + quick_lane + max(0, grown - held)


def _utf8_length(text: str) -> int:
    # ASCII text (most of it) is as long in UTF-8 as in characters: no copy on the request path.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def input_tokens_bound(inputs: Iterable[str | list[int] | dict[str, str]]) -> int:
    """An upper bound on the tokens of the longest input, known before tokenizing: no tokenizer
    makes more tokens of a text than it has UTF-8 bytes, plus the special tokens around it (and
    SentencePiece's leading space). 0 for no inputs."""
    longest = -SPECIAL_TOKENS_BOUND
    for item in inputs:
        if isinstance(item, dict):  # a reranker's pair: both texts, and the separators between them
            length = sum(_utf8_length(text) for text in item.values()) + SPECIAL_TOKENS_BOUND
        else:
            length = _utf8_length(item) if isinstance(item, str) else len(item)
        longest = max(longest, length)
    return longest + SPECIAL_TOKENS_BOUND


def decode_tokens_needed(batch_tokens: int, longest_input_tokens: int, capacity_tokens: int) -> int:
    """The largest decode a request can cause: the runner packs sequences up to its token budget,
    and takes a longer single input alone (see take_batch)."""
    return min(capacity_tokens, max(batch_tokens, longest_input_tokens))


def decode_tokens_for(params: LlamaParams, load: LoadOptions, limit_tokens: int, longest_input_tokens: int) -> int:
    """The largest decode a request can cause on a runner of `params`: its token budget (capped at
    a ubatch), or its longest input, cut at its context, alone in one decode (at most n_batch)."""
    batch_tokens = min(load.batch_tokens or params.batch_tokens, params.n_ubatch)
    longest = min(longest_input_tokens, limit_tokens, params.limit_tokens)
    return decode_tokens_needed(batch_tokens, longest, params.n_batch)


@dataclass(frozen=True)
class ProcessMemory:
    anonymous_bytes: int  # its heap and buffers: memory no other process has, and no file backs
    private_bytes: int  # every page it alone maps, file pages too (psutil's USS)


def runner_footprint_bytes(memory: ProcessMemory, weights_bytes: int, weights_mapped: bool) -> int:
    """What a runner adds to the service's memory: its anonymous memory, plus the weights it must
    keep resident when it maps them (read without mmap, they are part of the anonymous memory).
    Shared libraries are left out: the first runner's pages of libllama are shared by the next, and
    may already sit in the page cache; psutil's RSS counts them in every process."""
    return memory.anonymous_bytes + (weights_bytes if weights_mapped else 0)
