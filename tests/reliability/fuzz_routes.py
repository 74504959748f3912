"""Fuzz every route of a live daemon with generated requests; print a report.

    .venv/bin/python -m tests.reliability.fuzz_routes [--requests 10000] [--seed 1]

The daemon runs `emberd serve` on the tiny test model, with the Hub offline (a pull fails at once).
Requests are generated from a seeded random source: wrong types, huge and deeply nested JSON,
invalid UTF-8, giant strings, bodies that are not JSON, odd headers and methods. A 5xx other than
the documented 503 is a failure. At the end the daemon must still answer correctly (the same vector
as before), with its RSS and open files no higher than a margin over the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from daemon.convert import convert_hf_directory
from daemon.store import ModelStore
from tests.live import running_daemon
from tests.tiny_models import make_tiny_bert_dir

POST_ROUTES = [
    "/api/embed", "/api/embeddings", "/v1/embeddings", "/api/rerank", "/v1/rerank", "/v2/rerank",
    "/api/tokenize", "/api/detokenize", "/api/show", "/api/pull", "/api/create", "/api/generate",
]  # fmt: skip
GET_ROUTES = ["/api/tags", "/api/ps", "/api/version", "/healthz", "/readyz", "/metrics", "/v1/models", "/"]
ODD_METHODS = ["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "FOO"]
FIELDS = [
    "model", "input", "prompt", "query", "documents", "content", "tokens", "options", "keep_alive", "truncate",
    "dimensions", "encoding_format", "top_n", "return_documents", "prompt_name", "input_type", "from",
    "quantize", "stream", "split_long_inputs", "add_special", "name",
]  # fmt: skip
# 503 is documented (busy, shutting down, the Hub offline); anything else 5xx is a failure.
DOCUMENTED_5XX = {503}


def scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None, True, False, 0, -1, 1, 2**63, -(2**63), 1e308, -1e-308, 3.5, float(rng.randint(-9, 9)),
            "", "tiny", "tiny:latest", "x" * rng.randint(0, 64), "\u0000", "\ud7ff\ue000", "🙂" * 8,
            "../../etc/passwd", "hf.co/a/b:Q8_0", "5m", "-1", "1e9", "NaN", "[CLS]", " ",
        ]
    )  # fmt: skip


def value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return scalar(rng)
    if roll < 0.75:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {rng.choice(FIELDS): value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def body(rng: random.Random) -> tuple[bytes, dict[str, str]]:
    """A request body and headers: usually a JSON object of plausible fields with wrong values."""
    headers = {"Content-Type": rng.choice(["application/json", "text/plain", "", "application/x-www-form-urlencoded"])}
    if rng.random() < 0.1:
        headers["Host"] = rng.choice(["evil.example", "", "localhost:1", "[::1]"])
    if rng.random() < 0.05:
        headers["Origin"] = "http://evil.example"
    kind = rng.random()
    if kind < 0.6:
        document = {field: value(rng) for field in rng.sample(FIELDS, rng.randint(0, 6))}
        if rng.random() < 0.5:
            document["model"] = rng.choice(["tiny", "tiny:latest", "reranker", "nope", 5, None])
        return json.dumps(document).encode(), headers
    if kind < 0.68:  # deeply nested
        depth = rng.choice([100, 1000, 5000])
        return (b'{"model": "tiny", "input": ' + b"[" * depth + b"]" * depth + b"}"), headers
    if kind < 0.76:  # giant strings or many inputs
        size = rng.choice([10_000, 200_000, 1_000_000])
        if rng.random() < 0.5:
            return json.dumps({"model": "tiny", "input": "word " * (size // 5)}).encode(), headers
        return json.dumps({"model": "tiny", "input": ["a"] * rng.choice([2048, 2049, 5000])}).encode(), headers
    if kind < 0.86:  # invalid UTF-8 and binary
        return b'{"model": "tiny", "input": "' + bytes(rng.randrange(256) for _ in range(64)) + b'"}', headers
    return rng.choice([b"", b"{", b"null", b"[]", b"42", b'"x"', b"{}" * 3, b"\xff\xfe", b'{"model":']), headers


async def one(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, int]:
    roll = rng.random()
    if roll < 0.8:
        method, path = "POST", rng.choice(POST_ROUTES)
    elif roll < 0.9:
        method, path = "GET", rng.choice(GET_ROUTES + POST_ROUTES)
    else:
        method, path = rng.choice(ODD_METHODS), rng.choice(POST_ROUTES + GET_ROUTES)
    if rng.random() < 0.03:
        path += rng.choice(["/", "?x=1", "%00", "/../../etc", "//"])
    data, headers = body(rng)
    headers = {key: value for key, value in headers.items() if value}
    try:
        async with session.request(
            method, url + path, data=data, headers=headers, skip_auto_headers=["Content-Type"]
        ) as response:
            await response.read()
            return f"{method} {path}", response.status
    except aiohttp.ClientError as error:
        return f"{method} {path} ({type(error).__name__})", -1


def home_with_tiny_model(prefix: str) -> Path:
    """A fresh EMBERD_HOME whose store holds the tiny test model as "tiny"."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    path = workdir / "tiny.gguf"
    convert_hf_directory(make_tiny_bert_dir(workdir / "tiny"), path, "f32", "tiny")
    store = ModelStore(workdir / "home")
    store.open()
    store.create("tiny", path)
    return workdir / "home"


