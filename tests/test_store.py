"""The model store, the GGUF reader, the converter, and /api/create."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient

from daemon.api.common import STORE
from daemon.convert import convert_hf_directory
from daemon.errors import (
    BlobMissing,
    InsufficientDisk,
    InvalidModelFile,
    NotEmbeddingModel,
    UnknownModel,
    UnreadableManifest,
)
from daemon.gguf_info import format_parameter_size, read_gguf_facts
from daemon.store import ABANDONED_DOWNLOAD_S, SCHEMA_VERSION, ModelStore, digests_named_in
from tests.conftest import MakeClient
from tests.test_api_embed import embed
from tests.tiny_models import make_header_only_gguf, make_tiny_bert_dir

Client = TestClient[Any, Any]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    model_store = ModelStore(tmp_path / "home")
    model_store.open()
    return model_store


def store_files(store: ModelStore) -> list[str]:
    return sorted(str(p.relative_to(store.models_dir)) for p in store.models_dir.rglob("*") if p.is_file())


def test_a_gguf_is_stored_under_its_sha256(store: ModelStore, tiny_gguf: Path) -> None:
    model = store.create("Tiny", tiny_gguf)
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert model.name == "tiny:latest"
    assert model.digest == f"sha256:{digest}"
    assert model.blob_path == store.blobs_dir / f"sha256-{digest}"
    assert model.blob_path.read_bytes() == tiny_gguf.read_bytes()
    assert store.get("tiny:latest") == model
    assert [m.name for m in store.list()] == ["tiny:latest"]
    assert list(store.tmp_dir.iterdir()) == []


def test_two_names_share_a_blob_until_the_last_goes(store: ModelStore, tiny_gguf: Path) -> None:
    first = store.create("one", tiny_gguf)
    store.create("two:v1", tiny_gguf)
    assert len(list(store.blobs_dir.iterdir())) == 1
    store.delete("one")
    assert first.blob_path.exists()
    store.delete("two:v1")
    assert not first.blob_path.exists()
    assert store_files(store) == []
    with pytest.raises(UnknownModel):
        store.get("one")


def test_open_drops_partial_files_left_by_a_crash(store: ModelStore) -> None:
    (store.tmp_dir / "abc.partial").write_bytes(b"half a model")
    (store.tmp_dir / "download").mkdir()
    store.open()
    assert list(store.tmp_dir.iterdir()) == []


def test_a_failed_conversion_leaves_nothing_behind(store: ModelStore, tmp_path: Path) -> None:
    broken = make_tiny_bert_dir(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(InvalidModelFile, match="cannot read weights"):
        store.create("broken", broken)
    assert store_files(store) == []
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ("missing", InvalidModelFile, "no such file or directory"),
        ("text_file", InvalidModelFile, "is not a GGUF file"),
        ("truncated_gguf", InvalidModelFile, "truncated GGUF header"),
        ("chat_gguf", NotEmbeddingModel, "not an embedding model"),
        ("empty_dir", InvalidModelFile, "no config.json"),
        ("llama_dir", InvalidModelFile, "cannot be converted"),
        ("no_weights_dir", InvalidModelFile, "no .safetensors weights"),
    ],
)
def test_sources_that_are_refused(
    store: ModelStore, tmp_path: Path, tiny_gguf: Path, setup: str, error: type[Exception], message: str
) -> None:
    source = tmp_path / setup
    if setup == "text_file":
        source.write_text("hello")
    elif setup == "truncated_gguf":
        source.write_bytes(tiny_gguf.read_bytes()[:40])
    elif setup == "chat_gguf":
        make_header_only_gguf(source)
    elif setup == "empty_dir":
        source.mkdir()
    elif setup == "llama_dir":
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    elif setup == "no_weights_dir":
        make_tiny_bert_dir(source)
        (source / "model.safetensors").unlink()
    with pytest.raises(error, match=message):
        store.create("refused", source)
    assert store_files(store) == []


def test_gguf_facts_of_a_converted_model(tiny_gguf: Path) -> None:
    facts = read_gguf_facts(tiny_gguf)
    assert (facts.architecture, facts.context_length, facts.embedding_length, facts.block_count) == ("bert", 64, 32, 2)
    assert (facts.pooling_name, facts.causal_attention, facts.file_type) == ("mean", False, "F32")
    assert facts.is_embedding_model
    assert facts.metadata["tokenizer.ggml.model"] == "bert"
    assert "tokenizer.ggml.tokens" in facts.metadata
    assert facts.metadata["tokenizer.ggml.tokens"] is None  # arrays are skipped, not read


@pytest.mark.parametrize(("count", "text"), [(22_565_376, "22.57M"), (137_000_000, "137M"), (1_200_000_000, "1.20B")])
def test_parameter_size(count: int, text: str) -> None:
    assert format_parameter_size(count) == text


# The least cosine each output type keeps against the f32 conversion (measured on this tiny model:
# f16 0.9999998, bf16 0.99999, q8_0 0.9997).
@pytest.mark.parametrize(
    ("output_type", "file_type", "min_cosine"),
    [("f32", "F32", 0.999999), ("f16", "F16", 0.9999), ("bf16", "BF16", 0.9999), ("q8_0", "Q8_0", 0.999)],
)
async def test_every_output_type_converts_and_embeds_close_to_f32(
    make_client: MakeClient,
    tiny_dir: Path,
    tiny_gguf: Path,
    tmp_path: Path,
    output_type: str,
    file_type: str,
    min_cosine: float,
) -> None:
    path = tmp_path / f"tiny-{output_type}.gguf"
    convert_hf_directory(make_tiny_bert_dir(tmp_path / "dir", hidden=64, heads=2), path, output_type)
    reference = tmp_path / "reference.gguf"
    convert_hf_directory(tmp_path / "dir", reference, "f32")
    assert read_gguf_facts(path).file_type == file_type
    client = await make_client({"converted": path, "reference": reference})
    _, converted = await embed(client, {"model": "converted", "input": "why is the sky blue?"})
    _, expected = await embed(client, {"model": "reference", "input": "why is the sky blue?"})
    assert np.dot(converted["embeddings"][0], expected["embeddings"][0]) >= min_cosine


# -- /api/create ------------------------------------------------------------------------------------


async def test_create_streams_progress_then_the_model_answers(make_client: MakeClient, tiny_dir: Path) -> None:
    client = await make_client({})
    response = await client.post("/api/create", json={"model": "made", "from": str(tiny_dir)})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
    assert lines[-1] == {"status": "success"}
    assert any("converting" in line["status"] for line in lines[:-1])
    status, _ = await embed(client, {"model": "made", "input": "hello"})
    assert status == 200
    tags = await (await client.get("/api/tags")).json()
    [entry] = tags["models"]
    assert entry["name"] == "made:latest"
    assert entry["details"]["quantization_level"] == "F16"
    assert entry["capabilities"] == ["embedding"]


async def test_create_converts_to_the_quantize_it_is_given(make_client: MakeClient, tiny_dir: Path) -> None:
    client = await make_client({})
    body = {"model": "made", "from": str(tiny_dir), "quantize": "BF16", "stream": False}
    response = await client.post("/api/create", json=body)
    assert (response.status, await response.json()) == (200, {"status": "success"})
    status, _ = await embed(client, {"model": "made", "input": "hello"})
    assert status == 200
    [entry] = (await (await client.get("/api/tags")).json())["models"]
    assert entry["details"]["quantization_level"] == "BF16"


async def test_create_without_streaming_from_a_gguf(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({})
    response = await client.post("/api/create", json={"model": "copy", "from": str(tiny_gguf), "stream": False})
    assert (response.status, await response.json()) == (200, {"status": "success"})


@pytest.mark.parametrize(
    ("body_of", "message"),
    [
        (lambda p: {"model": "x", "from": str(p / "nowhere")}, "no such file or directory"),
        (lambda p: {"model": "x", "from": "a" * 5000}, "no such file or directory"),  # too long a name for the OS
        (lambda p: {"model": "x", "from": "a/" * 3000}, "no such file or directory"),  # too long a path
        (lambda p: {"model": "x", "from": "model\u0000.gguf"}, "no such file or directory"),
        (lambda p: {"model": "x", "from": str(p / "notes.txt")}, "is not a GGUF file"),
        (lambda p: {"model": "x", "from": str(p / "chat.gguf")}, "not an embedding model"),
        (lambda p: {"model": "x"}, '"from" is required'),
        (lambda p: {"model": "../x", "from": str(p / "notes.txt")}, "invalid model name"),
        (lambda p: {"model": "x", "from": str(p), "quantize": "q4_k_m"}, "unsupported quantize"),
    ],
)
async def test_create_refusals_are_400(make_client: MakeClient, tmp_path: Path, body_of: Any, message: str) -> None:
    client = await make_client({})
    (tmp_path / "notes.txt").write_text("not a model")
    make_header_only_gguf(tmp_path / "chat.gguf")
    response = await client.post("/api/create", json=body_of(tmp_path))
    assert response.status == 400
    assert message in (await response.json())["error"]


async def test_create_over_an_existing_name_replaces_it_and_reloads(
    make_client: MakeClient, tiny_gguf: Path, tmp_path: Path
) -> None:
    client = await make_client({"m": tiny_gguf})
    _, before = await embed(client, {"model": "m", "input": "hello"})
    other = make_tiny_bert_dir(tmp_path / "other", seed=7)
    shutil.rmtree(other / "1_Pooling")  # no pooling config: mean, like sentence-transformers
    response = await client.post("/api/create", json={"model": "m", "from": str(other), "stream": False})
    assert response.status == 200
    _, after = await embed(client, {"model": "m", "input": "hello"})
    assert after["load_duration"] > 0
    assert abs(np.dot(before["embeddings"][0], after["embeddings"][0])) < 0.99


def test_a_full_disk_while_creating_is_a_clear_error_and_leaves_nothing(
    store: ModelStore, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(_source: Path, _partial: Path, _token: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_hash_copy", no_space)
    with pytest.raises(InsufficientDisk, match="no space left"):
        store.create("full", tiny_gguf)
    assert store_files(store) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_a_full_disk_while_writing_a_manifest_is_a_clear_error_and_leaves_no_half_manifest(
    store: ModelStore, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("daemon.store.json.dump", no_space)
    with pytest.raises(InsufficientDisk, match=r"no space left on device .* to write the manifest of full:latest"):
        store.create("full", tiny_gguf)
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.manifests_dir.rglob("*.json")) == []


async def test_a_manifest_from_before_the_memory_facts_still_loads(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf})
    store = client.server.app[STORE]
    [path] = list(store.manifests_dir.rglob("*.json"))
    manifest = json.loads(path.read_text())
    for key in ("vocab_size", "feed_forward_length"):  # what the previous version wrote lacked them
        del manifest["facts"][key]
    path.write_text(json.dumps(manifest))
    assert store.get("tiny").facts.vocab_size == 0
    status, body = await embed(client, {"model": "tiny", "input": "hello"})
    assert status == 200 and len(body["embeddings"]) == 1
    assert (await client.get("/api/tags")).status == 200


def test_a_delete_before_a_publish_leaves_no_manifest_naming_a_missing_blob(store: ModelStore, tiny_gguf: Path) -> None:
    first = store.create("first", tiny_gguf)
    digest_hex = first.digest.removeprefix("sha256:")
    # A pull of another name for the same file found the blob, then a delete of the only name
    # that used it removed the blob before the pull could name it.
    store.delete("first")
    with pytest.raises(BlobMissing):
        store.publish_blob("second", digest_hex, "hf.co/x/y")
    assert store.list() == []
    # After the publish, a delete of the other name keeps the blob the new manifest names.
    store.create("first", tiny_gguf)
    store.publish_blob("second", digest_hex, "hf.co/x/y")
    store.delete("first")
    assert store.get("second").blob_path.is_file()


def test_opening_the_store_removes_orphan_blobs_and_abandoned_downloads(store: ModelStore, tiny_gguf: Path) -> None:
    kept = store.create("kept", tiny_gguf)
    orphan = store.blobs_dir / f"sha256-{'0' * 64}"
    orphan.write_bytes(b"no manifest names me")
    recent, abandoned = store.download_dir("1" * 64), store.download_dir("2" * 64)
    for download in (recent, abandoned):
        download.mkdir(parents=True)
        (download / "model.gguf.incomplete").write_bytes(b"partial")
    now_s = (recent / "model.gguf.incomplete").stat().st_mtime + ABANDONED_DOWNLOAD_S / 2
    old_s = now_s - ABANDONED_DOWNLOAD_S - 60
    for path in (abandoned, abandoned / "model.gguf.incomplete"):
        os.utime(path, (old_s, old_s))
    store.open(now_s=now_s)
    assert not orphan.exists() and not abandoned.exists()
    assert recent.exists() and kept.blob_path.exists()  # a recent download still resumes
    assert store.get("kept").digest == kept.digest


def test_manifests_from_other_versions_stay_readable_or_are_skipped(store: ModelStore, tiny_gguf: Path) -> None:
    model = store.create("current", tiny_gguf)
    path = store.manifests_dir / "current" / "latest.json"
    manifest = json.loads(path.read_text())
    # A manifest from a version whose facts had a field this one lacks, and lacked one it has.
    manifest["facts"]["a_field_from_the_future"] = 1
    del manifest["facts"]["vocab_size"]
    (store.manifests_dir / "older").mkdir()
    (store.manifests_dir / "older" / "latest.json").write_text(json.dumps({**manifest, "name": "older:latest"}))
    assert store.get("older").digest == model.digest
    assert store.get("older").facts.vocab_size == 0  # the default: read again from the GGUF at load
    # A manifest a newer emberd wrote is skipped by list and refused by get, with the reason.
    (store.manifests_dir / "newer").mkdir()
    newer = {**manifest, "name": "newer:latest", "schema_version": SCHEMA_VERSION + 1}
    (store.manifests_dir / "newer" / "latest.json").write_text(json.dumps(newer))
    assert sorted(m.name for m in store.list()) == ["current:latest", "older:latest"]
    with pytest.raises(UnreadableManifest, match="newer than this emberd"):
        store.get("newer")


def write_manifest_of(store: ModelStore, name: str, document: dict[str, Any] | str) -> Path:
    path = store.manifests_dir / name / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def test_a_newer_manifest_keeps_its_blob_through_a_downgrade_and_an_upgrade(store: ModelStore, tiny_gguf: Path) -> None:
    model = store.create("future", tiny_gguf)
    path = store.manifests_dir / "future" / "latest.json"
    written_by_this_version = path.read_text()
    # A newer emberd rewrote the manifest; this (older) emberd starts on the same home.
    write_manifest_of(store, "future", {**json.loads(written_by_this_version), "schema_version": SCHEMA_VERSION + 1})
    store.open()
    assert store.list() == []  # skipped with a warning ...
    assert model.blob_path.is_file()  # ... and its file kept
    # Upgrading again: the newer emberd finds its model whole.
    path.write_text(written_by_this_version)
    store.open()
    assert store.get("future").blob_path.read_bytes() == tiny_gguf.read_bytes()


def test_a_blob_a_newer_field_names_is_kept(store: ModelStore, tiny_gguf: Path) -> None:
    model = store.create("future", tiny_gguf)
    sidecar = store.blobs_dir / f"sha256-{'ab' * 32}"
    sidecar.write_bytes(b"a head a newer emberd stores beside the model")
    orphan = store.blobs_dir / f"sha256-{'cd' * 32}"
    orphan.write_bytes(b"named by nothing")
    path = store.manifests_dir / "future" / "latest.json"
    # A newer emberd names a second blob in a field this version has never heard of, nested.
    newer = {**json.loads(path.read_text()), "heads": {"sparse": [{"blob": f"sha256:{'ab' * 32}"}]}}
    write_manifest_of(store, "future", newer)
    store.open()
    assert sidecar.is_file() and model.blob_path.is_file()
    assert not orphan.exists()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"digest": f"sha256:{'a' * 64}"}, {f"sha256:{'a' * 64}"}),
        (
            {"x": [{"y": f"sha256:{'b' * 64}"}, 3, None], "z": f"sha256:{'c' * 64}"},
            {f"sha256:{'b' * 64}", f"sha256:{'c' * 64}"},
        ),
        ({"digest": f"sha256:{'a' * 63}"}, set()),  # one hex digit short
        ({"digest": f"sha256:{'A' * 64}"}, set()),  # the store writes lower case only
        ({"note": f"copied from sha256:{'a' * 64}"}, set()),  # inside prose: not a name
        ([], set()),
    ],
)
def test_digests_named_in_a_manifest(document: object, expected: set[str]) -> None:
    assert digests_named_in(document) == expected


def test_a_manifest_that_cannot_be_parsed_keeps_every_blob(
    store: ModelStore, tiny_gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = store.create("damaged", tiny_gguf)
    orphan = store.blobs_dir / f"sha256-{'0' * 64}"
    orphan.write_bytes(b"perhaps named by the damaged manifest")
    write_manifest_of(store, "damaged", '{"schema_version": 1, "name": "damaged:latest", "dig')  # cut by a crash
    store.open()
    assert model.blob_path.is_file() and orphan.is_file()
    assert "keeping every blob" in caplog.text
    # A manifest that parses but names no digest (an editor's slip) is the same.
    write_manifest_of(store, "damaged", {"schema_version": 1, "name": "damaged:latest"})
    store.open()
    assert model.blob_path.is_file() and orphan.is_file()
    # Once every manifest parses, an orphan goes.
    write_manifest_of(store, "damaged", {"digest": model.digest})
    store.open()
    assert model.blob_path.is_file() and not orphan.exists()


@pytest.mark.parametrize("other", ["newer", "damaged"])
def test_a_delete_keeps_a_blob_an_unreadable_manifest_may_name(store: ModelStore, tiny_gguf: Path, other: str) -> None:
    model = store.create("deleted", tiny_gguf)
    manifest = json.loads((store.manifests_dir / "deleted" / "latest.json").read_text())
    if other == "newer":
        write_manifest_of(store, "other", {**manifest, "name": "other:latest", "schema_version": SCHEMA_VERSION + 1})
    else:
        write_manifest_of(store, "other", "{not json")
    store.delete("deleted")
    assert model.blob_path.is_file()
    with pytest.raises(UnknownModel):
        store.get("deleted")
