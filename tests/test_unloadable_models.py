"""Models the pinned llama.cpp cannot load: refused with llama.cpp's (or the header check's) words
when they would enter the store (create from a GGUF or a folder, pull), and, stored by an emberd
older than the checks, refused at load with a 409 while the daemon serves its other models.

The three files: an architecture llama.cpp has no loader for (`mpnet`, gte's `new`), a vocabulary
that spells one token twice (llama.cpp aborts as it loads it), and a gemma-embedding whose layers
are all local (llama.cpp aborts at its first decode)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from gguf import GGUFReader, GGUFValueType, PoolingType

from daemon import gguf_info
from daemon.api.app import build_app
from daemon.api.common import STORE
from daemon.config import Settings
from daemon.errors import InvalidModelFile
from daemon.gguf_info import read_gguf_facts
from daemon.store import ModelStore
from tests.conftest import MakeClient, scheduler_of
from tests.family_ggufs import make_family_gguf
from tests.hub_server import FakeHub
from tests.test_api_embed import embed
from tests.tiny_models import copy_gguf, make_header_only_gguf, make_tiny_bert_dir, tiny_vocab

Client = TestClient[Any, Any]

# The duplicated token: the bert family's last token (id 106, "9") spelled as its id 6.
DUPLICATED, FIRST_ID, SECOND_ID = "\u2581sky", 6, 106
# Each file, and the words its refusal must carry (llama.cpp's, or the header check's).
REFUSALS = {
    "mpnet": "unknown model architecture: 'mpnet'",
    "new": "unknown model architecture: 'new'",
    "duplicated": f"spells the token '{DUPLICATED}' twice (ids {FIRST_ID} and {SECOND_ID})",
    "all-local": "all 2 of its layers are local",
}


def unknown_architecture(directory: Path, architecture: str) -> Path:
    """A GGUF of an architecture llama.cpp has no loader for, with a pooling type (an embedding
    model as far as the header tells)."""
    header_only = make_header_only_gguf(directory / f"{architecture}-header.gguf", architecture)
    return copy_gguf(
        header_only,
        directory / f"{architecture}.gguf",
        {f"{architecture}.pooling_type": (int(PoolingType.MEAN), GGUFValueType.UINT32)},
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("unloadable")
    good = make_family_gguf("bert", directory / "bert.gguf")
    tokens = [str(token) for token in GGUFReader(good).fields["tokenizer.ggml.tokens"].contents()]
    assert tokens[FIRST_ID] == DUPLICATED and len(tokens) == SECOND_ID + 1  # the layout the names above say
    tokens[SECOND_ID] = DUPLICATED
    return {
        "good": good,
        "mpnet": unknown_architecture(directory, "mpnet"),
        "new": unknown_architecture(directory, "new"),
        "duplicated": copy_gguf(good, directory / "duplicated.gguf", {"tokenizer.ggml.tokens": tokens}),
        # Two layers and no sliding_window_pattern key: gemma-embedding's default pattern (6) makes both local.
        "all-local": make_family_gguf("gemma-embedding", directory / "all-local.gguf", sliding_window_pattern=None),
        # The same family laid out as llama.cpp needs (a local and a global layer): the facts an old
        # manifest of the all-local file carries.
        "gemma": make_family_gguf("gemma-embedding", directory / "gemma.gguf"),
    }


def store_contents(store: ModelStore) -> list[str]:
    """Every file under the store's folders (blobs, manifests, partial files, downloads)."""
    folders = (store.models_dir, store.tmp_dir, store.downloads_dir)
    return sorted(str(path) for folder in folders for path in folder.rglob("*") if path.is_file())


def test_the_header_check_names_a_token_spelled_twice(files: dict[str, Path]) -> None:
    with pytest.raises(InvalidModelFile, match=re.escape(REFUSALS["duplicated"])):
        read_gguf_facts(files["duplicated"])
    assert read_gguf_facts(files["good"]).vocab_size == SECOND_ID + 1


def test_the_vocabulary_is_read_within_the_headers_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token texts are read in chunks, ahead of the item being checked: each still counts toward
    the header's bound, the last one too."""

    def text(value: bytes) -> bytes:
        return struct.pack("<Q", len(value)) + value

    count = 1000
    tokens = b"".join(text(b"token%05d" % index) for index in range(count))
    key_values = [
        text(b"general.architecture") + struct.pack("<I", GGUFValueType.STRING) + text(b"bert"),
        text(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, count) + tokens,
    ]
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(key_values)) + b"".join(key_values)
    path = tmp_path / "vocabulary.gguf"
    path.write_bytes(data)
    assert read_gguf_facts(path).vocab_size == count
    monkeypatch.setattr(gguf_info, "MAX_HEADER_BYTES", len(data) - 1)  # the last token's last byte is past it
    with pytest.raises(InvalidModelFile, match="GGUF header of more than"):
        read_gguf_facts(path)


