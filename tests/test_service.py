"""`emberd serve` as a real process, driven by the CLI as a user would, and its shutdown."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from daemon.service import sd_notify
from tests.conftest import REPO
from tests.hub_server import FakeHub
from tests.live import Daemon, post_json, running_daemon, wait_for


@pytest.fixture
def daemon(tmp_path: Path, tiny_dir: Path, fake_hub: FakeHub) -> Iterator[Daemon]:
    # HF_ENDPOINT: huggingface_hub's own variable, honoured as is.
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, {"HF_ENDPOINT": fake_hub.url}) as live:
        yield live


def test_the_cli_drives_a_running_daemon(daemon: Daemon, tiny_gguf: Path) -> None:
    created = daemon.cli("create", "second", "--from", str(tiny_gguf))
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().splitlines()[-1] == "success"

    listed = daemon.cli("list")
    assert "tiny:latest" in listed.stdout and "second:latest" in listed.stdout

    prompted = daemon.cli(
        "create", "third", "--from", str(tiny_gguf), "--prompt", "query=why ", "--prompt", "document=the "
    )
    assert prompted.returncode == 0, prompted.stderr
    shown = json.loads(daemon.cli("show", "third").stdout)
    assert shown["prompts"] == {"query": "why ", "document": "the "}
    malformed = daemon.cli("create", "fourth", "--from", str(tiny_gguf), "--prompt", "no-equals")
    assert (malformed.returncode, malformed.stderr.strip()) == (1, "Error: --prompt takes NAME=TEXT, got 'no-equals'")

    embedded = daemon.cli("embed", "tiny", "why is the sky blue?", "hello")
    assert embedded.returncode == 0, embedded.stderr
    assert len(json.loads(embedded.stdout)["embeddings"]) == 2

    assert "tiny:latest" in daemon.cli("ps").stdout
    assert daemon.cli("stop", "tiny").returncode == 0
    assert "tiny:latest" not in daemon.cli("ps").stdout

    missing = daemon.cli("embed", "nothing-here", "hello")
    assert missing.returncode == 1
    assert 'model "nothing-here" not found' in missing.stderr


def test_pull_list_embed_rm_from_the_command_line(daemon: Daemon) -> None:
    name = f"hf.co/{REPO}:Q8_0"
    pulled = daemon.cli("pull", name)
    assert pulled.returncode == 0, pulled.stderr
    output = pulled.stdout
    assert output.startswith("pulling manifest\n")
    assert "100% [" in output and "MB" in output  # the progress bar reached the end
    assert output.rstrip().endswith("verifying sha256 digest\nwriting manifest\nsuccess")

    assert name.lower() in daemon.cli("list").stdout
    shown = json.loads(daemon.cli("show", name).stdout)
    assert shown["details"]["quantization_level"] == "Q8_0"
    embedded = daemon.cli("embed", name, "hello")
    assert len(json.loads(embedded.stdout)["embeddings"][0]) == 32

    removed = daemon.cli("rm", name)
    assert removed.returncode == 0
    assert name.lower() not in daemon.cli("list").stdout
    failed = daemon.cli("pull", "hf.co/owner/not-there")
    assert failed.returncode == 1
    assert "not found on the Hugging Face Hub" in failed.stderr


def test_sigterm_answers_the_request_in_flight_then_exits_cleanly(daemon: Daemon) -> None:
    post_json(daemon.url + "/api/embed", {"model": "tiny"})  # preload
    [runner_pid] = daemon.runner_pids()
    os.kill(runner_pid, signal.SIGSTOP)  # hold the next request inside the runner
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post_json, daemon.url + "/api/embed", {"model": "tiny", "input": "hello"})
        wait_for(lambda: _bytes_waiting_in_stdin(runner_pid) > 0)  # the request reached the runner
        daemon.process.send_signal(signal.SIGTERM)
        os.kill(runner_pid, signal.SIGCONT)
        status, body = held.result(timeout=60)
    assert status == 200
    assert len(body["embeddings"]) == 1
    assert daemon.process.wait(timeout=60) == 0
    assert not psutil.pid_exists(runner_pid) or psutil.Process(runner_pid).status() == psutil.STATUS_ZOMBIE


def _bytes_waiting_in_stdin(pid: int) -> int:
    """Bytes written to a process's stdin pipe and not read yet (it is stopped, so it reads none)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    finally:
        os.close(fd)


def test_a_bad_setting_stops_serve_with_a_message(tmp_path: Path) -> None:
    environ = {**os.environ, "EMBERD_HOME": str(tmp_path), "EMBERD_MAX_QUEUE": "none"}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "max_queue" in result.stderr


def test_sd_notify_sends_to_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        sd_notify(str(path), "READY=1")
        assert server.recv(64) == b"READY=1"
    sd_notify(None, "READY=1")  # outside systemd: nothing happens, nothing fails
