"""Stopping as systemd and a terminal do it, by signalling the whole process group, and long jobs
that neither block short requests nor hold up a stop."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.conftest import MINILM_DIR
from tests.hub_server import FakeHub
from tests.live import Daemon, post_json, read_metrics, refuses_connections, running_daemon, wait_for

BUDGET_S = 10.0
CLIENTS = 32
MIB = 1024 * 1024


@pytest.fixture
def daemon(tmp_path: Path, tiny_dir: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, {"EMBERD_SHUTDOWN_TIMEOUT": f"{BUDGET_S:g}s"}) as live:
        yield live


def admitted(daemon: Daemon) -> float:
    return read_metrics(daemon.url).get(("emberd_requests_admitted", ()), 0.0)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def hold_runner(daemon: Daemon) -> int:
    """Load the model and stop its runner (SIGSTOP), so requests wait inside it."""
    post_json(daemon.url + "/api/embed", {"model": "tiny"})
    [runner_pid] = daemon.runner_pids()
    os.kill(runner_pid, signal.SIGSTOP)
    return runner_pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_whole_group_answers_every_accepted_request(daemon: Daemon, signum: int) -> None:
    runner_pid = hold_runner(daemon)
    with ThreadPoolExecutor(CLIENTS) as pool:
        requests = [
            pool.submit(post_json, daemon.url + "/api/embed", {"model": "tiny", "input": [f"text {i}", "the sky"]})
            for i in range(CLIENTS)
        ]
        wait_for(lambda: admitted(daemon) == CLIENTS)
        daemon.signal_group(signum)  # the runner gets it too, as under systemd or Ctrl-C
        signalled_s = time.monotonic()
        wait_for(lambda: refuses_connections(daemon.url))  # draining: the listener is closed
        os.kill(runner_pid, signal.SIGCONT)
        answers = [request.result(timeout=60) for request in requests]
    assert [status for status, _ in answers] == [200] * CLIENTS
    assert all(len(body["embeddings"]) == 2 for _, body in answers)
    assert daemon.process.wait(timeout=BUDGET_S + 5) == 0
    assert time.monotonic() - signalled_s <= BUDGET_S
    wait_for(lambda: not alive(runner_pid))
    log = daemon.log_text()
    assert "was killed by" not in log  # the runner was stopped by the daemon, not by the signal


def test_a_second_signal_exits_at_once_and_the_runners_go_with_it(daemon: Daemon) -> None:
    runner_pid = hold_runner(daemon)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post_json, daemon.url + "/api/embed", {"model": "tiny", "input": "hello"})
        wait_for(lambda: admitted(daemon) == 1)
        daemon.signal_group(signal.SIGTERM)
        wait_for(lambda: refuses_connections(daemon.url))
        daemon.signal_group(signal.SIGINT)
        assert daemon.process.wait(timeout=BUDGET_S) == 128 + signal.SIGINT
        with pytest.raises(OSError):  # forced: the held request is dropped with the connection
            held.result(timeout=30)
    wait_for(lambda: not alive(runner_pid))  # PR_SET_PDEATHSIG, even for a stopped runner


def test_runners_die_with_a_daemon_killed_by_sigkill(daemon: Daemon) -> None:
    post_json(daemon.url + "/api/embed", {"model": "tiny"})
    [runner_pid] = daemon.runner_pids()
    daemon.process.kill()
    daemon.process.wait(timeout=10)
    wait_for(lambda: not alive(runner_pid))


def test_drain_delay_keeps_serving_while_readyz_says_503(tmp_path: Path, tiny_dir: Path) -> None:
    environ = {"EMBERD_DRAIN_DELAY": "3s", "EMBERD_SHUTDOWN_TIMEOUT": f"{BUDGET_S:g}s"}
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, environ) as daemon:
        daemon.process.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz_status(daemon.url) == 503)
        status, body = post_json(daemon.url + "/api/embed", {"model": "tiny", "input": "still served"})
        assert (status, len(body["embeddings"])) == (200, 1)
        assert readyz_status(daemon.url) == 503
        assert daemon.process.wait(timeout=BUDGET_S + 5) == 0


def readyz_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def pull_events(url: str, name: str) -> Iterator[dict[str, object]]:
    request = urllib.request.Request(url + "/api/pull", data=json.dumps({"model": name}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            yield json.loads(line)


def test_sigterm_during_a_pull_stops_it_in_time_and_the_next_run_resumes_it(
    tmp_path: Path, tiny_dir: Path, big_ggufs: list[bytes]
) -> None:
    data = big_ggufs[0]
    sha256 = hashlib.sha256(data).hexdigest()
    hub = FakeHub()
    hub.add_repo("Owner/Big-GGUF", {"big-F32.gguf": data})
    hub.throttle_bytes_per_s[sha256] = 2 * MIB
    hub.start()
    home, name = tmp_path / "home", "hf.co/Owner/Big-GGUF"
    environ = {"HF_ENDPOINT": hub.url, "EMBERD_SHUTDOWN_TIMEOUT": f"{BUDGET_S:g}s"}
    try:
        with running_daemon(home, {"tiny": tiny_dir}, environ) as daemon:
            events = pull_events(daemon.url, name)
            for event in events:
                if int(str(event.get("completed", 0))) >= 2 * MIB:
                    break
            daemon.signal_group(signal.SIGTERM)
            signalled_s = time.monotonic()
            last = list(events)[-1]
            assert "shutting down" in str(last["error"])
            assert daemon.process.wait(timeout=BUDGET_S + 5) == 0
            assert time.monotonic() - signalled_s <= BUDGET_S
        partial = home / "downloads" / sha256 / "big-F32.gguf.partial"
        kept = partial.stat().st_size
        assert 2 * MIB <= kept < len(data)

        del hub.throttle_bytes_per_s[sha256]
        with running_daemon(home, {"tiny": tiny_dir}, environ) as daemon:
            assert post_json(daemon.url + "/api/pull", {"model": name, "stream": False}) == (200, {"status": "success"})
            status, body = post_json(daemon.url + "/api/embed", {"model": name, "input": "resumed"})
            assert (status, len(body["embeddings"][0])) == (200, 256)
        assert hub.range_starts[sha256] == [0, kept]  # the second transfer began where the first stopped
        assert not partial.exists()
    finally:
        hub.stop()


def test_short_requests_never_wait_for_the_pulls_and_the_conversion_holding_the_job_threads(
    tmp_path: Path, tiny_dir: Path, big_ggufs: list[bytes]
) -> None:
    # Each pull moves about 8 MB at 256 KiB/s: about 30 s. Before, the pulls' threads took every
    # worker of the default pool, and a store read behind them waited for a pull to end: seconds.
    # The bound is for liveness (over ten times the slowest answer seen on a loaded machine, 123 ms;
    # a fifteenth of a pull), not speed, which is the benchmarks' job. That jobs keep to threads of
    # their own is test_service_parts' test_the_job_executor_runs_at_most_max_jobs_at_once.
    bound_ms = 2000.0
    hub = FakeHub()
    for index, data in enumerate(big_ggufs):
        hub.add_repo(f"Owner/Slow-{index}", {f"slow-{index}-F32.gguf": data})
        hub.throttle_bytes_per_s[hashlib.sha256(data).hexdigest()] = MIB // 4
    hub.start()
    try:
        with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, {"HF_ENDPOINT": hub.url}) as daemon:
            post_json(daemon.url + "/api/embed", {"model": "tiny"})
            idle = route_latencies_ms(daemon.url)
            with ThreadPoolExecutor(5) as pool:
                pool.submit(post_json, daemon.url + "/api/create", {"model": "minilm", "from": str(MINILM_DIR)})
                wait_for(lambda: jobs_running(daemon.url) == 1)  # the conversion holds a job thread
                for index in range(4):
                    pool.submit(post_json, daemon.url + "/api/pull", {"model": f"hf.co/Owner/Slow-{index}"})
                wait_for(lambda: jobs_running(daemon.url) == 5)
                busy = route_latencies_ms(daemon.url)
                assert jobs_running(daemon.url) >= 4  # every pull was still running when the last answer came
                daemon.process.send_signal(signal.SIGTERM)  # ends the pulls, so the pool can close
                assert daemon.process.wait(timeout=60) == 0
        for route, samples in busy.items():
            print(
                f"{route}: idle median {statistics.median(idle[route]):.2f} ms; during 4 pulls and a conversion"
                f" median {statistics.median(samples):.2f} ms, slowest {max(samples):.2f} ms"
            )
            assert max(samples) < bound_ms, route
    finally:
        hub.stop()


def jobs_running(url: str) -> float:
    return read_metrics(url).get(("emberd_jobs_running", ()), 0.0)


def route_latencies_ms(url: str, rounds: int = 20) -> dict[str, list[float]]:
    """Latencies of /api/tags, /api/ps and /api/embed, interleaved so each sees the same load."""
    samples: dict[str, list[float]] = {"/api/tags": [], "/api/ps": [], "/api/embed": []}
    for _ in range(rounds):
        for route in samples:
            started_s = time.perf_counter()
            if route == "/api/embed":
                post_json(url + route, {"model": "tiny", "input": "why is the sky blue?"})
            else:
                with urllib.request.urlopen(url + route, timeout=30) as response:
                    response.read()
            samples[route].append((time.perf_counter() - started_s) * 1e3)
    return samples


def test_a_request_the_budget_cannot_cover_gets_a_503_and_the_exit_stays_in_budget(
    tmp_path: Path, tiny_dir: Path
) -> None:
    budget_s = 3.0
    environ = {"EMBERD_SHUTDOWN_TIMEOUT": f"{budget_s:g}s"}
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, environ) as daemon:
        runner_pid = hold_runner(daemon)  # never continued: this request cannot finish
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(status_and_error, daemon.url + "/api/embed", {"model": "tiny", "input": "hello"})
            wait_for(lambda: admitted(daemon) == 1)
            daemon.signal_group(signal.SIGTERM)
            signalled_s = time.monotonic()
            status, error = held.result(timeout=30)
        assert status == 503
        assert "shutting down" in error
        assert daemon.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled_s <= budget_s + 0.5
        wait_for(lambda: not alive(runner_pid))


def status_and_error(url: str, body: dict[str, object]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), ""
    except urllib.error.HTTPError as error:
        return int(error.code), str(json.loads(error.read())["error"])


def test_a_pull_stuck_in_a_read_does_not_stretch_a_short_budget(
    tmp_path: Path, tiny_dir: Path, big_ggufs: list[bytes]
) -> None:
    """A pull whose job thread is blocked in a read (the Hub never sends) cannot hold the stop past
    a short budget: its stream ends, and the daemon exits without waiting for the thread."""
    data = big_ggufs[0]
    sha256 = hashlib.sha256(data).hexdigest()
    hub = FakeHub()
    hub.add_repo("Owner/Stuck-GGUF", {"stuck-F32.gguf": data})
    released = hub.hold[sha256] = threading.Event()  # the Hub never starts the transfer
    hub.start()
    budget_s = 1.0
    environ = {"HF_ENDPOINT": hub.url, "EMBERD_SHUTDOWN_TIMEOUT": f"{budget_s:g}s"}
    try:
        with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, environ) as daemon, ThreadPoolExecutor(1) as pool:
            pulled = pool.submit(lambda: list(pull_events(daemon.url, "hf.co/Owner/Stuck-GGUF")))
            wait_for(lambda: hub.transfers_started[sha256] == 1)  # the job now waits in a read
            daemon.signal_group(signal.SIGTERM)
            signalled_s = time.monotonic()
            daemon.process.wait(timeout=30)
            assert time.monotonic() - signalled_s <= budget_s + 0.5
            with contextlib.suppress(Exception):  # the stream ended with an error line, or was cut
                pulled.result(timeout=30)
    finally:
        released.set()
        hub.stop()