async def test_create_refuses_a_file_llama_cpp_cannot_load_and_keeps_nothing(
    make_client: MakeClient, files: dict[str, Path]
) -> None:
    client = await make_client({})
    store = client.server.app[STORE]
    for case, words in REFUSALS.items():
        for stream in (False, True):
            body = {"model": case, "from": str(files[case]), "stream": stream}
            response = await client.post("/api/create", json=body)
            if response.content_type == "application/x-ndjson":  # the check ran in the job: its last line says why
                assert response.status == 200, case
                error = json.loads((await response.read()).splitlines()[-1])["error"]
            else:
                assert response.status == 400, case
                error = (await response.json())["error"]
            assert words in error, (case, stream, error)
            assert store_contents(store) == [], case
    status, _ = await embed(client, {"model": "mpnet", "input": "hello"})
    assert status == 404


async def test_create_from_a_folder_whose_vocabulary_spells_a_token_twice_is_refused(
    make_client: MakeClient, tmp_path: Path
) -> None:
    folder = make_tiny_bert_dir(tmp_path / "twice")
    vocab = tiny_vocab()
    vocab[-1] = "sky"  # id 6 is "sky" too (after the five specials and "the")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    client = await make_client({})
    response = await client.post("/api/create", json={"model": "twice", "from": str(folder), "stream": False})
    assert response.status == 400
    error = (await response.json())["error"]  # a word's first piece as llama.cpp spells it: "▁sky"
    assert error.startswith(f"twice: its vocabulary spells the token '{DUPLICATED}' twice (ids 6 and {len(vocab) - 1})")
    assert store_contents(client.server.app[STORE]) == []


@pytest.fixture
def unloadable_hub(files: dict[str, Path]) -> Iterator[FakeHub]:
    hub = FakeHub()
    for case in ("good", *REFUSALS):
        hub.add_repo(f"owner/{case}-GGUF", {"model-F16.gguf": files[case].read_bytes()})
    hub.start()
    yield hub
    hub.stop()


async def test_pull_refuses_a_file_llama_cpp_cannot_load_and_keeps_nothing(
    aiohttp_client: Any, tmp_path: Path, unloadable_hub: FakeHub
) -> None:
    client: Client = await aiohttp_client(
        build_app(Settings(home=tmp_path / "home", hub_endpoint=unloadable_hub.url, calibrate_on_store=False))
    )
    store = client.server.app[STORE]
    for case, words in REFUSALS.items():
        name = f"hf.co/owner/{case}-GGUF:F16"
        response = await client.post("/api/pull", json={"model": name})
        assert response.status == 200  # a stream: the refusal is its last line
        lines = [json.loads(line) for line in (await response.read()).splitlines()]
        assert words in lines[-1]["error"], (case, lines[-1])
        assert store_contents(store) == [], case
        response = await client.post("/api/pull", json={"model": name, "stream": False})
        assert response.status == 400, case
        assert words in (await response.json())["error"], case
        assert store_contents(store) == [], case
    response = await client.post("/api/pull", json={"model": "hf.co/owner/good-GGUF:F16", "stream": False})
    assert response.status == 200
    status, _ = await embed(client, {"model": "hf.co/owner/good-GGUF:F16", "input": "hello"})
    assert status == 200


def plant(home: Path, name: str, gguf: Path, like: Path) -> None:
    """A model as an emberd older than the checks stored it: the blob of `gguf`, named by a manifest
    with the facts of `like` (a manifest with every fact, vocabulary size included)."""
    store = ModelStore(home)
    store.open()
    store.create(name, like)
    [path] = (store.manifests_dir / name).rglob("*.json")
    data = gguf.read_bytes()
    digest_hex = hashlib.sha256(data).hexdigest()
    shutil.copyfile(gguf, store.blobs_dir / f"sha256-{digest_hex}")
    manifest = json.loads(path.read_text())
    assert manifest["facts"]["vocab_size"] > 0
    path.write_text(json.dumps({**manifest, "digest": f"sha256:{digest_hex}", "size": len(data)}))


OLD_MANIFESTS = {"mpnet": "good", "duplicated": "good", "all-local": "gemma"}  # the file, the facts it carries


