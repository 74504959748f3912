"""Memory decisions with real runners: max_memory, and a real cgroup v1 limit on this machine."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon.convert import convert_hf_directory
from daemon.gguf_info import read_gguf_facts
from daemon.memory import ModelShape, estimate_runner, held_after_bytes, peak_bytes
from daemon.options import LoadOptions, llama_params, splits_across_ubatches
from daemon.scheduler import LoadedModel
from daemon.store import ModelStore
from tests.conftest import MINILM_DIR, MakeClient, scheduler_of
from tests.live import post_json, read_metrics, running_daemon, wait_for
from tests.tiny_models import make_tiny_bert_dir, make_tiny_causal_gguf

Client = TestClient[Any, Any]
MIB = 1 << 20
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def load_estimate(entry: LoadedModel) -> int:
    """What loading this runner again sets aside (its estimate for a first decode budget): more
    than it measures once loaded, for the tiny model."""
    params = entry.params
    return max(entry.counted_bytes, peak_bytes(entry.shape, params.n_batch, entry.allowance_tokens, params.n_ubatch))


async def loaded_names(client: Client) -> list[str]:
    return [model["name"] for model in (await (await client.get("/api/ps")).json())["models"]]


async def test_max_memory_that_holds_one_model_evicts_the_idle_one(make_client: MakeClient, tiny_gguf: Path) -> None:
    probe = await make_client({"tiny": tiny_gguf})
    assert (await probe.post("/api/embed", json={"model": "tiny"})).status == 200
    one_runner = load_estimate(scheduler_of(probe).loaded()[0])
    client = await make_client({"first": tiny_gguf, "second": tiny_gguf}, max_memory_bytes=one_runner + MIB)
    for name in ["first", "second"] * 3:
        response = await client.post("/api/embed", json={"model": name, "input": "why is the sky blue?"})
        assert response.status == 200
        assert await loaded_names(client) == [f"{name}:latest"]  # never the two together
    samples = (await (await client.get("/metrics")).text()).splitlines()
    evicted = [line for line in samples if line.startswith("emberd_model_unloads_total") and "evicted" in line]
    assert sum(float(line.split()[-1]) for line in evicted) == 5


async def test_a_model_bigger_than_max_memory_is_refused_with_the_numbers_and_evicts_nothing(
    make_client: MakeClient, tiny_gguf: Path, models_dir: Path, big_ggufs: list[bytes]
) -> None:
    big = models_dir / "big-for-cap.gguf"
    big.write_bytes(big_ggufs[0])
    client = await make_client({"tiny": tiny_gguf, "big": big})
    assert (await client.post("/api/embed", json={"model": "tiny"})).status == 200
    tiny_bytes = load_estimate(scheduler_of(client).loaded()[0])
    big_facts = read_gguf_facts(big)
    big_bytes = estimate_runner(ModelShape.of(big_facts, big.stat().st_size), 512, 512).worst_bytes
    assert big_bytes > tiny_bytes + 2 * MIB
    client = await make_client({"tiny": tiny_gguf, "big": big}, max_memory_bytes=tiny_bytes + MIB)
    assert (await client.post("/api/embed", json={"model": "tiny"})).status == 200
    response = await client.post("/api/embed", json={"model": "big", "input": "x"})
    assert response.status == 507
    message = (await response.json())["error"]
    assert message.startswith("big:latest needs about")
    assert "max_memory is" in message and "loaded: tiny:latest" in message and "(idle)" in message
    assert await loaded_names(client) == ["tiny:latest"]  # nothing evicted for nothing


@pytest.fixture(scope="module")
def minilm_q8_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q8") / "all-minilm-q8_0.gguf"
    convert_hf_directory(MINILM_DIR, path, "q8_0", "all-minilm")
    return path


@contextmanager
def child_memory_cgroup(prefix: str) -> Iterator[Path]:
    """A child memory cgroup of this machine's cgroup v1 hierarchy (tests run as root); what is left
    in it is killed and reaped, then it is removed."""
    assert V1_MEMORY.is_dir() and os.geteuid() == 0, "these tests need cgroup v1 and root, as CI has"
    directory = V1_MEMORY / f"{prefix}{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    try:
        yield directory
    finally:
        for pid in (directory / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        wait_for(lambda: not (directory / "cgroup.procs").read_text().split())  # reaped
        os.rmdir(directory)


@pytest.fixture
def v1_cgroup() -> Iterator[Path]:
    with child_memory_cgroup("emberd-test-") as directory:
        yield directory


def in_cgroup(directory: Path) -> list[str]:
    """A prefix that moves the shell into the cgroup, then execs the daemon: all of it is charged there."""
    return ["sh", "-c", f'echo $$ > {directory}/cgroup.procs && exec "$0" "$@"']


def oom_kills(directory: Path) -> int:
    fields = dict(line.split() for line in (directory / "memory.oom_control").read_text().splitlines())
    return int(fields.get("oom_kill", 0))


def test_in_a_cgroup_that_holds_one_model_two_models_take_turns_without_an_oom_kill(
    tmp_path: Path, v1_cgroup: Path, minilm_gguf: Path, minilm_q8_gguf: Path
) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    models = [store.create("f16", minilm_gguf), store.create("q8", minilm_q8_gguf)]
    needs = [held_after_bytes(ModelShape.of(stored.facts, stored.size_bytes), 512, 256) for stored in models]
    for stored in models:
        drop_from_page_cache(stored.blob_path)  # so the runners' cgroup is charged for the weights
    with running_daemon(home, {}, {}, prefix=in_cgroup(v1_cgroup)) as daemon:
        # A limit that holds the daemon and either runner, but not both (about 210 MiB).
        limit = cgroup_working_set(v1_cgroup) + max(needs) + min(needs) // 2
        (v1_cgroup / "memory.limit_in_bytes").write_text(str(limit))
        for name in ["f16", "q8"] * 3:
            status, body = post_json(daemon.url + "/api/embed", {"model": name, "input": "why is the sky blue?"})
            assert (status, len(body["embeddings"][0])) == (200, 384)
            with urllib.request.urlopen(daemon.url + "/api/ps") as response:
                models = json.loads(response.read())["models"]
            assert [m["name"] for m in models] == [f"{name}:latest"]
        evicted = sum(
            value
            for (sample, labels), value in read_metrics(daemon.url).items()
            if sample == "emberd_model_unloads_total" and ("reason", "evicted") in labels
        )
        assert evicted == 5
        assert "killed" not in daemon.log_text()
    print(f"limit {limit / MIB:.0f} MiB")
    assert oom_kills(v1_cgroup) == 0


def test_in_a_cgroup_too_small_for_the_model_the_answer_is_507_with_the_numbers(
    tmp_path: Path, v1_cgroup: Path, minilm_gguf: Path
) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("f16", minilm_gguf)
    (v1_cgroup / "memory.limit_in_bytes").write_text(str(100 * MIB))
    with running_daemon(home, {}, {}, prefix=in_cgroup(v1_cgroup)) as daemon:
        request = urllib.request.Request(
            daemon.url + "/api/embed", data=b'{"model": "f16", "input": "hello"}', method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 507
        message = refused.value.read().decode()
        print(message)
        assert "the service's cgroup limit is 0.10 GiB" in message and "loaded: nothing" in message
        assert daemon.runner_pids() == []
    assert oom_kills(v1_cgroup) == 0


def held_by_cgroup(directory: Path) -> int:
    """rss + mapped_file: anonymous memory plus the file pages kept mapped (the weights)."""
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return int(stat["rss"]) + int(stat["mapped_file"])


def drop_from_page_cache(path: Path) -> None:
    """So the runner, not this test, is charged for reading the weights."""
    with path.open("rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.fixture(scope="module")
def long_context_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """BERTs of 8k and 32k context, made like the tiny model (narrow, so a full-length input takes
    seconds: the compute buffer's attention mask still grows with the square of the context)."""
    directory = tmp_path_factory.mktemp("long")
    paths = {}
    for name, context, hidden, layers in (("bert-8k", 8192, 256, 2), ("bert-32k", 32768, 64, 1)):
        source = make_tiny_bert_dir(directory / name, hidden=hidden, layers=layers, heads=2, context=context)
        paths[name] = directory / f"{name}.gguf"
        convert_hf_directory(source, paths[name], "f32", name)
    # A causal last-token embedder, decoded in 512-token ubatches: deep and narrow, so its KV cache
    # (held from load on) is a good part of what it holds.
    paths["causal"] = make_tiny_causal_gguf(directory / "causal.gguf", 2048, hidden=64, layers=32, heads=4, kv_heads=4)
    return paths


@pytest.mark.parametrize("model", ["tiny", "f16", "q8", "bert-8k", "bert-32k", "causal"])
def test_the_estimates_are_within_25_percent_of_what_a_runner_adds_at_its_longest_input(
    tmp_path: Path,
    v1_cgroup: Path,
    model: str,
    tiny_gguf: Path,
    minilm_gguf: Path,
    minilm_q8_gguf: Path,
    long_context_ggufs: dict[str, Path],
) -> None:
    source = {"tiny": tiny_gguf, "f16": minilm_gguf, "q8": minilm_q8_gguf, **long_context_ggufs}[model]
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    stored = store.create(model, source)
    drop_from_page_cache(stored.blob_path)
    with running_daemon(home, {}, {}, prefix=in_cgroup(v1_cgroup)) as daemon:
        daemon_alone = held_by_cgroup(v1_cgroup)
        (v1_cgroup / "memory.max_usage_in_bytes").write_text("0")  # the peak from here on
        usage_alone = cgroup_usage(v1_cgroup)
        facts = stored.facts
        limit = facts.context_length
        # The longest decode the runner can be given: inputs at the context limit, filling the
        # 512-token budget (one input for all-MiniLM, eight for the tiny model's 64 tokens).
        inputs = [" ".join(["word"] * (limit - 2))] * max(1, 512 // limit)
        status, body = post_json(daemon.url + "/api/embed", {"model": model, "input": inputs})
        assert status == 200 and body["prompt_eval_count"] == limit * len(inputs)
        added = held_by_cgroup(v1_cgroup) - daemon_alone
        peak_added = int((v1_cgroup / "memory.max_usage_in_bytes").read_text()) - usage_alone
        splits = splits_across_ubatches(facts.causal_attention, facts.pooling_type)
        params = llama_params(LoadOptions(0, 512, 0, 0, 0, True), facts.context_length, facts.block_count, splits)
        shape = ModelShape.of(facts, stored.size_bytes)
        estimate = estimate_runner(shape, params.n_batch, params.n_ubatch).worst_bytes
        # An encoder's runner gives back the logits of llama.cpp's output buffer after the decode
        # that zeroed them (all-MiniLM: 4 x 30,522 bytes a token); a causal model's writes them.
        gives_back = not facts.causal_attention
        largest = params.n_batch if facts.causal_attention else params.n_ubatch
        held = held_after_bytes(
            dataclasses.replace(shape, gives_back_logits=gives_back), params.n_batch, largest, params.n_ubatch
        )
        shown = ps_size(daemon.url, model)
    print(
        f"{model}: peak estimated {estimate / 1e6:.0f} MB, measured {peak_added / 1e6:.0f} MB"
        f" ({estimate / peak_added:.2f}x); held after estimated {held / 1e6:.0f} MB, measured {added / 1e6:.0f} MB"
        f" ({held / added:.2f}x), /api/ps {shown / 1e6:.0f} MB ({shown / added:.2f}x)"
    )
    assert 0.75 <= estimate / peak_added <= 1.25
    assert 0.75 <= held / added <= 1.25
    # What the scheduler counts (and /api/ps shows) is what the runner added to the service's memory,
    # and the quick lane's buffers, which llama.cpp touches at its first decode (none here: all-MiniLM's
    # 8.6 MB are 10% of its 86).
    assert 0.9 <= shown / added <= 1.2


def ps_size(url: str, model: str) -> int:
    with urllib.request.urlopen(url + "/api/ps") as response:
        models = json.loads(response.read())["models"]
    return next(entry["size"] for entry in models if entry["name"] == f"{model}:latest")


def cgroup_usage(directory: Path) -> int:
    return int((directory / "memory.usage_in_bytes").read_text())


def cgroup_working_set(directory: Path) -> int:
    """The charge less reclaimable page cache (not mapped), as emberd's probe counts it."""
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return cgroup_usage(directory) - max(0, int(stat["total_cache"]) - int(stat["total_mapped_file"]))


def test_a_long_context_model_counts_what_its_traffic_needs_and_gives_back_what_a_long_input_took(
    tmp_path: Path, v1_cgroup: Path, tiny_gguf: Path, long_context_ggufs: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    stored = store.create("bert-8k", long_context_ggufs["bert-8k"])
    tiny = store.create("tiny", tiny_gguf)
    drop_from_page_cache(stored.blob_path)
    shape = ModelShape.of(stored.facts, stored.size_bytes)
    worst = estimate_runner(shape, 8192, 8192).worst_bytes
    with running_daemon(home, {}, {}, prefix=in_cgroup(v1_cgroup)) as daemon:
        daemon_alone = held_by_cgroup(v1_cgroup)
        for _ in range(3):
            assert post_json(daemon.url + "/api/embed", {"model": "bert-8k", "input": "why is the sky blue?"})[0] == 200
        short_added, short_shown = held_by_cgroup(v1_cgroup) - daemon_alone, ps_size(daemon.url, "bert-8k")
        # Loaded for short queries, it counts what they need: what it holds, and the growth to one
        # full 512-token decode (the token budget) that memory is set aside for. Not its worst case.
        assert 1.0 <= short_shown / short_added <= 1.2
        assert short_shown < worst / 2

        status, body = post_json(daemon.url + "/api/embed", {"model": "bert-8k", "input": "word " * 8000})
        assert (status, body["prompt_eval_count"]) == (200, 8002)
        long_added, long_shown = held_by_cgroup(v1_cgroup) - daemon_alone, ps_size(daemon.url, "bert-8k")
        assert 0.9 <= long_shown / long_added <= 1.1
        assert long_added > short_added + 100 * MIB  # llama.cpp touched its buffers for 8,002 tokens

        # Memory is wanted: a limit that leaves the tiny model no room beside the grown runner.
        tiny_needs = held_after_bytes(ModelShape.of(tiny.facts, tiny.size_bytes), 512, 512)
        (v1_cgroup / "memory.limit_in_bytes").write_text(str(cgroup_usage(v1_cgroup) + tiny_needs // 2))
        assert post_json(daemon.url + "/api/embed", {"model": "tiny", "input": "hello"})[0] == 200
        with urllib.request.urlopen(daemon.url + "/api/ps") as response:
            assert sorted(m["name"] for m in json.loads(response.read())["models"]) == ["bert-8k:latest", "tiny:latest"]
        renewed_shown = ps_size(daemon.url, "bert-8k")
        renewed_added = held_by_cgroup(v1_cgroup) - daemon_alone - ps_size(daemon.url, "tiny")
        metrics = read_metrics(daemon.url)
        assert metrics[("emberd_context_renewals_total", (("model", "bert-8k:latest"),))] == 1
        assert not any(sample == "emberd_model_unloads_total" for sample, _labels in metrics)
    print(
        f"bert-8k: worst {worst / 1e6:.0f} MB; short queries {short_added / 1e6:.0f} MB held,"
        f" {short_shown / 1e6:.0f} shown; after 8,002 tokens {long_added / 1e6:.0f} held, {long_shown / 1e6:.0f}"
        f" shown; renewed {renewed_added / 1e6:.0f} held, {renewed_shown / 1e6:.0f} shown"
    )
    # The memory the long input took came back, as measured by the cgroup and as counted.
    assert renewed_added < short_added * 1.2 and renewed_shown < short_shown * 1.1
    assert oom_kills(v1_cgroup) == 0


async def test_a_long_input_sets_its_memory_aside_first_evicting_an_idle_model_or_refused_with_507(
    make_client: MakeClient, tiny_gguf: Path, long_context_ggufs: dict[str, Path]
) -> None:
    models = {"tiny": tiny_gguf, "bert-8k": long_context_ggufs["bert-8k"]}
    long_input = {"model": "bert-8k", "input": "word " * 8000}
    probe = await make_client(models)
    for name in models:
        assert (await probe.post("/api/embed", json={"model": name, "input": "hello"})).status == 200
    tiny, bert = sorted(scheduler_of(probe).measured(), key=lambda entry: entry.name != "tiny:latest")
    tiny_bytes = tiny.counted_bytes
    # What the long input sets aside before it is sent: the growth of a decode up to the context
    # (its bound before tokenizing), by the estimate; the measured size replaces it afterwards.
    growth = held_after_bytes(bert.shape, bert.params.n_batch, 8192) - held_after_bytes(
        bert.shape, bert.params.n_batch, bert.allowance_tokens
    )
    long_bytes = bert.counted_bytes + growth

    # Room for the grown runner, but not beside the tiny model: the long input evicts it first.
    client = await make_client(models, max_memory_bytes=long_bytes + tiny_bytes // 2)
    for name in models:
        assert (await client.post("/api/embed", json={"model": name, "input": "hello"})).status == 200
    assert sorted(await loaded_names(client)) == ["bert-8k:latest", "tiny:latest"]
    assert (await client.post("/api/embed", json=long_input)).status == 200
    assert await loaded_names(client) == ["bert-8k:latest"]

    # Room for short inputs only: a clear 507 with the numbers, and the model stays loaded.
    client = await make_client(models, max_memory_bytes=long_bytes - 40 * MIB)
    assert (await client.post("/api/embed", json={"model": "bert-8k", "input": "hello"})).status == 200
    response = await client.post("/api/embed", json=long_input)
    assert response.status == 507
    message = (await response.json())["error"]
    assert message.startswith("bert-8k:latest needs about") and "max_memory is" in message
    assert await loaded_names(client) == ["bert-8k:latest"]
    assert (await client.post("/api/embed", json={"model": "bert-8k", "input": "hello"})).status == 200
