"""What a Hugging Face tokenizer.json says beyond its vocabulary: added tokens, and the special
tokens its post-processor puts around a text (what llama.cpp must add to match it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gguf import TokenType

from daemon.errors import InvalidModelFile


@dataclass(frozen=True)
class SpecialLayout:
    """The special tokens the post-processor adds: before a text, after it, between a pair's texts."""

    first: int | None = None
    last: int | None = None
    between: list[int] = field(default_factory=list)


def added_token_types(tokenizer: dict[str, Any]) -> dict[int, TokenType]:
    """Added tokens by id: a special one is a control token, another a user-defined one (llama.cpp
    matches both whole in a text, as Hugging Face does)."""
    types: dict[int, TokenType] = {}
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int) and isinstance(added.get("content"), str):
            types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    return types


def token_id(tokenizer: dict[str, Any], vocab_ids: dict[str, int], text: Any) -> int | None:
    """The id of a token spelt `text` (a string or tokenizer_config's {"content": ...})."""
    if isinstance(text, dict):
        text = text.get("content")
    if not isinstance(text, str):
        return None
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == text and isinstance(added.get("id"), int):
            return int(added["id"])
    return vocab_ids.get(text)


def _template_ids(processor: dict[str, Any], item: dict[str, Any]) -> list[int]:
    name = item["SpecialToken"]["id"]
    special = (processor.get("special_tokens") or {}).get(name) or {}
    ids = special.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise InvalidModelFile(f"tokenizer.json: the post-processor's special token {name!r} has no id")
    return ids


def _special_ids(items: list[list[int] | str]) -> list[int]:
    """The ids of the special tokens among template items with no text among them."""
    return [token for item in items if not isinstance(item, str) for token in item]


def _template_layout(processor: dict[str, Any]) -> SpecialLayout:
    def split(template: list[dict[str, Any]]) -> list[list[int] | str]:
        # Each item: a special token's ids, or "A"/"B" for a text.
        return [
            _template_ids(processor, item) if "SpecialToken" in item else str(item.get("Sequence", {}).get("id"))
            for item in template
        ]

    single = split(processor.get("single") or [])
    texts = [index for index, item in enumerate(single) if isinstance(item, str)]
    if len(texts) != 1:
        raise InvalidModelFile("tokenizer.json: the post-processor's template has no single text")
    before, after = _special_ids(single[: texts[0]]), _special_ids(single[texts[0] + 1 :])
    if len(before) > 1 or len(after) > 1:
        raise InvalidModelFile(
            "tokenizer.json: the post-processor adds several tokens on one side of a text; llama.cpp adds one"
        )
    pair = split(processor.get("pair") or [])
    pair_texts = [index for index, item in enumerate(pair) if isinstance(item, str)]
    between = _special_ids(pair[pair_texts[0] + 1 : pair_texts[1]]) if len(pair_texts) == 2 else []
    # A pair is [first] A [last] [between...] B [last]: what lies between, less the first text's end.
    between = between[1:] if after and between[:1] == after else between
    return SpecialLayout(before[0] if before else None, after[0] if after else None, between)


def special_layout(tokenizer: dict[str, Any]) -> SpecialLayout:
    """The special tokens tokenizer.json's post-processor adds (none without a post-processor)."""
    processor = tokenizer.get("post_processor")
    if not isinstance(processor, dict):
        return SpecialLayout()
    kind = processor.get("type")
    if kind == "Sequence":
        layouts = [special_layout({"post_processor": inner}) for inner in processor.get("processors") or []]
        adding = [layout for layout in layouts if layout != SpecialLayout()]
        return adding[0] if len(adding) == 1 else SpecialLayout()
    if kind == "TemplateProcessing":
        return _template_layout(processor)
    if kind in ("RobertaProcessing", "BertProcessing"):
        cls, sep = processor.get("cls"), processor.get("sep")
        if not (isinstance(cls, list) and isinstance(sep, list) and len(cls) == 2 and len(sep) == 2):
            raise InvalidModelFile(f"tokenizer.json: {kind} without its cls and sep tokens")
        # RoBERTa's pair: <s> A </s></s> B </s>; BERT's: [CLS] A [SEP] B [SEP].
        return SpecialLayout(int(cls[1]), int(sep[1]), [int(sep[1])] if kind == "RobertaProcessing" else [])
    if kind == "ByteLevel":
        return SpecialLayout()
    raise InvalidModelFile(f"tokenizer.json: post-processor {kind!r} is not supported")
