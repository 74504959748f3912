"""Rough edges a new user hits first, and races found by reading the code (issue 11)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.api.app import default_runner_factory
from daemon.api.common import STORE
from daemon.config import Settings, unknown_environment_settings
from daemon.errors import ModelLoadFailed, UnknownModel
from daemon.options import QUICK_LANE_TOKENS, LoadOptions, llama_params, resolve_load_options
from daemon.runner.client import RunnerProcess
from daemon.store import ModelStore
from tests.conftest import MakeClient
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


async def test_a_model_deleted_while_it_loads_is_not_found_not_a_failed_load(
    make_client: MakeClient, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzzer: a tokenize (or embed) that read the manifest, then a delete, then the
    runner opening the file was a 500 "failed to load ... Model path does not exist"."""
    settings = Settings(home=tmp_path / "home", calibrate_on_store=False)
    store = ModelStore(settings.home)
    store.open()
    store.create("tiny", tiny_gguf)
    store.create("other", tiny_gguf)
    model = store.get("tiny")
    store.delete("tiny")
    store.delete("other")  # the last name of the file: the blob goes
    params = llama_params(resolve_load_options(settings, {}), model.facts.context_length, model.facts.block_count)
    with pytest.raises(UnknownModel, match="deleted while it loaded"):
        await default_runner_factory(settings)(model, params)
    # Deleted and created again while the runner loaded: another file under the same name.
    store.create("tiny", tiny_gguf)
    model = store.get("tiny")

    async def start_while_recreated(*_args: Any, **_kwargs: Any) -> RunnerProcess:
        store.delete("tiny")
        store.create("tiny", tiny_gguf)
        raise ModelLoadFailed("failed to load tiny:latest: ValueError: Model path does not exist")

    monkeypatch.setattr(RunnerProcess, "start", start_while_recreated)
    with pytest.raises(UnknownModel, match="deleted while it loaded"):
        await default_runner_factory(settings)(model, params)
    monkeypatch.undo()
    # Through the routes: the manifest is read, the file is gone.
    client = await make_client({"tiny": tiny_gguf})
    client.server.app[STORE].get("tiny").blob_path.unlink()
    for path, body in (("/api/tokenize", {"content": "hi"}), ("/api/embed", {"input": "hi"})):
        response = await client.post(path, json={"model": "tiny", **body})
        assert response.status == 404, await response.text()


async def test_deletes_of_one_model_at_once_are_one_200_and_404s(
    make_client: MakeClient, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzzer: deletes that had all found the model raced to read and remove its
    manifest, and the losers' FileNotFoundError was a 500 with a traceback."""
    client = await make_client({})
    store = client.server.app[STORE]
    for _round in range(20):
        await asyncio.to_thread(store.create, "doomed", tiny_gguf)
        responses = await asyncio.gather(*(client.delete("/api/delete", json={"model": "doomed"}) for _ in range(8)))
        assert sorted(response.status for response in responses) == [200] + [404] * 7
    # The losing side, every time: the manifest goes between the store's check and its read.
    await asyncio.to_thread(store.create, "doomed", tiny_gguf)
    read_manifest = store._read_manifest

    def vanishing(path: Path) -> Any:
        path.unlink()
        return read_manifest(path)

    monkeypatch.setattr(store, "_read_manifest", vanishing)
    response = await client.delete("/api/delete", json={"model": "doomed"})
    assert response.status == 404 and 'model "doomed" not found' in (await response.json())["error"]


async def test_a_listing_during_deletes_answers_200(
    make_client: MakeClient, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzzer: /api/tags walking the manifests while a delete removed a model's
    directory (hf.co/owner/...) was a 500, FileNotFoundError from the walk."""
    client = await make_client({"tiny": tiny_gguf})
    store = client.server.app[STORE]
    names = [f"hf.co/owner{index}/repo" for index in range(6)]

    async def churn() -> None:
        for _round in range(15):
            for name in names:
                await asyncio.to_thread(store.create, name, tiny_gguf)
            await asyncio.gather(*(client.delete("/api/delete", json={"model": name}) for name in names))

    async def listing() -> list[int]:
        statuses = []
        for _index in range(60):
            for path in ("/api/tags", "/v1/models"):
                statuses.append((await client.get(path)).status)
        return statuses

    _, statuses = await asyncio.gather(churn(), listing())
    assert set(statuses) == {200}
    # A manifest that a delete removes between the walk and its read, every time: not listed.
    await asyncio.to_thread(store.create, "doomed", tiny_gguf)
    read_manifest = store._read_manifest

    def vanishing(path: Path) -> Any:
        if "doomed" in str(path):
            path.unlink()
        return read_manifest(path)

    monkeypatch.setattr(store, "_read_manifest", vanishing)
    response = await client.get("/api/tags")
    assert response.status == 200
    assert [model["name"] for model in (await response.json())["models"]] == ["tiny:latest"]


@pytest.mark.parametrize(("num_ctx", "num_batch"), [(8, 1), (17, 16), (40, 32), (63, 1), (64, 1)])
async def test_a_small_context_with_a_small_budget_loads(
    make_client: MakeClient, tiny_gguf: Path, num_ctx: int, num_batch: int
) -> None:
    """Found by the fuzzer: options {num_ctx: 40, num_batch: 32} gave a context under 64 tokens, and
    the quick lane beside it (its tokens cut to the context, 16 sequences) made llama.cpp abort as
    the runner loaded: a 500. A context under a whole lane now has none."""
    params = llama_params(resolve_load_options(Settings(), {"num_ctx": num_ctx, "num_batch": num_batch}), 64, 2)
    assert params.quick_lane_tokens == (QUICK_LANE_TOKENS if params.n_ctx >= QUICK_LANE_TOKENS else 0)
    client = await make_client({"tiny": tiny_gguf})
    options = {"num_ctx": num_ctx, "num_batch": num_batch}
    response = await client.post(
        "/api/embed", json={"model": "tiny", "input": ["why is the sky blue?"] * 20, "options": options}
    )
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("default_prompt_name", [[], {}, ["query"], 5])
async def test_create_with_a_default_prompt_name_of_another_type_is_a_400(
    make_client: MakeClient, tiny_gguf: Path, default_prompt_name: Any
) -> None:
    """Found by the fuzzer: a list or an object there raised TypeError (unhashable), a 500."""
    client = await make_client({})
    body = {"model": "made", "from": str(tiny_gguf), "prompts": {"query": "q: "}}
    response = await client.post("/api/create", json={**body, "default_prompt_name": default_prompt_name})
    assert response.status == 400, await response.text()
    assert "default_prompt_name" in (await response.json())["error"]
