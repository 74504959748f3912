"""BGE-M3's sparse and ColBERT heads: read from torch files without running their pickles, stored, applied."""

from __future__ import annotations

import collections
import functools
import io
import pickle
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import numpy as np

from daemon.errors import InvalidInput, InvalidModelFile
from daemon.vectors import normalize_rows

# The files FlagEmbedding saves beside a BGE-M3 model (torch.save of each Linear's state dict).
SPARSE_FILE = "sparse_linear.pt"
COLBERT_FILE = "colbert_linear.pt"
HEAD_FILES = (SPARSE_FILE, COLBERT_FILE)
# A head file is a few MiB (bge-m3's colbert_linear.pt: 1024 x 1024 floats, 4 MiB); a bound keeps a
# hostile zip from making the reader hold gigabytes.
MAX_HEAD_BYTES = 64 * 1024 * 1024
_MAX_PICKLE_BYTES = 1024 * 1024


class UnsafeCheckpoint(InvalidModelFile):
    """A torch file that is not a plain tensor state dict (its pickle names something else)."""


# -- reading torch's zip format without torch's unpickler -------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """torch.FloatStorage and its kin as the pickle names them: only the element type matters."""

    name: str


ByteOrder = Literal["<", ">"]


def _bfloat16_as_float32(raw: bytes, byteorder: ByteOrder) -> np.ndarray:
    halves = np.frombuffer(raw, dtype=np.dtype("u2").newbyteorder(byteorder))
    return (halves.astype(np.uint32) << 16).view(np.float32)


# The storages a float head may hold: numpy's dtype for each (bfloat16 widened by hand).
_STORAGE_DTYPES = {"FloatStorage": "f4", "HalfStorage": "f2", "DoubleStorage": "f8", "BFloat16Storage": "bf16"}


