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
    # KV cache: llama.cpp runs most without one; see kv_unread for those it gives one).
    n_layer: int = 0
    q_width: int = 0  # query width of a layer: heads x key length
    kv_width: int = 0  # key + value width of a layer, for each cached token
    mean_pooling: bool = False  # pooled through a ubatch_tokens x n_seq_max matrix
    # The runner hands the logits part of llama.cpp's output buffer back after each decode that grew
    # it (an encoder on a CPU, see runner.engine.writes_no_logits): known from its ready frame.
    gives_back_logits: bool = False
    # The family's graph (general.architecture, a key of ENCODER_GRAPHS; "": BERT's), and what of its
    # header sizes that graph beyond the widths above.
    architecture: str = ""
    # An encoder that llama.cpp still gives a KV cache (of n_layer x kv_width), which its graph
    # never reads: it decodes like an encoder, in one ubatch (llama-embed, t5encoder).
    kv_unread: bool = False
    attention_masks: int = 1  # 2 with local (sliding-window) layers beside global ones
    n_head: int = 0  # attention heads (T5's relative position bias is per head)
    n_expert_used: int = 0  # a mixture-of-experts layer's experts per token

    @classmethod
    def of(cls, facts: GGUFFacts, file_bytes: int) -> ModelShape:
        n_ff = facts.feed_forward_length or 4 * facts.embedding_length  # BERT's usual width, if unknown
        architecture = facts.architecture
        masks = 2 if _has_local_layers(architecture, facts.sliding_window) else 1
        # A manifest from before the experts' count was kept: nomic-embed-text-v2-moe's 2.
        experts = facts.expert_used_count or (2 if architecture in _MOE_ENCODERS else 0)
        if not (facts.causal_attention or architecture in ENCODERS_WITH_KV_CACHE):
            return cls(
                file_bytes,
                facts.embedding_length,
                n_ff,
                facts.vocab_size,
                mean_pooling=facts.pooling_type == PoolingType.MEAN,
                architecture=architecture,
                attention_masks=masks,
                n_head=facts.head_count,
                n_expert_used=experts,
            )
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
            architecture=architecture,
            kv_unread=not facts.causal_attention,
            attention_masks=masks,
            n_head=facts.head_count,
            n_expert_used=experts,
        )

    @property
    def splits(self) -> bool:
        """Whether the model attends causally over its KV cache: its decodes may span ubatches."""
        return self.kv_width > 0 and not self.kv_unread


# Non-causal architectures llama.cpp still makes a KV cache for (llama_model::create_memory gives
# none only to the encoders it lists: BERT and its kin, modern-bert, gemma-embedding, ...). It is
# allocated and zeroed with the context, so it counts from load on, though the graph never reads it.
ENCODERS_WITH_KV_CACHE = frozenset({"llama-embed", "t5encoder"})
_MOE_ENCODERS = frozenset({"nomic-bert-moe"})


def _has_local_layers(architecture: str, sliding_window: int) -> bool:
    """Whether llama.cpp builds a second attention mask (its sliding window's) beside the global
    one: gemma-embedding always (llama.cpp sets its window type whatever the header says),
    modern-bert when its header gives a window."""
    return architecture == "gemma-embedding" or (architecture == "modern-bert" and sliding_window > 0)


@dataclass(frozen=True)
class EncoderGraph:
    """What llama.cpp's graph of an encoder family holds at once, per token of a ubatch, in floats
    (f32): the widest of its attention stage (attention_embd x n_embd) and its feed-forward stage
    (ffn_widths x n_ff + ffn_embd x n_embd). Measured by loading tiny GGUFs of each family
    (tests/family_ggufs.py) over hidden 64 to 512 and n_ff of 1 to 8 x hidden, four layers or more
    (with two, llama.cpp's allocator reuses a mask that its last layer no longer reads): the
    logged compute buffer, less the masks and the pooling matrix, is this within 1%, except where
    the two stages are about as wide (n_ff about n_embd), where it is up to 9% less."""

    attention_embd: float
    ffn_widths: int  # n_ff-wide activations held together at the feed-forward stage (0: n_expert_used)
    ffn_embd: int = 3  # the residual stream, the stage's input and its output beside them


