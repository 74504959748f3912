"""BERT with a WordPiece vocabulary, as llama.cpp's own converter writes BertModel ("bert"):
"phantom space" tokens, position and token-type embeddings in f32, the classifier head of a
cross-encoder (BertForSequenceClassification) for rank pooling. The encoder's tensor names are
shared with XLM-RoBERTa (xlm_roberta.py), which llama.cpp runs as "bert" too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter, PoolingType, TensorNameMap, TokenType

from daemon.convert.source import HFSource, read_json, read_pooling
from daemon.convert.writer import Tensors
from daemon.errors import InvalidModelFile

ARCHITECTURES = {"BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"}
MODEL_TYPES = {"bert"}
# BertForSequenceClassification's head as llama.cpp's BERT graph runs it for rank pooling: the
# pooler's dense layer (then tanh) is "cls", the classifier "cls.output".
_CLASSIFIER_HEAD = {
    "pooler.dense.weight": "cls.weight",
    "pooler.dense.bias": "cls.bias",
    "classifier.weight": "cls.output.weight",
    "classifier.bias": "cls.output.bias",
}
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ENCODER_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def write_encoder_metadata(
    writer: GGUFWriter, config: dict[str, Any], context_length: int, pooling: PoolingType
) -> None:
    """The hyperparameters of llama.cpp's "bert" graph (BERT and XLM-RoBERTa)."""
    writer.add_context_length(context_length)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    labels = [str(label) for _, label in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    if pooling == PoolingType.RANK and len(labels) > 1:
        writer.add_classifier_output_labels(labels)


def encoder_tensor_name(source: HFSource, bare: str, head: dict[str, str] | None) -> str | None:
    """The GGUF name of an encoder tensor (its "bert."/"roberta." prefix taken off), or None for a
    tensor llama.cpp does not run (the pre-training heads, the pooler of an embedding model).
    `head` maps a reranker's classifier tensors."""
    if head is not None and bare in head:
        return head[bare]
    if bare.startswith(("pooler.", "cls.", "classifier.", "lm_head.")) or bare.endswith("position_ids"):
        return None
    name_map = TensorNameMap(MODEL_ARCH.BERT, source.config["num_hidden_layers"])
    gguf_name = name_map.get_name(bare, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise InvalidModelFile(f"{source.name}: unexpected tensor {bare}")
    return gguf_name


def _phantom_space(token: str) -> str:
    # llama.cpp's WordPiece tokenizer marks word starts with U+2581 instead of marking continuations.
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def read_wordpiece_vocab(source: HFSource) -> list[str]:
    vocab_txt = source.path / "vocab.txt"
    if vocab_txt.is_file():
        return vocab_txt.read_text(encoding="utf-8").splitlines()
    tokenizer = source.json_file("tokenizer.json")
    if tokenizer is not None:
        model = tokenizer.get("model", {})
        if model.get("type") == "WordPiece" and isinstance(model.get("vocab"), dict):
            by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
            return [token for token, _ in by_id]
    raise InvalidModelFile(f"{source.name}: no WordPiece vocabulary (vocab.txt or tokenizer.json)")


def _special_tokens(source: HFSource, vocab: list[str]) -> set[str]:
    specials = {token for token in _SPECIAL_TOKENS if token in vocab}
    tokenizer_json = source.path / "tokenizer.json"
    if tokenizer_json.is_file():
        for added in read_json(tokenizer_json).get("added_tokens", []):
            if added.get("special") and isinstance(added.get("content"), str):
                specials.add(added["content"])
    return specials


def write_wordpiece_vocab(writer: GGUFWriter, source: HFSource, vocab: list[str], rows: int = 0) -> None:
    """The WordPiece vocabulary as llama.cpp's "bert" tokenizer reads it, [CLS] before a text and [SEP]
    after it; padded with unused tokens to `rows` when the embedding has rows past the vocabulary."""
    specials = _special_tokens(source, vocab)
    padding = [f"[PAD{index}]" for index in range(len(vocab), rows)]
    writer.add_tokenizer_model("bert")
    writer.add_token_list([_phantom_space(token) for token in vocab] + padding)
    writer.add_token_types(
        [TokenType.CONTROL if t in specials else TokenType.NORMAL for t in vocab] + [TokenType.UNUSED] * len(padding)
    )
    token_ids = {token: index for index, token in enumerate(vocab)}
    for special, add in (
        ("[CLS]", writer.add_bos_token_id),
        ("[SEP]", writer.add_sep_token_id),
        ("[UNK]", writer.add_unk_token_id),
        ("[PAD]", writer.add_pad_token_id),
        ("[MASK]", writer.add_mask_token_id),
    ):
        if special in token_ids:
            add(token_ids[special])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)


@dataclass(frozen=True)
class BertPlan:
    source: HFSource
    vocab: list[str]
    pooling: PoolingType  # RANK for a cross-encoder (a reranker: BertForSequenceClassification)
    architecture: str = "bert"

    def write_metadata(self, writer: GGUFWriter) -> None:
        config = self.source.config
        write_encoder_metadata(writer, config, int(config.get("max_position_embeddings", 512)), self.pooling)
        write_wordpiece_vocab(writer, self.source, self.vocab)

    def tensors(self, hf_name: str, read: Callable[[], np.ndarray]) -> Tensors:
        head = _CLASSIFIER_HEAD if self.pooling == PoolingType.RANK else None
        gguf_name = encoder_tensor_name(self.source, hf_name.removeprefix("bert."), head)
        return [] if gguf_name is None else [(gguf_name, read())]


def plan(source: HFSource) -> BertPlan:
    for key in ENCODER_SETTINGS:
        source.int_setting(key)
    # A cross-encoder scores a query/document pair with a classifier head: llama.cpp's rank pooling.
    if "BertForSequenceClassification" in source.architectures:
        pooling = PoolingType.RANK
    else:
        # sentence-transformers builds a plain Hugging Face model with mean pooling too.
        pooling = read_pooling(source.path) or PoolingType.MEAN
    return BertPlan(source, read_wordpiece_vocab(source), pooling)
