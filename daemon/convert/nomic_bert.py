"""NomicBert (nomic-embed-text v1 and v1.5) as llama.cpp runs "nomic-bert": BERT's post-norm layers
with rotary positions (no position embeddings), no biases but the norms', a SwiGLU feed-forward, and
BERT's WordPiece vocabulary. Reads the Hub's remote-code config and weight names (n_embd, Wqkv, fc11)
and transformers' own (hidden_size, q_proj, up_proj)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFWriter, PoolingType

from daemon.convert.bert import read_wordpiece_vocab, write_wordpiece_vocab
from daemon.convert.source import HFSource, read_pooling
from daemon.convert.writer import Tensors
from daemon.errors import InvalidModelFile

ARCHITECTURES = {"NomicBertModel", "NomicBertForMaskedLM", "NomicBertForPreTraining"}
MODEL_TYPES = {"nomic_bert"}
# Each setting as the Hub's remote code (nomic-ai/nomic-bert-2048) names it, then as transformers does.
_SETTINGS = {
    "embedding": ("n_embd", "hidden_size"),
    "layers": ("n_layer", "num_hidden_layers"),
    "heads": ("n_head", "num_attention_heads"),
    "feed_forward": ("n_inner", "intermediate_size"),
    "vocabulary": ("vocab_size", "vocab_size"),
}
# transformers' NomicBertConfig default RoPE base (default_theta), for a config that names none.
_DEFAULT_ROPE_THETA = 1000.0
# The Hub config's switches and the values llama.cpp's nomic-bert graph runs (its converter asserts
# them): post-norm, not causal, rotary over the whole head, NeoX-style (halves, not interleaved), no
# biases but the layer norms', LayerNorm not RMSNorm, one block after another.
_HUB_SWITCHES: dict[str, Any] = {
    "causal": False,
    "prenorm": False,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "qkv_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "use_rms_norm": False,
    "parallel_block": False,
}
# Tensors an embedding model does not run: the masked-LM head, a pooler.
_DROPPED_PREFIXES = ("cls.", "pooler.", "lm_head.")
# Per-layer tensors: the Hub's names and transformers' (saved by a state_dict; save_pretrained
# writes the Hub's), and the GGUF's. Fused or separate q/k/v both load in llama.cpp.
_LAYER_TENSORS = {
    "attn.Wqkv.weight": "attn_qkv.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "attn.out_proj.weight": "attn_output.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.fc11.weight": "ffn_up.weight",  # fc11 is multiplied by the activated fc12, as up by gate
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.fc12.weight": "ffn_gate.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "norm1.weight": "attn_output_norm.weight",
    "norm1.bias": "attn_output_norm.bias",
    "post_attention_layernorm.weight": "attn_output_norm.weight",
    "post_attention_layernorm.bias": "attn_output_norm.bias",
    "norm2.weight": "layer_output_norm.weight",
    "norm2.bias": "layer_output_norm.bias",
    "post_mlp_layernorm.weight": "layer_output_norm.weight",
    "post_mlp_layernorm.bias": "layer_output_norm.bias",
}
_EMBEDDING_TENSORS = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "emb_ln.weight": "token_embd_norm.weight",
    "emb_ln.bias": "token_embd_norm.bias",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_LAYER = re.compile(r"(?:encoder\.)?layers\.(\d+)\.(.+)")


def hub_config(config: dict[str, Any]) -> bool:
    """Whether config.json is spelled as the Hub's remote code writes it (n_embd) or as transformers does."""
    return "n_embd" in config


def setting(source: HFSource, name: str) -> int:
    return source.int_setting(_SETTINGS[name][0 if hub_config(source.config) else 1])


def context_length(source: HFSource) -> int:
    """The Hub's configs give n_positions 8192 but train on max_trained_positions 2048 (llama.cpp's
    converter writes 2048 for v1 and v1.5): RoPE has no table to bound it, so the trained length
    is the context. transformers' configs give max_position_embeddings."""
    config = source.config
    if not hub_config(config):
        return source.int_setting("max_position_embeddings")
    positions = source.int_setting("n_positions")
    trained = config.get("max_trained_positions")
    return min(positions, trained) if isinstance(trained, int) and trained > 0 else positions


