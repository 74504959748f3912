"""Named prompts a model carries ("query", "document", ...) and which one a request gets. Pure.

Retrieval models are trained with prefixes (nomic's "search_query: ", e5's "query: ", bge's query
instruction); clients forget them and lose quality. A model's prompts come from its alias
(configs/models.toml), `emberd create --prompt NAME=TEXT`, or a sentence-transformers directory's
config_sentence_transformers.json. None is applied unless asked (`prompt_name`, or OpenAI-side
`input_type`), so default vectors stay Ollama's, unless the model sets a `default_prompt_name`.

An alias also carries the model card's other input conventions (check_card_conventions):
`append_eos` (the card's inputs end with EOS, as Qwen3-Embedding's do), which the runner acts on
where the GGUF's tokenizer does not add it itself; and the card's `pooling` and `normalize`,
recorded to compare against, since llama.cpp pools as the GGUF's `<arch>.pooling_type` says and
emberd normalises every vector (Ollama's rule).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daemon.errors import InvalidInput, InvalidModelFile

MAX_PROMPT_CHARS = 4096
# llama.cpp's pooling types (enum llama_pooling_type), as an alias names the card's.
POOLING_NAMES = ("none", "mean", "cls", "last", "rank")
# A text, token ids, or a reranker's query/document pair (the runner's inputs).
PromptInput = str | list[int] | dict[str, str]
# Cohere's and Voyage's names for the two sides of retrieval, as prompt names.
INPUT_TYPE_PROMPTS = {
    "query": "query",
    "document": "document",
    "search_query": "query",
    "search_document": "document",
}


@dataclass(frozen=True)
class ModelPrompts:
    """What a model's card says to do with its inputs: named prompts, and its other conventions."""

    prompts: Mapping[str, str] = field(default_factory=dict)
    default_name: str | None = None  # applied when a request names none
    append_eos: bool = False  # every input ends with EOS: appended where the GGUF's tokenizer adds none
    pooling: str | None = None  # the card's pooling (recorded; the GGUF's pooling_type decides)
    normalize: bool | None = None  # whether the card normalises (recorded; emberd always does)

    def as_manifest(self) -> dict[str, Any]:
        return {"prompts": dict(self.prompts), "default_prompt_name": self.default_name}

    def conventions_as_manifest(self) -> dict[str, Any]:
        return {"append_eos": self.append_eos, "card_pooling": self.pooling, "card_normalize": self.normalize}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ModelPrompts:
        # A manifest written before the conventions were kept has none: the defaults.
        return cls(
            dict(manifest.get("prompts") or {}),
            manifest.get("default_prompt_name"),
            manifest.get("append_eos") is True,
            manifest.get("card_pooling"),
            manifest.get("card_normalize"),
        )


def check_prompts(prompts: Any, default_name: Any, where: str) -> ModelPrompts:
    """Validate prompts from a request, a config file or a model directory."""
    if not isinstance(prompts, Mapping) or not all(
        isinstance(name, str) and name and isinstance(text, str) and len(text) <= MAX_PROMPT_CHARS
        for name, text in prompts.items()
    ):
        raise InvalidInput(f"{where}: prompts must map names to texts of at most {MAX_PROMPT_CHARS} characters")
    if default_name is not None and (not isinstance(default_name, str) or default_name not in prompts):
        raise InvalidInput(f"{where}: default_prompt_name {default_name!r:.80} is not one of its prompts")
    return ModelPrompts(dict(prompts), default_name)


def check_card_conventions(
    prompts: ModelPrompts, append_eos: Any, pooling: Any, normalize: Any, where: str
) -> ModelPrompts:
    """`prompts` with a model card's conventions from a config file, each checked; `where` names
    the alias, each message the field."""
    if not isinstance(append_eos, bool):
        raise InvalidInput(f"{where}: append_eos must be true or false, got {append_eos!r:.80}")
    if pooling is not None and pooling not in POOLING_NAMES:
        raise InvalidInput(f"{where}: pooling must be one of {', '.join(POOLING_NAMES)}, got {pooling!r:.80}")
    if normalize is not None and not isinstance(normalize, bool):
        raise InvalidInput(f"{where}: normalize must be true or false, got {normalize!r:.80}")
    return replace(prompts, append_eos=append_eos, pooling=pooling, normalize=normalize)


def parse_prompt_option(text: str) -> tuple[str, str]:
    """`--prompt NAME=TEXT` as (NAME, TEXT)."""
    name, separator, prompt = text.partition("=")
    if not separator or not name:
        raise InvalidInput(f"--prompt takes NAME=TEXT, got {text!r}")
    return name, prompt


def read_sentence_transformers_prompts(directory: Path) -> ModelPrompts:
    """The `prompts` and `default_prompt_name` of a sentence-transformers directory, if it has them."""
    path = directory / "config_sentence_transformers.json"
    if not path.is_file():
        return ModelPrompts()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidModelFile(f"{path}: {error}") from None
    prompts = {name: text for name, text in (config.get("prompts") or {}).items() if text}
    default_name = config.get("default_prompt_name")
    return check_prompts(prompts, default_name if default_name in prompts else None, str(path))


def merge_prompts(base: ModelPrompts, override: ModelPrompts) -> ModelPrompts:
    return ModelPrompts({**base.prompts, **override.prompts}, override.default_name or base.default_name)


def choose_prompt(prompts: ModelPrompts, prompt_name: str | None, input_type: str | None = None) -> str:
    """The text to put before each input: the named prompt (which must exist), the one an
    input_type means (if the model has it: a model without a query prompt needs none), the model's
    default, or none."""
    if prompt_name is None and input_type is not None:
        side = INPUT_TYPE_PROMPTS.get(input_type)
        if side is None:
            raise InvalidInput(f"input_type must be one of {', '.join(INPUT_TYPE_PROMPTS)}, got {input_type!r}")
        return prompts.prompts.get(side, "")
    if prompt_name is None:
        prompt_name = prompts.default_name
        if prompt_name is None:
            return ""
    if prompt_name not in prompts.prompts:
        known = ", ".join(sorted(prompts.prompts)) or "none"
        raise InvalidInput(f"unknown prompt_name {prompt_name!r}; this model's prompts: {known}")
    return prompts.prompts[prompt_name]


def apply_prompt(prompt: str, inputs: Sequence[PromptInput]) -> list[PromptInput]:
    """Texts get the prompt before them; token ids (already a model input) and reranking pairs are
    taken as they are."""
    if not prompt:
        return list(inputs)
    return [prompt + item if isinstance(item, str) else item for item in inputs]
