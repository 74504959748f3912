"""A real `emberd serve` process for tests that drive it from outside, as users and clients do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


class Daemon:
    def __init__(self, process: subprocess.Popen[bytes], environ: dict[str, str], url: str, log_path: Path) -> None:
        self.process = process
        self.environ = environ
        self.url = url
        self.log_path = log_path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        """What systemd (KillMode=control-group) and a terminal's Ctrl-C do: signal every process."""
        os.killpg(self.process.pid, signum)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon", *args], env=self.environ, capture_output=True, text=True, timeout=120
        )

    def runner_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children()]


@contextmanager
def running_daemon(
    home: Path, ensure: dict[str, Path], extra_environ: dict[str, str], prefix: Sequence[str] = ()
) -> Iterator[Daemon]:
    """`emberd serve` on a free port with its own store, stopped (and reaped) at the end. `prefix`
    is a command that execs the daemon (to start it inside a cgroup, say)."""
    port = free_port()
    # The vector cache off unless a test turns it on: answers must not depend on earlier requests.
    environ = {
        **os.environ,
        "EMBERD_CACHE": "false",
        # Calibration (int8/uint8 ranges) loads a created or pulled model at once: off unless a test asks.
        "EMBERD_CALIBRATE_ON_STORE": "false",
        "EMBERD_HOST": f"127.0.0.1:{port}",
        "EMBERD_HOME": str(home),
        **extra_environ,
    }
    environ.pop("EMBERD_CONFIG", None)
    command = [*prefix, sys.executable, "-m", "daemon", "serve"]
    for name, path in ensure.items():
        command += ["--ensure-model", f"{name}={path}"]
    # Logs go to a file (a pipe nobody reads would fill up and block the daemon).
    log_path = home.parent / f"emberd-{port}.log"
    with log_path.open("wb") as log_file:
        # A process group of its own, as systemd and a terminal give it: tests signal the whole group.
        process = subprocess.Popen(
            command, env=environ, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(url + "/readyz") or process.poll() is not None)
        assert process.poll() is None, log_path.read_text(errors="replace")
        yield Daemon(process, environ, url, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_metrics(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def refuses_connections(url: str) -> bool:
    """True once nothing listens at url (the daemon closed its listener)."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1):
            return False
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
