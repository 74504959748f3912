"""Pulling from the Hugging Face Hub (a local server speaking its protocol), and model management."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from daemon.api.app import DEFAULT_MODELS_FILE, build_app, read_aliases
from daemon.api.common import PULLS, STORE
from daemon.config import Settings
from daemon.errors import InvalidConfig, UnknownModel
from daemon.hub import load_aliases, pick_gguf_file, quant_of
from daemon.pulls import DISK_MARGIN_BYTES, PROGRESS_STEPS, PullJob
from daemon.store import ModelStore
from tests.conftest import REPO, scheduler_of, wait_until
from tests.hub_server import FakeHub
from tests.test_api_embed import embed

Client = TestClient[Any, Any]


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def aliases_file(tmp_path: Path, fake_hub: FakeHub, quant_files: dict[str, bytes]) -> Path:
    repo = fake_hub.repos[REPO]
    path = tmp_path / "models.toml"
    path.write_text(
        f'["tiny-alias:latest"]\nrepo = "{REPO}"\nfile = "tiny-embed-Q8_0.gguf"\nrevision = "{repo.commit}"\n'
        f'sha256 = "{sha_of(quant_files["tiny-embed-Q8_0.gguf"])}"\n'
        'prompts = { query = "why ", document = "the " }\n\n'
        f'["pinned-wrong"]\nrepo = "{REPO}"\nfile = "tiny-embed-F16.gguf"\nrevision = "main"\nsha256 = "{"0" * 64}"\n'
    )
    return path


@pytest.fixture
def make_hub_client(aiohttp_client: Any, tmp_path: Path, fake_hub: FakeHub, aliases_file: Path) -> Any:
    async def make(**overrides: Any) -> Client:
        disk_free = overrides.pop("disk_free_bytes", None)
        overrides.setdefault("hub_endpoint", fake_hub.url)
        settings = Settings(
            home=tmp_path / "home", models_file=str(aliases_file), **{"calibrate_on_store": False, **overrides}
        )
        client: Client = await aiohttp_client(build_app(settings, disk_free_bytes=disk_free))
        return client

    return make


@pytest.fixture
async def hub_client(make_hub_client: Any) -> Client:
    client: Client = await make_hub_client()
    return client


async def pull_lines(client: Client, name: str) -> tuple[int, list[dict[str, Any]]]:
    response = await client.post("/api/pull", json={"model": name})
    if response.headers["Content-Type"] != "application/x-ndjson":
        return response.status, [await response.json()]
    return response.status, [orjson.loads(line) for line in (await response.read()).splitlines()]


def store_of(client: Client) -> ModelStore:
    return client.server.app[STORE]


# -- tag selection (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "tag", "expected"),
    [
        (["m-Q8_0.gguf", "m-F16.gguf", "m-Q4_K_M.gguf"], None, "m-F16.gguf"),
        (["m-Q8_0.gguf", "m-Q4_K_M.gguf"], None, "m-Q8_0.gguf"),
        (["m-q8_0.gguf", "m-f16.gguf"], "Q8_0", "m-q8_0.gguf"),
        (["m-Q8_0.gguf", "m-F16.gguf"], "q8_0", "m-Q8_0.gguf"),
        (["bge-m3-FP16.gguf", "bge-m3-Q8_0.gguf"], "F16", "bge-m3-FP16.gguf"),
        (["m.Q4_K_M.gguf", "m.f16.gguf"], "q4_k_m", "m.Q4_K_M.gguf"),
        (["snowflake-m--Q4_K_M.GGUF", "snowflake-m-f16.GGUF"], None, "snowflake-m-f16.GGUF"),
        (["only-one-model.gguf", "README.md"], None, "only-one-model.gguf"),
        (["m-F16-00001-of-00002.gguf", "m-F16-00002-of-00002.gguf", "m-Q8_0.gguf"], None, "m-Q8_0.gguf"),
        (["mmproj-F16.gguf", "m-Q8_0.gguf"], None, "m-Q8_0.gguf"),
        (["gguf/m-f16.gguf"], None, "gguf/m-f16.gguf"),
        # jina-embeddings-v3's task adapters sit beside the model (an alias names them as adapters).
        (["lora-retrieval.query-jina-v3-F16.gguf", "jina-v3-Q8_0.gguf"], None, "jina-v3-Q8_0.gguf"),
        (["adapters/lora-separation-m-F16.gguf", "m-F16.gguf"], "F16", "m-F16.gguf"),
        (["flora-m-F16.gguf"], None, "flora-m-F16.gguf"),  # only a name that starts so is an adapter
    ],
)
def test_pick_gguf_file(files: list[str], tag: str | None, expected: str) -> None:
    assert pick_gguf_file(files, tag, "o/r") == expected


@pytest.mark.parametrize(
    ("files", "tag", "message"),
    [
        (["m-Q8_0.gguf"], "Q4_K_M", "has no Q4_K_M file; available: Q8_0"),
        (["README.md"], None, "no single-file GGUF"),
        (["a-Q4_K_M.gguf", "a-Q5_K_M.gguf"], None, "pick one with a tag: Q4_K_M, Q5_K_M"),
    ],
)
def test_pick_gguf_file_refusals(files: list[str], tag: str | None, message: str) -> None:
    with pytest.raises(UnknownModel, match=message):
        pick_gguf_file(files, tag, "o/r")


@pytest.mark.parametrize(
    ("filename", "quant"),
    [
        ("Qwen3-Embedding-0.6B-Q8_0.gguf", "Q8_0"),
        ("x.f16.gguf", "F16"),
        ("x-fp32.gguf", "F32"),
        ("a/b-bf16.gguf", "BF16"),
    ],
)
def test_quant_of(filename: str, quant: str) -> None:
    assert quant_of(filename) == quant


# -- pulling ----------------------------------------------------------------------------------------


async def test_pull_streams_ollamas_progress_then_the_model_is_listed_and_embeds(
    hub_client: Client, quant_files: dict[str, bytes]
) -> None:
    status, lines = await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    assert status == 200
    expected_sha = sha_of(quant_files["tiny-embed-Q8_0.gguf"])
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [line for line in lines if "total" in line]
    assert progress, "no progress lines"
    assert all(line["digest"] == f"sha256:{expected_sha}" for line in progress)
    assert all(line["status"] == f"pulling {expected_sha[:12]}" for line in progress)
    assert progress[-1]["completed"] == progress[-1]["total"] == len(quant_files["tiny-embed-Q8_0.gguf"])
    completed = [line["completed"] for line in progress]
    assert completed == sorted(completed)

    tags = await (await hub_client.get("/api/tags")).json()
    [entry] = tags["models"]
    assert entry["name"] == f"hf.co/{REPO.lower()}:q8_0"
    assert entry["digest"] == expected_sha
    assert entry["details"]["quantization_level"] == "Q8_0"
    status, body = await embed(hub_client, {"model": f"hf.co/{REPO}:Q8_0", "input": "hello"})
    assert status == 200
    assert len(body["embeddings"][0]) == 32


async def test_no_tag_prefers_f16_and_huggingface_co_names_work(
    hub_client: Client, quant_files: dict[str, bytes]
) -> None:
    _, lines = await pull_lines(hub_client, f"huggingface.co/{REPO}")
    assert lines[-1] == {"status": "success"}
    model = store_of(hub_client).get(f"hf.co/{REPO}")
    assert model.digest == f"sha256:{sha_of(quant_files['tiny-embed-F16.gguf'])}"


async def test_stream_false_answers_one_object(hub_client: Client) -> None:
    response = await hub_client.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False})
    assert (response.status, await response.json()) == (200, {"status": "success"})


async def test_a_cut_transfer_resumes_where_it_broke_off(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    data = quant_files["tiny-embed-F16.gguf"]
    fake_hub.cut_next.add(sha_of(data))
    _, lines = await pull_lines(hub_client, f"hf.co/{REPO}:F16")
    assert lines[-1] == {"status": "success"}
    assert fake_hub.transfers_started[sha_of(data)] == 2  # the first broke off; the second resumed
    assert store_of(hub_client).get(f"hf.co/{REPO}:F16").blob_path.read_bytes() == data


async def test_a_sha256_mismatch_leaves_nothing_in_the_store(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    fake_hub.tamper.add(sha_of(quant_files["tiny-embed-Q8_0.gguf"]))
    _, lines = await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    assert "digest mismatch" in lines[-1]["error"]
    store = store_of(hub_client)
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.manifests_dir.rglob("*.json")) == []
    assert list(store.downloads_dir.iterdir()) == []
    response = await hub_client.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False})
    assert response.status == 502


async def test_a_full_disk_fails_before_downloading(make_hub_client: Any, fake_hub: FakeHub) -> None:
    client = await make_hub_client(disk_free_bytes=lambda _path: 10 * 1024 * 1024)
    _, lines = await pull_lines(client, f"hf.co/{REPO}:Q8_0")
    assert "not enough disk space" in lines[-1]["error"]
    assert sum(fake_hub.downloads.values()) == 0
    assert list(store_of(client).blobs_dir.iterdir()) == []
    assert list(store_of(client).downloads_dir.iterdir()) == []  # a refusal creates nothing


async def test_a_resumed_download_needs_room_only_for_the_bytes_it_lacks(
    make_hub_client: Any, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    data = quant_files["tiny-embed-F16.gguf"]
    half = len(data) // 2
    client = await make_hub_client(disk_free_bytes=lambda _path: DISK_MARGIN_BYTES + (len(data) - half))
    staged = store_of(client).download_dir(sha_of(data))
    staged.mkdir(parents=True)
    (staged / "tiny-embed-F16.gguf.partial").write_bytes(data[:half])  # what a cut transfer left
    _, lines = await pull_lines(client, f"hf.co/{REPO}:F16")
    assert lines[-1] == {"status": "success"}
    assert fake_hub.range_starts[sha_of(data)] == [half]


async def test_a_download_under_way_keeps_the_room_it_still_needs(
    make_hub_client: Any, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    q8, f16 = quant_files["tiny-embed-Q8_0.gguf"], quant_files["tiny-embed-F16.gguf"]
    # Room for either download alone, not for both.
    client = await make_hub_client(disk_free_bytes=lambda _path: DISK_MARGIN_BYTES + len(q8) + len(f16) - 1)
    release = threading.Event()
    fake_hub.hold[sha_of(q8)] = release
    first = asyncio.create_task(pull_lines(client, f"hf.co/{REPO}:Q8_0"))
    await wait_until(lambda: fake_hub.transfers_started[sha_of(q8)] == 1)
    _, lines = await pull_lines(client, f"hf.co/{REPO}:F16")
    assert "not enough disk space for tiny-embed-F16.gguf" in lines[-1]["error"]
    assert "to downloads under way" in lines[-1]["error"]
    assert fake_hub.transfers_started[sha_of(f16)] == 0
    release.set()
    assert (await first)[1][-1] == {"status": "success"}
    _, lines = await pull_lines(client, f"hf.co/{REPO}:F16")  # the first one done: room again
    assert lines[-1] == {"status": "success"}


def fill_the_disk_midway(url: str, partial: Path, size_bytes: int, *_args: Any) -> None:
    """hub_http.transfer on a disk another writer fills: half the bytes land, then ENOSPC."""
    partial.write_bytes(b"\0" * (size_bytes // 2))
    raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_disk_that_fills_during_the_transfer_is_a_507_that_says_so_and_leaves_no_partial(
    hub_client: Client, quant_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon import hub_http

    monkeypatch.setattr(hub_http, "transfer", fill_the_disk_midway)
    response = await hub_client.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False})
    assert response.status == 507
    message = (await response.json())["error"]
    assert "filled up while downloading tiny-embed-Q8_0.gguf" in message
    assert "no space left on device" in message and "partial download was removed" in message
    store = store_of(hub_client)
    assert list(store.downloads_dir.iterdir()) == [] and list(store.blobs_dir.iterdir()) == []
    _, lines = await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    assert "filled up while downloading" in lines[-1]["error"]  # streamed: the last line says so too

    monkeypatch.undo()  # room again: the same pull succeeds, with no restart
    _, lines = await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    assert lines[-1] == {"status": "success"}
    assert store.get(f"hf.co/{REPO}:Q8_0").blob_path.read_bytes() == quant_files["tiny-embed-Q8_0.gguf"]


async def test_a_full_disk_when_the_manifest_is_written_is_a_507_and_the_next_pull_names_the_kept_blob(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("daemon.store.json.dump", no_space)
    response = await hub_client.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False})
    assert response.status == 507
    assert "to write the manifest of" in (await response.json())["error"]
    store = store_of(hub_client)
    assert list(store.tmp_dir.iterdir()) == [] and list(store.manifests_dir.rglob("*.json")) == []
    monkeypatch.undo()
    _, lines = await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    assert lines[-1] == {"status": "success"}
    assert fake_hub.downloads[sha_of(quant_files["tiny-embed-Q8_0.gguf"])] == 1  # the verified blob was kept


async def test_offline_fails_at_once_and_suggests_create(make_hub_client: Any, fake_hub: FakeHub) -> None:
    client = await make_hub_client(hub_offline=True)
    status, [body] = await pull_lines(client, f"hf.co/{REPO}:Q8_0")
    assert status == 503
    assert "offline" in body["error"] and "emberd create" in body["error"]
    assert sum(fake_hub.downloads.values()) == 0


async def test_two_pulls_of_one_model_share_one_download(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    sha = sha_of(quant_files["tiny-embed-Q8_0.gguf"])
    release = threading.Event()
    fake_hub.hold[sha] = release
    first = asyncio.create_task(pull_lines(hub_client, f"hf.co/{REPO}:Q8_0"))
    await wait_until(lambda: fake_hub.transfers_started[sha] == 1)
    second = asyncio.create_task(pull_lines(hub_client, f"HF.CO/{REPO}:q8_0"))
    pulls = hub_client.server.app[PULLS]
    # The second pull has joined the first (not merely started after it ended).
    await wait_until(lambda: pulls.followers(f"hf.co/{REPO}:Q8_0") == 2)
    release.set()
    (_, first_lines), (_, second_lines) = await asyncio.gather(first, second)
    assert first_lines[-1] == second_lines[-1] == {"status": "success"}
    assert second_lines[0] == {"status": "pulling manifest"}  # the follower sees the whole story
    assert fake_hub.downloads[sha] == 1


async def test_an_alias_and_its_hf_co_name_pulled_at_once_share_one_download(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    sha = sha_of(quant_files["tiny-embed-Q8_0.gguf"])
    release = threading.Event()
    fake_hub.hold[sha] = release
    by_alias = asyncio.create_task(pull_lines(hub_client, "tiny-alias"))
    await wait_until(lambda: fake_hub.transfers_started[sha] == 1)
    by_name = asyncio.create_task(pull_lines(hub_client, f"hf.co/{REPO}:Q8_0"))
    pulls = hub_client.server.app[PULLS]
    # Two jobs (two names) wait on one download of the blob, in one staging folder.
    await wait_until(lambda: by_name.done() or fake_hub.transfers_started[sha] > 1 or pulls.waiting_for(sha) == 2)
    release.set()
    (_, alias_lines), (_, name_lines) = await asyncio.gather(by_alias, by_name)
    assert alias_lines[-1] == name_lines[-1] == {"status": "success"}
    assert fake_hub.downloads[sha] == 1
    store = store_of(hub_client)
    assert store.get("tiny-alias").digest == store.get(f"hf.co/{REPO}:Q8_0").digest == f"sha256:{sha}"


async def test_a_pull_whose_client_leaves_mid_stream_finishes_without_an_error_logged(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    sha = sha_of(quant_files["tiny-embed-Q8_0.gguf"])
    release = threading.Event()
    fake_hub.hold[sha] = release
    body = orjson.dumps({"model": f"hf.co/{REPO}:Q8_0"})
    host, port = hub_client.server.host, hub_client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /api/pull HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await reader.readuntil(b"pulling manifest")  # the stream has begun
    writer.close()  # the client leaves
    release.set()
    pulls = hub_client.server.app[PULLS]
    await wait_until(lambda: pulls.in_flight == 0)
    assert store_of(hub_client).get(f"hf.co/{REPO}:Q8_0").blob_path.is_file()  # the pull went on
    assert not [record for record in caplog.records if "unexpected error" in record.getMessage()]


async def test_an_alias_pulls_its_pinned_file(hub_client: Client, quant_files: dict[str, bytes]) -> None:
    _, lines = await pull_lines(hub_client, "tiny-alias")
    assert lines[-1] == {"status": "success"}
    assert (
        store_of(hub_client).get("tiny-alias:latest").digest == f"sha256:{sha_of(quant_files['tiny-embed-Q8_0.gguf'])}"
    )
    # The alias's prompts come with it: /api/show lists them and a request can pick one.
    show = await (await hub_client.post("/api/show", json={"model": "tiny-alias"})).json()
    assert (show["prompts"], show["default_prompt_name"]) == ({"query": "why ", "document": "the "}, None)
    _, picked = await embed(hub_client, {"model": "tiny-alias", "input": "sky", "prompt_name": "query"})
    _, spelled = await embed(hub_client, {"model": "tiny-alias", "input": "why sky"})
    assert picked["embeddings"] == spelled["embeddings"]


async def test_an_alias_whose_pinned_sha256_differs_is_refused(hub_client: Client) -> None:
    _, lines = await pull_lines(hub_client, "pinned-wrong")
    assert "differs from the pinned" in lines[-1]["error"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hf.co/owner/missing-repo", "not found on the Hugging Face Hub"),
        (f"hf.co/{REPO}:Q2_K", "has no Q2_K file; available: F16, Q8_0"),
        ("hf.co/owner/gated", "is gated"),
    ],
)
async def test_pull_errors_after_the_stream_began_end_it_with_an_error_line(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes], name: str, message: str
) -> None:
    fake_hub.add_repo("owner/gated", quant_files, gated=True)
    status, lines = await pull_lines(hub_client, name)
    assert status == 200
    assert lines[0] == {"status": "pulling manifest"}
    assert message in lines[-1]["error"]


@pytest.mark.parametrize("name", ["nomic-embed-text-unknown", "../escape", "hf.co/only-owner", "hf.co/a/b/c"])
async def test_names_that_cannot_be_pulled_are_refused_before_streaming(hub_client: Client, name: str) -> None:
    status, [body] = await pull_lines(hub_client, name)
    assert status in (400, 404)
    assert body["error"]


async def test_auto_pull_fetches_a_missing_model_for_embed(make_hub_client: Any) -> None:
    off = await make_hub_client()
    status, body = await embed(off, {"model": f"hf.co/{REPO}:Q8_0", "input": "hello"})
    assert (status, body["error"]) == (404, f'model "hf.co/{REPO}:Q8_0" not found, try pulling it first')
    on = await make_hub_client(auto_pull=True)
    status, body = await embed(on, {"model": f"hf.co/{REPO}:Q8_0", "input": "hello"})
    assert status == 200


async def test_an_auto_pull_is_admitted_first_and_counts_against_the_queue(
    make_hub_client: Any, fake_hub: FakeHub, quant_files: dict[str, bytes]
) -> None:
    release = threading.Event()
    fake_hub.hold[sha_of(quant_files["tiny-embed-Q8_0.gguf"])] = release
    client = await make_hub_client(auto_pull=True, max_queue=1)
    pulling = asyncio.ensure_future(embed(client, {"model": f"hf.co/{REPO}:Q8_0", "input": "hello"}))
    try:
        await wait_until(lambda: scheduler_of(client).admitted == 1)  # admitted while its pull runs
        status, body = await embed(client, {"model": f"hf.co/{REPO}:Q8_0", "input": "hello"})
        assert (status, body["error"]) == (503, "server busy, please try again.  maximum pending requests exceeded")
    finally:
        release.set()
    status, _ = await pulling
    assert status == 200


# -- show, delete, list -----------------------------------------------------------------------------


async def test_show_gives_details_gguf_metadata_and_capabilities(hub_client: Client) -> None:
    await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    response = await hub_client.post("/api/show", json={"model": f"hf.co/{REPO}:Q8_0"})
    body = await response.json()
    assert response.status == 200
    assert body["capabilities"] == ["embedding"]
    assert body["details"]["family"] == "bert"
    assert body["model_info"]["bert.context_length"] == 64
    assert body["model_info"]["bert.pooling_type"] == 1
    assert body["model_info"]["general.parameter_count"] > 0
    assert body["model_info"]["tokenizer.ggml.tokens"] is None
    missing = await hub_client.post("/api/show", json={"model": "nothing"})
    assert missing.status == 404


async def test_delete_unloads_a_loaded_model_and_keeps_shared_blobs(hub_client: Client) -> None:
    await pull_lines(hub_client, f"hf.co/{REPO}:Q8_0")
    await pull_lines(hub_client, "tiny-alias")  # the same file under a second name
    await embed(hub_client, {"model": f"hf.co/{REPO}:Q8_0", "input": "hello"})
    runner = scheduler_of(hub_client).loaded()[0].runner
    response = await hub_client.delete("/api/delete", json={"model": f"hf.co/{REPO}:Q8_0"})
    assert (response.status, await response.read()) == (200, b"")
    assert scheduler_of(hub_client).loaded() == []
    await asyncio.wait_for(runner.exited.wait(), timeout=10)
    store = store_of(hub_client)
    assert [m.name for m in store.list()] == ["tiny-alias:latest"]
    assert store.get("tiny-alias").blob_path.exists()
    status, _ = await embed(hub_client, {"model": "tiny-alias", "input": "hello"})
    assert status == 200
    again = await hub_client.delete("/api/delete", json={"model": f"hf.co/{REPO}:Q8_0"})
    assert again.status == 404
    escape = await hub_client.delete("/api/delete", json={"model": "../../etc"})
    assert escape.status == 400


async def test_openai_model_list_and_lookup(hub_client: Client) -> None:
    await pull_lines(hub_client, "tiny-alias")
    listing = await (await hub_client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny-alias"]
    assert listing["data"][0]["object"] == "model"
    one = await hub_client.get("/v1/models/tiny-alias")
    assert (await one.json())["id"] == "tiny-alias"
    missing = await hub_client.get("/v1/models/nothing")
    assert missing.status == 404
    error = (await missing.json())["error"]
    assert error["type"] == "not_found_error" and "nothing" in error["message"]


def test_the_shipped_aliases_cover_the_documented_models() -> None:
    aliases = load_aliases(DEFAULT_MODELS_FILE)
    wanted = [
        "all-minilm", "nomic-embed-text", "mxbai-embed-large", "bge-m3", "bge-small-en-v1.5", "bge-large-en-v1.5",
        "snowflake-arctic-embed", "snowflake-arctic-embed2", "granite-embedding", "embeddinggemma",
        "qwen3-embedding", "paraphrase-multilingual",
        "bge-reranker-v2-m3", "jina-reranker-v1-tiny-en", "jina-reranker-v2-base-multilingual",
        "nomic-embed-text-v2-moe", "qwen3-reranker",
    ]  # fmt: skip
    for name in wanted:
        entry = aliases[f"{name}:latest"]
        assert "/" in entry.repo_id
        assert entry.revision == "main" or len(entry.revision) == 40
        assert entry.sha256 is None or len(entry.sha256) == 64
    assert aliases["nomic-embed-text:v1.5"] == aliases["nomic-embed-text:latest"]


async def test_progress_events_are_throttled_and_the_end_is_reported_once() -> None:
    job = PullJob()
    total = 10_000
    for completed in [0, *range(1, total + 1, 7), total, total]:
        job.progress("pulling x", "sha256:x", total, completed)
    completed_values = [event["completed"] for event in job.events]
    assert len(completed_values) <= PROGRESS_STEPS + 2
    assert completed_values == sorted(completed_values)
    assert completed_values.count(total) == 1


def test_a_configured_aliases_file_must_exist_but_the_default_may_be_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidConfig, match="cannot read aliases file"):
        read_aliases(Settings(home=tmp_path, models_file=str(tmp_path / "missing.toml")))
    monkeypatch.setattr("daemon.api.app.DEFAULT_MODELS_FILE", tmp_path / "not-shipped.toml")
    assert read_aliases(Settings(home=tmp_path)) == {}


async def test_hf_token_opens_a_gated_repo(
    hub_client: Client, fake_hub: FakeHub, quant_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add_repo("owner/gated-with-token", quant_files, token="hf_secret")
    _, lines = await pull_lines(hub_client, "hf.co/owner/gated-with-token:Q8_0")
    assert "is gated" in lines[-1]["error"] and "HF_TOKEN" in lines[-1]["error"]
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # read by huggingface_hub itself, at each request
    _, lines = await pull_lines(hub_client, "hf.co/owner/gated-with-token:Q8_0")
    assert lines[-1] == {"status": "success"}


async def test_a_file_that_is_not_gguf_is_not_kept(hub_client: Client, fake_hub: FakeHub) -> None:
    fake_hub.add_repo("owner/html-instead", {"model-Q8_0.gguf": b"<html>rate limited</html>" * 100})
    _, lines = await pull_lines(hub_client, "hf.co/owner/html-instead:Q8_0")
    assert "is not a GGUF file" in lines[-1]["error"]
    store = store_of(hub_client)
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.downloads_dir.iterdir()) == []


async def test_an_unreachable_hub_says_so_and_suggests_create(make_hub_client: Any) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket closes
    client = await make_hub_client(hub_endpoint=f"http://127.0.0.1:{port}")
    _, lines = await pull_lines(client, f"hf.co/{REPO}:Q8_0")
    assert "cannot reach the Hugging Face Hub" in lines[-1]["error"]
    assert "emberd create" in lines[-1]["error"]
