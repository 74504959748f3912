"""The vector cache (daemon/cache.py) through the daemon: hits byte-identical to misses, keys that
follow the model's weights and the exact token ids, a corrupt file replaced, a shared Redis serving
two daemons, kill -9 mid-write, LRU eviction; and its pure policy, table-tested."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from daemon import cache as cache_module
from daemon.api import app as app_module
from daemon.api.app import build_app
from daemon.api.embedding import VECTOR_CACHE
from daemon.cache import POOLED, SqliteVectors, cache_key, evictions
from daemon.config import Settings
from daemon.convert import convert_hf_directory
from daemon.runner.protocol import GROUP_SIGNALS
from daemon.store import ModelStore
from tests.conftest import MakeClient, scheduler_of, wait_until
from tests.test_adapters import QUERY, SEPARATION, cosine, files, reference  # noqa: F401 (fixtures)
from tests.test_adapters import TEXTS as ADAPTER_TEXTS
from tests.tiny_models import make_tiny_bert_dir

HITS = "X-Emberd-Cache-Hits"
TEXTS = ["why is the sky blue?", "a second, somewhat longer passage about the colour of the sea", "third"]
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo conftest's vector_cache_off: these tests are the cache's own."""
    monkeypatch.setattr(app_module, "open_vector_cache", cache_module.open_vector_cache)


@pytest.fixture(scope="module")
def other_tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT's architecture and vocabulary with other random weights."""
    directory = make_tiny_bert_dir(tmp_path_factory.mktemp("other") / "tiny-bert-other", seed=11)
    path = directory.parent / "other.gguf"
    convert_hf_directory(directory, path, "f32", "tiny")
    return path


def embeddings_bytes(body: bytes) -> bytes:
    """The `embeddings` array of an /api/embed answer, as the bytes it was sent as."""
    match = re.search(rb'"embeddings":(\[\[.*?\]\])', body)
    assert match is not None, body[:200]
    return match.group(1)


async def embed(client: TestClient[Any, Any], body: dict[str, Any]) -> tuple[int, bytes, dict[str, Any], str]:
    response = await client.post("/api/embed", json={"model": "tiny", **body})
    raw = await response.read()
    assert response.status == 200, raw
    return response.status, raw, await response.json(), response.headers[HITS]


async def loaded_models(client: TestClient[Any, Any]) -> list[str]:
    response = await client.get("/api/ps")
    return [model["name"] for model in (await response.json())["models"]]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- through the daemon --------------------------------------------------------------------------


@pytest.mark.usefixtures("cache_on")
async def test_a_hit_is_byte_identical_to_the_miss_and_counts_its_tokens(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, cache=True)
    _status, first, first_json, first_hits = await embed(client, {"input": TEXTS})
    _status, second, second_json, second_hits = await embed(client, {"input": TEXTS})
    assert (first_hits, second_hits) == ("0", "3")
    assert embeddings_bytes(second) == embeddings_bytes(first)
    assert second_json["prompt_eval_count"] == first_json["prompt_eval_count"] > 0
    # The same vectors through OpenAI's route (the same cache): usage counts the hits' tokens too.
    response = await client.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS})
    answer = await response.json()
    assert response.headers[HITS] == "3"
    assert answer["usage"]["prompt_tokens"] == first_json["prompt_eval_count"]
    # A request of old and new inputs: the old ones hit, the vectors are those each got alone.
    _status, _raw, mixed, mixed_hits = await embed(client, {"input": ["a new input", TEXTS[1]]})
    assert mixed_hits == "1"
    assert mixed["embeddings"][1] == first_json["embeddings"][1]
    _status, _raw, alone, _hits = await embed(client, {"input": "a new input"})
    assert alone["embeddings"][0] == mixed["embeddings"][0]
    metrics = metric_samples(await (await client.get("/metrics")).text())
    model = (("model", "tiny:latest"),)
    assert metrics[("emberd_cache_hits_total", model)] == 3 + 3 + 1 + 1
    assert metrics[("emberd_cache_misses_total", model)] == 3 + 1
    assert metrics[("emberd_cache_bytes", ())] > 0


