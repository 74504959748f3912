"""Qwen3 (Qwen3-Embedding, with last-token pooling; Qwen3-Reranker) as llama.cpp runs "qwen3": a
byte-level BPE vocabulary with merges and Qwen2's pre-tokenizer, the special tokens the Hugging
Face tokenizer's post-processor adds (Qwen3-Embedding appends <|endoftext|>, not the EOS its
tokenizer_config names), and for a reranker the "yes"/"no" rows of the language-model head."""

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

ARCHITECTURES = {"Qwen3Model", "Qwen3ForCausalLM"}
MODEL_TYPES = {"qwen3"}
# Qwen2's pre-tokenizer split, as its tokenizer.json spells it (llama.cpp's "qwen2" runs the same).
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3-Reranker's prompt (its model card's), which llama.cpp renders for a pair: the score is the
# probability of "yes" after it.
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct"
    ' provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")


def _split_regexes(pre_tokenizer: Any) -> list[str]:
    items = [pre_tokenizer, *(pre_tokenizer or {}).get("pretokenizers", [])]
    return [
        str(item["pattern"].get("Regex"))
        for item in items
        if isinstance(item, dict) and item.get("type") == "Split" and isinstance(item.get("pattern"), dict)
    ]


def _check_pretokenizer(source: HFSource, tokenizer: dict[str, Any]) -> None:
    """llama.cpp's converter recognises a pre-tokenizer by the hash of a test text's tokens, which a
    fine-tuned vocabulary changes; emberd reads the split itself, or the tokenizer class, which
    transformers builds with Qwen2's split whatever tokenizer.json says."""
    regexes = _split_regexes(tokenizer.get("pre_tokenizer"))
    if regexes == [QWEN2_PRETOKENIZER_REGEX]:
        return
    config = source.json_file("tokenizer_config.json") or {}
    if config.get("tokenizer_class") in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        return
    raise InvalidModelFile(
        f"{source.name}: tokenizer.json's pre-tokenizer is not Qwen2's (emberd converts Qwen3 models with"
        " Qwen2's byte-level BPE tokenizer)"
    )


def _read_vocab(source: HFSource) -> BPEVocab:
    tokenizer = bpe_tokenizer_json(source)
    _check_pretokenizer(source, tokenizer)
    return read_bpe_vocab(source, tokenizer)


def _is_reranker(source: HFSource) -> bool:
    """Qwen3-Reranker is a Qwen3ForCausalLM like any Qwen3 chat model: llama.cpp's converter tells
    it by its name or its model card, as emberd does."""
    hints = [source.name, str(source.config.get("_name_or_path", ""))]
    readme = source.path / "README.md"
    card = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    return any("qwen3-reranker" in hint.lower() for hint in hints) or "# qwen3-reranker" in card


@dataclass(frozen=True)
class Qwen3Plan:
    source: HFSource
    vocab: BPEVocab
    pooling: PoolingType
    architecture: str = "qwen3"

    def write_metadata(self, writer: GGUFWriter) -> None:
        config = self.source.config
        heads = config["num_attention_heads"]
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        rope = config.get("rope_parameters") or {}
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 1_000_000.0))
        if self.pooling == PoolingType.RANK:
            writer.add_classifier_output_labels(["yes", "no"])
            writer.add_chat_template([{"name": "rerank", "template": RERANK_TEMPLATE}])
        self._write_tokenizer(writer)

    def _write_tokenizer(self, writer: GGUFWriter) -> None:
        vocab = self.vocab
        vocab.write(writer, "qwen2")
        tokenizer = self.source.json_file("tokenizer.json") or {}
        config = self.source.json_file("tokenizer_config.json") or {}
        layout = vocab.layout
        named_eos = token_id(tokenizer, vocab.ids, config.get("eos_token"))
        bos = layout.first if layout.first is not None else token_id(tokenizer, vocab.ids, config.get("bos_token"))
        # The token the Hugging Face tokenizer appends is the one llama.cpp must append: for
        # Qwen3-Embedding <|endoftext|>, while tokenizer_config names <|im_end|> (the chat's end).
        eos = layout.last if layout.last is not None else named_eos
        if bos is not None:
            writer.add_bos_token_id(bos)
        if eos is not None:
            writer.add_eos_token_id(eos)
        if named_eos is not None and named_eos != eos:
            writer.add_eot_token_id(named_eos)
        pad = token_id(tokenizer, vocab.ids, config.get("pad_token"))
        if pad is not None:
            writer.add_pad_token_id(pad)
        writer.add_add_bos_token(layout.first is not None)
        writer.add_add_eos_token(layout.last is not None)

    def tensors(self, hf_name: str, read: Callable[[], np.ndarray]) -> Tensors:
        tied = bool(self.source.config.get("tie_word_embeddings"))
        is_head = hf_name == "lm_head.weight" or (tied and hf_name.endswith("embed_tokens.weight"))
        result = []
        if is_head and self.pooling == PoolingType.RANK:
            # The reranker's score: softmax over the "yes" and "no" logits of the last token.
            head = read()
            result.append(("cls.output.weight", np.stack([head[self.vocab.ids["yes"]], head[self.vocab.ids["no"]]])))
        if hf_name == "lm_head.weight":
            return result  # an embedding model needs no language-model head
        name = hf_name if hf_name.startswith("model.") else f"model.{hf_name}"
        name_map = TensorNameMap(MODEL_ARCH.QWEN3, self.source.config["num_hidden_layers"])
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InvalidModelFile(f"{self.source.name}: unexpected tensor {hf_name}")
        return [*result, (gguf_name, read())]


def plan(source: HFSource) -> Qwen3Plan:
    for key in _SETTINGS:
        source.int_setting(key)
    config = source.config
    rope_type = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default" or config.get("use_sliding_window"):
        raise InvalidModelFile(f"{source.name}: RoPE scaling and sliding-window attention are not converted")
    vocab = _read_vocab(source)
    pooling = read_pooling(source.path)
    if pooling is None:
        if not _is_reranker(source):
            raise InvalidModelFile(
                f"{source.name}: a Qwen3 model without a sentence-transformers pooling (modules.json and"
                " 1_Pooling/config.json) is a chat model, not an embedding model; Qwen3-Reranker is told by its name"
            )
        if "yes" not in vocab.ids or "no" not in vocab.ids:
            raise InvalidModelFile(f"{source.name}: a Qwen3 reranker's vocabulary needs the tokens 'yes' and 'no'")
        pooling = PoolingType.RANK
    return Qwen3Plan(source, vocab, pooling)
