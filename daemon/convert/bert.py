"""Convert a Hugging Face BERT-family model directory into a GGUF embedding model.

Follows what llama.cpp's own converter writes for BertModel (so llama.cpp loads it as "bert"):
WordPiece vocabulary with "phantom space" tokens, 2-D weights in the requested type, 1-D tensors,
position and token-type embeddings in f32, and the pooling type from 1_Pooling/config.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    PoolingType,
    TensorNameMap,
    TokenType,
)
from gguf.quants import quantize
from safetensors import SafetensorError, safe_open

from daemon.errors import InvalidModelFile
from daemon.jobs import NEVER_CANCELLED, CancelToken

BERT_ARCHITECTURES = {"BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"}
OUTPUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# BertForSequenceClassification's head as llama.cpp's BERT graph runs it for rank pooling: the
# pooler's dense layer (then tanh) is "cls", the classifier "cls.output".
_CLASSIFIER_HEAD = {
    "pooler.dense.weight": "cls.weight",
    "pooler.dense.bias": "cls.bias",
    "classifier.weight": "cls.output.weight",
    "classifier.bias": "cls.output.bias",
}
# Tensors llama.cpp's converter always keeps in f32, whatever the requested type.
_ALWAYS_F32_SUFFIXES = ("position_embd.weight", "token_types.weight")
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class HFModelDirectory:
    path: Path
    config: dict[str, Any]
    weights: list[Path]
    vocab: list[str]
    pooling: PoolingType  # RANK for a cross-encoder (a reranker: *ForSequenceClassification)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidModelFile(f"cannot read {path.name}: {error}") from None
    if not isinstance(value, dict):
        raise InvalidModelFile(f"{path.name} is not a JSON object")
    return value


def _read_vocab(directory: Path) -> list[str]:
    vocab_txt = directory / "vocab.txt"
    if vocab_txt.is_file():
        return vocab_txt.read_text(encoding="utf-8").splitlines()
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        model = _read_json(tokenizer_json).get("model", {})
        if model.get("type") == "WordPiece" and isinstance(model.get("vocab"), dict):
            by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
            return [token for token, _ in by_id]
    raise InvalidModelFile(f"{directory.name}: no WordPiece vocabulary (vocab.txt or tokenizer.json)")


def _read_pooling(directory: Path) -> PoolingType:
    pooling_config = directory / "1_Pooling" / "config.json"
    if not pooling_config.is_file():
        # sentence-transformers builds a plain Hugging Face model with mean pooling too.
        return PoolingType.MEAN
    config = _read_json(pooling_config)
    if config.get("pooling_mode_mean_tokens"):
        return PoolingType.MEAN
    if config.get("pooling_mode_cls_token"):
        return PoolingType.CLS
    if config.get("pooling_mode_lasttoken"):
        return PoolingType.LAST
    raise InvalidModelFile(f"{directory.name}: pooling mode in 1_Pooling/config.json is not supported by llama.cpp")


def inspect_hf_directory(directory: Path) -> HFModelDirectory:
    """Check that a directory holds a convertible BERT model; InvalidModelFile says what is missing."""
    if not (directory / "config.json").is_file():
        raise InvalidModelFile(f"{directory} has no config.json: not a Hugging Face model directory")
    config = _read_json(directory / "config.json")
    architectures = set(config.get("architectures") or [])
    if config.get("model_type") != "bert" and not architectures & BERT_ARCHITECTURES:
        raise InvalidModelFile(
            f"{directory.name}: model_type {config.get('model_type')!r} cannot be converted "
            "(emberd converts BERT models; give it a GGUF file for other architectures)"
        )
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise InvalidModelFile(f"{directory.name}: no .safetensors weights")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(config.get(key), int):
            raise InvalidModelFile(f"{directory.name}: config.json lacks {key}")
    # A cross-encoder scores a query/document pair with a classifier head: llama.cpp's rank pooling.
    pooling = PoolingType.RANK if "BertForSequenceClassification" in architectures else _read_pooling(directory)
    return HFModelDirectory(directory, config, weights, _read_vocab(directory), pooling)


def _phantom_space(token: str) -> str:
    # llama.cpp's WordPiece tokenizer marks word starts with U+2581 instead of marking continuations.
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def _special_tokens(directory: Path, vocab: list[str]) -> set[str]:
    specials = {token for token in _SPECIAL_TOKENS if token in vocab}
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        for added in _read_json(tokenizer_json).get("added_tokens", []):
            if added.get("special") and isinstance(added.get("content"), str):
                specials.add(added["content"])
    return specials


def _tensor_data(name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    data = data.astype(np.float32, copy=False)
    if data.ndim <= 1 or name.endswith(_ALWAYS_F32_SUFFIXES) or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 != 0:
        return data.astype(np.float16), GGMLQuantizationType.F16
    return quantize(data, qtype), qtype


def convert_hf_directory(
    directory: Path,
    output: Path,
    output_type: str = "f16",
    model_name: str = "",
    progress: Callable[[str], None] = lambda _status: None,
    token: CancelToken = NEVER_CANCELLED,
) -> None:
    """Write `directory` (a BERT model) as a GGUF embedding model at `output`. A cancelled `token`
    stops it between two tensors."""
    if output_type not in OUTPUT_TYPES:
        raise InvalidModelFile(f"unknown output type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    source = inspect_hf_directory(directory)
    qtype, file_type = OUTPUT_TYPES[output_type]
    config = source.config
    block_count = config["num_hidden_layers"]
    name_map = TensorNameMap(MODEL_ARCH.BERT, block_count)
    specials = _special_tokens(directory, source.vocab)

    writer = GGUFWriter(output, "bert")
    writer.add_name(model_name or directory.name)
    writer.add_file_type(file_type)
    writer.add_context_length(int(config.get("max_position_embeddings", 512)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(block_count)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(source.pooling)
    labels = [str(label) for _, label in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    if source.pooling == PoolingType.RANK and len(labels) > 1:
        writer.add_classifier_output_labels(labels)

    writer.add_tokenizer_model("bert")
    writer.add_token_list([_phantom_space(token) for token in source.vocab])
    writer.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in source.vocab])
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    token_ids = {token: index for index, token in enumerate(source.vocab)}
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

    progress("converting tensors")
    try:
        _add_tensors(writer, source, name_map, qtype, token)
    except (OSError, ValueError, SafetensorError) as error:
        raise InvalidModelFile(f"{directory.name}: cannot read weights: {error}") from None

    token.check()
    progress("writing gguf")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensors(
    writer: GGUFWriter,
    source: HFModelDirectory,
    name_map: TensorNameMap,
    qtype: GGMLQuantizationType,
    token: CancelToken,
) -> None:
    for weights in source.weights:
        with safe_open(str(weights), framework="numpy") as tensors:
            for hf_name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                token.check()
                bare = hf_name.removeprefix("bert.")
                head = _CLASSIFIER_HEAD.get(bare) if source.pooling == PoolingType.RANK else None
                if head is None and (
                    bare.startswith(("pooler.", "cls.", "classifier.")) or bare.endswith("position_ids")
                ):
                    continue  # not part of the encoder llama.cpp runs
                gguf_name = head or name_map.get_name(bare, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise InvalidModelFile(f"{source.path.name}: unexpected tensor {hf_name}")
                data, tensor_type = _tensor_data(gguf_name, tensors.get_tensor(hf_name), qtype)
                writer.add_tensor(gguf_name, data, raw_dtype=tensor_type)
