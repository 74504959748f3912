"""A byte-level BPE vocabulary as tokenizer.json holds it (Qwen3, ModernBERT): tokens with added
tokens in place, token types, merges as llama.cpp reads them, the post-processor's special tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFWriter, TokenType

from daemon.convert.source import HFSource
from daemon.convert.tokenizer_json import SpecialLayout, added_token_types, special_layout
from daemon.errors import InvalidModelFile


@dataclass(frozen=True)
class BPEVocab:
    tokens: list[str]
    types: list[TokenType]
    merges: list[str]
    layout: SpecialLayout
    ids: dict[str, int]

    def write(self, writer: GGUFWriter, pre_tokenizer: str) -> None:
        """The vocabulary as llama.cpp's "gpt2" (byte-level BPE) tokenizer, split by `pre_tokenizer`."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    result = []
    for merge in merges:
        if isinstance(merge, str):
            result.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
            # llama.cpp splits a merge at its space: a space inside a part is written as U+0120's kin.
            result.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge))
        else:
            raise InvalidModelFile("tokenizer.json: a merge is neither 'a b' nor ['a', 'b']")
    return result


def bpe_tokenizer_json(source: HFSource) -> dict[str, Any]:
    """tokenizer.json, which must hold a BPE model with its vocabulary."""
    tokenizer = source.json_file("tokenizer.json")
    model = (tokenizer or {}).get("model") or {}
    if tokenizer is None or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InvalidModelFile(f"{source.name}: no byte-level BPE vocabulary (tokenizer.json)")
    return tokenizer


def read_bpe_vocab(source: HFSource, tokenizer: dict[str, Any]) -> BPEVocab:
    """The vocabulary of a tokenizer.json that bpe_tokenizer_json accepted, padded with unused
    tokens to config.json's vocab_size (an embedding often has spare rows)."""
    model = tokenizer["model"]
    by_id: dict[int, str] = {index: text for text, index in model["vocab"].items() if isinstance(index, int)}
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int) and isinstance(added.get("content"), str):
            by_id[added["id"]] = added["content"]
    size = max(max(by_id) + 1, int(source.config.get("vocab_size") or 0))
    added_types = added_token_types(tokenizer)
    # Ids the tokenizer never gives (the embedding's spare rows): llama.cpp wants a token for each.
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(size)]
    types = [added_types.get(index, TokenType.NORMAL if index in by_id else TokenType.UNUSED) for index in range(size)]
    ids = {text: index for index, text in by_id.items()}
    return BPEVocab(tokens, types, _merges(model), special_layout(tokenizer), ids)
