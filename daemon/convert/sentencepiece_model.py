"""Read a SentencePiece model file (sentencepiece.bpe.model): its pieces and normaliser settings,
from the protobuf wire format directly (the fields XLM-RoBERTa needs), without the sentencepiece
or protobuf packages at run time."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import InvalidModelFile

# sentencepiece_model.proto's numbers.
UNIGRAM = 1
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: int  # NORMAL, UNKNOWN, CONTROL, ...


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: list[Piece]
    model_type: int
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a message: an int (varint or fixed32,
    read as its raw 32 bits) or the bytes of a length-delimited field."""
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, offset = _varint(data, offset)
        elif wire == 1:
            value, offset = int.from_bytes(data[offset : offset + 8], "little"), offset + 8
        elif wire == 2:
            length, offset = _varint(data, offset)
            value, offset = data[offset : offset + length], offset + length
        elif wire == 5:
            value, offset = int.from_bytes(data[offset : offset + 4], "little"), offset + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if offset > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def _piece(data: bytes) -> Piece:
    text, score, kind = "", 0.0, NORMAL
    for number, wire, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            text = value.decode("utf-8")
        elif number == 2 and wire == 5 and isinstance(value, int):
            score = struct.unpack("<f", value.to_bytes(4, "little"))[0]
        elif number == 3 and isinstance(value, int):
            kind = value
    return Piece(text, score, kind)


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    try:
        data = path.read_bytes()
        pieces: list[Piece] = []
        model_type, charsmap, add_dummy_prefix, remove_extra_whitespaces = UNIGRAM, b"", True, True
        for number, _wire, value in _fields(data):
            if number == 1 and isinstance(value, bytes):
                pieces.append(_piece(value))
            elif number == 2 and isinstance(value, bytes):  # TrainerSpec
                for inner, _, setting in _fields(value):
                    if inner == 3 and isinstance(setting, int):
                        model_type = setting
            elif number == 3 and isinstance(value, bytes):  # NormalizerSpec
                for inner, _, setting in _fields(value):
                    if inner == 2 and isinstance(setting, bytes):
                        charsmap = setting
                    elif inner == 3 and isinstance(setting, int):
                        add_dummy_prefix = bool(setting)
                    elif inner == 4 and isinstance(setting, int):
                        remove_extra_whitespaces = bool(setting)
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidModelFile(f"cannot read {path.name}: {error}") from None
    if not pieces:
        raise InvalidModelFile(f"{path.name} holds no SentencePiece pieces")
    return SentencePieceModel(pieces, model_type, charsmap, add_dummy_prefix, remove_extra_whitespaces)