@pytest.mark.usefixtures("cache_on")
async def test_cached_vectors_equal_those_of_a_daemon_without_the_cache(
    make_client: MakeClient, tiny_gguf: Path, aiohttp_client: Any, tmp_path: Path
) -> None:
    """The sequences tokenized for the cache's keys are those the runner decodes by itself: long
    inputs cut, a shorter num_ctx, split windows."""
    long_text = " ".join(f"word{index}" for index in range(200))
    bodies: list[dict[str, Any]] = [
        {"input": [long_text, "short"], "truncate": True},
        {"input": [long_text, "short"], "options": {"num_ctx": 16}},
        {"input": [long_text, "short"], "split_long_inputs": True},
    ]
    cached = await make_client({"tiny": tiny_gguf}, cache=True)
    settings = Settings(home=tmp_path / "plain", cache=False)
    store = ModelStore(settings.home)
    store.open()
    store.create("tiny", tiny_gguf)
    plain = await aiohttp_client(build_app(settings))
    for body in bodies:
        for _round in range(2):  # the miss, then the hit
            _status, _raw, with_cache, _hits = await embed(cached, body)
            _status, _raw, without, _hits = await embed(plain, body)
            # Decodes packed otherwise differ in the last float digits; a cut elsewhere differs by 1e-2.
            np.testing.assert_allclose(with_cache["embeddings"], without["embeddings"], atol=2e-5)
            assert with_cache["prompt_eval_count"] == without["prompt_eval_count"]


@pytest.mark.usefixtures("cache_on")
async def test_keys_follow_the_token_ids_decoded(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, cache=True, openai_token_ids="model")
    tokens = await client.post("/api/tokenize", json={"model": "tiny", "content": "hello world"})
    ids = (await tokens.json())["tokens"]
    _status, _raw, text_answer, hits = await embed(client, {"input": "hello world", "truncate": False})
    assert hits == "0"
    # The same ids sent as ids (OpenAI's route, ids of the model's vocabulary) decode the same
    # sequence: a hit, the same vector.
    response = await client.post("/v1/embeddings", json={"model": "tiny", "input": [ids], "encoding_format": "float"})
    assert response.status == 200, await response.text()
    assert response.headers[HITS] == "1"
    np.testing.assert_allclose((await response.json())["data"][0]["embedding"], text_answer["embeddings"][0], rtol=0)
    long_text = " ".join(f"word{index}" for index in range(200))
    _status, _raw, _answer, hits = await embed(client, {"input": long_text})
    assert hits == "0"
    # Another num_ctx cuts it elsewhere: other ids, a miss; then a hit.
    for expected in ("0", "1"):
        _status, _raw, _answer, hits = await embed(client, {"input": long_text, "options": {"num_ctx": 16}})
        assert hits == expected
    # A split input is not cached (its vector pools several decodes): a miss every time.
    for _round in range(2):
        _status, _raw, _answer, hits = await embed(client, {"input": long_text, "split_long_inputs": True})
        assert hits == "0"


