"""Rough edges a new user hits first, and races found by reading the code (issue 11)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import unknown_environment_settings
from daemon.options import LoadOptions, llama_params
from daemon.runner.client import RunnerProcess
from tests.live import Daemon, free_port, running_daemon

IGNORED = "is not an emberd setting and is ignored"


def test_a_taken_port_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {**os.environ, "EMBERD_HOST": f"127.0.0.1:{port}", "EMBERD_HOME": str(tmp_path / "home")}
        environ.pop("EMBERD_CONFIG", None)
        done = subprocess.run(
            [sys.executable, "-m", "daemon", "serve"], env=environ, capture_output=True, text=True, timeout=60
        )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "Traceback" in line]
    assert errors == [
        f"Error: 127.0.0.1:{port} is already in use (another program); stop it, or pick another address with "
        f"EMBERD_HOST=127.0.0.1:{port + 1} (or --host)"
    ]


@pytest.fixture
def live(tmp_path: Path, tiny_gguf: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "home", {"tiny": tiny_gguf}, {"EMBERD_KEEPALIVE": "5m"}) as daemon:
        yield daemon


def test_host_is_taken_after_the_verb_too_and_a_mistyped_variable_is_named(live: Daemon) -> None:
    host = live.url.removeprefix("http://")
    elsewhere = {**live.environ, "EMBERD_HOST": f"127.0.0.1:{free_port()}"}  # nothing listens there
    for args in (["list", "--host", host], ["--host", host, "list"]):
        done = subprocess.run(
            [sys.executable, "-m", "daemon", *args], env=elsewhere, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "tiny:latest" in done.stdout
    assert "EMBERD_KEEPALIVE is not an emberd setting and is ignored; did you mean EMBERD_KEEP_ALIVE?" in (
        live.log_text()
    )


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"EMBERD_KEEPALIVE": "5m"},
            ["EMBERD_KEEPALIVE is not an emberd setting and is ignored; did you mean EMBERD_KEEP_ALIVE?"],
        ),
        ({"EMBERD_HOST": "x", "EMBERD_CONFIG": "y", "EMBERD_LB_BIND": "z", "PATH": "/bin"}, []),
        ({"EMBERD_ZZZ": "1"}, [f"EMBERD_ZZZ {IGNORED}"]),
    ],
)
def test_unknown_environment_settings(environ: dict[str, str], expected: list[str]) -> None:
    assert unknown_environment_settings(environ) == expected


async def test_a_late_ready_frame_after_a_timed_out_load_does_not_kill_the_frame_reader(tiny_gguf: Path) -> None:
    params = llama_params(LoadOptions(0, 256, 1, 0, 0, True), 64, 2)
    runner = await RunnerProcess.start(tiny_gguf, params, "tiny", 60.0)
    try:
        assert runner.facts is not None
        facts = {name: getattr(runner.facts, name) for name in runner.facts.__dataclass_fields__}
        runner._ready = runner._ready.get_loop().create_future()
        runner._ready.cancel()  # as a load timeout leaves it
        runner._dispatch({"type": "ready", "facts": facts}, b"")  # raised InvalidStateError before
        result = await runner.embed(["hello"], True)
        assert result.vectors.shape == (1, 32)  # the frame reader still reads
    finally:
        await runner.stop(5.0)


def test_a_clients_malformed_http_is_one_log_line_without_a_traceback() -> None:
    from aiohttp.http_exceptions import BadHttpMethod

    from daemon.logs import MalformedHttpFilter

    try:
        raise BadHttpMethod("FOO")
    except BadHttpMethod:
        record = logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            sys.exc_info(),
        )
    assert MalformedHttpFilter().filter(record)
    assert (record.levelname, record.exc_info) == ("INFO", None)
    assert record.getMessage() == "Error handling request from 127.0.0.1: Bad HTTP method in status line 'FOO' (400)"
    assert logging.Formatter().format(record).count("\n") == 0
