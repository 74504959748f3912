"""Task adapters (jina-embeddings-v3's LoRA per task): stored beside a model by /api/create, loaded
once by its runner, picked per request by `task`, `prompt_name` or `input_type`; each request's
vector is llama.cpp's own with that adapter applied (llama-cpp-python's Llama(lora_path=...))."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import msgspec
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from gguf import GGUFType, GGUFWriter, Keys

from daemon.adapters import InputPrefix, choose_input_prefix
from daemon.api.common import STORE
from daemon.api.models import ShowAnswer
from daemon.cli import parse_adapter_option
from daemon.errors import InvalidConfig, InvalidInput, InvalidModelFile
from daemon.hub import load_aliases
from daemon.prompts import ModelPrompts
from daemon.runner.batching import QueuedRequest, take_batch
from daemon.store import ModelStore
from tests.conftest import MakeClient, scheduler_of
from tests.family_ggufs import make_family_gguf
from tests.hub_server import FakeHub
from tests.test_unloadable_models import store_contents

Client = TestClient[Any, Any]
CONTEXT = 128
HIDDEN, LAYERS, RANK = 32, 2, 4  # make_family_gguf's defaults (its feed-forward is twice as wide)
QUERY, SEPARATION = "retrieval.query", "separation"
# Task prefixes as llama.cpp's converter writes them from jina's task_instructions (shortened: the
# tiny vocabulary spells them letter by letter); separation's is empty, as jina's is.
PREFIXES = {QUERY: "query: ", SEPARATION: ""}
TEXTS = ["why is the sky blue?", "the grass is green", "hello world", "a harbour turns grey at dusk"]


def write_lora(
    path: Path, task: str | None, seed: int, architecture: str = "jina-bert-v3", hidden: int = HIDDEN
) -> Path:
    """A tiny random LoRA adapter GGUF as llama.cpp's loader reads it (src/llama-adapter.cpp):
    `<base tensor>.lora_a` (ne {in, rank}) and `.lora_b` (ne {rank, out}) for each layer's fused
    QKV, attention output and feed-forward, with the metadata llama.cpp's converter writes for
    jina-embeddings-v3 (conversion/bert.py). `hidden`: the width of the model it is for."""
    writer = GGUFWriter(path, architecture)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, 8.0)
    if task is not None:
        writer.add_string(Keys.Adapter.LORA_TASK_NAME, task)
        writer.add_string(Keys.Adapter.LORA_PROMPT_PREFIX, PREFIXES.get(task, ""))
    rng = np.random.default_rng(seed)
    for layer in range(LAYERS):
        for name, n_in, n_out in (
            ("attn_qkv", hidden, 3 * hidden),
            ("attn_output", hidden, hidden),
            ("ffn_up", hidden, 2 * hidden),
            ("ffn_down", 2 * hidden, hidden),
        ):
            base = f"blk.{layer}.{name}.weight"
            writer.add_tensor(f"{base}.lora_a", (rng.standard_normal((RANK, n_in)) * 0.3).astype(np.float32))
            writer.add_tensor(f"{base}.lora_b", (rng.standard_normal((n_out, RANK)) * 0.3).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_adapter(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A jina-bert-v3 LoRA adapter GGUF of task retrieval.query with the given tensors, each of the
    given dimensions in GGUF's order (ne[0] first, as llama.cpp and its messages name them)."""
    writer = GGUFWriter(path, "jina-bert-v3")
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, 8.0)
    writer.add_string(Keys.Adapter.LORA_TASK_NAME, QUERY)
    rng = np.random.default_rng(6)
    for name, ne in shapes.items():  # numpy's order is GGUF's reversed
        writer.add_tensor(name, (rng.standard_normal(tuple(reversed(ne))) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("adapters")
    return {
        "model": make_family_gguf("jina-bert-v3", directory / "jina.gguf", CONTEXT),
        QUERY: write_lora(directory / f"lora-{QUERY}-jina.gguf", QUERY, seed=1),
        SEPARATION: write_lora(directory / f"lora-{SEPARATION}-jina.gguf", SEPARATION, seed=2),
        "untitled": write_lora(directory / "lora-untitled.gguf", None, seed=3),
        "bert": write_lora(directory / "lora-bert.gguf", QUERY, seed=4, architecture="bert"),
        "narrow": write_lora(directory / "lora-narrow.gguf", QUERY, seed=5, hidden=16),
    }


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> Iterator[dict[str | None, dict[str, np.ndarray]]]:
    """llama.cpp's own normalised vector of each text after the task's prefix, with the task's
    adapter applied (None: the base model), one text a decode."""
    vectors: dict[str | None, dict[str, np.ndarray]] = {}
    for task in (None, QUERY, SEPARATION, "untitled"):
        model = llama_cpp.Llama(
            str(files["model"]),
            embedding=True,
            n_ctx=CONTEXT,
            n_batch=CONTEXT,
            n_ubatch=CONTEXT,
            n_threads=1,
            verbose=False,
            lora_path=None if task is None else str(files[task]),
        )
        prefix = PREFIXES.get(task or "", "")
        vectors[task] = {text: np.asarray(model.embed(prefix + text), dtype=np.float64) for text in TEXTS}
        model.close()
    yield vectors


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def create(client: Client, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post("/api/create", json={"stream": False, **body})
    return response.status, await response.json()


async def embed(client: Client, texts: list[str], **fields: Any) -> list[list[float]]:
    response = await client.post("/api/embed", json={"model": "jina", "input": texts, **fields})
    answer = await response.json()
    assert response.status == 200, answer
    vectors: list[list[float]] = answer["embeddings"]
    return vectors


@pytest.fixture
async def jina(make_client: MakeClient, files: dict[str, Path]) -> Client:
    """A daemon with "jina" created through /api/create with two task adapters (tasks from headers)."""
    client = await make_client({})
    status, answer = await create(
        client, {"model": "jina", "from": str(files["model"]), "adapters": [str(files[QUERY]), str(files[SEPARATION])]}
    )
    assert status == 200, answer
    return client


# -- through the daemon -----------------------------------------------------------------------------


async def test_a_task_gets_llama_cpps_vector_with_its_adapter(
    jina: Client, reference: dict[str | None, dict[str, np.ndarray]]
) -> None:
    for task in (QUERY, SEPARATION, None):
        fields = {"task": task} if task else {}
        vectors = await embed(jina, TEXTS, **fields)
        for text, vector in zip(TEXTS, vectors, strict=True):
            assert cosine(vector, reference[task][text]) >= 0.9999, (task, text)
    # The adapters change the vectors: a task differs from the other and from the base model.
    for text in TEXTS:
        assert cosine(reference[QUERY][text], reference[SEPARATION][text]) < 0.99
        assert cosine(reference[SEPARATION][text], reference[None][text]) < 0.99
    # OpenAI's route takes `task` too; input_type and prompt_name pick a task by its name.
    for fields, task in (
        ({"task": QUERY}, QUERY),
        ({"input_type": "search_query"}, QUERY),
        ({"input_type": "clustering"}, SEPARATION),
        ({"prompt_name": SEPARATION}, SEPARATION),
        ({"input_type": "document"}, None),  # no retrieval.passage adapter, no document prompt
    ):
        response = await jina.post("/v1/embeddings", json={"model": "jina", "input": TEXTS[0], **fields})
        answer = await response.json()
        assert response.status == 200, answer
        assert cosine(answer["data"][0]["embedding"], reference[task][TEXTS[0]]) >= 0.9999, fields
    show_bytes = await (await jina.post("/api/show", json={"model": "jina"})).read()
    msgspec.json.decode(show_bytes, type=ShowAnswer)  # the answer's declared schema (closed) holds it
    show = json.loads(show_bytes)
    assert [(a["task"], a["prompt_prefix"], a["alpha"]) for a in show["adapters"]] == [
        (QUERY, "query: ", 8.0),
        (SEPARATION, "", 8.0),
    ]
    assert show["default_task"] is None


async def test_concurrent_requests_of_mixed_tasks_each_get_their_adapter(
    jina: Client, reference: dict[str | None, dict[str, np.ndarray]]
) -> None:
    await embed(jina, [TEXTS[0]])  # loaded, so that the requests below meet in the runner's queue
    asks = [(task, TEXTS[index % len(TEXTS)]) for index in range(24) for task in [(QUERY, SEPARATION, None)[index % 3]]]
    answers = await asyncio.gather(*(embed(jina, [text], **({"task": task} if task else {})) for task, text in asks))
    for (task, text), [vector] in zip(asks, answers, strict=True):
        assert cosine(vector, reference[task][text]) >= 0.9999, (task, text)


async def test_unknown_task_is_a_400_naming_the_models_tasks(jina: Client, make_client: MakeClient) -> None:
    for route, body in (
        ("/api/embed", {"model": "jina", "input": "sky", "task": "retrieval.passage"}),
        ("/v1/embeddings", {"model": "jina", "input": "sky", "task": "retrieval.passage"}),
    ):
        response = await jina.post(route, json=body)
        assert response.status == 400
        text = await response.text()
        assert "unknown task 'retrieval.passage'; this model's tasks: retrieval.query, separation" in text
    response = await jina.post("/api/embed", json={"model": "jina", "input": "sky", "prompt_name": "passage"})
    assert response.status == 400
    assert "its tasks: retrieval.query, separation" in (await response.json())["error"]
    response = await jina.post("/api/embed", json={"model": "jina", "input": "sky", "task": 3})
    assert (response.status, (await response.json())["error"]) == (400, "task must be a string")


async def test_bad_adapters_are_a_400_at_create(jina: Client, files: dict[str, Path]) -> None:
    model = str(files["model"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"adapters": [model]}, "jina.gguf is not a LoRA adapter: general.type is None"),
        ({"adapters": [str(files["bert"])]}, "lora-bert.gguf is an adapter of a bert model, and this model is jina"),
        ({"adapters": [str(files[QUERY]), str(files[QUERY])]}, "are both adapters of task 'retrieval.query'"),
        ({"adapters": {SEPARATION: str(files[QUERY])}}, "is the adapter of task 'retrieval.query', not 'separation'"),
        ({"adapters": [str(files["untitled"])]}, "names no task (adapter.lora.task_name)"),
        ({"adapters": [str(files[QUERY])], "default_task": "classification"}, "default_task 'classification'"),
        ({"adapters": [str(files["model"].parent / "missing.gguf")]}, "missing.gguf: no such adapter file"),
        ({"adapters": ["lora\u0000.gguf"]}, "no such adapter file"),  # a path the OS cannot name (the fuzzer's)
        ({"adapters": [str(files["model"].parent)]}, "no such adapter file"),  # a folder
        ({"adapters": ["a" * 5000]}, "no such adapter file"),  # a name too long for the OS (the fuzzer's)
        ({"adapters": "lora.gguf"}, "create: adapters must map task names to paths, or list paths"),
    ]
    for fields, message in cases:
        status, answer = await create(jina, {"model": "other", "from": model, **fields})
        assert status == 400, (fields, answer)
        assert message in answer["error"], (fields, answer)
    tags = await (await jina.get("/api/tags")).json()
    assert [entry["name"] for entry in tags["models"]] == ["jina:latest"]  # none of them was created


# What the narrow adapter (written for a model of width 16) meets first in the tiny model (width 32).
NARROW_REFUSAL = (
    "lora-narrow.gguf does not fit this model: tensor 'blk.0.attn_output.weight' has incorrect shape: lora_a is"
    " [16, 4] and lora_b [4, 16], for the model's [32, 32]; llama.cpp takes lora_a [32, rank] and lora_b [rank, 32]"
)


async def test_an_adapter_whose_tensors_do_not_fit_the_model_is_a_400_at_create(
    make_client: MakeClient, files: dict[str, Path]
) -> None:
    # llama.cpp refuses it as it loads it: the check says so before the file is stored.
    assert llama_cpp_outcome(files["model"], files["narrow"], aborts=False) == "refused"
    client = await make_client({})
    for adapters in (
        [str(files["narrow"])],
        {QUERY: str(files["narrow"])},
        [str(files[SEPARATION]), str(files["narrow"])],
    ):
        for stream in (False, True):
            body = {"model": "jina", "from": str(files["model"]), "adapters": adapters, "stream": stream}
            response = await client.post("/api/create", json=body)
            answer = await response.json()
            assert (response.status, answer) == (400, {"error": NARROW_REFUSAL}), (adapters, stream)
    assert store_contents(client.server.app[STORE]) == []


async def test_an_alias_whose_adapter_does_not_fit_its_model_fails_its_pull(
    make_client: MakeClient, files: dict[str, Path], tmp_path: Path
) -> None:
    hub = FakeHub()
    repo_files = {"jina-F32.gguf": files["model"], "lora-narrow.gguf": files["narrow"]}
    repo = hub.add_repo("Owner/Jina-Tiny-GGUF", {name: path.read_bytes() for name, path in repo_files.items()})
    hub.start()
    try:
        aliases = tmp_path / "models.toml"
        aliases.write_text(
            f'["jina-tiny"]\nrepo = "Owner/Jina-Tiny-GGUF"\nfile = "jina-F32.gguf"\nrevision = "{repo.commit}"\n'
            'adapters = ["lora-narrow.gguf"]\n'
        )
        client = await make_client({}, models_file=str(aliases), hub_endpoint=hub.url)
        response = await client.post("/api/pull", json={"model": "jina-tiny", "stream": False})
        assert response.status == 400
        error = (await response.json())["error"]  # the blob's task names it: its file name is a digest
        assert error == NARROW_REFUSAL.replace("lora-narrow.gguf", QUERY), error
        assert (await (await client.get("/api/tags")).json())["models"] == []
    finally:
        hub.stop()


def plant_adapter(home: Path, name: str, model: Path, fitting: Path, adapter: Path) -> None:
    """A model with one task adapter, as an emberd older than the shape check stored it: created
    with the `fitting` adapter, its manifest then pointed at `adapter`'s blob."""
    store = ModelStore(home)
    store.open()
    store.create(name, model, adapters=[(fitting, None)])
    data = adapter.read_bytes()
    digest_hex = hashlib.sha256(data).hexdigest()
    shutil.copyfile(adapter, store.blobs_dir / f"sha256-{digest_hex}")
    [path] = (store.manifests_dir / name).rglob("*.json")
    manifest = json.loads(path.read_text())
    manifest["adapters"][0].update(digest=f"sha256:{digest_hex}", size=len(data))
    path.write_text(json.dumps(manifest))


async def test_a_stored_adapter_llama_cpp_refuses_is_a_409_with_its_reason_and_the_others_serve_on(
    make_client: MakeClient,
    files: dict[str, Path],
    reference: dict[str | None, dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    plant_adapter(tmp_path / "home", "jina", files["model"], files[QUERY], files["narrow"])  # make_client's home
    client = await make_client({"plain": files["model"]})
    prefix = "jina:latest cannot be loaded by this emberd's llama.cpp: llama.cpp refused the adapter of task "
    for _attempt in range(2):  # the same answer again: nothing was left half-loaded
        for route, fields in (("/api/embed", {"task": QUERY}), ("/api/embed", {}), ("/v1/embeddings", {})):
            response = await client.post(route, json={"model": "jina", "input": TEXTS[0], **fields})
            answer = await response.json()
            assert response.status == 409, (route, answer)
            error = answer["error"] if route == "/api/embed" else answer["error"]["message"]
            assert error.startswith(f"{prefix}'{QUERY}' (sha256-"), error
            # llama.cpp's own reason, from its log.
            assert "tensor 'blk.0.attn_output.weight' has incorrect shape" in error, error
    # What reads no weights answers: the header, and the vocabulary (which loads no adapter).
    response = await client.post("/api/show", json={"model": "jina"})
    assert response.status == 200
    assert [entry["task"] for entry in (await response.json())["adapters"]] == [QUERY]
    response = await client.post("/api/tokenize", json={"model": "jina", "content": "sky"})
    assert response.status == 200
    vectors = (await (await client.post("/api/embed", json={"model": "plain", "input": TEXTS[1]})).json())["embeddings"]
    assert cosine(vectors[0], reference[None][TEXTS[1]]) >= 0.9999
    assert [entry.model.name for entry in scheduler_of(client).loaded()] == ["plain:latest"]


# Adapter tensors against the tiny jina-bert-v3's (GGUF's order: hidden 32, feed-forward 64, 73
# tokens), what llama.cpp does with them (takes them and decodes; refuses them as it loads them;
# takes them and aborts at its first decode), and emberd's refusal at create.
UP, EMBD = "blk.0.ffn_up.weight", "token_embd.weight"  # [32, 64] and [32, 73] in the model
PAIR_CASES: dict[str, tuple[dict[str, tuple[int, ...]], str, str | None]] = {
    "fits": ({f"{UP}.lora_a": (32, 4), f"{UP}.lora_b": (4, 64)}, "decodes", None),
    "a norm tensor is skipped": (
        {f"{UP}.lora_a": (32, 4), f"{UP}.lora_b": (4, 64), "blk.0.attn_output_norm.weight": (32,)},
        "decodes",
        None,
    ),
    "token_embd, flipped": ({f"{EMBD}.lora_a": (4, 73), f"{EMBD}.lora_b": (4, 32)}, "decodes", None),
    "n_in": (
        {f"{UP}.lora_a": (16, 4), f"{UP}.lora_b": (4, 64)},
        "refused",
        f"tensor '{UP}' has incorrect shape: lora_a is [16, 4] and lora_b [4, 64], for the model's [32, 64];"
        " llama.cpp takes lora_a [32, rank] and lora_b [rank, 64]",
    ),
    "n_out": (
        {f"{UP}.lora_a": (32, 4), f"{UP}.lora_b": (4, 32)},
        "refused",
        f"tensor '{UP}' has incorrect shape: lora_a is [32, 4] and lora_b [4, 32], for the model's [32, 64];"
        " llama.cpp takes lora_a [32, rank] and lora_b [rank, 64]",
    ),
    "lora_b laid out as lora_a": (
        {f"{UP}.lora_a": (32, 4), f"{UP}.lora_b": (64, 4)},
        "refused",
        f"tensor '{UP}' has incorrect shape: lora_a is [32, 4] and lora_b [64, 4]",
    ),
    "token_embd laid out as another tensor": (
        {f"{EMBD}.lora_a": (32, 4), f"{EMBD}.lora_b": (4, 73)},
        "refused",
        f"tensor '{EMBD}' has incorrect shape: lora_a is [32, 4] and lora_b [4, 73], for the model's [32, 73];"
        " llama.cpp takes lora_a [rank, 73] and lora_b [rank, 32]",
    ),
    "ranks differ": (
        {f"{UP}.lora_a": (32, 4), f"{UP}.lora_b": (8, 64)},
        "refused",
        f"tensor '{UP}': lora_a tensor is not transposed: lora_a is [32, 4] and lora_b [8, 64], for the model's"
        " [32, 64], and their ranks differ (4, 8)",
    ),
    "half a pair": (
        {f"{UP}.lora_a": (32, 4)},
        "refused",
        f"LoRA tensor pair for '{UP}' is missing one component (its lora_b)",
    ),
    "a tensor the model lacks": (
        {"blk.9.ffn_up.weight.lora_a": (32, 4), "blk.9.ffn_up.weight.lora_b": (4, 64)},
        "refused",
        "LoRA tensor 'blk.9.ffn_up.weight' does not exist in base model",
    ),
    "a suffix": ({f"{UP}.lora_c": (32, 4)}, "refused", f"LoRA tensor '{UP}.lora_c' has unexpected suffix"),
    "token_embd's ranks differ": (
        {f"{EMBD}.lora_a": (4, 73), f"{EMBD}.lora_b": (8, 32)},
        "aborts",
        f"tensor '{EMBD}': lora_a is [4, 73] and lora_b [8, 32], for the model's [32, 73], and their ranks differ"
        " (4, 8); llama.cpp takes it, then aborts at its first decode",
    ),
    "three dimensions for a matrix": (
        {f"{UP}.lora_a": (32, 4, 2), f"{UP}.lora_b": (4, 64)},
        "aborts",
        f"tensor '{UP}': lora_a is [32, 4, 2] and lora_b [4, 64], for the model's [32, 64], a pair of more than two"
        " dimensions for a matrix; llama.cpp takes it, then aborts at its first decode",
    ),
}


def embeds_with_adapter(model_path: str, adapter_path: str) -> bool:
    """llama.cpp's load of an adapter onto a model (False: it refuses it), then a text embedded with
    it (an abort ends the process). Not Llama(lora_path=...): llama-cpp-python 0.3.36 tests the NULL
    pointer of a refusal for None, and goes on with it."""
    import ctypes

    import llama_cpp

    model = llama_cpp.Llama(
        model_path, embedding=True, n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1, verbose=False
    )
    adapter = llama_cpp.llama_adapter_lora_init(model.model, adapter_path.encode())
    if adapter:
        chosen = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        assert llama_cpp.llama_set_adapters_lora(model.ctx, chosen, 1, (ctypes.c_float * 1)(1.0)) == 0
        assert len(model.embed("why is the sky blue?")) == HIDDEN
    model.close()  # llama.cpp frees the adapter with the model
    return bool(adapter)


def llama_cpp_outcome(model: Path, adapter: Path, aborts: bool) -> str:
    """What llama.cpp does with the adapter: "decodes", "refused" (as it loads it) or "aborts" (at
    the first decode); where it may abort, in a process of its own."""
    if not aborts:
        return "decodes" if embeds_with_adapter(str(model), str(adapter)) else "refused"
    script = (
        inspect.getsource(embeds_with_adapter)
        + "\nimport sys\nsys.exit(0 if embeds_with_adapter(*sys.argv[1:]) else 3)\n"
    )
    environment = {"GGML_NO_BACKTRACE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", f"HIDDEN = {HIDDEN}\n" + script, str(model), str(adapter)],
        capture_output=True,
        env=environment,
    )
    outcomes = {0: "decodes", 3: "refused", -signal.SIGABRT: "aborts"}
    assert done.returncode in outcomes, (done.returncode, done.stderr[-2000:])
    return outcomes[done.returncode]


@pytest.mark.parametrize("case", PAIR_CASES)
def test_adapter_tensors_are_checked_as_llama_cpp_checks_them(
    case: str, files: dict[str, Path], tmp_path: Path
) -> None:
    shapes, outcome, refusal = PAIR_CASES[case]
    adapter = write_adapter(tmp_path / "lora.gguf", shapes)
    assert llama_cpp_outcome(files["model"], adapter, aborts=outcome == "aborts") == outcome
    if refusal is None:
        ModelStore.check_adapter_sources([(adapter, None)], "jina-bert-v3", None, files["model"])
    else:
        with pytest.raises(InvalidModelFile) as refused:
            ModelStore.check_adapter_sources([(adapter, None)], "jina-bert-v3", None, files["model"])
        assert refused.value.message.startswith(f"lora.gguf does not fit this model: {refusal}"), refused.value


async def test_adapters_survive_a_restart_and_go_with_their_model(
    make_client: MakeClient, files: dict[str, Path], reference: dict[str | None, dict[str, np.ndarray]]
) -> None:
    first = await make_client({})
    body = {
        "model": "jina",
        "from": str(files["model"]),
        "adapters": {"untitled": str(files["untitled"]), SEPARATION: str(files[SEPARATION])},
        "default_task": "untitled",
    }
    status, answer = await create(first, body)
    assert status == 200, answer
    await first.close()
    # A restart: the store opens again (its garbage collection runs) and a new daemon serves it.
    second = await make_client({})
    vectors = await embed(second, [TEXTS[1]])  # no task: the model's default task, "untitled"
    assert cosine(vectors[0], reference["untitled"][TEXTS[1]]) >= 0.9999
    vectors = await embed(second, [TEXTS[1]], task=SEPARATION)
    assert cosine(vectors[0], reference[SEPARATION][TEXTS[1]]) >= 0.9999


def test_store_keeps_adapter_blobs_and_removes_them_with_their_model(tmp_path: Path, files: dict[str, Path]) -> None:
    store = ModelStore(tmp_path / "home")
    store.open()
    model = store.create("jina", files["model"], adapters=[(files[QUERY], None), (files[SEPARATION], None)])
    store.create("other", files["model"], adapters=[(files[QUERY], None)])
    blobs = {adapter.task: adapter.blob_path for adapter in model.adapters}
    assert blobs[QUERY].read_bytes() == files[QUERY].read_bytes()
    assert blobs[SEPARATION].read_bytes() == files[SEPARATION].read_bytes()
    manifest = json.loads(store._manifest_path("jina:latest").read_text())
    assert [entry["task"] for entry in manifest["adapters"]] == [QUERY, SEPARATION]
    store.open()  # start-up's garbage collection: every adapter blob is named
    assert all(path.is_file() for path in blobs.values())
    assert store.get("jina").adapters == model.adapters
    store.delete("jina")  # its separation adapter goes; "other" still names the query adapter
    assert (blobs[QUERY].is_file(), blobs[SEPARATION].is_file(), model.blob_path.is_file()) == (True, False, True)
    store.delete("other")
    assert not blobs[QUERY].is_file() and not model.blob_path.is_file()


async def test_created_again_with_adapters_while_loaded_gets_a_runner_with_them(
    make_client: MakeClient, files: dict[str, Path], reference: dict[str | None, dict[str, np.ndarray]]
) -> None:
    client = await make_client({"jina": files["model"]})
    vectors = await embed(client, [TEXTS[2]])
    assert cosine(vectors[0], reference[None][TEXTS[2]]) >= 0.9999
    status, answer = await create(
        client, {"model": "jina", "from": str(files["model"]), "adapters": [str(files[QUERY])]}
    )
    assert status == 200, answer
    vectors = await embed(client, [TEXTS[2]], task=QUERY)  # same GGUF, other adapters: a new runner
    assert cosine(vectors[0], reference[QUERY][TEXTS[2]]) >= 0.9999


async def test_an_alias_pulls_its_adapters_with_the_model(
    make_client: MakeClient,
    files: dict[str, Path],
    reference: dict[str | None, dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    hub = FakeHub()
    repo_files = {"jina-F32.gguf": files["model"], f"lora-{QUERY}-jina-F32.gguf": files[QUERY]}
    repo_files[f"lora-{SEPARATION}-jina-F32.gguf"] = files[SEPARATION]
    repo = hub.add_repo("Owner/Jina-Tiny-GGUF", {name: path.read_bytes() for name, path in repo_files.items()})
    hub.start()
    try:
        aliases = tmp_path / "models.toml"
        aliases.write_text(
            f'["jina-tiny"]\nrepo = "Owner/Jina-Tiny-GGUF"\nfile = "jina-F32.gguf"\nrevision = "{repo.commit}"\n'
            f'adapters = ["lora-{QUERY}-jina-F32.gguf", "lora-{SEPARATION}-jina-F32.gguf"]\n'
            f'default_task = "{QUERY}"\n'
        )
        client = await make_client({}, models_file=str(aliases), hub_endpoint=hub.url)
        response = await client.post("/api/pull", json={"model": "jina-tiny", "stream": False})
        assert response.status == 200, await response.text()
        for fields, task in (({}, QUERY), ({"task": SEPARATION}, SEPARATION)):
            response = await client.post("/api/embed", json={"model": "jina-tiny", "input": TEXTS[3], **fields})
            [vector] = (await response.json())["embeddings"]
            assert cosine(vector, reference[task][TEXTS[3]]) >= 0.9999, fields
    finally:
        hub.stop()


# -- policy -----------------------------------------------------------------------------------------

TASKS = {QUERY: "query: ", SEPARATION: "", "retrieval.passage": "passage: "}
PROMPTS = ModelPrompts({"query": "q: ", "document": "d: "})


@pytest.mark.parametrize(
    ("prompts", "tasks", "default_task", "fields", "expected"),
    [
        (PROMPTS, TASKS, None, {}, InputPrefix(None, "")),  # no task: the base model
        (PROMPTS, TASKS, SEPARATION, {}, InputPrefix(SEPARATION, "")),  # the model's default task
        (PROMPTS, TASKS, None, {"task": QUERY}, InputPrefix(QUERY, "query: ")),
        (PROMPTS, TASKS, None, {"task": QUERY, "prompt_name": QUERY}, InputPrefix(QUERY, "query: ")),
        (PROMPTS, TASKS, None, {"prompt_name": "retrieval.passage"}, InputPrefix("retrieval.passage", "passage: ")),
        (PROMPTS, TASKS, None, {"prompt_name": "query"}, InputPrefix(None, "q: ")),  # a prompt, no adapter
        (PROMPTS, TASKS, SEPARATION, {"input_type": "search_document"}, InputPrefix("retrieval.passage", "passage: ")),
        (PROMPTS, TASKS, None, {"input_type": "query"}, InputPrefix(QUERY, "query: ")),
        (PROMPTS, TASKS, None, {"input_type": "classification"}, InputPrefix(None, "")),  # no such adapter
        (PROMPTS, {}, None, {"input_type": "query"}, InputPrefix(None, "q: ")),  # no adapters: prompts as before
        (PROMPTS, {}, None, {"input_type": "clustering"}, InputPrefix(None, "")),
        (ModelPrompts({"query": "q: "}, "query"), {}, None, {}, InputPrefix(None, "q: ")),
    ],
)
def test_choose_input_prefix(
    prompts: ModelPrompts,
    tasks: dict[str, str],
    default_task: str | None,
    fields: dict[str, str],
    expected: InputPrefix,
) -> None:
    assert choose_input_prefix(prompts, tasks, default_task, **fields) == expected


@pytest.mark.parametrize(
    ("tasks", "fields", "message"),
    [
        (TASKS, {"task": "text-matching"}, "unknown task 'text-matching'; this model's tasks: retrieval.passage, "),
        ({}, {"task": QUERY}, "unknown task 'retrieval.query'; this model's tasks: none"),
        (TASKS, {"task": QUERY, "prompt_name": "query"}, "task 'retrieval.query' and prompt_name 'query': name one"),
        (TASKS, {"prompt_name": "passage"}, "unknown prompt_name 'passage'; this model's prompts: document, query;"),
        (TASKS, {"input_type": "question"}, "input_type must be one of query, search_query, document"),
    ],
)
def test_choose_input_prefix_refuses(tasks: dict[str, str], fields: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_input_prefix(PROMPTS, tasks, None, **fields)


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        # The first turn (shortest next sequence) decides the decode's task; others wait.
        ([QueuedRequest([5, 5], 0, "a"), QueuedRequest([3], 0, "b"), QueuedRequest([4], 0, "b")], [0, 1, 1]),
        ([QueuedRequest([5], 0, None), QueuedRequest([3], 0, "a"), QueuedRequest([6], 0, None)], [0, 1, 0]),
        # An overdue request goes first, and its task with it.
        ([QueuedRequest([5], 8, "a"), QueuedRequest([3], 0, "b"), QueuedRequest([4], 0, "a")], [1, 0, 1]),
        ([QueuedRequest([5, 6], 0, None), QueuedRequest([7], 0, None)], [2, 1]),  # one task: as before
    ],
)
def test_take_batch_puts_one_task_in_a_decode(requests: list[QueuedRequest], expected: list[int]) -> None:
    assert take_batch(requests, 512, 16) == expected


def test_an_alias_s_adapters_are_checked_as_it_loads(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('["jina"]\nrepo = "o/r"\nrevision = "main"\nadapters = "lora.gguf"\n')
    with pytest.raises(InvalidConfig, match="alias 'jina': adapters must be a list of the repo's file names"):
        load_aliases(path)
    path.write_text('["jina"]\nrepo = "o/r"\nrevision = "main"\nadapters = ["a.gguf"]\ndefault_task = 1\n')
    with pytest.raises(InvalidConfig, match="alias 'jina': default_task must be a task name"):
        load_aliases(path)
    path.write_text('["jina"]\nrepo = "o/r"\nrevision = "main"\nadapters = ["a.gguf"]\ndefault_task = "separation"\n')
    assert load_aliases(path)["jina:latest"].adapters == ("a.gguf",)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("lora-retrieval.query-jina.gguf", (None, "lora-retrieval.query-jina.gguf")),
        ("retrieval.query=/models/lora.gguf", ("retrieval.query", "/models/lora.gguf")),
        ("/models/a=b/lora.gguf", (None, "/models/a=b/lora.gguf")),  # '=' in a folder's name: a path
    ],
)
def test_the_adapter_option(option: str, expected: tuple[str | None, str]) -> None:
    assert parse_adapter_option(option) == expected