async def test_a_model_stored_before_the_checks_is_a_409_that_says_why_and_the_others_serve_on(
    make_client: MakeClient, files: dict[str, Path], tmp_path: Path
) -> None:
    for case, like in OLD_MANIFESTS.items():
        plant(tmp_path / "home", case, files[case], files[like])  # make_client's home
    client = await make_client({"good": files["good"]})
    status, body = await embed(client, {"model": "good", "input": "hello"})
    assert status == 200
    vector = body["embeddings"][0]
    [runner] = [entry.runner for entry in scheduler_of(client).loaded()]
    for case in OLD_MANIFESTS:
        for _attempt in range(2):  # the same answer again: nothing was left half-loaded
            status, body = await embed(client, {"model": case, "input": "hello"})
            assert status == 409, (case, body)
            assert body["error"].startswith(f"{case}:latest cannot be loaded by this emberd's llama.cpp: "), body
            assert REFUSALS[case] in body["error"], body
        assert [entry.runner for entry in scheduler_of(client).loaded()] == [runner]
    # Its tokenizer alone (a vocabulary-only runner) says the same.
    response = await client.post("/api/tokenize", json={"model": "mpnet", "content": "hello"})
    assert response.status == 409
    assert REFUSALS["mpnet"] in (await response.json())["error"]
    status, body = await embed(client, {"model": "good", "input": "hello"})
    assert (status, body["embeddings"][0]) == (200, vector)
    assert [entry.runner for entry in scheduler_of(client).loaded()] == [runner] and runner.alive


def message_of(body: dict[str, Any]) -> str:
    """The error's words in either dialect's body (Ollama's string, OpenAI's and Cohere's object)."""
    if "message" in body:  # Cohere's
        return str(body["message"])
    error = body["error"]
    return error if isinstance(error, str) else str(error["message"])


async def test_every_route_that_loads_a_model_stored_before_the_checks_gives_the_same_409(
    make_client: MakeClient, files: dict[str, Path], reranker_gguf: Path, tmp_path: Path
) -> None:
    """Its tokenizer alone (a vocabulary-only runner) included: llama.cpp aborts as it loads a
    vocabulary that spells a token twice, which was a 500. /api/show reads no weights: it answers."""
    tokens = [str(token) for token in GGUFReader(reranker_gguf).fields["tokenizer.ggml.tokens"].contents()]
    tokens[-1] = tokens[FIRST_ID]
    twice = copy_gguf(reranker_gguf, tmp_path / "reranker-twice.gguf", {"tokenizer.ggml.tokens": tokens})
    plant(tmp_path / "home", "reranker-twice", twice, reranker_gguf)  # make_client's home
    for case, like in OLD_MANIFESTS.items():
        plant(tmp_path / "home", case, files[case], files[like])
    client = await make_client({"good": files["good"]})
    architectures = {"mpnet": "mpnet", "duplicated": "bert", "all-local": "gemma-embedding"}
    for case in OLD_MANIFESTS:
        status, body = await embed(client, {"model": case, "input": "hello"})
        assert status == 409 and REFUSALS[case] in body["error"], body
        for route, fields in (
            ("/api/tokenize", {"content": "hello"}),
            ("/api/tokenize", {"content": "hello", "add_special": False}),
            ("/api/detokenize", {"tokens": [1, 2]}),
            ("/api/embeddings", {"prompt": "hello"}),
            ("/v1/embeddings", {"input": "hello"}),
        ):
            response = await client.post(route, json={"model": case, **fields})
            answer = await response.json()
            assert (response.status, message_of(answer)) == (409, body["error"]), (case, route, answer)
        response = await client.post("/api/show", json={"model": case})
        assert response.status == 200, case
        assert (await response.json())["model_info"]["general.architecture"] == architectures[case]
    spelled = f"its vocabulary spells the token '{tokens[FIRST_ID]}' twice (ids {FIRST_ID} and {len(tokens) - 1})"
    for route in ("/api/rerank", "/v1/rerank", "/v2/rerank"):
        response = await client.post(route, json={"model": "reranker-twice", "query": "sky", "documents": ["blue"]})
        answer = await response.json()
        assert response.status == 409, (route, answer)
        assert message_of(answer).startswith(
            f"reranker-twice:latest cannot be loaded by this emberd's llama.cpp: {spelled}"
        ), answer
    response = await client.post("/api/tokenize", json={"model": "reranker-twice", "content": "sky"})
    assert response.status == 409 and spelled in message_of(await response.json())
    # The daemon serves its other model, its tokenizer too.
    response = await client.post("/api/tokenize", json={"model": "good", "content": "hello"})
    assert response.status == 200 and (await response.json())["tokens"]
    status, _ = await embed(client, {"model": "good", "input": "hello"})
    assert status == 200