def process_tree_usage(pid: int) -> tuple[float, int, int]:
    """(RSS MiB of the daemon and its runners, the daemon's open files, its threads)."""
    daemon = psutil.Process(pid)
    rss = sum(p.memory_info().rss for p in [daemon, *daemon.children(recursive=True)]) / 2**20
    return rss, daemon.num_fds(), daemon.num_threads()


async def embed_vector(session: aiohttp.ClientSession, url: str) -> list[float]:
    async with session.post(url + "/api/embed", json={"model": "tiny", "input": "why is the sky blue?"}) as response:
        assert response.status == 200, await response.text()
        return list((await response.json())["embeddings"][0])


async def fuzz(url: str, pid: int, requests: int, seed: int, concurrency: int) -> int:
    rng = random.Random(seed)
    outcomes: Counter[int] = Counter()
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        before_vector = await embed_vector(session, url)
        before = process_tree_usage(pid)
        started_s = time.monotonic()
        queue = [random.Random(rng.random()) for _ in range(requests)]

        async def worker() -> None:
            while queue:
                label, status = await one(session, url, queue.pop())
                outcomes[status] += 1
                if status == -1 or (status >= 500 and status not in DOCUMENTED_5XX):
                    failures.append(f"{label} -> {status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed_s = time.monotonic() - started_s
        after_vector = await embed_vector(session, url)
        after = process_tree_usage(pid)
    alive = psutil.pid_exists(pid)
    print(f"\nfuzzed {requests} requests in {elapsed_s:.0f} s (seed {seed}, {concurrency} at a time)")
    print("statuses: " + ", ".join(f"{status}: {count}" for status, count in sorted(outcomes.items())))
    print(f"failures (5xx other than 503, or no answer): {len(failures)}")
    for failure in failures[:20]:
        print(f"  {failure}")
    print(f"daemon alive and answering correctly after: {alive and after_vector == before_vector}")
    print(f"RSS MiB (daemon + runners) before {before[0]:.0f}, after {after[0]:.0f}")
    print(f"open files before {before[1]}, after {after[1]}; threads before {before[2]}, after {after[2]}")
    ok = not failures and alive and after_vector == before_vector and after[1] <= before[1] + 8
    print("RESULT: " + ("pass" if ok else "FAIL"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    home = home_with_tiny_model("emberd-fuzz-")
    with running_daemon(home, {}, {"EMBERD_HUB_OFFLINE": "1", "EMBERD_MAX_QUEUE": "64"}) as daemon:
        status = asyncio.run(fuzz(daemon.url, daemon.process.pid, args.requests, args.seed, args.concurrency))
        log = daemon.log_text()
    unexpected = [line for line in log.splitlines() if "unexpected error" in line or "Traceback" in line]
    print(f"tracebacks in the daemon's log: {len(unexpected)}")
    for line in unexpected[:10]:
        print(f"  {line}")
    return status or (1 if unexpected else 0)


if __name__ == "__main__":
    sys.exit(main())
