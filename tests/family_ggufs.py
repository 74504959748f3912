"""Tiny random-weight GGUFs of every architecture the pinned llama.cpp embeds with, written directly
with gguf's GGUFWriter: the tensors each loader requires (src/models/<arch>.cpp, create_tensor
without TENSOR_NOT_REQUIRED), under gguf's own names, and the tokenizer the family really uses.

FAMILIES lists them (the key is what `make_family_gguf` takes):

    family            GGUF architecture  tokenizer (tokenizer.ggml.model)       pooling  special tokens added
    bert              bert               WordPiece ("bert")                      mean     [CLS] ... [SEP]
    bert-xlm-roberta  bert               XLM-R SentencePiece unigram ("t5")      cls      <s> ... </s>
    nomic-bert        nomic-bert         WordPiece                               mean     [CLS] ... [SEP]
    nomic-bert-moe    nomic-bert-moe     XLM-R unigram                           mean     <s> ... </s>
    jina-bert-v2      jina-bert-v2       WordPiece                               mean     [CLS] ... [SEP]
    jina-bert-v3      jina-bert-v3       XLM-R unigram                           mean     <s> ... </s>
    modern-bert       modern-bert        byte-level BPE ("gpt2")                 cls      [CLS] ... [SEP]
    neo-bert          neo-bert           WordPiece                               cls      [CLS] ... [SEP]
    eurobert          eurobert           byte-level BPE                          mean     ... <|end_of_text|>
    gemma-embedding   gemma-embedding    SentencePiece BPE ("llama")             mean     <bos> ... <eos>
    qwen3             qwen3              byte-level BPE                          last     ... <|endoftext|>
    t5encoder         t5encoder          T5 unigram ("t5")                       mean     ... </s>
    llama-embed       llama-embed        byte-level BPE                          mean     <|begin_of_text|> ...

Shapes are tiny (hidden 32, 2 layers, a vocabulary of a few hundred tokens) unless `shape` says
otherwise: hidden, layers, heads, kv_heads, ff, filler_tokens (vocabulary tokens no text produces,
to widen it as a real model's is), and for gemma-embedding sliding_window_pattern (an int, a list of
booleans per layer, or None to leave the key out; 2 by default: its 2 layers are one local, one
global). qwen3 is the only causal one.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

# Words the test texts are made of, whole tokens in every vocabulary below.
WORDS = [
    "the", "sky", "is", "blue", "why", "grass", "green", "word", "hello", "world",
    "over", "harbour", "turns", "at", "noon", "and", "grey", "dusk", "a", "of",
]  # fmt: skip
PUNCTUATION = list("?.,!;:'\"()-")
LETTERS = list(string.ascii_lowercase + string.digits)


@dataclass(frozen=True)
class Family:
    """One architecture as the matrix makes it."""

    architecture: str  # general.architecture
    tokenizer: str  # tokenizer.ggml.model
    pooling: PoolingType
    causal: bool = False


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "bert", PoolingType.MEAN),
    "bert-xlm-roberta": Family("bert", "t5", PoolingType.CLS),
    "nomic-bert": Family("nomic-bert", "bert", PoolingType.MEAN),
    "nomic-bert-moe": Family("nomic-bert-moe", "t5", PoolingType.MEAN),
    "jina-bert-v2": Family("jina-bert-v2", "bert", PoolingType.MEAN),
    "jina-bert-v3": Family("jina-bert-v3", "t5", PoolingType.MEAN),
    "modern-bert": Family("modern-bert", "gpt2", PoolingType.CLS),
    "neo-bert": Family("neo-bert", "bert", PoolingType.CLS),
    "eurobert": Family("eurobert", "gpt2", PoolingType.MEAN),
    "gemma-embedding": Family("gemma-embedding", "llama", PoolingType.MEAN),
    "qwen3": Family("qwen3", "gpt2", PoolingType.LAST, causal=True),
    "t5encoder": Family("t5encoder", "t5", PoolingType.MEAN),
    "llama-embed": Family("llama-embed", "gpt2", PoolingType.MEAN),
}


# -- vocabularies ---------------------------------------------------------------------------------


def _filler(count: int) -> list[str]:
    return [f"<filler{index}>" for index in range(count)]


def _wordpiece(writer: GGUFWriter, filler_tokens: int) -> None:
    """A BERT vocabulary as llama.cpp's converter writes it: words with the phantom space "▁" they
    start with, word pieces ("##x") without it, control tokens as they are."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # No piece twice: llama.cpp aborts on a vocabulary that spells a token twice (GGML_ASSERT).
    pieces = list(dict.fromkeys(f"\u2581{word}" for word in WORDS + PUNCTUATION + LETTERS)) + LETTERS
    tokens = specials + pieces + _filler(filler_tokens)
    types = [TokenType.CONTROL] * len(specials) + [TokenType.NORMAL] * (len(tokens) - len(specials))
    types[1] = TokenType.UNKNOWN
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_bos_token_id(2)  # [CLS]
    writer.add_sep_token_id(3)
    writer.add_mask_token_id(4)


