"""A soak: a live daemon under a steady mixed load for a while; print a report.

    .venv/bin/python -m tests.reliability.soak [--clients 32] [--seconds 600] [--interval 5]

`emberd serve` runs on the tiny test model and a tiny reranker (settings as shipped). Client threads
send, one request at a time each on a new connection, a mix of /api/embed (short queries, passages,
batches), /v1/embeddings (texts, token ids, base64), /api/tokenize and /api/detokenize, and
reranking on the three rerank routes, for the whole duration.

After a warm-up (the first 10% of the time) the daemon's and each runner's RSS, open files and
threads are sampled every few seconds. It passes when every request got a 200 with the expected
shape, no runner was replaced, and, comparing the last fifth of the samples with the first fifth,
RSS grew by less than 5% (medians; the daemon and each runner), and open files (less the clients'
connections open at that instant) and threads did not grow at all. For those two the fewest in each
fifth are compared: a socket a client just closed, still open at the instant of a sample, is no
leak (it made a busy CI machine fail once), while a leak raises the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from daemon.store import ModelStore
from tests.live import post_json, running_daemon
from tests.reliability.fuzz_routes import home_with_tiny_model

PASSAGE = "the sky is blue because the air scatters blue light more than red light, why is grass green? " * 2
DOCUMENTS = ["the sky is blue", "grass is green", "hello world", PASSAGE, "why is grass green?", "blue blue sky"]
RSS_GROWTH_LIMIT = 0.05
WARM_UP_FRACTION = 0.1
WINDOW_FRACTION = 0.2  # the first and last fifth of the samples are compared
Check = Callable[[Any], bool]


def embed_count(expected: int) -> Check:
    return lambda answer: len(answer["embeddings"]) == expected


def openai_count(expected: int) -> Check:
    return lambda answer: len(answer["data"]) == expected


def request_for(rng: random.Random) -> tuple[str, str, dict[str, Any], Check]:
    """(kind, path, body, a check of the answer's shape)."""
    roll = rng.random()
    query = f"why is the sky blue? {rng.randint(0, 9999)}"
    if roll < 0.30:
        return "embed short", "/api/embed", {"model": "tiny", "input": query}, embed_count(1)
    if roll < 0.45:
        count = rng.randint(2, 16)
        return "embed passages", "/api/embed", {"model": "tiny", "input": [PASSAGE] * count}, embed_count(count)
    if roll < 0.50:
        return "embed batch of 64", "/api/embed", {"model": "tiny", "input": [PASSAGE] * 64}, embed_count(64)
    if roll < 0.60:
        return "openai short", "/v1/embeddings", {"model": "tiny", "input": query}, openai_count(1)
    if roll < 0.68:
        body = {"model": "tiny", "input": [PASSAGE, query] * 4, "encoding_format": "base64"}
        return "openai base64 batch", "/v1/embeddings", body, openai_count(8)
    if roll < 0.73:  # LangChain's default: cl100k_base token ids
        body = {"model": "tiny", "input": [[3923, 374, 279, 13180, 6437, 30]] * 3}
        return "openai token ids", "/v1/embeddings", body, openai_count(3)
    if roll < 0.80:
        body = {"model": "tiny", "content": f"{query} {PASSAGE}"}
        return "tokenize", "/api/tokenize", body, lambda answer: len(answer["tokens"]) > 2
    if roll < 0.85:
        body = {"model": "tiny", "tokens": [2, 33, 70, 3]}
        return "detokenize", "/api/detokenize", body, lambda answer: isinstance(answer["content"], str)
    path = rng.choice(["/api/rerank", "/v1/rerank", "/v2/rerank"])
    documents = rng.sample(DOCUMENTS, rng.randint(1, len(DOCUMENTS)))
    body = {"model": "reranker", "query": query, "documents": documents, "top_n": 3}
    return "rerank", path, body, lambda answer: len(answer["results"]) == min(3, len(documents))


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: Counter[str] = field(default_factory=Counter)  # "kind status"
    failures: Counter[str] = field(default_factory=Counter)  # what went wrong, with the error message
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)

    def record(self, kind: str, outcome: str, latency_ms: float, failure: str | None) -> None:
        with self.lock:
            self.answers[f"{kind} {outcome}"] += 1
            self.latencies_ms.setdefault(kind, []).append(latency_ms)
            if failure is not None:
                self.failures[failure] += 1