@pytest.mark.usefixtures("cache_on")
async def test_the_daemon_evicts_the_least_recently_used_past_the_bound(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    entry = 32 + 4 * 32  # a SHA-256 key, and the tiny model's 32 float32s
    client = await make_client({"tiny": tiny_gguf}, cache=True, cache_max_bytes=3 * entry)
    for text in ("one", "two", "three", "four"):  # one a request: written in this order
        _status, _raw, _answer, hits = await embed(client, {"input": text})
        assert hits == "0"
    # "four" took it past 3 entries: the oldest went until at most 90% was left ("one" and "two").
    _status, _raw, _answer, hits = await embed(client, {"input": ["three", "four"]})
    assert hits == "2"
    _status, _raw, _answer, hits = await embed(client, {"input": "one"})
    assert hits == "0"
    metrics = metric_samples(await (await client.get("/metrics")).text())
    assert metrics[("emberd_cache_evictions_total", ())] >= 2
    assert metrics[("emberd_cache_bytes", ())] <= 3 * entry


@pytest.mark.usefixtures("cache_on")
async def test_task_adapters_key_apart(
    make_client: MakeClient,
    files: dict[str, Path],  # noqa: F811 (test_adapters' fixture)
    reference: dict[str | None, dict[str, np.ndarray]],  # noqa: F811 (test_adapters' fixture)
) -> None:
    """The separation task has no prefix: its inputs decode the same ids as the base model's, and
    only the task in the key keeps their vectors apart."""
    client = await make_client({}, cache=True)
    created = await client.post(
        "/api/create",
        json={
            "model": "jina",
            "from": str(files["model"]),
            "adapters": [str(files[QUERY]), str(files[SEPARATION])],
            "stream": False,
        },
    )
    assert created.status == 200, await created.text()
    every = len(ADAPTER_TEXTS)
    for task, expected_hits in ((None, 0), (SEPARATION, 0), (SEPARATION, every), (None, every), (QUERY, 0)):
        body = {"model": "jina", "input": ADAPTER_TEXTS, **({"task": task} if task else {})}
        response = await client.post("/api/embed", json=body)
        answer = await response.json()
        assert response.status == 200, answer
        assert response.headers[HITS] == str(expected_hits), task
        for text, vector in zip(ADAPTER_TEXTS, answer["embeddings"], strict=True):
            assert cosine(vector, reference[task][text]) >= 0.9999, (task, text)


@pytest.mark.usefixtures("cache_on")
async def test_rerank_pairs_are_cached_too(make_client: MakeClient, reranker_gguf: Path) -> None:
    client = await make_client({"reranker": reranker_gguf}, cache=True)
    body = {"model": "reranker", "query": "why is the sky blue?", "documents": TEXTS}
    answers = []
    for expected in ("0", "3"):
        response = await client.post("/api/rerank", json=body)
        assert response.status == 200, await response.text()
        assert response.headers[HITS] == expected
        answers.append(await response.json())
    assert answers[1]["results"] == answers[0]["results"]


@pytest.mark.usefixtures("cache_on")
async def test_all_hits_load_no_model(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, cache=True)
    _status, first, _answer, _hits = await embed(client, {"input": TEXTS})
    assert await scheduler_of(client).unload("tiny")
    assert await loaded_models(client) == []
    _status, second, _answer, hits = await embed(client, {"input": TEXTS})
    assert hits == "3"
    assert embeddings_bytes(second) == embeddings_bytes(first)
    assert await loaded_models(client) == []
    # One miss loads it.
    _status, _raw, _answer, hits = await embed(client, {"input": [*TEXTS, "new"]})
    assert hits == "3"
    assert await loaded_models(client) == ["tiny:latest"]


@pytest.mark.usefixtures("cache_on")
async def test_a_model_recreated_with_other_weights_never_serves_old_vectors(
    make_client: MakeClient, tiny_gguf: Path, other_tiny_gguf: Path, tmp_path: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, cache=True)
    _status, _raw, old, _hits = await embed(client, {"input": TEXTS})
    _status, _raw, _old_again, hits = await embed(client, {"input": TEXTS})
    assert hits == "3"
    created = await client.post("/api/create", json={"model": "tiny", "files": {"model.gguf": str(other_tiny_gguf)}})
    if created.status != 200:  # the route's other spelling: the store, as `emberd create` does
        ModelStore(tmp_path / "home").create("tiny", other_tiny_gguf)
    _status, _raw, new, hits = await embed(client, {"input": TEXTS})
    assert hits == "0"
    assert not np.allclose(new["embeddings"], old["embeddings"], atol=1e-3)
    _status, _raw, _new_again, hits = await embed(client, {"input": TEXTS})
    assert hits == "3"


@pytest.mark.usefixtures("cache_on")
async def test_a_corrupt_cache_file_is_replaced(
    make_client: MakeClient, tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "home" / "cache" / "vectors.sqlite3"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a SQLite database, " * 200)
    client = await make_client({"tiny": tiny_gguf}, cache=True)
    _status, first, _answer, hits = await embed(client, {"input": TEXTS})
    assert hits == "0"
    _status, second, _answer, hits = await embed(client, {"input": TEXTS})
    assert hits == "3"
    assert embeddings_bytes(second) == embeddings_bytes(first)
    assert path.with_name("vectors.sqlite3.corrupt").read_bytes().startswith(b"this is not a SQLite")
    assert any("is corrupt" in record.getMessage() for record in caplog.records)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.usefixtures("cache_on")
async def test_daemons_sharing_a_home_share_the_file(aiohttp_client: Any, tiny_gguf: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("tiny", tiny_gguf)
    first, second = [await aiohttp_client(build_app(Settings(home=home, cache=True))) for _daemon in range(2)]
    texts = [[f"{text} ({daemon})" for text in TEXTS] for daemon in range(2)]
    # Both write at once (one transaction each, queued by SQLite's lock): nothing is lost.
    await asyncio.gather(embed(first, {"input": texts[0]}), embed(second, {"input": texts[1]}))
    # Their runners started at once: the group's signals are unblocked again (a stop still stops).
    assert not set(GROUP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    path = home / "cache" / "vectors.sqlite3"

    def stored() -> int:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            (count,) = connection.execute("SELECT count(*) FROM vectors").fetchone()
            return int(count)

    await wait_until(lambda: stored() == 2 * len(TEXTS))  # written in the background
    for client, own in ((first, texts[1]), (second, texts[0])):  # each asks for the other's
        _status, _raw, _answer, hits = await embed(client, {"input": own})
        assert hits == str(len(TEXTS))


@pytest.mark.usefixtures("cache_on")
async def test_a_cache_that_cannot_be_opened_is_a_miss_logged_once(
    make_client: MakeClient, tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "cache").write_bytes(b"a file where the cache's folder goes")
    client = await make_client({"tiny": tiny_gguf}, cache=True)
    for _round in range(3):
        _status, _raw, answer, hits = await embed(client, {"input": TEXTS})
        assert hits == "0" and len(answer["embeddings"]) == len(TEXTS)
    await client.server.app[VECTOR_CACHE].flush()
    failures = [record for record in caplog.records if "vector cache lookup failed" in record.getMessage()]
    assert len(failures) == 1  # at most once a minute, not once a request


# -- a shared Redis ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server (Debian's package; `make test` installs it) on a loopback port."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.01)  # polling for the port, with a deadline
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
async def redis_keys(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.usefixtures("cache_on")
async def test_a_shared_redis_serves_two_daemons(
    aiohttp_client: Any, tiny_gguf: Path, tmp_path: Path, redis_url: str, redis_keys: Any
) -> None:
    clients = []
    for index in range(2):
        settings = Settings(home=tmp_path / f"home-{index}", cache=True, cache_url=redis_url)
        store = ModelStore(settings.home)
        store.open()
        store.create("tiny", tiny_gguf)
        clients.append(await aiohttp_client(build_app(settings)))
    first, second = clients
    _status, first_raw, _answer, hits = await embed(first, {"input": TEXTS})
    assert hits == "0"

    async def stored_keys() -> int:
        count: int = await redis_keys.dbsize()
        return count

    deadline = time.monotonic() + 10
    while await stored_keys() < len(TEXTS):  # the first daemon writes in the background
        assert time.monotonic() < deadline, "the first daemon's vectors never reached Redis"
        await asyncio.sleep(0.01)
    _status, second_raw, _answer, hits = await embed(second, {"input": TEXTS})
    assert hits == "3"
    assert embeddings_bytes(second_raw) == embeddings_bytes(first_raw)
    assert await loaded_models(second) == []
    assert not (tmp_path / "home-1" / "cache").exists()  # Redis, not the file


@pytest.mark.usefixtures("cache_on")
async def test_an_unreachable_redis_is_a_miss_not_an_error(
    make_client: MakeClient, tiny_gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client({"tiny": tiny_gguf}, cache=True, cache_url=f"redis://127.0.0.1:{free_port()}/0")
    for _round in range(2):
        _status, _raw, answer, hits = await embed(client, {"input": TEXTS})
        assert hits == "0"
        assert len(answer["embeddings"]) == len(TEXTS)
    assert any("vector cache" in record.getMessage() for record in caplog.records)


# -- the SQLite file: kill -9 mid-write, LRU -------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from daemon.cache import SqliteVectors

vectors = SqliteVectors(Path(sys.argv[1]), 1 << 40)
index = 0
while True:
    batch = [((index * 8 + part).to_bytes(8, "big"), bytes([(index * 8 + part) % 251]) * 1536) for part in range(8)]
    vectors.put_many_blocking(batch)
    print(index, flush=True)  # after the commit: every entry of batches up to this one is stored
    index += 1
"""


def test_kill_9_mid_write_loses_only_the_write_under_way(tmp_path: Path) -> None:
    path = tmp_path / "vectors.sqlite3"
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True
    ) as process:
        assert process.stdout is not None
        committed = -1
        for line in process.stdout:
            committed = int(line)
            if committed >= 300:
                break
        os.kill(process.pid, signal.SIGKILL)
        for line in process.stdout:  # what it printed before it died
            committed = int(line)
    assert process.returncode == -signal.SIGKILL
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(connection.execute("SELECT key, value FROM vectors").fetchall())
        (stored_bytes,) = connection.execute("SELECT bytes FROM stored").fetchone()
    for number in range((committed + 1) * 8):
        assert rows[number.to_bytes(8, "big")] == bytes([number % 251]) * 1536
    # At most the batch being written when it died is there beyond them, and whole if at all.
    extra = len(rows) - (committed + 1) * 8
    assert extra in (0, 8)
    assert stored_bytes == sum(len(key) + len(value) for key, value in rows.items())


def test_the_size_bound_evicts_the_least_recently_used_first(tmp_path: Path) -> None:
    entry = 8 + 1000  # a key of 8 bytes, a value of 1,000
    vectors = SqliteVectors(tmp_path / "vectors.sqlite3", max_bytes=4 * entry, touch_after_s=0.0)
    keys = [bytes([index]) * 8 for index in range(6)]
    for key in keys[:4]:  # full: 0, 1, 2, 3 (oldest first)
        assert vectors.put_many_blocking([(key, key[:1] * 1000)]).added == 1
        time.sleep(0.002)  # distinct use times (milliseconds), not a wait for anything
    assert vectors.get_many_blocking([keys[0]]) == [keys[0][:1] * 1000]  # 0 used again: 1 is the oldest
    outcome = vectors.put_many_blocking([(keys[4], b"\x04" * 1000)])
    # Past the bound: the oldest go until at most 90% is left (5 entries -> 3).
    assert outcome.evicted == 2
    present = [value is not None for value in vectors.get_many_blocking(keys[:5])]
    assert present == [True, False, False, True, True]
    assert outcome.stored_bytes == 3 * entry
    vectors.close_blocking()


# -- pure policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "stored", "bound", "expected"),
    [
        ([100, 100, 100], 300, 300, 0),  # at the bound: nothing goes
        ([100, 100, 100], 301, 300, 1),  # past it: down to 90% (270): one
        ([10, 10, 100, 100], 380, 300, 3),  # the oldest first, small or not, until 270 is reached
        ([100, 100], 1000, 300, 2),  # all there is, if that is what it takes
        ([], 500, 300, 0),
    ],
)
def test_evictions(sizes: list[int], stored: int, bound: int, expected: int) -> None:
    assert evictions(sizes, stored, bound) == expected


def test_cache_keys_differ_in_every_part() -> None:
    ids = np.array([101, 7592, 102], "<i4").tobytes()
    base = ("sha256:aa", "llama 1", POOLED, None, ids)
    variants = [
        ("sha256:ab", "llama 1", POOLED, None, ids),  # other weights
        ("sha256:aa", "llama 2", POOLED, None, ids),  # another llama.cpp
        ("sha256:aa", "llama 1", "tokens", None, ids),  # another output kind
        ("sha256:aa", "llama 1", POOLED, "query", ids),  # a task adapter
        ("sha256:aa", "llama 1", POOLED, "", ids),  # a task named "" is not no task
        ("sha256:aa", "llama 1", POOLED, None, np.array([101, 7592, 103], "<i4").tobytes()),
        ("sha256:aa", "llama 1", POOLED, None, ids[:-4]),  # a prefix of the ids
        ("sha256:a", "allama 1", POOLED, None, ids),  # the same characters, split elsewhere
    ]
    keys = {cache_key(*parts) for parts in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert cache_key(*base) == cache_key(*base)
    assert len(cache_key(*base)) == 32
