"""Hostile and broken model files are refused by the header check, with bounded reads, before
llama.cpp sees them; the daemon answers a clear 400 and keeps serving."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import InvalidModelFile
from daemon.gguf_info import read_gguf_facts
from tests.conftest import MakeClient

STRING, UINT32, ARRAY = 8, 4, 9


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def header(
    kvs: list[bytes],
    tensors: tuple[bytes, ...] | list[bytes] = (),
    tensor_count: int | None = None,
    kv_count: int | None = None,
) -> bytes:
    """A GGUF v3 header: magic, version, counts, then the given key/value and tensor-info records."""
    counts = struct.pack(
        "<QQ", len(tensors) if tensor_count is None else tensor_count, len(kvs) if kv_count is None else kv_count
    )
    return b"GGUF" + struct.pack("<I", 3) + counts + b"".join(kvs) + b"".join(tensors)


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value)


def kv_array(key: str, item_type: int, count: int, payload: bytes = b"") -> bytes:
    return gguf_string(key) + struct.pack("<I", ARRAY) + struct.pack("<IQ", item_type, count) + payload


ARCH = kv_string("general.architecture", "bert")


def tensor_info(name: str, shape: tuple[int, ...], tensor_type: int = 0, offset: int = 0) -> bytes:
    return (
        gguf_string(name)
        + struct.pack("<I", len(shape))
        + b"".join(struct.pack("<Q", n) for n in shape)
        + struct.pack("<IQ", tensor_type, offset)
    )


def hostile_files(tiny_gguf: Path) -> dict[str, tuple[bytes, str]]:
    whole = tiny_gguf.read_bytes()
    return {
        "truncated": (whole[: len(whole) // 2], "truncated GGUF"),
        "header cut short": (whole[:40], "truncated GGUF header"),
        "wrong magic": (b"GGML" + whole[4:], "is not a GGUF file"),
        "absurd tensor count": (header([ARCH], tensor_count=1 << 40), "implausible GGUF header counts"),
        "absurd key count": (header([ARCH], kv_count=1 << 40), "implausible GGUF header counts"),
        "absurd string length": (
            header([gguf_string("general.architecture") + struct.pack("<IQ", STRING, 1 << 62)]),
            "GGUF string of",
        ),
        "absurd array length": (header([ARCH, kv_array("tokenizer.ggml.scores", 6, 1 << 62)]), "GGUF array of"),
        "vocabulary of the wrong type": (
            header([ARCH, kv_array("tokenizer.ggml.tokens", UINT32, 2, struct.pack("<II", 1, 2))]),
            "tokenizer.ggml.tokens must be an array of string",
        ),
        "tensor past the end": (
            header([ARCH], [tensor_info("token_embd.weight", (1 << 30, 1 << 20))]),
            "ends past the file",
        ),
        "unknown tensor type": (header([ARCH], [tensor_info("x", (4,), tensor_type=999)]), "unknown type 999"),
        "no architecture": (header([]), "without general.architecture"),
    }


def test_each_hostile_file_is_refused_by_the_header_check(tmp_path: Path, tiny_gguf: Path) -> None:
    for label, (data, message) in hostile_files(tiny_gguf).items():
        path = tmp_path / f"{label.replace(' ', '-')}.gguf"
        path.write_bytes(data)
        with pytest.raises(InvalidModelFile, match=message):
            read_gguf_facts(path)


async def test_the_daemon_answers_400_for_each_and_keeps_serving(
    make_client: MakeClient, tmp_path: Path, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf})
    assert (await client.post("/api/embed", json={"model": "tiny", "input": "hello"})).status == 200
    for label, (data, message) in hostile_files(tiny_gguf).items():
        path = tmp_path / f"{label.replace(' ', '-')}.gguf"
        path.write_bytes(data)
        response = await client.post("/api/create", json={"model": "bad", "from": str(path), "stream": False})
        body: dict[str, Any] = await response.json()
        assert response.status == 400, label
        assert message in body["error"], label
    assert [m["name"] for m in (await (await client.get("/api/tags")).json())["models"]] == ["tiny:latest"]
    assert (await client.post("/api/embed", json={"model": "tiny", "input": "hello"})).status == 200