def client(url: str, stop_at: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        kind, path, body, check = request_for(rng)
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
        started_s = time.monotonic()
        failure: str | None = None
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                outcome = str(response.status)
                if not check(json.loads(response.read())):
                    failure = f"{kind}: an answer of the wrong shape"
        except urllib.error.HTTPError as error:
            outcome = str(error.code)
            failure = f"{kind}: {error.code} {error.read()[:160]!r}"
        except OSError as error:  # no answer at all
            outcome = "lost"
            failure = f"{kind}: no answer ({type(error).__name__}: {error})"
        tally.record(kind, outcome, (time.monotonic() - started_s) * 1e3, failure)


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_mib: float
    fds: int  # open files, less the clients' connections open at that instant
    threads: int
    # What those open files are (paths, "socket", "pipe", "anon_inode:..."): a report that says the
    # count grew names what was opened.
    fd_kinds: Counter[str] = field(default_factory=Counter, compare=False)


def client_socket_inodes(pid: int, port: int) -> set[str]:
    """The inodes of TCP connections to `port` in the process's network namespace, in any state but
    the listener (under a slow CI machine a connection a client has closed stays open, CLOSE_WAIT,
    until its answer is written)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as rows:
                next(rows)  # the header
                for row in rows:
                    fields = row.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if local_port == port and fields[3] != "0A":  # 0A: LISTEN
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def open_files(pid: int, port: int | None) -> Counter[str]:
    """The targets of a process's open descriptors (sockets and pipes by kind, not inode), less the
    clients' connections to `port`. The descriptors are listed first and the connections read after,
    so a connection opened in between is in neither and one closed in between is counted: a sample
    can only count too many, never too few. (psutil's num_fds less its net_connections, taken the
    other way round, once undercounted by two in the first minutes and failed a CI soak, 14 -> 16.)"""
    directory = f"/proc/{pid}/fd"
    targets: list[str] = []
    for name in os.listdir(directory):
        try:
            targets.append(os.readlink(f"{directory}/{name}"))
        except OSError:  # closed between the listing and the read
            continue
    clients = client_socket_inodes(pid, port) if port is not None else set()
    kinds: Counter[str] = Counter()
    for target in targets:
        if target.startswith("socket:[") and target[len("socket:[") : -1] in clients:
            continue
        kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return kinds


def sample(process: psutil.Process, at_s: float, port: int | None = None) -> Sample:
    with process.oneshot():
        rss_mib = process.memory_info().rss / 2**20
        threads = process.num_threads()
    kinds = open_files(process.pid, port)
    return Sample(at_s, rss_mib, kinds.total(), threads, kinds)


def window_medians(samples: list[Sample]) -> tuple[Sample, Sample]:
    """The first and the last fifth of the samples (at least 3 each): the median RSS, and the fewest
    open files and threads (the floor a leak raises)."""
    size = max(3, int(len(samples) * WINDOW_FRACTION))

    def median(window: list[Sample]) -> Sample:
        fewest_files = min(window, key=lambda s: s.fds)
        return Sample(
            window[-1].at_s,
            statistics.median(s.rss_mib for s in window),
            fewest_files.fds,
            min(s.threads for s in window),
            fewest_files.fd_kinds,
        )

    return median(samples[:size]), median(samples[-size:])


def judge(label: str, samples: list[Sample]) -> bool:
    """Print one process's line of the report; whether it held steady."""
    if len(samples) < 6:
        print(f"{label}: too few samples ({len(samples)}) to judge")
        return False
    first, last = window_medians(samples)
    growth = last.rss_mib / first.rss_mib - 1
    ok = growth < RSS_GROWTH_LIMIT and last.fds <= first.fds and last.threads <= first.threads
    peak = max(s.rss_mib for s in samples)
    print(
        f"{label}: RSS MiB {first.rss_mib:.1f} -> {last.rss_mib:.1f} ({growth:+.1%}, peak {peak:.1f}); "
        f"open files {first.fds} -> {last.fds}; threads {first.threads} -> {last.threads}" + ("" if ok else "  <- grew")
    )
    if last.fds > first.fds:
        opened = last.fd_kinds - first.fd_kinds
        closed = first.fd_kinds - last.fd_kinds
        print(f"  open files at the fewest, opened since: {dict(opened)}; closed since: {dict(closed)}")
    tenths = [samples[len(samples) * i // 10 : len(samples) * (i + 1) // 10] for i in range(10)]
    print(
        "  RSS MiB by tenth of the time: " + " ".join(f"{statistics.median(s.rss_mib for s in t):.1f}" for t in tenths)
    )
    return ok


def runner_label(process: psutil.Process, names: dict[str, str]) -> str:
    """ "runner tiny (pid N)": the model named by the runner's config (its command line's argument)."""
    config = json.loads(next(arg for arg in process.cmdline() if arg.startswith("{")))
    kind = "vocabulary runner" if config["params"].get("vocab_only") else "runner"
    return f"{kind} {names.get(config['model_path'], '?')} (pid {process.pid})"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run(clients: int, seconds: float, interval_s: float) -> int:
    home = home_with_tiny_model("emberd-soak-", reranker=True)
    store = ModelStore(home)
    model_names = {str(store.get(name).blob_path): name for name in ("tiny", "reranker")}
    tally = Tally()
    daemon_samples: list[Sample] = []
    runner_samples: dict[int, list[Sample]] = {}
    runner_labels: dict[int, str] = {}
    with running_daemon(home, {}, {}) as daemon:
        url = daemon.url
        port = int(url.rsplit(":", 1)[1])
        process = psutil.Process(daemon.process.pid)
        # Both models loaded first, as a service's are: tokenizing then uses the model's own runner.
        post_json(url + "/api/embed", {"model": "tiny"})
        post_json(url + "/api/rerank", {"model": "reranker", "query": "q", "documents": ["d"]})
        started_s = time.monotonic()
        stop_at = started_s + seconds
        warm_until = started_s + seconds * WARM_UP_FRACTION
        threads = [threading.Thread(target=client, args=(url, stop_at, i, tally)) for i in range(clients)]
        for thread in threads:
            thread.start()
        # Sampling at an interval is the point here (not a wait for a condition).
        time.sleep(max(0.0, warm_until - time.monotonic()))
        runners_at_warm_up = {child.pid for child in process.children()}
        next_at = time.monotonic()
        while next_at < stop_at - interval_s / 2:
            at_s = time.monotonic() - started_s
            daemon_samples.append(sample(process, at_s, port))
            for child in process.children():
                try:
                    runner_samples.setdefault(child.pid, []).append(sample(child, at_s))
                    if child.pid not in runner_labels:
                        runner_labels[child.pid] = runner_label(child, model_names)
                except psutil.NoSuchProcess:
                    pass
            next_at += interval_s
            time.sleep(max(0.0, next_at - time.monotonic()))
        for thread in threads:
            thread.join()
        runners_at_end = {child.pid for child in process.children()}
        log = daemon.log_text()
    elapsed_s = time.monotonic() - started_s
    total = sum(tally.answers.values())
    failed = sum(tally.failures.values())
    tracebacks = sum("Traceback" in line or "unexpected error" in line for line in log.splitlines())
    replaced = runners_at_warm_up != runners_at_end or set(runner_samples) != runners_at_warm_up

    print(f"\n{clients} clients for {seconds:g} s (warm-up {seconds * WARM_UP_FRACTION:g} s), ", end="")
    print(f"{len(daemon_samples)} samples every {interval_s:g} s after it")
    print(f"requests: {total} ({total / elapsed_s:.0f}/s)")
    kinds = sorted(tally.latencies_ms)
    print(
        "by kind (count, p50/p99 ms): "
        + ", ".join(
            f"{kind}: {len(tally.latencies_ms[kind])} "
            f"({percentile(tally.latencies_ms[kind], 0.5):.0f}/{percentile(tally.latencies_ms[kind], 0.99):.0f})"
            for kind in kinds
        )
    )
    statuses = Counter(outcome.rsplit(" ", 1)[1] for outcome in tally.answers.elements())
    print("answers: " + ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items())))
    print(f"failed requests (not a 200 of the expected shape, or no answer): {failed}")
    for failure, count in tally.failures.most_common(10):
        print(f"  {count} x {failure}")
    steady = judge("daemon", daemon_samples)
    for pid, samples in sorted(runner_samples.items()):
        steady = judge(runner_labels[pid], samples) and steady
    print(f"runners replaced during the soak: {'yes' if replaced else 'no'}; tracebacks in the log: {tracebacks}")
    ok = failed == 0 and total > 0 and steady and not replaced and tracebacks == 0 and len(runner_samples) == 2
    print("RESULT: " + ("pass" if ok else "FAIL"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples; 0: seconds / 120")
    args = parser.parse_args()
    return run(args.clients, args.seconds, args.interval or args.seconds / 120)


if __name__ == "__main__":
    sys.exit(main())
