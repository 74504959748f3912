"""Every architecture's memory estimate against llama.cpp: each part (weights, KV cache, output and
compute buffers) against the sizes llama.cpp logs as a real runner loads the model, and the total
against that runner's peak in a cgroup v1 child of its own after a decode that fills its context.

One runner per family (tests/family_ggufs.py), of one long-context shape: hidden 256, 4 layers,
n_ff 4 x hidden, a 2,048-token context and a vocabulary widened to about 30,000 tokens with filler
tokens, as a real model's is. The tiny default shape (hidden 32, a few hundred tokens) is not used:
its output and KV buffers are a few tens of KiB, under the 0.01 MiB llama.cpp logs them to, and its
fixed costs (the interpreter, the header) are all of its total. Four layers, not two: with two,
llama.cpp's allocator hands the attention mask the first layer no longer reads (gemma-embedding's
and modern-bert's local or global one) to the last layer, which no real model of 12 or more layers
does.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import orjson
import pytest

from daemon.config import Settings
from daemon.gguf_info import GGUFFacts, read_gguf_facts
from daemon.memory import (
    ModelShape,
    compute_buffer_bytes,
    kv_cache_bytes,
    output_buffer_bytes,
    peak_bytes,
)
from daemon.options import LlamaParams, llama_params, resolve_load_options, splits_across_ubatches
from daemon.runner.client import runner_environment
from daemon.runner.protocol import encode_frame, read_frame_blocking
from tests.family_ggufs import FAMILIES, make_family_gguf
from tests.test_memory import child_memory_cgroup

REPOSITORY = Path(__file__).resolve().parent.parent
CONTEXT = 2048
SHAPE: dict[str, Any] = {"hidden": 256, "heads": 4, "layers": 4, "ff": 1024, "filler_tokens": 30_000}
PARTS = ("model", "kv", "output", "compute")


@dataclass(frozen=True)
class Measured:
    family: str  # a key of FAMILIES
    facts: GGUFFacts
    shape: ModelShape
    params: LlamaParams
    logged: dict[str, int]  # llama.cpp's buffer sizes, as the runner's ready frame reports them
    max_sequences: int
    token_count: int  # of the decode that filled the context
    peak_bytes: int  # the runner's cgroup's memory.max_usage_in_bytes after it


def run_in_own_cgroup(path: Path, params: LlamaParams, cgroup: Path, stderr: Path) -> tuple[dict[str, Any], int]:
    """A runner (daemon.runner.worker, as the daemon starts it) that enters `cgroup` before it
    execs, so the cgroup holds it alone from its first page; one embed of a text longer than the
    context, cut to it. Its ready frame's facts and the result's token count."""
    config = {"model_path": str(path), "params": dataclasses.asdict(params), "parent_pid": os.getpid()}
    enter = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"'
    command = ["sh", "-c", enter, sys.executable, "-m", "daemon.runner.worker", orjson.dumps(config).decode()]
    with (
        stderr.open("wb") as errors,
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            cwd=REPOSITORY,
            env=runner_environment(os.environ),
        ) as process,
    ):
        assert process.stdin is not None
        frames = cast(BinaryIO, process.stdout)
        ready = read_frame_blocking(frames)
        assert ready is not None and ready[0]["type"] == "ready", (ready, stderr.read_text())
        text = "the " * (2 * CONTEXT)
        embed = {"type": "embed", "id": 1, "texts": [text], "truncate": True, "limit_tokens": None, "split": False}
        process.stdin.write(encode_frame(embed))
        process.stdin.flush()
        result = read_frame_blocking(frames)
        assert result is not None and result[0]["type"] == "result", (result, stderr.read_text())
        process.stdin.close()  # the runner's end of input: it exits
        process.wait(timeout=60)
    return ready[0]["facts"], int(result[0]["token_count"])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def measured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Measured]:
    family: str = request.param
    directory = tmp_path_factory.mktemp(f"memory-{family}")
    path = make_family_gguf(family, directory / f"{family}.gguf", context=CONTEXT, **SHAPE)
    with path.open("rb") as handle:  # written just now: make the runner read it from the disk, charged to it
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    facts = read_gguf_facts(path)
    # The load parameters the scheduler gives a runner of this model with the default settings.
    splits = splits_across_ubatches(facts.causal_attention, facts.pooling_type)
    load = resolve_load_options(Settings(), {})
    params = llama_params(load, facts.context_length, facts.block_count, splits, facts.vocab_size)
    with child_memory_cgroup("emberd-family-") as cgroup:
        runner_facts, token_count = run_in_own_cgroup(path, params, cgroup, directory / "stderr")
        peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    yield Measured(
        family,
        facts,
        ModelShape.of(facts, path.stat().st_size),
        params,
        runner_facts["llama_buffer_bytes"],
        runner_facts["max_sequences"],
        token_count,
        peak,
    )
    path.unlink()


def estimated_parts(item: Measured) -> dict[str, int]:
    """The estimate of each buffer as llama.cpp makes it at load: the output buffer for n_seq_max
    rows, the compute buffer reserved for a full ubatch attending to the whole context."""
    shape, params = item.shape, item.params
    return {
        "model": shape.file_bytes,
        "kv": kv_cache_bytes(shape, params.n_ctx),
        "output": output_buffer_bytes(shape, item.max_sequences),
        "compute": compute_buffer_bytes(shape, params.n_ubatch, item.max_sequences, n_kv=params.n_ctx),
    }


def test_each_part_of_the_estimate_is_within_10_percent_of_what_llama_cpp_logs(measured: Measured) -> None:
    estimated = estimated_parts(measured)
    logged = {part: measured.logged.get(part, 0) for part in PARTS}
    print(
        f"{measured.family}: "
        + ", ".join(f"{part} {estimated[part] / 2**20:.2f}/{logged[part] / 2**20:.2f} MiB" for part in PARTS)
    )
    # Every part is MiBs here: the weights tens, the output buffer 64 rows of 30,000 logits.
    assert min(logged["model"], logged["output"], logged["compute"]) > 2**20
    for part in PARTS:
        if logged[part] == 0:  # an encoder llama.cpp gives no KV cache
            assert estimated[part] == 0, part
        else:
            assert 0.9 <= estimated[part] / logged[part] <= 1.1, (part, estimated[part], logged[part])
    # llama-embed and t5encoder are encoders, yet llama.cpp makes a KV cache for them.
    has_kv = measured.facts.causal_attention or measured.facts.architecture in ("llama-embed", "t5encoder")
    assert (logged["kv"] > 2**20) is has_kv


def test_the_estimated_total_is_within_15_percent_of_the_runners_peak_in_its_own_cgroup(measured: Measured) -> None:
    params = measured.params
    assert measured.token_count == params.limit_tokens == CONTEXT  # the decode filled the context
    # What the scheduler sets aside for a runner whose largest decode is a full context (a causal
    # model's in ubatches of the budget), its quick lane counted.
    largest = params.n_batch
    estimate = peak_bytes(measured.shape, params.n_batch, largest, params.n_ubatch, params.quick_lane_tokens)
    print(
        f"{measured.family}: total estimated {estimate / 2**20:.0f} MiB, cgroup peak"
        f" {measured.peak_bytes / 2**20:.0f} MiB ({estimate / measured.peak_bytes:.2f}x)"
    )
    assert 0.85 <= estimate / measured.peak_bytes <= 1.15


def _encoder(architecture: str, n_embd: int, n_ff: int, **family: Any) -> ModelShape:
    return ModelShape(0, n_embd, n_ff, 400, architecture=architecture, **family)


MEAN = {"mean_pooling": True}


@pytest.mark.parametrize(
    ("shape", "logged_compute_mib"),
    [
        # llama.cpp's logged compute buffers (llama-cpp-python 0.3.36, 2026-12-03) of
        # tests/family_ggufs.py models, a 1,024-token context and ubatch, 64 sequences: at n_ff
        # 4 x hidden 128 the feed-forward stage is the widest, at 1.5 x hidden 512 the attention.
        (_encoder("bert", 128, 512, **MEAN), 5.76),
        (_encoder("bert", 512, 768, **MEAN), 13.26),  # 6 x n_embd counted, 5.5 held: 7.5% over
        (_encoder("bert", 512, 768), 13.01),  # CLS pooling (XLM-R): no pooling matrix
        (_encoder("nomic-bert", 128, 512, **MEAN), 9.76),
        (_encoder("nomic-bert", 512, 768, **MEAN), 17.26),
        (_encoder("jina-bert-v2", 128, 512, **MEAN), 9.76),
        (_encoder("jina-bert-v3", 128, 512, **MEAN), 6.01),
        (_encoder("jina-bert-v3", 512, 768, **MEAN), 17.26),
        (_encoder("neo-bert", 512, 768), 17.01),
        (_encoder("eurobert", 512, 768, **MEAN), 17.26),
        (_encoder("llama-embed", 128, 512, **MEAN, n_layer=2, kv_width=256, kv_unread=True), 9.76),
        # Four layers: both masks live through the graph, as in a real model.
        (_encoder("modern-bert", 256, 1024, attention_masks=2), 19.01),
        (_encoder("gemma-embedding", 128, 512, **MEAN, attention_masks=2), 11.76),
        (_encoder("nomic-bert-moe", 256, 1024, **MEAN, n_expert_used=2), 15.26),
        (_encoder("nomic-bert-moe", 512, 768, **MEAN, n_expert_used=2), 18.26),
        # T5: 3 x 4 heads x 1,024 floats a token beside the int32 buckets, whatever n_ff.
        (_encoder("t5encoder", 128, 512, **MEAN, n_head=4, n_layer=2, kv_width=256, kv_unread=True), 56.76),
        (_encoder("t5encoder", 512, 768, **MEAN, n_head=4, n_layer=2, kv_width=1024, kv_unread=True), 64.26),
    ],
)
def test_each_familys_compute_buffer_matches_what_llama_cpp_logged(
    shape: ModelShape, logged_compute_mib: float
) -> None:
    compute = compute_buffer_bytes(shape, 1024, 64, n_kv=1024)
    assert 0.98 <= compute / (logged_compute_mib * 2**20) <= 1.08


def test_the_shape_of_each_family_reads_what_sizes_its_graph(tmp_path: Path) -> None:
    shapes = {
        family: ModelShape.of(read_gguf_facts(path), 1000)
        for family in ("bert", "gemma-embedding", "modern-bert", "nomic-bert-moe", "t5encoder", "llama-embed", "qwen3")
        for path in [make_family_gguf(family, tmp_path / f"{family}.gguf", layers=4)]
    }
    assert [shapes[family].attention_masks for family in ("bert", "gemma-embedding", "modern-bert")] == [1, 2, 2]
    assert (shapes["nomic-bert-moe"].n_expert_used, shapes["bert"].n_expert_used) == (2, 0)
    # Encoders with a KV cache llama.cpp makes and never reads: 4 layers of 2 heads x (16 + 16).
    for family in ("t5encoder", "llama-embed"):
        assert (shapes[family].n_layer, shapes[family].kv_width, shapes[family].splits) == (4, 64, False)
    assert (shapes["qwen3"].splits, shapes["bert"].kv_width, shapes["t5encoder"].n_head) == (True, 0, 2)
    assert (shapes["bert"].mean_pooling, shapes["modern-bert"].mean_pooling) == (True, False)