def _rebuild_tensor(
    storage: np.ndarray,
    offset: int,
    size: Sequence[int],
    stride: Sequence[int],
    _requires_grad: bool = False,
    _hooks: Any = None,
    _metadata: Any = None,
) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2's job: a view of a storage by offset, size and stride (in
    elements), copied out, bounds checked first."""
    if not all(isinstance(value, int) and value >= 0 for value in (offset, *size, *stride)):
        raise UnsafeCheckpoint("a tensor with a negative or non-integer offset, size or stride")
    last = offset + sum((extent - 1) * step for extent, step in zip(size, stride, strict=True)) if all(size) else offset
    if all(size) and last >= len(storage):
        raise UnsafeCheckpoint("a tensor reaches past the end of its storage")
    if not all(size):
        return np.zeros(tuple(size), dtype=np.float32)
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(step * itemsize for step in stride), writeable=False
    )
    return np.array(view, dtype=np.float32)


def _rebuild_parameter(data: np.ndarray, _requires_grad: bool = False, _hooks: Any = None) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """pickle, but every global the stream names must be one of the few a tensor state dict needs,
    each mapped to a function of ours; anything else (os.system, builtins.eval, torch's own
    loaders) is refused before it is called."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Callable[..., Any]]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, stream: IO[bytes], storage: Callable[[_StorageType, str, int], np.ndarray], label: str) -> None:
        super().__init__(stream)
        self._storage = storage
        self._label = label

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpoint(
            f"{self._label}: its pickle names {module}.{name}, which a tensor state dict never needs: refused"
            " (nothing in it was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        # torch writes ("storage", storage type, key, location, element count) for each storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"{self._label}: an unknown persistent id in its pickle")
        _kind, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeCheckpoint(f"{self._label}: a malformed storage reference in its pickle")
        return self._storage(storage_type, key, numel)


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A torch.save'd state dict (torch's zip format) as float32 arrays, without torch and without
    running anything its pickle names but the tensor rebuilders (see _StateDictUnpickler)."""
    label = path.name
    try:
        if path.stat().st_size > MAX_HEAD_BYTES:
            raise InvalidModelFile(f"{label}: larger than {MAX_HEAD_BYTES} bytes, too large for a head")
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InvalidModelFile(f"{label}: not a torch file in zip format (torch >= 1.6 saves one)") from None
    except OSError as error:
        raise InvalidModelFile(f"{label}: {error}") from None
    with archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise InvalidModelFile(f"{label}: not a torch file (no single data.pkl in it)")
        prefix = pickles[0].removesuffix("data.pkl")
        byteorder: ByteOrder = "<"
        if f"{prefix}byteorder" in names:
            byteorder = ">" if archive.read(f"{prefix}byteorder").strip() == b"big" else "<"

        def storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise UnsafeCheckpoint(f"{label}: a storage ({key}) that is not in the file")
            info = archive.getinfo(member)
            kind = _STORAGE_DTYPES[storage_type.name]
            itemsize = 2 if kind == "bf16" else np.dtype(kind).itemsize
            if info.file_size > MAX_HEAD_BYTES or info.file_size < numel * itemsize:
                raise UnsafeCheckpoint(f"{label}: storage {key} is not the size its pickle says")
            raw = archive.read(member)[: numel * itemsize]
            if kind == "bf16":
                return _bfloat16_as_float32(raw, byteorder)
            return np.frombuffer(raw, dtype=np.dtype(kind).newbyteorder(byteorder))

        if archive.getinfo(pickles[0]).file_size > _MAX_PICKLE_BYTES:
            raise InvalidModelFile(f"{label}: its pickle is too large for a state dict")
        stream = io.BytesIO(archive.read(pickles[0]))
        try:
            loaded = _StateDictUnpickler(stream, storage, label).load()
        except UnsafeCheckpoint:
            raise
        except Exception as error:  # a truncated or malformed pickle
            raise InvalidModelFile(f"{label}: not a readable state dict ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, np.ndarray) for key, value in loaded.items()
    ):
        raise InvalidModelFile(f"{label}: not a state dict of tensors")
    return dict(loaded)


# -- the heads --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heads:
    """BGE-M3's two heads over the last hidden states (hidden = the model's n_embd)."""

    sparse_weight: np.ndarray  # (1, hidden)
    sparse_bias: np.ndarray  # (1,)
    colbert_weight: np.ndarray  # (dims, hidden)
    colbert_bias: np.ndarray  # (dims,)

    @property
    def hidden(self) -> int:
        return int(self.sparse_weight.shape[1])

    @property
    def colbert_dimensions(self) -> int:
        return int(self.colbert_weight.shape[0])


def _linear(state: dict[str, np.ndarray], label: str, outputs: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A Linear's weight (out, in) and bias (out,) from its state dict ("weight", "bias", or with
    a prefix such as "linear.weight")."""
    weights = [value for key, value in state.items() if key.rsplit(".", 1)[-1] == "weight"]
    biases = [value for key, value in state.items() if key.rsplit(".", 1)[-1] == "bias"]
    if len(weights) != 1 or len(biases) != 1:
        raise InvalidModelFile(f"{label}: not a Linear layer's state dict (keys: {sorted(state)})")
    weight, bias = weights[0], biases[0]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or (outputs is not None and weight.shape[0] != outputs):
        raise InvalidModelFile(f"{label}: a Linear of shapes {weight.shape} and {bias.shape} is not the head expected")
    return weight, bias


def read_heads(directory: Path, hidden: int) -> Heads | None:
    """A BGE-M3 folder's heads (sparse_linear.pt and colbert_linear.pt), checked against the model's
    hidden size; None when the folder has neither."""
    present = [name for name in HEAD_FILES if (directory / name).is_file()]
    if not present:
        return None
    if len(present) != len(HEAD_FILES):
        missing = next(name for name in HEAD_FILES if name not in present)
        raise InvalidModelFile(f"{directory.name}: {present[0]} without {missing}: BGE-M3's heads come as a pair")
    return read_head_files(directory / SPARSE_FILE, directory / COLBERT_FILE, hidden)