def _unigram(writer: GGUFWriter, filler_tokens: int, layout: str) -> None:
    """A SentencePiece unigram vocabulary ("t5" in llama.cpp). `layout` "xlm-roberta": <s> <pad>
    </s> <unk> first, <mask> last, <s> and </s> added (XLM-RoBERTa, bge-m3, nomic v2, jina v3);
    "t5": <pad> </s> <unk>, only </s> added (T5's encoder)."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if layout == "xlm-roberta" else ["<pad>", "</s>", "<unk>"]
    pieces = [(f"\u2581{word}", -2.0 - index / 10) for index, word in enumerate(WORDS)]
    pieces += [("\u2581", -3.0)] + [(mark, -3.5) for mark in PUNCTUATION]
    pieces += [(letter, -4.0 - index / 100) for index, letter in enumerate(LETTERS)]
    pieces += [(token, -20.0) for token in _filler(filler_tokens)]
    tokens = specials + [piece for piece, _ in pieces]
    scores = [0.0] * len(specials) + [score for _, score in pieces]
    types = [TokenType.UNKNOWN if token == "<unk>" else TokenType.CONTROL for token in specials]
    types += [TokenType.NORMAL] * len(pieces)
    if layout == "xlm-roberta":
        tokens.append("<mask>")
        scores.append(0.0)
        types.append(TokenType.CONTROL)
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_pad_token_id(tokens.index("<pad>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_unk_token_id(tokens.index("<unk>"))
    if layout == "xlm-roberta":
        writer.add_token_type_count(1)
        writer.add_bos_token_id(tokens.index("<s>"))
        writer.add_sep_token_id(tokens.index("</s>"))
        writer.add_mask_token_id(tokens.index("<mask>"))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(True)
    else:
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(True)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (its byte-level BPE's base vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)]


def _chain_merges(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """Merges that build each word left to right ("s k", "sk y"), and the tokens they make."""
    merges: list[str] = []
    made: list[str] = []
    for word in words:
        for end in range(2, len(word) + 1):
            merge = f"{word[: end - 1]} {word[end - 1]}"
            if merge not in merges:
                merges.append(merge)
                made.append(word[:end])
    return merges, made


def _byte_bpe(
    writer: GGUFWriter, filler_tokens: int, pre: str, specials: Sequence[str], bos: str | None, eos: str | None
) -> None:
    """A byte-level BPE vocabulary ("gpt2"): the 256 byte symbols, merges that make each word and
    each word after a space ("Ġsky") one token, then the special tokens (control)."""
    merges, made = _chain_merges(WORDS + [f"\u0120{word}" for word in WORDS])
    tokens = _byte_symbols() + made + _filler(filler_tokens) + list(specials)
    types = [TokenType.NORMAL] * (len(tokens) - len(specials)) + [TokenType.CONTROL] * len(specials)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if bos is not None:
        writer.add_bos_token_id(tokens.index(bos))
    if eos is not None:
        writer.add_eos_token_id(tokens.index(eos))
    writer.add_add_bos_token(bos is not None)
    writer.add_add_eos_token(eos is not None)


def _sentencepiece_bpe(writer: GGUFWriter, filler_tokens: int) -> None:
    """Gemma's SentencePiece vocabulary ("llama"): <pad> <eos> <bos> <unk>, the 256 byte pieces
    (<0x00>..: what no piece spells falls back on them), then pieces with scores, every prefix of a
    word a piece too (llama.cpp's SentencePiece tokenizer merges pairs whose join is a piece)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    pieces: list[str] = []
    for word in [f"\u2581{word}" for word in WORDS] + WORDS:
        for end in range(1, len(word) + 1):
            if word[:end] not in pieces:
                pieces.append(word[:end])
    pieces += [letter for letter in LETTERS + PUNCTUATION if letter not in pieces]
    tokens = specials + byte_pieces + pieces + _filler(filler_tokens)
    # Longer pieces score higher, so whole words win.
    scores = [0.0] * (len(specials) + len(byte_pieces)) + [float(len(piece)) for piece in pieces]
    scores += [-100.0] * filler_tokens
    types = [TokenType.CONTROL] * 3 + [TokenType.UNKNOWN] + [TokenType.BYTE] * len(byte_pieces)
    types += [TokenType.NORMAL] * (len(pieces) + filler_tokens)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_space_prefix(False)


# -- weights --------------------------------------------------------------------------------------


class _Tensors:
    """Tensors added under their GGUF names with llama.cpp's dimension order (ne: {in, out}), which
    numpy writes reversed."""

    def __init__(self, writer: GGUFWriter, seed: int) -> None:
        self._writer = writer
        self._rng = np.random.default_rng(seed)

    def weight(self, name: str, *ne: int) -> None:
        shape = tuple(reversed(ne))
        self._writer.add_tensor(name, (self._rng.standard_normal(shape) * 0.2).astype(np.float32))

    def norm(self, name: str, size: int, bias: bool = False) -> None:
        """A norm's weight (about one), and with `bias` its bias (about zero)."""
        self._writer.add_tensor(f"{name}.weight", (1 + self._rng.standard_normal(size) * 0.1).astype(np.float32))
        if bias:
            self._writer.add_tensor(f"{name}.bias", (self._rng.standard_normal(size) * 0.1).astype(np.float32))

    def linear(self, name: str, n_in: int, n_out: int, bias: bool = False) -> None:
        self.weight(f"{name}.weight", n_in, n_out)
        if bias:
            self.weight(f"{name}.bias", n_out)


@dataclass(frozen=True)
class _Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ff: int
    context: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _bert_like(writer: GGUFWriter, t: _Tensors, s: _Shape, family: str) -> None:
    """bert (both vocabularies), nomic-bert(-moe), jina-bert-v2/v3: post-norm encoders with biases."""
    h = s.hidden
    writer.add_layer_norm_eps(1e-12)
    t.weight("token_embd.weight", h, s.vocab)
    t.weight("token_types.weight", h, 1 if family in ("bert-xlm-roberta", "jina-bert-v3", "nomic-bert-moe") else 2)
    t.norm("token_embd_norm", h, bias=True)
    if family in ("bert", "bert-xlm-roberta"):
        t.weight("position_embd.weight", h, s.context)
    else:
        writer.add_rope_freq_base(1000.0)
    if family == "nomic-bert-moe":
        writer.add_expert_count(4)
        writer.add_expert_used_count(2)
        writer.add_moe_every_n_layers(2)
    for i in range(s.layers):
        b = f"blk.{i}"
        if family in ("bert", "bert-xlm-roberta", "jina-bert-v2"):
            for part in ("attn_q", "attn_k", "attn_v"):
                t.linear(f"{b}.{part}", h, h, bias=True)
        else:
            t.linear(f"{b}.attn_qkv", h, 3 * h, bias=family != "nomic-bert")
        t.linear(f"{b}.attn_output", h, h, bias=True)
        t.norm(f"{b}.attn_output_norm", h, bias=True)
        if family == "nomic-bert-moe" and i % 2 == 1:
            t.weight(f"{b}.ffn_gate_inp.weight", h, 4)
            t.weight(f"{b}.ffn_up_exps.weight", h, s.ff, 4)
            t.weight(f"{b}.ffn_down_exps.weight", s.ff, h, 4)
        elif family == "nomic-bert":
            t.linear(f"{b}.ffn_up", h, s.ff)
            t.linear(f"{b}.ffn_gate", h, s.ff)
            t.linear(f"{b}.ffn_down", s.ff, h)
        elif family == "jina-bert-v2":  # GEGLU: up and gate in one tensor of twice the width
            t.linear(f"{b}.ffn_up", h, 2 * s.ff, bias=True)
            t.linear(f"{b}.ffn_down", s.ff, h, bias=True)
        else:
            t.linear(f"{b}.ffn_up", h, s.ff, bias=True)
            t.linear(f"{b}.ffn_down", s.ff, h, bias=True)
        t.norm(f"{b}.layer_output_norm", h, bias=True)


def _modern_bert(writer: GGUFWriter, t: _Tensors, s: _Shape) -> None:
    h = s.hidden
    writer.add_layer_norm_eps(1e-5)
    writer.add_rope_freq_base(160000.0)
    writer.add_rope_freq_base_swa(10000.0)
    # ModernBERT's local attention: every third layer global, the first one included (dense first).
    writer.add_sliding_window(16)
    writer.add_sliding_window_pattern(3)
    writer.add_vocab_size(s.vocab)
    t.weight("token_embd.weight", h, s.vocab)
    t.norm("token_embd_norm", h)
    t.norm("output_norm", h)
    for i in range(s.layers):
        b = f"blk.{i}"
        if i:  # the first layer's attention norm is an identity in ModernBERT
            t.norm(f"{b}.attn_norm", h)
        t.linear(f"{b}.attn_qkv", h, 3 * h)
        t.linear(f"{b}.attn_output", h, h)
        t.norm(f"{b}.ffn_norm", h)
        t.linear(f"{b}.ffn_up", h, 2 * s.ff)
        t.linear(f"{b}.ffn_down", s.ff, h)


def _neo_bert(writer: GGUFWriter, t: _Tensors, s: _Shape) -> None:
    h = s.hidden
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    t.weight("token_embd.weight", h, s.vocab)
    t.norm("enc.output_norm", h)
    for i in range(s.layers):
        b = f"blk.{i}"
        t.norm(f"{b}.attn_norm", h)
        t.linear(f"{b}.attn_qkv", h, 3 * h)
        t.linear(f"{b}.attn_output", h, h)
        t.norm(f"{b}.ffn_norm", h)
        t.linear(f"{b}.ffn_up", h, 2 * s.ff)  # SwiGLU: up and gate in one tensor
        t.linear(f"{b}.ffn_down", s.ff, h)


def _llama_like(writer: GGUFWriter, t: _Tensors, s: _Shape, family: str) -> None:
    """eurobert, llama-embed, qwen3 (with q/k norms), gemma-embedding (and its post-norms): pre-norm
    RMSNorm decoders' blocks, with rotary positions."""
    h, hd = s.hidden, s.head_dim
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    t.weight("token_embd.weight", h, s.vocab)
    t.norm("output_norm", h)
    for i in range(s.layers):
        b = f"blk.{i}"
        t.norm(f"{b}.attn_norm", h)
        t.linear(f"{b}.attn_q", h, s.heads * hd)
        t.linear(f"{b}.attn_k", h, s.kv_heads * hd)
        t.linear(f"{b}.attn_v", h, s.kv_heads * hd)
        t.linear(f"{b}.attn_output", s.heads * hd, h)
        if family in ("qwen3", "gemma-embedding"):
            t.norm(f"{b}.attn_q_norm", hd)
            t.norm(f"{b}.attn_k_norm", hd)
        if family == "gemma-embedding":
            t.norm(f"{b}.post_attention_norm", h)
            t.norm(f"{b}.post_ffw_norm", h)
        t.norm(f"{b}.ffn_norm", h)
        t.linear(f"{b}.ffn_gate", h, s.ff)
        t.linear(f"{b}.ffn_up", h, s.ff)
        t.linear(f"{b}.ffn_down", s.ff, h)


_DEFAULT_GEMMA_PATTERN = 2


def _gemma_embedding(writer: GGUFWriter, t: _Tensors, s: _Shape, pattern: int | Sequence[bool] | None) -> None:
    """EmbeddingGemma: local (sliding-window) and global layers, and after the pooling two dense
    projections (sentence-transformers' 2_Dense and 3_Dense: hidden -> 2 hidden -> hidden)."""
    writer.add_sliding_window(8)
    writer.add_rope_freq_base_swa(10000.0)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern if isinstance(pattern, int) else list(pattern))
    wide = 2 * s.hidden
    writer.add_dense_features_dims("dense_2", s.hidden, wide)
    writer.add_dense_features_dims("dense_3", wide, s.hidden)
    t.weight("dense_2.weight", s.hidden, wide)
    t.weight("dense_3.weight", wide, s.hidden)
    _llama_like(writer, t, s, "gemma-embedding")


