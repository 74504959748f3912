"""ModernBERT (modernbert-embed-base, gte-modernbert-base) as llama.cpp runs "modern-bert": local
(sliding-window) and global attention layers with their own RoPE bases, the up and gate halves of
the feed-forward in one tensor, no biases, and a byte-level BPE vocabulary with GPT-2's split and
[CLS] ... [SEP] around a text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter, PoolingType, TensorNameMap

from daemon.convert.bpe_vocab import BPEVocab, bpe_tokenizer_json, read_bpe_vocab
from daemon.convert.source import HFSource, read_pooling
from daemon.convert.tokenizer_json import token_id
from daemon.convert.writer import Tensors
from daemon.errors import InvalidModelFile

ARCHITECTURES = {"ModernBertModel", "ModernBertForMaskedLM"}
MODEL_TYPES = {"modernbert"}
_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
# transformers' defaults for what a ModernBERT config may leave out (ModernBertConfig).
_DEFAULT_GLOBAL_EVERY_N_LAYERS = 3
_DEFAULT_GLOBAL_ROPE_THETA = 160_000.0
_DEFAULT_LOCAL_ROPE_THETA = 10_000.0
_DEFAULT_LOCAL_ATTENTION = 128
# Hugging Face activations and the gated feed-forward llama.cpp runs for each ({arch}.hidden_activation:
# "gelu" is GeGLU, "silu" SwiGLU, "relu" ReGLU). llama.cpp's GELU is the tanh approximation.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
# The biases llama.cpp's graph has no place for: a model that uses one is refused.
_BIAS_SETTINGS = ("norm_bias", "attention_bias", "mlp_bias")
# Tensors an embedding model does not run: ModernBertForMaskedLM's prediction head and decoder.
_DROPPED_PREFIXES = ("head.", "decoder.")


def local_layers(source: HFSource) -> list[bool]:
    """Which layers attend through the local window: config.json's layer_types (transformers 5), or
    every layer but each global_attn_every_n_layers-th, the first included (the Hub's configs)."""
    config = source.config
    layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        if len(layer_types) != layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise InvalidModelFile(f"{source.name}: config.json's layer_types is not one of two kinds per layer")
        return [kind == "sliding_attention" for kind in layer_types]
    every = config.get("global_attn_every_n_layers") or _DEFAULT_GLOBAL_EVERY_N_LAYERS
    if not isinstance(every, int) or every < 1:
        raise InvalidModelFile(f"{source.name}: config.json's global_attn_every_n_layers is not a positive integer")
    return [layer % every != 0 for layer in range(layers)]


def swa_pattern(local: list[bool]) -> int | list[bool]:
    """{arch}.attention.sliding_window_pattern as llama.cpp reads it for modern-bert: n when every
    n-th layer is global, the first included (what llama.cpp's converter writes), else a flag per layer."""
    for every in range(1, len(local) + 1):
        if [layer % every != 0 for layer in range(len(local))] == local:
            return every
    return local


def rope_bases(source: HFSource) -> tuple[float, float]:
    """The RoPE bases of the global and the local layers: rope_parameters' full_attention and
    sliding_attention (transformers 5), or global_rope_theta and local_rope_theta (the Hub's)."""
    config = source.config
    parameters = config.get("rope_parameters") or {}
    full, sliding = parameters.get("full_attention") or {}, parameters.get("sliding_attention") or {}
    for kind in (full, sliding, config.get("rope_scaling") or {}):
        if kind.get("rope_type", "default") != "default":
            raise InvalidModelFile(f"{source.name}: RoPE scaling is not converted")
    global_theta = full.get("rope_theta") or config.get("global_rope_theta") or _DEFAULT_GLOBAL_ROPE_THETA
    local_theta = sliding.get("rope_theta") or config.get("local_rope_theta") or _DEFAULT_LOCAL_ROPE_THETA
    return float(global_theta), float(local_theta)


def _check_pretokenizer(source: HFSource, tokenizer: dict[str, Any]) -> None:
    """llama.cpp's "modern-bert" pre-tokenizer is GPT-2's split with no space put before a text:
    tokenizer.json's ByteLevel pre-tokenizer with its regex and without add_prefix_space."""
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return
    raise InvalidModelFile(
        f"{source.name}: tokenizer.json's pre-tokenizer is not GPT-2's byte-level split without a prefix space"
        " (emberd converts ModernBERT models with ModernBERT's tokenizer)"
    )


@dataclass(frozen=True)
class ModernBertPlan:
    source: HFSource
    vocab: BPEVocab
    pooling: PoolingType
    local: list[bool]  # per layer: attends through the local window
    activation: str  # llama.cpp's name of the feed-forward's activation
    architecture: str = "modern-bert"

    def write_metadata(self, writer: GGUFWriter) -> None:
        config = self.source.config
        global_theta, local_theta = rope_bases(self.source)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_layer_norm_eps(float(config.get("norm_eps", 1e-5)))
        writer.add_causal_attention(False)
        writer.add_rope_freq_base(global_theta)
        writer.add_string(f"{self.architecture}.hidden_activation", self.activation)
        writer.add_vocab_size(len(self.vocab.tokens))
        if any(self.local):
            # The whole window, tokens on both sides of one: llama.cpp and transformers both let a
            # token see those at most half of it away.
            writer.add_sliding_window(int(config.get("local_attention") or _DEFAULT_LOCAL_ATTENTION))
            writer.add_sliding_window_pattern(swa_pattern(self.local))
            writer.add_rope_freq_base_swa(local_theta)
        # With no local layer no window is written: llama.cpp then builds global attention only
        # (with a window and no local layer it would abort at the first decode).
        self._write_tokenizer(writer)

    def _write_tokenizer(self, writer: GGUFWriter) -> None:
        vocab = self.vocab
        vocab.write(writer, "modern-bert")
        tokenizer = self.source.json_file("tokenizer.json") or {}
        config = self.source.json_file("tokenizer_config.json") or {}
        layout = vocab.layout
        # The tokens the post-processor puts around a text, [CLS] and [SEP], are those llama.cpp adds.
        if layout.first is not None:
            writer.add_bos_token_id(layout.first)
        if layout.last is not None:
            writer.add_eos_token_id(layout.last)
            writer.add_sep_token_id(layout.last)
        for name, add in (
            ("pad_token", writer.add_pad_token_id),
            ("unk_token", writer.add_unk_token_id),
            ("mask_token", writer.add_mask_token_id),
        ):
            found = token_id(tokenizer, vocab.ids, config.get(name))
            if found is not None:
                add(found)
        writer.add_add_bos_token(layout.first is not None)
        writer.add_add_eos_token(layout.last is not None)
        writer.add_add_sep_token(layout.last is not None)

    def tensors(self, hf_name: str, read: Callable[[], np.ndarray]) -> Tensors:
        bare = hf_name.removeprefix("model.")
        if bare.startswith(_DROPPED_PREFIXES) or bare.endswith("position_ids"):
            return []
        name_map = TensorNameMap(MODEL_ARCH.MODERN_BERT, self.source.config["num_hidden_layers"])
        gguf_name = name_map.get_name(bare, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or not gguf_name.endswith(".weight"):
            raise InvalidModelFile(f"{self.source.name}: unexpected tensor {hf_name}")
        return [(gguf_name, read())]


def plan(source: HFSource) -> ModernBertPlan:
    for key in _SETTINGS:
        source.int_setting(key)
    config = source.config
    if "ModernBertForSequenceClassification" in source.architectures:
        raise InvalidModelFile(f"{source.name}: ModernBERT cross-encoders (rerankers) are not converted")
    biased = [key for key in _BIAS_SETTINGS if config.get(key)]
    if biased:
        raise InvalidModelFile(f"{source.name}: {', '.join(biased)} set: llama.cpp's ModernBERT has no biases")
    activation = _ACTIVATIONS.get(str(config.get("hidden_activation", "gelu")))
    if activation is None:
        raise InvalidModelFile(f"{source.name}: hidden_activation {config.get('hidden_activation')!r} is not converted")
    local = local_layers(source)
    if all(local):
        raise InvalidModelFile(
            f"{source.name}: every layer attends locally; llama.cpp needs a global layer in a modern-bert model"
        )
    rope_bases(source)  # refuses RoPE scaling before the conversion starts
    tokenizer = bpe_tokenizer_json(source)
    _check_pretokenizer(source, tokenizer)
    # sentence-transformers builds a plain Hugging Face model with mean pooling.
    pooling = read_pooling(source.path) or PoolingType.MEAN
    return ModernBertPlan(source, read_bpe_vocab(source, tokenizer), pooling, local, activation)