def read_head_files(sparse_file: Path, colbert_file: Path, hidden: int) -> Heads:
    """The heads from their two torch files (wherever they are: a pull stages each on its own),
    checked against the model's hidden size."""
    sparse_weight, sparse_bias = _linear(read_state_dict(sparse_file), SPARSE_FILE, 1)
    colbert_weight, colbert_bias = _linear(read_state_dict(colbert_file), COLBERT_FILE, None)
    for label, weight in ((SPARSE_FILE, sparse_weight), (COLBERT_FILE, colbert_weight)):
        if weight.shape[1] != hidden:
            raise InvalidModelFile(f"{label}: takes {weight.shape[1]} values, and the model gives {hidden}")
    return Heads(sparse_weight, sparse_bias, colbert_weight, colbert_bias)


_NPZ_KEYS = ("sparse_weight", "sparse_bias", "colbert_weight", "colbert_bias")


def write_heads(heads: Heads, handle: IO[bytes]) -> None:
    """The heads as an .npz (numpy's zip of .npy arrays: no pickle), the blob the store keeps."""
    arrays: dict[str, Any] = {key: np.ascontiguousarray(getattr(heads, key), dtype=np.float32) for key in _NPZ_KEYS}
    np.savez(handle, **arrays)


@functools.lru_cache(maxsize=8)
def load_heads(path: Path) -> Heads:
    """A heads blob (see write_heads); cached by path: a blob's name is its digest."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return Heads(*(np.array(arrays[key], dtype=np.float32) for key in _NPZ_KEYS))
    except (OSError, ValueError, KeyError) as error:
        raise InvalidModelFile(f"the heads blob {path.name} is unreadable: {error}") from None


# -- applying them (FlagEmbedding's BGE_M3 formulas) ------------------------------------------------


# llama.cpp's pooling types (llama_pooling_type) that pool_tokens does.
_MEAN, _CLS, _LAST = 1, 2, 3


def pool_tokens(token_vectors: np.ndarray, pooling_type: int) -> np.ndarray:
    """An input's pooled vector from its token vectors, as llama.cpp pools (not normalised):
    BGE-M3's dense vector is its CLS pooling, the first token's."""
    if pooling_type == _CLS:
        return np.asarray(token_vectors[0], dtype=np.float32)
    if pooling_type == _LAST:
        return np.asarray(token_vectors[-1], dtype=np.float32)
    if pooling_type == _MEAN:
        return np.asarray(token_vectors.mean(axis=0), dtype=np.float32)
    raise InvalidInput(f"a model of pooling type {pooling_type} has no dense vector from its token vectors")


def sparse_weights(
    heads: Heads, token_vectors: np.ndarray, token_ids: Sequence[int], special_ids: Iterable[int]
) -> list[tuple[int, float]]:
    """(token id, weight) by token id: relu(sparse_linear(h_t)) of each token, the largest over a
    token's occurrences, special tokens ([CLS]/<s>, </s>, <pad>, <unk>) and zero weights left out."""
    weights = np.maximum(token_vectors @ heads.sparse_weight[0] + heads.sparse_bias[0], 0.0)
    skipped = set(special_ids)
    best: dict[int, float] = {}
    for token, weight in zip(token_ids, weights.tolist(), strict=True):
        if token not in skipped and weight > 0 and weight > best.get(token, 0.0):
            best[token] = weight
    return sorted(best.items())


def colbert_vectors(heads: Heads, token_vectors: np.ndarray) -> np.ndarray:
    """BGE-M3's multi-vector output: colbert_linear(h_t) of every token after the first,
    each unit length."""
    projected = token_vectors[1:] @ heads.colbert_weight.T + heads.colbert_bias
    return normalize_rows(projected.astype(np.float32))