def _t5encoder(writer: GGUFWriter, t: _Tensors, s: _Shape) -> None:
    h, buckets = s.hidden, 32
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_relative_attn_buckets_count(buckets)
    writer.add_key_length(s.head_dim)
    writer.add_value_length(s.head_dim)
    t.weight("token_embd.weight", h, s.vocab)
    t.norm("enc.output_norm", h)
    for i in range(s.layers):
        b = f"enc.blk.{i}"
        t.norm(f"{b}.attn_norm", h)
        if i == 0:  # T5 keeps its relative position biases in the first layer only
            t.weight(f"{b}.attn_rel_b.weight", s.heads, buckets)
        for part in ("attn_q", "attn_k", "attn_v", "attn_o"):
            t.linear(f"{b}.{part}", h, h)
        t.norm(f"{b}.ffn_norm", h)
        t.linear(f"{b}.ffn_gate", h, s.ff)  # T5 v1.1's gated GELU
        t.linear(f"{b}.ffn_up", h, s.ff)
        t.linear(f"{b}.ffn_down", s.ff, h)


def _vocabulary(family: str, writer: GGUFWriter, filler_tokens: int) -> None:
    tokenizer = FAMILIES[family].tokenizer
    if tokenizer == "bert":
        _wordpiece(writer, filler_tokens)
    elif tokenizer == "t5":
        _unigram(writer, filler_tokens, "t5" if family == "t5encoder" else "xlm-roberta")
    elif tokenizer == "llama":
        _sentencepiece_bpe(writer, filler_tokens)
    elif family == "modern-bert":
        _byte_bpe(writer, filler_tokens, "modern-bert", ["[CLS]", "[SEP]", "[MASK]"], "[CLS]", "[SEP]")
        writer.add_add_sep_token(True)
    elif family == "eurobert":
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        _byte_bpe(writer, filler_tokens, "llama-bpe", specials, None, "<|end_of_text|>")
    elif family == "llama-embed":
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        _byte_bpe(writer, filler_tokens, "llama-bpe", specials, "<|begin_of_text|>", None)
    else:  # qwen3: Qwen3-Embedding ends every text with <|endoftext|>, and adds no BOS
        _byte_bpe(writer, filler_tokens, "qwen2", ["<|endoftext|>", "<|im_start|>"], None, "<|endoftext|>")


