"""Hostile and broken model files are refused by the header check, with bounded reads, before
llama.cpp sees them; the daemon answers a clear 400 and keeps serving. A file that gets past the check
and makes llama.cpp abort kills its own runner only: its requests get a clear error, the daemon and
the other models serve on."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.errors import InvalidModelFile
from daemon.gguf_info import read_gguf_facts
from daemon.prompts import ModelPrompts
from daemon.store import ModelStore
from tests.conftest import MakeClient
from tests.live import Daemon, read_metrics, running_daemon, wait_for
from tests.tiny_models import copy_gguf, make_byteless_sentencepiece_gguf

STRING, UINT32, BOOL, ARRAY = 8, 4, 7, 9


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


def kv_uint32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", UINT32, value)


def kv_bool(key: str, value: bool) -> bytes:
    return gguf_string(key) + struct.pack("<I?", BOOL, value)


def kv_array(key: str, item_type: int, count: int, payload: bytes = b"") -> bytes:
    return gguf_string(key) + struct.pack("<I", ARRAY) + struct.pack("<IQ", item_type, count) + payload


ARCH = kv_string("general.architecture", "bert")
WORDPIECE = kv_string("tokenizer.ggml.model", "bert")


def tokens(*texts: str) -> bytes:
    return kv_array("tokenizer.ggml.tokens", STRING, len(texts), b"".join(gguf_string(t) for t in texts))


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
        # What llama.cpp loads without complaint and then aborts the process on (GGML_ASSERT):
        "no layers": (header([ARCH, kv_uint32("bert.block_count", 0)]), "bert.block_count 0 is not between 1 and 512"),
        "too many layers": (header([ARCH, kv_uint32("bert.block_count", 513)]), "block_count 513 is not between"),
        "unknown pooling type": (header([ARCH, kv_uint32("bert.pooling_type", 9)]), "unknown pooling type 9"),
        "WordPiece vocabulary without a CLS id": (
            header([ARCH, WORDPIECE, tokens("[SEP]", "a"), kv_uint32("tokenizer.ggml.seperator_token_id", 0)]),
            "its bert tokenizer adds a [CLS] token to every text, but has no id for it inside its vocabulary of 2 "
            "tokens (no tokenizer.ggml.bos_token_id)",
        ),
        "SEP id outside the vocabulary": (
            header(
                [
                    ARCH,
                    WORDPIECE,
                    tokens("[CLS]", "a"),
                    kv_uint32("tokenizer.ggml.bos_token_id", 0),
                    kv_uint32("tokenizer.ggml.seperator_token_id", 7),
                ]
            ),
            "adds a [SEP] token to every text, but has no id for it inside its vocabulary of 2 tokens "
            "(tokenizer.ggml.seperator_token_id = 7)",
        ),
    }


def test_each_hostile_file_is_refused_by_the_header_check(tmp_path: Path, tiny_gguf: Path) -> None:
    for label, (data, message) in hostile_files(tiny_gguf).items():
        path = tmp_path / f"{label.replace(' ', '-')}.gguf"
        path.write_bytes(data)
        with pytest.raises(InvalidModelFile, match=re.escape(message)):
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


async def test_text_a_vocabulary_without_an_unknown_token_cannot_hold_is_a_400_for_its_request_only(
    make_client: MakeClient, tmp_path: Path, tiny_gguf: Path
) -> None:
    # A WordPiece vocabulary with no [UNK] gives characters it lacks the token id -1; llama.cpp then
    # fails the whole decode, with every other request packed into it.
    no_unknown = copy_gguf(tiny_gguf, tmp_path / "no-unknown.gguf", {"tokenizer.ggml.unknown_token_id": 1000})
    client = await make_client({"no-unknown": no_unknown})
    await client.post("/api/embed", json={"model": "no-unknown", "input": "hello"})
    answers = await asyncio.gather(
        *(
            client.post("/api/embed", json={"model": "no-unknown", "input": text})
            for text in ["hello 漢字", "hello world", "why is the sky blue?"] * 4
        )
    )
    statuses = [answer.status for answer in answers]
    assert statuses == [400, 200, 200] * 4
    error = (await answers[0].json())["error"]
    assert "no token for" in error and "[UNK]" in error


def test_special_tokens_llama_cpp_finds_an_id_for_are_accepted(tmp_path: Path) -> None:
    """llama.cpp falls back on its default id when a key's is outside the vocabulary, and adds a
    flagged token only when its flag is on: neither is refused."""
    vocabulary = tokens(*(f"t{index}" for index in range(103)))  # BERT's defaults: [CLS] 101, [SEP] 102
    for kvs in (
        [ARCH, WORDPIECE, vocabulary, kv_uint32("tokenizer.ggml.bos_token_id", 5000)],
        [ARCH, kv_string("tokenizer.ggml.model", "llama"), tokens("a"), kv_bool("tokenizer.ggml.add_bos_token", False)],
        [ARCH, kv_string("tokenizer.ggml.model", "gpt2"), tokens("a")],  # adds no BOS unless flagged
    ):
        path = tmp_path / "accepted.gguf"
        path.write_bytes(header(kvs))
        read_gguf_facts(path)


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # a hang fails the test
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


def embed(daemon: Daemon, model: str, text: str) -> tuple[int, Any]:
    return post(daemon.url + "/api/embed", {"model": model, "input": text})


def loaded(daemon: Daemon) -> list[str]:
    with urllib.request.urlopen(daemon.url + "/api/ps", timeout=10) as response:
        return sorted(model["name"] for model in json.loads(response.read())["models"])


def test_a_file_that_makes_llama_cpp_abort_on_a_request_kills_its_own_runner_only(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """A SentencePiece vocabulary without byte pieces passes every check and embeds ASCII words, but
    llama.cpp's tokenizer throws (uncaught: std::terminate, SIGABRT) on a character it has no piece
    for. Through a live daemon: a clear 500 each time, no hang, and the other model keeps its runner."""
    byteless = make_byteless_sentencepiece_gguf(tiny_gguf, tmp_path / "byteless.gguf")
    read_gguf_facts(byteless)  # the header check has nothing against it
    with running_daemon(tmp_path / "home", {"tiny": tiny_gguf, "byteless": byteless}, {}) as daemon:
        status, body = embed(daemon, "tiny", "hello")
        assert status == 200
        vector = body["embeddings"][0]
        [tiny_pid] = daemon.runner_pids()
        assert embed(daemon, "byteless", "hello")[0] == 200  # it loads, and serves what it can tokenize
        assert loaded(daemon) == ["byteless:latest", "tiny:latest"]

        for attempt in range(2):  # the second request loads it again, and gets the same answer
            status, body = embed(daemon, "byteless", "héllo")
            assert status == 500, attempt
            assert body["error"].startswith("model runner for byteless:latest was killed by SIGABRT"), body
            assert loaded(daemon) == ["tiny:latest"]
            assert daemon.runner_pids() == [tiny_pid]
        # Its tokenizer alone (a vocabulary-only runner) dies the same way, as cleanly.
        status, body = post(daemon.url + "/api/tokenize", {"model": "byteless", "content": "héllo"})
        assert status == 500
        assert body["error"].startswith("model runner for byteless:latest was killed by SIGABRT"), body
        wait_for(lambda: daemon.runner_pids() == [tiny_pid])

        status, body = embed(daemon, "tiny", "hello")
        assert status == 200
        np.testing.assert_allclose(body["embeddings"][0], vector, rtol=1e-5)
        assert daemon.runner_pids() == [tiny_pid]
        crashes = read_metrics(daemon.url)[("emberd_runner_crashes_total", (("model", "byteless:latest"),))]
        assert crashes == 2  # one per request that met the bad character: no reload loop
        assert daemon.process.poll() is None


def store_without_the_check(home: Path, name: str, gguf: Path, like: Path) -> None:
    """Put a GGUF in the store as an emberd older than its header check did: its blob, named by a
    manifest with the facts of `like` (a load takes the manifest's facts, reading no header)."""
    store = ModelStore(home)
    store.open()
    copy = store.tmp_dir / "copy.gguf"
    shutil.copyfile(gguf, copy)
    digest_hex = ModelStore.hash_file(copy)
    store.adopt_blob(copy, digest_hex)
    store._write_manifest(
        name, store.blobs_dir / f"sha256-{digest_hex}", read_gguf_facts(like), str(gguf), ModelPrompts()
    )


def test_a_stored_file_that_makes_llama_cpp_abort_as_it_loads_fails_its_loads_only(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """A model stored before the header check refused its kind (an unknown pooling type: llama.cpp's
    GGML_ABORT as it builds the context): the load applies today's header checks, so each request to
    it gets a 409 with the check's reason and no runner starts for it; the other model keeps its
    runner."""
    unknown_pooling = copy_gguf(tiny_gguf, tmp_path / "pooling-9.gguf", {"bert.pooling_type": 9})
    with pytest.raises(InvalidModelFile, match="unknown pooling type 9"):
        read_gguf_facts(unknown_pooling)
    home = tmp_path / "home"
    store_without_the_check(home, "pooling-9:latest", unknown_pooling, like=tiny_gguf)
    with running_daemon(home, {"tiny": tiny_gguf}, {}) as daemon:
        assert embed(daemon, "tiny", "hello")[0] == 200
        [tiny_pid] = daemon.runner_pids()
        for attempt in range(2):
            status, body = embed(daemon, "pooling-9", "hello")
            assert status == 409, attempt
            assert body["error"].startswith("pooling-9:latest cannot be loaded by this emberd's llama.cpp"), body
            assert "unknown pooling type 9" in body["error"], body
            assert loaded(daemon) == ["tiny:latest"]
            assert daemon.runner_pids() == [tiny_pid]
        assert embed(daemon, "tiny", "hello")[0] == 200
        assert daemon.runner_pids() == [tiny_pid]