def rope_base(source: HFSource) -> float:
    config = source.config
    if hub_config(config):
        base = config.get("rotary_emb_base")
    else:
        parameters = config.get("rope_parameters") or {}
        if parameters.get("rope_type", "default") != "default" or config.get("rope_scaling"):
            raise InvalidModelFile(f"{source.name}: RoPE scaling is not converted")
        base = parameters.get("rope_theta") or config.get("rope_theta") or _DEFAULT_ROPE_THETA
    if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
        raise InvalidModelFile(f"{source.name}: config.json lacks a RoPE base (rotary_emb_base or rope_parameters)")
    return float(base)


def layer_norm_eps(source: HFSource) -> float:
    key = "layer_norm_epsilon" if hub_config(source.config) else "layer_norm_eps"
    return float(source.config.get(key, 1e-12))


def _check_layout(source: HFSource) -> None:
    """Refuse what llama.cpp's nomic-bert graph does not run, before anything is written."""
    config = source.config
    if config.get("moe_every_n_layers") or config.get("num_experts"):
        raise InvalidModelFile(
            f"{source.name}: NomicBert with mixture-of-experts layers (nomic-embed-text-v2-moe, llama.cpp's"
            " nomic-bert-moe) is not converted; give emberd its GGUF file"
        )
    if source.architectures & {"NomicBertForSequenceClassification", "NomicBertForTokenClassification"}:
        raise InvalidModelFile(f"{source.name}: NomicBert classifiers are not converted")
    if hub_config(config):
        activation, expected = config.get("activation_function", "swiglu"), "swiglu"
        for key, value in _HUB_SWITCHES.items():
            if key in config and config[key] != value:
                raise InvalidModelFile(
                    f"{source.name}: config.json's {key} is {config[key]!r}; llama.cpp's nomic-bert runs {value!r}"
                )
    else:
        activation, expected = config.get("hidden_act", "silu"), "silu"
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim * setting(source, "heads") != setting(source, "embedding"):
            raise InvalidModelFile(f"{source.name}: head_dim times the heads is not hidden_size")
    if activation != expected:
        raise InvalidModelFile(
            f"{source.name}: activation {activation!r} is not converted (llama.cpp's nomic-bert runs SwiGLU)"
        )


@dataclass(frozen=True)
class NomicBertPlan:
    source: HFSource
    vocab: list[str]
    pooling: PoolingType
    architecture: str = "nomic-bert"

    def write_metadata(self, writer: GGUFWriter) -> None:
        writer.add_context_length(context_length(self.source))
        writer.add_embedding_length(setting(self.source, "embedding"))
        writer.add_feed_forward_length(setting(self.source, "feed_forward"))
        writer.add_block_count(setting(self.source, "layers"))
        writer.add_head_count(setting(self.source, "heads"))
        writer.add_layer_norm_eps(layer_norm_eps(self.source))
        writer.add_rope_freq_base(rope_base(self.source))
        writer.add_causal_attention(False)
        # llama.cpp's loader requires the count (it adds the first row to every token).
        writer.add_token_type_count(int(self.source.config.get("type_vocab_size", 2)))
        # The embedding has rows past the tokenizer's (30528 for 30522 tokens in nomic-embed-text).
        write_wordpiece_vocab(writer, self.source, self.vocab, rows=setting(self.source, "vocabulary"))

    def tensors(self, hf_name: str, read: Callable[[], np.ndarray]) -> Tensors:
        bare = hf_name.removeprefix("bert.").removeprefix("nomic_bert.")
        if bare.startswith(_DROPPED_PREFIXES) or bare.endswith(("position_ids", "inv_freq")):
            return []
        gguf_name = _EMBEDDING_TENSORS.get(bare)
        layer = _LAYER.fullmatch(bare)
        if layer is not None and layer.group(2) in _LAYER_TENSORS:
            gguf_name = f"blk.{layer.group(1)}.{_LAYER_TENSORS[layer.group(2)]}"
        if gguf_name is None:
            raise InvalidModelFile(f"{self.source.name}: unexpected tensor {hf_name}")
        return [(gguf_name, read())]


def plan(source: HFSource) -> NomicBertPlan:
    for name in _SETTINGS:
        setting(source, name)
    context_length(source)
    _check_layout(source)
    rope_base(source)  # refuses a missing base or RoPE scaling before the conversion starts
    vocab = read_wordpiece_vocab(source)
    if len(vocab) > setting(source, "vocabulary"):
        raise InvalidModelFile(f"{source.name}: the vocabulary has more tokens than the embedding has rows")
    # sentence-transformers builds a plain Hugging Face model with mean pooling (nomic-embed-text's own).
    pooling = read_pooling(source.path) or PoolingType.MEAN
    return NomicBertPlan(source, vocab, pooling)