def make_family_gguf(family: str, path: Path, context: int = 64, seed: int = 0, **shape: Any) -> Path:
    """A tiny GGUF of `family` (a key of FAMILIES) with random weights, llama.cpp-loadable, at
    `path`. `shape`: hidden (32), layers (2), heads (2), kv_heads (heads), ff (2 hidden),
    filler_tokens (0), and for gemma-embedding sliding_window_pattern (see the module docstring)."""
    spec = FAMILIES[family]
    pattern = shape.pop("sliding_window_pattern", _DEFAULT_GEMMA_PATTERN)
    hidden = int(shape.pop("hidden", 32))
    heads = int(shape.pop("heads", 2))
    layers = int(shape.pop("layers", 2))
    kv_heads = int(shape.pop("kv_heads", heads))
    ff = int(shape.pop("ff", 2 * hidden))
    filler_tokens = int(shape.pop("filler_tokens", 0))
    if shape:
        raise TypeError(f"unknown shape parameters: {sorted(shape)}")

    writer = GGUFWriter(path, spec.architecture)
    writer.add_name(f"tiny-{family}")
    writer.add_file_type(0)  # ALL_F32
    _vocabulary(family, writer, filler_tokens)
    vocab = _token_count(writer)
    s = _Shape(hidden, layers, heads, kv_heads, ff, context, vocab)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_pooling_type(spec.pooling)
    if not spec.causal:
        writer.add_causal_attention(False)
    t = _Tensors(writer, seed)
    builders: dict[str, Callable[[], None]] = {
        "modern-bert": lambda: _modern_bert(writer, t, s),
        "neo-bert": lambda: _neo_bert(writer, t, s),
        "gemma-embedding": lambda: _gemma_embedding(writer, t, s, pattern),
        "t5encoder": lambda: _t5encoder(writer, t, s),
        "eurobert": lambda: _llama_like(writer, t, s, family),
        "llama-embed": lambda: _llama_like(writer, t, s, family),
        "qwen3": lambda: _llama_like(writer, t, s, family),
    }
    builders.get(family, lambda: _bert_like(writer, t, s, family))()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _token_count(writer: GGUFWriter) -> int:
    """The vocabulary's size, as the writer holds it (tokenizer.ggml.tokens)."""
    for shard in writer.kv_data:
        if "tokenizer.ggml.tokens" in shard:
            return len(shard["tokenizer.ggml.tokens"].value)
    raise ValueError("no vocabulary written")
