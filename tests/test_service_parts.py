"""The pieces of the service: systemd's watchdog and notifications, the job executor, new settings."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.errors import InvalidConfig
from daemon.jobs import Cancelled, CancelToken, JobExecutor
from daemon.service import SystemdLink, start_io_threads
from tests.live import running_daemon


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, SystemdLink(None, None)),
        ({"NOTIFY_SOCKET": "/run/n.sock"}, SystemdLink("/run/n.sock", None)),
        ({"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "30000000"}, SystemdLink("@n", 15.0)),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, SystemdLink(None, None)),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, SystemdLink(None, None)),
        ({"WATCHDOG_USEC": "soon"}, SystemdLink(None, None)),
    ],
)
def test_systemd_link_from_the_environment(environ: dict[str, str], expected: SystemdLink) -> None:
    assert SystemdLink.from_environment(environ) == expected


def test_watchdog_ready_and_stopping_reach_a_real_notify_socket(tmp_path: Path, tiny_dir: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(30)
        environ = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, environ) as daemon:
            messages: list[str] = []
            while "READY=1\nSTATUS=serving" not in messages or messages.count("WATCHDOG=1") < 3:
                messages.append(notify.recv(256).decode())  # the socket's timeout bounds the wait
                assert len(messages) < 100
            daemon.signal_group(signal.SIGTERM)
            assert daemon.process.wait(timeout=30) == 0
        rest = []
        notify.settimeout(0)
        while True:
            try:
                rest.append(notify.recv(256).decode())
            except BlockingIOError:
                break
    assert "STOPPING=1" in rest


async def test_the_job_executor_runs_at_most_max_jobs_at_once() -> None:
    executor = JobExecutor(max_jobs=2)
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def job(_token: CancelToken) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1
        return 1

    jobs = [asyncio.ensure_future(executor.run(job)) for _ in range(5)]
    async with asyncio.timeout(10):
        while running < 2:
            await asyncio.sleep(0.001)
    assert executor.running == 5  # two on threads, three waiting
    release.set()
    assert await asyncio.gather(*jobs) == [1] * 5
    assert most == 2 and executor.running == 0
    executor.close()


async def test_cancel_all_stops_running_jobs_at_their_next_check_and_queued_ones_before_they_start() -> None:
    executor = JobExecutor(max_jobs=1)
    started = threading.Event()
    chunks_done = 0
    queued_ran = False

    def chunked(token: CancelToken) -> None:
        nonlocal chunks_done
        started.set()
        while True:
            token.check()
            chunks_done += 1
            threading.Event().wait(0.001)  # one chunk of work

    def queued(_token: CancelToken) -> None:
        nonlocal queued_ran
        queued_ran = True

    running = asyncio.ensure_future(executor.run(chunked))
    waiting = asyncio.ensure_future(executor.run(queued))
    await asyncio.to_thread(started.wait, 10)
    executor.cancel_all()
    for job in (running, waiting):
        with pytest.raises(Cancelled):
            await job
    assert chunks_done > 0 and not queued_ran
    with pytest.raises(Cancelled):
        await executor.run(queued)  # nothing new starts once shutdown began
    executor.close()


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("EMBERD_ALLOWED_HOSTS", "embed.lan, gpu-box:11434", "allowed_hosts", ("embed.lan", "gpu-box:11434")),
        ("EMBERD_CORS_ORIGINS", "http://a.test,http://b.test", "cors_origins", ("http://a.test", "http://b.test")),
        ("EMBERD_API_KEYS_FILE", "/etc/emberd/keys", "api_keys_file", "/etc/emberd/keys"),
        ("EMBERD_MAX_INPUTS", "64", "max_inputs", 64),
        ("EMBERD_LOG_FORMAT", "json", "log_format", "json"),
        ("EMBERD_DRAIN_DELAY", "2s", "drain_delay_s", 2.0),
        ("EMBERD_MAX_JOBS", "3", "max_jobs", 3),
    ],
)
def test_the_service_settings_have_environment_variables(
    variable: str, value: str, field: str, expected: object
) -> None:
    assert getattr(load_settings({variable: value}), field) == expected


def test_lists_in_the_file_are_toml_arrays(tmp_path: Path) -> None:
    config = tmp_path / "emberd.toml"
    config.write_text('allowed_hosts = ["embed.lan"]\ncors_origins = ["*"]\n')
    settings = load_settings({}, config)
    assert (settings.allowed_hosts, settings.cors_origins) == (("embed.lan",), ("*",))
    config.write_text("allowed_hosts = [1]\n")
    with pytest.raises(InvalidConfig, match="allowed_hosts"):
        load_settings({}, config)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EMBERD_LOG_FORMAT": "xml"}, "log_format"),
        ({"EMBERD_MAX_INPUTS": "0"}, "max_inputs"),
        ({"EMBERD_MAX_JOBS": "0"}, "max_jobs"),
        ({"EMBERD_DRAIN_DELAY": "30s", "EMBERD_SHUTDOWN_TIMEOUT": "30s"}, "drain_delay"),
    ],
)
def test_bad_service_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        load_settings(environ)


def test_an_unreadable_api_keys_file_stops_serve_with_a_message(tmp_path: Path) -> None:
    environ = {**os.environ, "EMBERD_HOME": str(tmp_path), "EMBERD_API_KEYS_FILE": str(tmp_path / "missing")}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "api_keys_file" in result.stderr


def test_a_model_that_cannot_be_ensured_stops_serve_with_status_1(tmp_path: Path) -> None:
    environ = {**os.environ, "EMBERD_HOME": str(tmp_path / "home"), "EMBERD_HOST": "127.0.0.1:0"}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--ensure-model", f"broken={tmp_path / 'nothing-here'}"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "--ensure-model failed" in result.stderr and "nothing-here" in result.stderr


def test_the_daemon_fixes_glibcs_mmap_threshold_unless_the_user_did() -> None:
    # In a child: the threshold would otherwise stay set for the rest of this test process.
    code = (
        "from daemon.service import return_large_blocks_when_freed as f;"
        "print(f({}), f({'MALLOC_MMAP_THRESHOLD_': '65536'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]  # Linux and glibc, as here and in CI


def test_the_io_threads_start_at_once_and_concurrent_calls_add_none() -> None:
    async def main() -> tuple[int, int, int]:
        before = threading.active_count()
        pool = start_io_threads(asyncio.get_running_loop(), 4)
        started = threading.active_count()
        for _ in range(3):  # every thread busy at once: a growing pool would start new ones here
            all_busy = threading.Barrier(4)
            await asyncio.gather(*(asyncio.to_thread(all_busy.wait, 10.0) for _ in range(4)))
        after = threading.active_count()
        pool.shutdown()
        return before, started, after

    before, started, after = asyncio.run(main())
    assert (started - before, after) == (4, started)
