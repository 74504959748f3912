"""Vectors as the types Cohere's embed v2 names: float, int8, uint8, binary, ubinary, base64.

Pure. The rules are sentence-transformers' `quantize_embeddings`, so a client that indexes with it
and queries emberd (or the reverse) gets the same integers:
- int8 and uint8: each dimension's calibrated range [low, high] cut into 255 steps; a value's step
  is floor((value - low) / step), clipped to 0..255 (uint8), less 128 for int8. The ranges are the
  model's, fixed when it was created or pulled (daemon.calibration), never the request's own
  vectors: the same text gets the same integers in any request and from any daemon of a fleet.
  They were calibrated on unit vectors at the model's full width, so int8/uint8 need both.
- ubinary: the signs (value > 0), packed 8 to a byte, first dimension in the high bit;
  binary: the same bytes less 128, as int8.
- base64: the float32 little-endian bytes of each vector, base64-encoded (Cohere's and OpenAI's).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from daemon.errors import InvalidInput

EMBEDDING_TYPES: Final = ("float", "int8", "uint8", "binary", "ubinary", "base64")
CALIBRATED_TYPES: Final = frozenset({"int8", "uint8"})
STEPS: Final = 255


@dataclass(frozen=True)
class QuantizationRanges:
    """Per dimension, the lowest and highest value of a model's unit vectors over the calibration
    texts (daemon.calibration)."""

    low: np.ndarray  # float32 (n_embd,)
    high: np.ndarray  # float32 (n_embd,)

    def as_manifest(self) -> dict[str, list[float]]:
        return {"low": [float(value) for value in self.low], "high": [float(value) for value in self.high]}

    @staticmethod
    def from_manifest(entry: Any) -> QuantizationRanges | None:
        """The manifest's "quantization_ranges", or None when it has none or an unusable one (a
        model stored before calibration existed, or a hand-edited file): it is calibrated again."""
        if not isinstance(entry, dict):
            return None
        try:
            low = np.asarray(entry["low"], dtype=np.float32)
            high = np.asarray(entry["high"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return None
        if low.ndim != 1 or low.shape != high.shape or not len(low) or not np.all(high >= low):
            return None
        return QuantizationRanges(low, high)


def check_embedding_types(types: list[str], what: str) -> list[str]:
    """The requested types, each once in the order given; an unknown one is a 400 naming the field."""
    unknown = [kind for kind in types if kind not in EMBEDDING_TYPES]
    if unknown:
        raise InvalidInput(f"{what} must be among {', '.join(EMBEDDING_TYPES)}; got {unknown[0]!r}")
    return list(dict.fromkeys(types))


def check_calibrated_use(types: list[str], normalized: bool, cut: bool) -> None:
    """int8/uint8 ranges hold for unit vectors at the model's full width only: a 400 otherwise."""
    calibrated = [kind for kind in types if kind in CALIBRATED_TYPES]
    if calibrated and not normalized:
        raise InvalidInput(f"{calibrated[0]} vectors are calibrated on normalized vectors: leave normalize on")
    if calibrated and cut:
        raise InvalidInput(f"{calibrated[0]} vectors are calibrated at the model's full width: leave out dimensions")


def quantize_steps(vectors: np.ndarray, ranges: QuantizationRanges) -> np.ndarray:
    """Each value's step in its dimension's range, 0..255 (float64 arithmetic on float32 input, as
    sentence-transformers computes it)."""
    if vectors.shape[1] != len(ranges.low):
        raise InvalidInput(f"the model's ranges have {len(ranges.low)} dimensions, the vectors {vectors.shape[1]}")
    step = (ranges.high - ranges.low) / STEPS
    step = np.where(step == 0, 1, step)
    steps: np.ndarray = np.clip(np.floor((vectors - ranges.low) / step), 0, STEPS)
    return steps


def typed_vectors(vectors: np.ndarray, embedding_type: str, ranges: QuantizationRanges | None) -> Any:
    """`vectors` (float32, rows) as `embedding_type`: an array orjson writes as lists of numbers, or
    for base64 a list of strings. int8/uint8 need `ranges`."""
    if embedding_type == "float":
        return vectors.astype(np.float32, copy=False)
    if embedding_type == "base64":
        rows = np.ascontiguousarray(vectors, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    if embedding_type in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if embedding_type == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if embedding_type in CALIBRATED_TYPES:
        assert ranges is not None, "int8/uint8 without the model's ranges"
        steps = quantize_steps(vectors, ranges)
        return steps.astype(np.uint8) if embedding_type == "uint8" else (steps - 128).astype(np.int8)
    raise InvalidInput(f"unknown embedding type {embedding_type!r}")
