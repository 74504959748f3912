"""GGUF header facts, read with bounded reads: no weights are loaded and no array is materialised
(the vocabulary's token texts are read once, as they go by, to find one spelled twice: llama.cpp aborts).

gguf's GGUFReader parses every field (a 250k-token vocabulary becomes a quarter of a million Python
objects); deciding whether a file is an embedding model needs a few scalars only, so this module walks
the key/value section and skips what it does not need.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType, PoolingType

from daemon.errors import InvalidModelFile, UnsupportedModelFile

GGUF_MAGIC = b"GGUF"
_MAX_KV_COUNT = 1 << 16
_MAX_TENSOR_COUNT = 1 << 20
_MAX_STRING_BYTES = 1 << 20
# The whole header (key/values and tensor infos), which bounds what a read holds and how long it
# takes: each item's bound alone would let 65,536 keys of 1 MiB each through. The largest real
# headers (a 262k-token vocabulary with its merges and scores) are a few tens of MiB.
MAX_HEADER_BYTES = 64 << 20
_MAX_DIMS = 8
# The longest array a real model has is its merges or vocabulary (a few hundred thousand items).
_MAX_ARRAY_LENGTH = 1 << 24
# Arrays whose item type llama.cpp takes for granted (it would abort on another).
_ARRAY_ITEM_TYPES = {
    "tokenizer.ggml.tokens": GGUFValueType.STRING,
    "tokenizer.ggml.merges": GGUFValueType.STRING,
    "tokenizer.ggml.token_type": GGUFValueType.INT32,
    "tokenizer.ggml.scores": GGUFValueType.FLOAT32,
}
_DEFAULT_ALIGNMENT = 32
# String arrays are walked in reads of this size, not two reads an item: a BufferedReader's tell()
# is a system call, and a 250k-token vocabulary took 450 ms of them.
_STRING_CHUNK_BYTES = 1 << 20
# The vocabulary: llama.cpp maps each token's text to its id, and aborts on a text spelled twice.
_TOKENS_KEY = "tokenizer.ggml.tokens"
# How much of a vocabulary is checked for a text spelled twice, which bounds what the check holds
# (about 100 bytes a token beside its text): the largest real vocabularies have 262,144 tokens and
# 2 MiB of text. Past either bound a file is left to llama.cpp (a create's or pull's vocabulary-only
# load refuses it by its abort).
_MAX_CHECKED_TOKENS = 1 << 19
_MAX_CHECKED_TEXT_BYTES = 8 << 20
# llama.cpp's LLAMA_MAX_LAYERS: a block_count outside 1..512 fails a GGML_ASSERT as it loads (an abort).
_MAX_LAYERS = 512


@dataclass(frozen=True)
class _AddedToken:
    """A special token llama.cpp's tokenizer adds to every text, and aborts on (GGML_ASSERT) when it
    has no id for it: the id is the key's when inside the vocabulary, else llama.cpp's default id
    for the tokenizer when inside it, else none."""

    label: str
    key: str
    default_id: int | None
    flag: str | None  # the tokenizer.ggml.add_*_token key that turns it on or off (None: always added)
    added_by_default: bool = True


_BOS, _EOS = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"
_ADD_BOS, _ADD_EOS = "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"
# Per tokenizer.ggml.model, as llama.cpp's llama-vocab.cpp sets them up.
_ADDED_TOKENS: dict[str, tuple[_AddedToken, ...]] = {
    "bert": (  # WordPiece adds [CLS] and [SEP] whatever the flags say
        _AddedToken("[CLS]", _BOS, 101, None),
        _AddedToken("[SEP]", "tokenizer.ggml.seperator_token_id", 102, None),  # sic: the GGUF key's spelling
    ),
    "llama": (_AddedToken("BOS", _BOS, 1, _ADD_BOS), _AddedToken("EOS", _EOS, 2, _ADD_EOS, False)),
    "t5": (_AddedToken("BOS", _BOS, None, _ADD_BOS, False), _AddedToken("EOS", _EOS, 1, _ADD_EOS)),
    "gpt2": (_AddedToken("BOS", _BOS, 11, _ADD_BOS, False), _AddedToken("EOS", _EOS, 11, _ADD_EOS, False)),
}

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFFacts:
    """What the daemon needs to know about a model before loading it."""

    architecture: str
    name: str
    context_length: int
    embedding_length: int
    block_count: int
    pooling_type: int  # gguf.PoolingType; NONE (0) means "not an embedding model"
    causal_attention: bool
    file_type: str  # "F16", "Q8_0", ...
    parameter_count: int
    tensor_count: int
    # Scalar and string metadata (arrays are None: skipped, not read), for /api/show.
    metadata: dict[str, Any]
    # For the memory estimate. Defaults keep manifests written before they existed readable (0: not
    # known there; the scheduler reads the header again at load).
    vocab_size: int = 0
    feed_forward_length: int = 0
    # The attention's shape, for the KV cache a causal model's context allocates (0: not known).
    head_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0  # per head
    value_length: int = 0  # per head
    # What sizes llama.cpp's compute buffer beyond the widths above (0: none, or not known).
    expert_used_count: int = 0  # experts each token goes through in a mixture-of-experts layer
    sliding_window: int = 0  # tokens a local (sliding-window) attention layer sees
    # Where the weights go when layers are offloaded to a GPU (see layer_placement_bytes): each
    # repeating layer's bytes, and the output layer's (llama.cpp offloads it first).
    layer_bytes: tuple[int, ...] = ()
    output_layer_bytes: int = 0

    @property
    def is_embedding_model(self) -> bool:
        return self.pooling_type not in (PoolingType.NONE, PoolingType.RANK)

    @property
    def is_reranker(self) -> bool:
        """A cross-encoder: llama.cpp's rank pooling scores a query/document pair."""
        return self.pooling_type == PoolingType.RANK

    @property
    def capabilities(self) -> list[str]:
        return ["embedding"] if self.is_embedding_model else ["rerank"] if self.is_reranker else []

    @property
    def pooling_name(self) -> str:
        try:
            return PoolingType(self.pooling_type).name.lower()
        except ValueError:
            return f"unknown({self.pooling_type})"


