"""Convert a Hugging Face model directory into a GGUF embedding model or reranker, as llama.cpp's
own converter writes it: BERT (bert.py), XLM-RoBERTa (xlm_roberta.py), Qwen3 (qwen3.py), ModernBERT
(modern_bert.py), NomicBert (nomic_bert.py); the writing they share is writer.py. Weights are read
from .safetensors only (never a pickle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from daemon.convert import bert, modern_bert, nomic_bert, qwen3, xlm_roberta
from daemon.convert.source import HFSource, read_source, require_weights
from daemon.convert.writer import OUTPUT_TYPES, ConversionPlan, write_gguf
from daemon.errors import InvalidModelFile
from daemon.jobs import NEVER_CANCELLED, CancelToken

__all__ = ["OUTPUT_TYPES", "ConversionPlan", "convert_hf_directory", "inspect_hf_directory"]

# Each family: the architectures and model types it converts, and how it plans a conversion.
_FAMILIES: list[tuple[str, set[str], set[str], Callable[[HFSource], ConversionPlan]]] = [
    ("BERT", bert.ARCHITECTURES, bert.MODEL_TYPES, bert.plan),
    ("XLM-RoBERTa", xlm_roberta.ARCHITECTURES, xlm_roberta.MODEL_TYPES, xlm_roberta.plan),
    ("Qwen3", qwen3.ARCHITECTURES, qwen3.MODEL_TYPES, qwen3.plan),
    ("ModernBERT", modern_bert.ARCHITECTURES, modern_bert.MODEL_TYPES, modern_bert.plan),
    ("NomicBert", nomic_bert.ARCHITECTURES, nomic_bert.MODEL_TYPES, nomic_bert.plan),
]
SUPPORTED = ", ".join(name for name, *_ in _FAMILIES)


def inspect_hf_directory(directory: Path) -> ConversionPlan:
    """Check that a directory holds a model emberd converts; InvalidModelFile says what is missing."""
    source = read_source(directory)
    model_type = source.config.get("model_type")
    for _name, architectures, model_types, plan in _FAMILIES:
        if model_type in model_types or source.architectures & architectures:
            require_weights(source)
            return plan(source)
    named = f"model_type {model_type!r}"
    if source.architectures:
        named += f" ({', '.join(sorted(source.architectures))})"
    raise InvalidModelFile(
        f"{directory.name}: {named} cannot be converted (emberd converts {SUPPORTED} models; give it a GGUF"
        " file for other architectures)"
    )


def convert_hf_directory(
    directory: Path,
    output: Path,
    output_type: str = "f16",
    model_name: str = "",
    progress: Callable[[str], None] = lambda _status: None,
    token: CancelToken = NEVER_CANCELLED,
) -> None:
    """Write `directory` as a GGUF model at `output`. A cancelled `token` stops it between two tensors."""
    if output_type not in OUTPUT_TYPES:
        raise InvalidModelFile(f"unknown output type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    write_gguf(inspect_hf_directory(directory), output, output_type, model_name, progress, token)
