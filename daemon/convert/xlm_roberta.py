"""XLM-RoBERTa (bge-m3, multilingual-e5, bge-reranker-v2-m3) as llama.cpp's converter writes it:
the "bert" graph with a SentencePiece unigram vocabulary ("t5" tokenizer: pieces, scores, the
normaliser's charsmap), position embeddings without their first pad_token_id + 1 rows, and the
classifier head of XLMRobertaForSequenceClassification for rank pooling."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

from daemon.convert import sentencepiece_model as spm
from daemon.convert.bert import ENCODER_SETTINGS, encoder_tensor_name, write_encoder_metadata
from daemon.convert.source import HFSource, read_pooling
from daemon.convert.tokenizer_json import SpecialLayout, added_token_types, special_layout, token_id
from daemon.convert.writer import Tensors
from daemon.errors import InvalidModelFile

ARCHITECTURES = {"XLMRobertaModel", "XLMRobertaForSequenceClassification", "XLMRobertaForMaskedLM"}
MODEL_TYPES = {"xlm-roberta"}
# XLMRobertaForSequenceClassification's head: a dense layer (then tanh) and the projection, as
# llama.cpp's BERT graph runs them for rank pooling.
_CLASSIFIER_HEAD = {
    "classifier.dense.weight": "cls.weight",
    "classifier.dense.bias": "cls.bias",
    "classifier.out_proj.weight": "cls.output.weight",
    "classifier.out_proj.bias": "cls.output.bias",
}
# XLMRobertaTokenizer's four first ids, which fairseq put before SentencePiece's own pieces.
_FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
_UNUSED_SCORE = -10000.0


@dataclass(frozen=True)
class UnigramVocab:
    tokens: list[str]
    scores: list[float]
    types: list[TokenType]
    precompiled_charsmap: bytes
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    layout: SpecialLayout


def _charsmap(normalizer: Any) -> bytes:
    normalizers = normalizer.get("normalizers", []) if isinstance(normalizer, dict) else []
    for item in [normalizer, *normalizers]:
        if isinstance(item, dict) and item.get("type") == "Precompiled":
            try:
                return base64.b64decode(item.get("precompiled_charsmap") or "")
            except (binascii.Error, ValueError):
                raise InvalidModelFile("tokenizer.json: the precompiled charsmap is not base64") from None
    return b""


def _prepends_space(pre_tokenizer: Any, default: bool) -> bool:
    for item in [pre_tokenizer, *(pre_tokenizer or {}).get("pretokenizers", [])]:
        if isinstance(item, dict) and item.get("type") == "Metaspace":
            if "prepend_scheme" in item:
                return bool(item["prepend_scheme"] != "never")
            return bool(item.get("add_prefix_space", default))
    return default


def _vocab_from_tokenizer_json(source: HFSource, tokenizer: dict[str, Any]) -> UnigramVocab:
    model = tokenizer.get("model") or {}
    pieces = model.get("vocab")
    if model.get("type") != "Unigram" or not isinstance(pieces, list):
        raise InvalidModelFile(f"{source.name}: tokenizer.json holds no SentencePiece unigram vocabulary")
    added = added_token_types(tokenizer)
    unk_id = model.get("unk_id")
    tokens, scores, types = [], [], []
    for index, entry in enumerate(pieces):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InvalidModelFile(f"{source.name}: tokenizer.json's unigram entry {index} is not [piece, score]")
        tokens.append(entry[0])
        scores.append(float(entry[1]))
        types.append(TokenType.UNKNOWN if index == unk_id else added.get(index, TokenType.NORMAL))
    config = source.json_file("tokenizer_config.json") or {}
    # SentencePiece drops leading, trailing and repeated spaces (remove_extra_whitespaces), and
    # transformers' XLMRobertaTokenizer splits on whitespace before its Metaspace as well.
    return UnigramVocab(
        tokens,
        scores,
        types,
        _charsmap(tokenizer.get("normalizer")),
        _prepends_space(tokenizer.get("pre_tokenizer"), bool(config.get("add_prefix_space", True))),
        True,
        special_layout(tokenizer),
    )


def _vocab_from_sentencepiece(source: HFSource) -> UnigramVocab:
    model = spm.read_sentencepiece_model(source.path / "sentencepiece.bpe.model")
    if model.model_type != spm.UNIGRAM:
        raise InvalidModelFile(f"{source.name}: sentencepiece.bpe.model is not a unigram model")
    kinds = {
        spm.UNKNOWN: TokenType.UNKNOWN,
        spm.CONTROL: TokenType.CONTROL,
        spm.USER_DEFINED: TokenType.USER_DEFINED,
        spm.UNUSED: TokenType.UNUSED,
        spm.BYTE: TokenType.BYTE,
    }
    # XLMRobertaTokenizer's ids: <s> <pad> </s> <unk>, then SentencePiece's pieces past its own
    # three specials (<unk> <s> </s>) one id later, then <mask>.
    tokens = [*_FAIRSEQ_SPECIALS, *(piece.text for piece in model.pieces[3:]), "<mask>"]
    scores = [0.0] * 4 + [piece.score for piece in model.pieces[3:]] + [0.0]
    types = [TokenType.CONTROL] * 3 + [TokenType.UNKNOWN]
    types += [kinds.get(piece.kind, TokenType.NORMAL) for piece in model.pieces[3:]] + [TokenType.CONTROL]
    layout = SpecialLayout(first=0, last=2, between=[2])  # <s> A </s></s> B </s>
    return UnigramVocab(
        tokens,
        scores,
        types,
        model.precompiled_charsmap,
        model.add_dummy_prefix,
        model.remove_extra_whitespaces,
        layout,
    )


def _read_vocab(source: HFSource) -> UnigramVocab:
    tokenizer = source.json_file("tokenizer.json")
    if tokenizer is not None:
        vocab = _vocab_from_tokenizer_json(source, tokenizer)
    elif (source.path / "sentencepiece.bpe.model").is_file():
        vocab = _vocab_from_sentencepiece(source)
    else:
        raise InvalidModelFile(
            f"{source.name}: no SentencePiece vocabulary (tokenizer.json or sentencepiece.bpe.model)"
        )
    rows = int(source.config.get("vocab_size") or 0)
    if len(vocab.tokens) > rows > 0:
        raise InvalidModelFile(f"{source.name}: the tokenizer has {len(vocab.tokens)} tokens, the model {rows} rows")
    # Rows of the embedding no token uses: llama.cpp wants a token for each.
    padding = range(len(vocab.tokens), rows)
    vocab.tokens.extend(f"[PAD{index}]" for index in padding)
    vocab.scores.extend(_UNUSED_SCORE for _ in padding)
    vocab.types.extend(TokenType.UNUSED for _ in padding)
    return vocab


@dataclass(frozen=True)
class XLMRobertaPlan:
    source: HFSource
    vocab: UnigramVocab
    pooling: PoolingType
    position_offset: int  # RoBERTa numbers positions from pad_token_id + 1
    architecture: str = "bert"

    def write_metadata(self, writer: GGUFWriter) -> None:
        config = self.source.config
        context = int(config.get("max_position_embeddings", 514)) - self.position_offset
        write_encoder_metadata(writer, config, context, self.pooling)
        vocab = self.vocab
        writer.add_tokenizer_model("t5")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
        if vocab.precompiled_charsmap:
            writer.add_precompiled_charsmap(vocab.precompiled_charsmap)
        self._write_specials(writer)

    def _write_specials(self, writer: GGUFWriter) -> None:
        tokenizer = self.source.json_file("tokenizer.json") or {}
        config = self.source.json_file("tokenizer_config.json") or {}
        ids = {token: index for index, token in enumerate(self.vocab.tokens)}
        layout = self.vocab.layout

        def special(key: str, default: str) -> int | None:
            return token_id(tokenizer, ids, config.get(key, default))

        bos = layout.first if layout.first is not None else special("bos_token", "<s>")
        eos = layout.last if layout.last is not None else special("eos_token", "</s>")
        sep = layout.between[0] if layout.between else special("sep_token", "</s>")
        for value, add in (
            (bos, writer.add_bos_token_id),
            (eos, writer.add_eos_token_id),
            (sep, writer.add_sep_token_id),
            (special("unk_token", "<unk>"), writer.add_unk_token_id),
            (special("pad_token", "<pad>"), writer.add_pad_token_id),
            (special("mask_token", "<mask>"), writer.add_mask_token_id),
        ):
            if value is not None:
                add(value)
        # What the Hugging Face tokenizer puts around a text, and between a pair's texts (llama.cpp
        # lays a pair out as [BOS] A [EOS] [SEP] B [EOS], each where it is added).
        writer.add_add_bos_token(layout.first is not None)
        writer.add_add_eos_token(layout.last is not None)
        writer.add_add_sep_token(len(layout.between) == 1)

    def tensors(self, hf_name: str, read: Callable[[], np.ndarray]) -> Tensors:
        bare = hf_name.removeprefix("roberta.")
        head = _CLASSIFIER_HEAD if self.pooling == PoolingType.RANK else None
        gguf_name = encoder_tensor_name(self.source, bare, head)
        if gguf_name is None:
            return []
        data = read()
        if bare == "embeddings.position_embeddings.weight":
            # Position p of a text is row p + pad_token_id + 1 in RoBERTa; llama.cpp counts from row 0.
            data = data[self.position_offset :]
        return [(gguf_name, data)]


def plan(source: HFSource) -> XLMRobertaPlan:
    for key in ENCODER_SETTINGS:
        source.int_setting(key)
    if "XLMRobertaForSequenceClassification" in source.architectures:
        pooling = PoolingType.RANK
    else:
        pooling = read_pooling(source.path) or PoolingType.MEAN  # sentence-transformers' default
    pad_token_id = source.config.get("pad_token_id", 1)
    if not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise InvalidModelFile(f"{source.name}: config.json's pad_token_id is not a token id")
    return XLMRobertaPlan(source, _read_vocab(source), pooling, pad_token_id + 1)