class _Cursor:
    def __init__(self, handle: IO[bytes], path: Path) -> None:
        self.handle = handle
        self.path = path

    def _within_header(self, size: int) -> None:
        if self.handle.tell() + size > MAX_HEADER_BYTES:
            raise InvalidModelFile(f"{self.path.name}: GGUF header of more than {MAX_HEADER_BYTES >> 20} MiB")

    def take(self, size: int) -> bytes:
        self._within_header(size)
        data = self.handle.read(size)
        if len(data) != size:
            raise InvalidModelFile(f"{self.path.name}: truncated GGUF header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > _MAX_STRING_BYTES:
            raise InvalidModelFile(f"{self.path.name}: GGUF string of {length} bytes")
        return self.take(length).decode("utf-8", errors="replace")

    def skip(self, size: int) -> None:
        self._within_header(size)
        self.handle.seek(size, 1)

    def strings(self, count: int, visit: Callable[[int, bytes], None] | None = None) -> None:
        """Walk an array of `count` strings, read in chunks; `visit` sees each (index, raw bytes)."""
        base = self.handle.tell()  # the file position of buffer[0]
        buffer, offset = b"", 0

        def ensure(need: int) -> None:
            nonlocal buffer, offset, base
            if base + offset + need > MAX_HEADER_BYTES:  # every item, read ahead or not
                raise InvalidModelFile(f"{self.path.name}: GGUF header of more than {MAX_HEADER_BYTES >> 20} MiB")
            if len(buffer) - offset >= need:
                return
            base, buffer, offset = base + offset, buffer[offset:], 0
            buffer += self.handle.read(max(need - len(buffer), _STRING_CHUNK_BYTES))
            if len(buffer) < need:
                raise InvalidModelFile(f"{self.path.name}: truncated GGUF header")

        for index in range(count):
            ensure(8)
            (length,) = struct.unpack_from("<Q", buffer, offset)
            ensure(8 + length)  # within the header's bound, as every item
            if visit is not None:
                visit(index, buffer[offset + 8 : offset + 8 + length])
            offset += 8 + length
        self.handle.seek(base + offset)


@dataclass(frozen=True)
class _SkippedArray:
    count: int
    item_type: int
    # A boolean array of at most _MAX_LAYERS items (a per-layer flag, as the sliding-window
    # pattern): read, as it is a few bytes.
    flags: tuple[bool, ...] | None = None


def _read_value(cursor: _Cursor, value_type: int, visit: Callable[[int, bytes], None] | None = None) -> Any:
    try:
        kind = GGUFValueType(value_type)
    except ValueError:
        raise InvalidModelFile(f"{cursor.path.name}: unknown GGUF value type {value_type}") from None
    if kind == GGUFValueType.STRING:
        return cursor.string()
    if kind == GGUFValueType.ARRAY:
        item_type = cursor.unpack("<I")
        count = cursor.unpack("<Q")
        if count > _MAX_ARRAY_LENGTH:
            raise InvalidModelFile(f"{cursor.path.name}: GGUF array of {count} items")
        if item_type == GGUFValueType.STRING:
            cursor.strings(count, visit)
        elif item_type == GGUFValueType.BOOL and count <= _MAX_LAYERS:
            return _SkippedArray(count, item_type, tuple(byte != 0 for byte in cursor.take(count)))
        elif item_type in _SCALAR_FORMATS:
            cursor.skip(count * struct.calcsize(_SCALAR_FORMATS[GGUFValueType(item_type)]))
        else:
            raise InvalidModelFile(f"{cursor.path.name}: unsupported GGUF array item type {item_type}")
        return _SkippedArray(count, item_type)  # vocabularies, merges: only their length is kept
    return cursor.unpack(_SCALAR_FORMATS[kind])


def _file_type_name(metadata: dict[str, Any], tensor_types: list[int]) -> str:
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No file type key: name the most common tensor type.
    if tensor_types:
        most_common = max(set(tensor_types), key=tensor_types.count)
        try:
            return GGMLQuantizationType(most_common).name
        except ValueError:
            pass
    return "unknown"


def _tensor_bytes(path: Path, name: str, tensor_type: int, elements: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        raise InvalidModelFile(f"{path.name}: tensor {name} has unknown type {tensor_type}") from None
    return elements // block_size * type_size


@dataclass(frozen=True)
class _Header:
    """What a walk of a GGUF header keeps (arrays are counted, not kept, but for short boolean ones)."""

    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    flag_arrays: dict[str, tuple[bool, ...]]
    tensor_count: int
    parameter_count: int
    tensor_types: list[int]
    tensor_sizes: dict[str, int]
    tensor_shapes: dict[str, tuple[int, ...]]  # dimensions in GGUF's order: ne[0] (a row's length) first


def _read_header(path: Path, checked: bool) -> _Header:
    """Walk a GGUF header with bounded reads; `checked`: refuse a vocabulary llama.cpp aborts on (a
    token spelled twice, an array of another item type than it takes for granted)."""
    try:
        with path.open("rb") as handle:
            cursor = _Cursor(handle, path)
            if handle.read(4) != GGUF_MAGIC:
                raise InvalidModelFile(f"{path.name} is not a GGUF file")
            version = cursor.unpack("<I")
            if version not in (2, 3):
                raise InvalidModelFile(f"{path.name}: unsupported GGUF version {version}")
            tensor_count = cursor.unpack("<Q")
            kv_count = cursor.unpack("<Q")
            if kv_count > _MAX_KV_COUNT or tensor_count > _MAX_TENSOR_COUNT:
                raise InvalidModelFile(f"{path.name}: implausible GGUF header counts")
            metadata: dict[str, Any] = {}
            array_lengths: dict[str, int] = {}
            flag_arrays: dict[str, tuple[bool, ...]] = {}
            for _ in range(kv_count):
                key = cursor.string()
                visit = _UniqueTokens(path) if checked and key == _TOKENS_KEY else None
                value = _read_value(cursor, cursor.unpack("<I"), visit)
                if isinstance(value, _SkippedArray):
                    expected = _ARRAY_ITEM_TYPES.get(key)
                    if checked and expected is not None and value.item_type != expected:
                        raise UnsupportedModelFile(f"{path.name}: {key} must be an array of {expected.name.lower()}")
                    if value.flags is not None:
                        flag_arrays[key] = value.flags
                    # Arrays are left out of the metadata, as Ollama's /api/show leaves them out.
                    array_lengths[key], value = value.count, None
                metadata[key] = value
            parameter_count = 0
            tensor_types: list[int] = []
            data_ends: list[tuple[str, int]] = []  # (tensor, where its data ends past the data section's start)
            tensor_sizes: dict[str, int] = {}
            tensor_shapes: dict[str, tuple[int, ...]] = {}
            for _ in range(tensor_count):
                tensor_name = cursor.string()
                n_dims = cursor.unpack("<I")
                if n_dims > _MAX_DIMS:
                    raise InvalidModelFile(f"{path.name}: tensor with {n_dims} dimensions")
                tensor_shapes[tensor_name] = tuple(cursor.unpack("<Q") for _ in range(n_dims))
                elements = 1
                for dimension in tensor_shapes[tensor_name]:
                    elements *= dimension
                parameter_count += elements
                tensor_type = cursor.unpack("<I")
                tensor_types.append(tensor_type)
                offset = cursor.unpack("<Q")
                tensor_sizes[tensor_name] = _tensor_bytes(path, tensor_name, tensor_type, elements)
                data_ends.append((tensor_name, offset + tensor_sizes[tensor_name]))
            # Every tensor's data must lie inside the file: a truncated download or a crafted
            # offset is refused here, before llama.cpp maps the file.
            alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise InvalidModelFile(f"{path.name}: general.alignment {alignment!r} is not a power of two")
            data_start = -(-handle.tell() // alignment) * alignment
            file_bytes = path.stat().st_size
            for tensor_name, end in data_ends:
                if data_start + end > file_bytes:
                    raise InvalidModelFile(
                        f"{path.name}: truncated GGUF: the data of tensor {tensor_name} ends past the file"
                    )
    except OSError as error:
        raise InvalidModelFile(f"cannot read {path}: {error.strerror}") from None
    return _Header(
        metadata, array_lengths, flag_arrays, tensor_count, parameter_count, tensor_types, tensor_sizes, tensor_shapes
    )


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's dimensions, in GGUF's order (ne[0] first), as a GGUF file's header lists them."""
    return _read_header(path, checked=False).tensor_shapes


def read_gguf_facts(path: Path, checked: bool = True) -> GGUFFacts:
    """Read the header of a GGUF file; InvalidModelFile if it is not one or is malformed, and
    UnsupportedModelFile if llama.cpp would refuse or abort on it (`checked` False: not asked, for
    what reads the header alone, as /api/show)."""
    return read_gguf_header(path, checked)[0]


def read_gguf_header(path: Path, checked: bool = True) -> tuple[GGUFFacts, dict[str, tuple[int, ...]]]:
    """read_gguf_facts and each tensor's dimensions (as read_tensor_shapes gives them), from one
    walk of the header: for what checks task adapters against the file it has just read."""
    header = _read_header(path, checked)
    metadata, array_lengths, tensor_sizes = header.metadata, header.array_lengths, header.tensor_sizes
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise InvalidModelFile(f"{path.name}: GGUF without general.architecture")

    def arch_int(key: str, default: int = 0) -> int:
        value = metadata.get(f"{architecture}.{key}", default)
        return int(value) if isinstance(value, (int, float)) else default

    if checked:
        _check_what_llama_cpp_asserts(path, architecture, metadata, array_lengths)
        _check_sliding_window_layers(path, architecture, metadata, header.flag_arrays)
    causal = metadata.get(f"{architecture}.attention.causal", True)
    layer_bytes, output_layer_bytes = layer_placement_bytes(architecture, arch_int("block_count"), tensor_sizes)
    facts = GGUFFacts(
        architecture=architecture,
        name=str(metadata.get("general.name", "")),
        context_length=arch_int("context_length"),
        embedding_length=arch_int("embedding_length"),
        block_count=arch_int("block_count"),
        pooling_type=arch_int("pooling_type", int(PoolingType.NONE)),
        causal_attention=bool(causal),
        file_type=_file_type_name(metadata, header.tensor_types),
        parameter_count=header.parameter_count,
        tensor_count=header.tensor_count,
        metadata=metadata,
        vocab_size=array_lengths.get("tokenizer.ggml.tokens", 0),
        feed_forward_length=arch_int("feed_forward_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        key_length=arch_int("attention.key_length"),
        value_length=arch_int("attention.value_length"),
        expert_used_count=arch_int("expert_used_count"),
        sliding_window=arch_int("attention.sliding_window"),
        layer_bytes=layer_bytes,
        output_layer_bytes=output_layer_bytes,
    )
    return facts, header.tensor_shapes


# llama.cpp's input layer, which it always keeps on the CPU (LLM_TENSOR_LAYER_INPUT in llama-arch.cpp).
_INPUT_TENSORS = ("token_embd.", "position_embd.", "token_types.", "per_layer_token_embd.")
# Tensors llama.cpp places with the first repeating layer ("do the norms on the first layer").
_FIRST_LAYER_TENSORS = ("token_embd_norm.", "rope_freqs.", "rope_factors_long.", "rope_factors_short.")
# Families whose output layer is the token embedding when the file has no output.weight: llama.cpp
# makes a copy of it for the output layer's device (TENSOR_DUPLICATED in src/models/<arch>.cpp). On
# the CPU the copy shares the mapping; on a GPU it is device memory.
_TIED_OUTPUT_ARCHITECTURES = frozenset({"qwen3", "gemma-embedding", "t5encoder"})
_LAYER_TENSOR = re.compile(r"(?:enc\.)?blk\.(\d+)\.")  # T5 names its encoder's "enc.blk.N"


def layer_placement_bytes(
    architecture: str, block_count: int, tensor_sizes: dict[str, int]
) -> tuple[tuple[int, ...], int]:
    """The bytes of each repeating layer's tensors (blk.N.*) and of the output layer's (what is
    neither input nor repeating: output norms, classifier heads, dense projections), as llama.cpp
    assigns them to devices when n_gpu_layers offloads part of a model."""
    layers = [0] * block_count
    output = 0
    for name, size in tensor_sizes.items():
        match = _LAYER_TENSOR.match(name)
        if match is not None:
            index = int(match.group(1))
            if index < block_count:
                layers[index] += size
        elif name.startswith(_FIRST_LAYER_TENSORS):
            if layers:
                layers[0] += size
        elif not name.startswith(_INPUT_TENSORS):
            output += size
    if architecture in _TIED_OUTPUT_ARCHITECTURES and "output.weight" not in tensor_sizes:
        output += tensor_sizes.get("token_embd.weight", 0)
    return tuple(layers), output


def _check_what_llama_cpp_asserts(
    path: Path, architecture: str, metadata: dict[str, Any], array_lengths: dict[str, int]
) -> None:
    """Refuse what llama.cpp does not refuse but aborts the process on (GGML_ASSERT, GGML_ABORT), as
    it loads the model or tokenizes the first text. Keys left out are left to llama.cpp: it refuses
    a missing required key cleanly."""
    blocks = metadata.get(f"{architecture}.block_count")
    if isinstance(blocks, int) and not 1 <= blocks <= _MAX_LAYERS:
        raise UnsupportedModelFile(
            f"{path.name}: {architecture}.block_count {blocks} is not between 1 and {_MAX_LAYERS}"
        )
    pooling = metadata.get(f"{architecture}.pooling_type")
    if isinstance(pooling, int) and pooling not in {int(kind) for kind in PoolingType}:
        raise UnsupportedModelFile(f"{path.name}: unknown pooling type {pooling} ({architecture}.pooling_type)")
    tokenizer = metadata.get("tokenizer.ggml.model")
    vocab_size = array_lengths.get("tokenizer.ggml.tokens")
    if not isinstance(tokenizer, str) or vocab_size is None:
        return
    for token in _ADDED_TOKENS.get(tokenizer, ()):
        flag = metadata.get(token.flag) if token.flag else None
        if not (flag if isinstance(flag, bool) else token.added_by_default):
            continue
        explicit = metadata.get(token.key)
        ids = (explicit if isinstance(explicit, int) else None, token.default_id)
        if not any(token_id is not None and 0 <= token_id < vocab_size for token_id in ids):
            found = f"{token.key} = {explicit}" if explicit is not None else f"no {token.key}"
            raise UnsupportedModelFile(
                f"{path.name}: its {tokenizer} tokenizer adds a {token.label} token to every text, but "
                f"has no id for it inside its vocabulary of {vocab_size} tokens ({found})"
            )


class _UniqueTokens:
    """Refuses a vocabulary that spells a token twice, as its texts are read: llama.cpp maps each
    text to its id and asserts that it has as many texts as ids (GGML_ASSERT in llama_vocab's load,
    an abort). Its loader names an empty token [EMPTY_<id>], so two empty ones are not the same."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._first_ids: dict[bytes, int] = {}
        self._text_bytes = 0

    def __call__(self, token_id: int, text: bytes) -> None:
        if token_id >= _MAX_CHECKED_TOKENS or self._text_bytes > _MAX_CHECKED_TEXT_BYTES:
            return
        self._text_bytes += len(text)
        text = text or b"[EMPTY_%d]" % token_id
        first = self._first_ids.setdefault(text, token_id)
        if first != token_id:
            spelled = text.decode("utf-8", errors="replace")
            raise UnsupportedModelFile(
                f"{self._path.name}: its vocabulary spells the token {spelled!r} twice (ids {first} and {token_id}); "
                "llama.cpp aborts loading a vocabulary whose token texts are not all different"
            )


@dataclass(frozen=True)
class _SlidingWindowRule:
    """How llama.cpp lays out an encoder's local (sliding-window) and global attention layers
    (llama_model_base::load_swa_pattern, llama_hparams::set_swa_pattern)."""

    default_pattern: int  # used when the GGUF has no {arch}.attention.sliding_window_pattern
    dense_first: bool  # a pattern's global layer is its first (else its last)
    only_with_window: bool  # the layout applies only when {arch}.attention.sliding_window > 0


# The encoders llama.cpp builds with both attention masks and no KV cache: its attention input
# asserts that each mask has a buffer (GGML_ASSERT(buffer), an abort at the first decode), and a
# mask no layer uses gets none. So such a model needs a local layer and a global layer.
_SLIDING_WINDOW_RULES = {
    "gemma-embedding": _SlidingWindowRule(6, dense_first=False, only_with_window=False),
    "modern-bert": _SlidingWindowRule(3, dense_first=True, only_with_window=True),
}


def sliding_window_layers(block_count: int, pattern: int | Sequence[bool], dense_first: bool) -> list[bool]:
    """Which layers attend through a sliding window, as llama.cpp derives them: a per-layer array as
    it is; a pattern n makes every n-th layer global (the first of each n when `dense_first`, else
    the last), 0 makes every layer local."""
    if not isinstance(pattern, int):
        return [bool(flag) for flag in pattern[:block_count]] + [False] * max(0, block_count - len(pattern))
    if pattern == 0:
        return [True] * block_count
    if dense_first:
        return [layer % pattern != 0 for layer in range(block_count)]
    return [layer % pattern < pattern - 1 for layer in range(block_count)]


def _check_sliding_window_layers(
    path: Path, architecture: str, metadata: dict[str, Any], flag_arrays: dict[str, tuple[bool, ...]]
) -> None:
    """Refuse an encoder whose layers are all local or all global where llama.cpp needs both (see
    _SLIDING_WINDOW_RULES): it loads, then aborts the process at its first decode."""
    rule = _SLIDING_WINDOW_RULES.get(architecture)
    blocks = metadata.get(f"{architecture}.block_count")
    if rule is None or not isinstance(blocks, int):
        return
    window = metadata.get(f"{architecture}.attention.sliding_window")
    if rule.only_with_window and not (isinstance(window, int) and window > 0):
        return
    key = f"{architecture}.attention.sliding_window_pattern"
    scalar = metadata.get(key)
    pattern: int | Sequence[bool] = flag_arrays.get(key, scalar if isinstance(scalar, int) else rule.default_pattern)
    local = sliding_window_layers(blocks, pattern, rule.dense_first)
    if all(local) or not any(local):
        which = "local (sliding-window)" if all(local) else "global"
        given = f"{key} = {scalar if key not in flag_arrays else list(flag_arrays[key])}"
        if key not in flag_arrays and scalar is None:
            given = f"no {key}: every {rule.default_pattern}th layer is global"
        layers = "its one layer is" if blocks == 1 else f"all {blocks} of its layers are"
        raise UnsupportedModelFile(
            f"{path.name}: {layers} {which} ({given}); llama.cpp needs a local and a global layer in a "
            f"{architecture} model, and would abort at its first decode"
        )


# Headers read for /api/show, by the file's identity: a blob is never rewritten in place, and one
# that is replaced (or a registered file edited) has another inode or mtime. A few models' facts.
_CACHED_FILES = 16


@functools.lru_cache(maxsize=_CACHED_FILES)
def _cached_facts(path: Path, _identity: tuple[int, int, int, int]) -> GGUFFacts:
    return read_gguf_facts(path)


def cached_gguf_facts(path: Path) -> GGUFFacts:
    """read_gguf_facts, reading the header again only when the file at `path` is another file or
    has changed (its device, inode, size or modification time). Callers must not mutate the facts'
    metadata: it is shared."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise InvalidModelFile(f"cannot read {path}: {error.strerror}") from None
    return _cached_facts(path, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))


def format_parameter_size(count: int) -> str:
    """Ollama's style: 22.57M, 137M, 1.2B."""
    for threshold, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if count >= threshold:
            value = count / threshold
            return f"{value:.2f}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return str(count)