# Why each family's figures are what they are (what llama.cpp's src/models/<arch>.cpp builds):
ENCODER_GRAPHS: dict[str, EncoderGraph] = {
    # Separate Q, K and V projections, learned positions: 5.5 x n_embd measured, 6 counted (the
    # figure all-MiniLM's estimate was checked with). A GELU feed-forward: its up projection, then
    # the activation in place.
    "bert": EncoderGraph(6, 1),
    # Like BERT with ALiBi (a bias the attention kernel applies: no tensor of its own) and GEGLU:
    # the up projection is 2 x n_ff wide (up and gate in one), then the n_ff product.
    "jina-bert-v2": EncoderGraph(5.5, 3),
    # One fused QKV projection (3 x n_embd), its Q, K and V views made contiguous and rotated
    # (RoPE): 7.5 x n_embd at the attention stage. A plain GELU feed-forward.
    "jina-bert-v3": EncoderGraph(7.5, 1),
    # Fused QKV and RoPE; SwiGLU with separate up and gate projections and their product: 3 x n_ff.
    "nomic-bert": EncoderGraph(7.5, 3),
    "neo-bert": EncoderGraph(7.5, 3),  # fused QKV, RoPE; SwiGLU from one 2 x n_ff projection
    "modern-bert": EncoderGraph(7.5, 3),  # fused QKV, RoPE; GEGLU from one 2 x n_ff projection
    # Every other layer a mixture of experts: each token's n_expert_used experts' up projections
    # (n_expert_used x n_ff), their outputs and weights (5 x n_embd with the stream); the dense
    # layers between are plain GELU (n_ff + 3 x n_embd), never the widest.
    "nomic-bert-moe": EncoderGraph(7.5, 0, 5),
    # Separate Q, K, V projections with RoPE (and gemma's Q/K norms): 6 x n_embd; gated
    # feed-forwards (SwiGLU, gemma's GELU-gated): gate, up and product, 3 x n_ff.
    "eurobert": EncoderGraph(6, 3),
    "llama-embed": EncoderGraph(6, 3),
    "gemma-embedding": EncoderGraph(6, 3),
    # T5's attention is not flash attention (llama.cpp's kernel takes no position bias): see
    # _relative_attention_floats. Its feed-forward is gated GELU.
    "t5encoder": EncoderGraph(5, 3),
}


def _relative_attention_floats(shape: ModelShape, ubatch_tokens: int) -> int:
    """Per token, what T5's attention holds: the position bias looked up for every pair of tokens
    and head (n_head x n_tokens floats, kept for every layer: the first layer's table serves all),
    the scores of the layer (as many) and their soft-max output (as many)."""
    return 3 * max(shape.n_head, 1) * ubatch_tokens


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

    An encoder (no KV cache, or one its graph never reads): the f16 attention mask (ubatch_tokens x
    ubatch_tokens padded to 64; a second one for a family with local layers, see
    _has_local_layers), MEAN pooling's matrix (ubatch_tokens x n_seq_max f32) and the activations of
    the widest stage, by family (ENCODER_GRAPHS). T5 adds its relative positions' bucket of every
    pair of tokens (int32) and its per-head bias and scores (_relative_attention_floats). Within
    10% of llama.cpp's logged size for every family tests/test_family_memory.py loads.

    A causal model: the f16 mask over the n_kv cached tokens the ubatch attends to, and the widest
    stage: the gated feed-forward (gate, up and product, 3 x n_ff, beside 4 x n_embd), attention
    (query, keys and values of the ubatch), or the output projection (n_vocab floats a token:
    llama.cpp computes logits even for embeddings); MEAN pooling adds its matrix, as for an
    encoder. Fitted to llama.cpp's logged sizes for qwen3 shapes: within 1% for n_ff of 3 x n_embd
    and more, up to 25% over for n_ff of 2 x n_embd or less (llama.cpp's allocator fits part of that
    stage in freed blocks); the vocabulary-bound case within 0.1%; 43% over for attention sixteen
    times wider than the model."""
    padded = _pad(ubatch_tokens, UBATCH_PAD)
    if not shape.splits:
        graph = ENCODER_GRAPHS.get(shape.architecture, ENCODER_GRAPHS["bert"])
        ffn_widths = graph.ffn_widths or shape.n_expert_used
        widest = max(graph.attention_embd * shape.n_embd, ffn_widths * shape.n_ff + graph.ffn_embd * shape.n_embd)
        masks = 2 * padded * ubatch_tokens * shape.attention_masks
        if shape.architecture == "t5encoder":
            # The bucket of each pair of tokens (int32), and the bias and scores beside the stage.
            masks += 4 * padded * ubatch_tokens
            widest = max(_relative_attention_floats(shape, ubatch_tokens) + graph.attention_embd * shape.n_embd, widest)
        # MEAN pooling's matrix; a shape made without its architecture is counted with it (BERT's).
        pooling = 4 * ubatch_tokens * n_seq_max if shape.mean_pooling or not shape.architecture else 0
        return masks + pooling + int(4 * ubatch_tokens * widest)
    widest = max(3 * shape.n_ff + 4 * shape.n_embd, 2 * (shape.q_width + shape.kv_width), shape.n_vocab + shape.n_embd)
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
    largest = n_batch if shape.splits else n_ubatch
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
