"""The GGUF writing every family shares: output types, tensor types, the tensor loop, the file."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, PoolingType
from gguf.quants import quantize
from safetensors import SafetensorError, safe_open

from daemon.convert.source import HFSource
from daemon.errors import InvalidModelFile
from daemon.jobs import CancelToken

OUTPUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    # bfloat16: f32's exponent, 8 bits of mantissa. llama.cpp multiplies it natively where the CPU
    # has AVX512-BF16 (all-MiniLM on this AMD EPYC: 1.23x f16's texts/s, docs/performance.md).
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Tensors llama.cpp's converter always keeps in f32, whatever the requested type.
_ALWAYS_F32_SUFFIXES = ("position_embd.weight", "token_types.weight")

# A tensor as the family maps it: its GGUF name and its data (as llama.cpp's graph wants it).
Tensors = Iterable[tuple[str, np.ndarray]]


class ConversionPlan(Protocol):
    """What one family (BERT, XLM-RoBERTa, Qwen3) decided about a directory it can convert."""

    @property
    def source(self) -> HFSource: ...

    @property
    def architecture(self) -> str: ...  # llama.cpp's name: "bert", "qwen3"

    @property
    def pooling(self) -> PoolingType: ...  # RANK for a reranker

    def write_metadata(self, writer: GGUFWriter) -> None:
        """Hyperparameters and the tokenizer."""

    def tensors(self, hf_name: str, read: Callable[[], np.ndarray]) -> Tensors:
        """The GGUF tensors one Hugging Face tensor becomes (none: llama.cpp does not run it)."""


def tensor_data(name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    data = data.astype(np.float32, copy=False)
    if data.ndim <= 1 or name.endswith(_ALWAYS_F32_SUFFIXES) or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 != 0:
        return data.astype(np.float16), GGMLQuantizationType.F16
    return quantize(data, qtype), qtype


def write_gguf(
    plan: ConversionPlan,
    output: Path,
    output_type: str,
    model_name: str,
    progress: Callable[[str], None],
    token: CancelToken,
) -> None:
    qtype, file_type = OUTPUT_TYPES[output_type]
    writer = GGUFWriter(output, plan.architecture)
    writer.add_name(model_name or plan.source.name)
    writer.add_file_type(file_type)
    writer.add_pooling_type(plan.pooling)
    plan.write_metadata(writer)

    progress("converting tensors")
    try:
        for weights in plan.source.weights:
            with safe_open(str(weights), framework="numpy") as tensors:
                for hf_name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                    token.check()
                    for gguf_name, data in plan.tensors(hf_name, functools.partial(tensors.get_tensor, hf_name)):
                        converted, tensor_type = tensor_data(gguf_name, data, qtype)
                        writer.add_tensor(gguf_name, converted, raw_dtype=tensor_type)
    except (OSError, ValueError, SafetensorError) as error:
        raise InvalidModelFile(f"{plan.source.name}: cannot read weights: {error}") from None

    token.check()
    progress("writing gguf")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
