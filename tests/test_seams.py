"""Seams between modules: the Hub's two modules import one way, handlers read the store off the
event loop, and one function says which models take pairs."""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from gguf import PoolingType

from daemon.api.common import STORE, list_stored_models, stored_model
from daemon.api.embedding import check_model_kind
from daemon.errors import InvalidInput
from daemon.gguf_info import GGUFFacts
from daemon.store import ModelStore, StoredModel
from tests.conftest import MakeClient

ROOT = Path(__file__).parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function: `from daemon import hub_http`
    counts as daemon.hub_http."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_the_hubs_http_module_does_not_import_the_hub_module_that_imports_it() -> None:
    assert "daemon.hub_http" in imported_modules(ROOT / "daemon" / "hub.py")  # at the first pull
    http_imports = imported_modules(ROOT / "daemon" / "hub_http.py")
    assert [module for module in http_imports if module == "daemon.hub" or module.startswith("daemon.hub.")] == []


# -- which models take pairs --------------------------------------------------------------------------


def stored(pooling_type: int) -> StoredModel:
    facts = GGUFFacts(
        architecture="bert", name="m", context_length=512, embedding_length=8, block_count=1,
        pooling_type=pooling_type, causal_attention=False, file_type="F32", parameter_count=1, tensor_count=1,
        metadata={},
    )  # fmt: skip
    return StoredModel("m:latest", "sha256:00", 1, "2026-01-01T00:00:00+00:00", Path("blob"), facts)


@pytest.mark.parametrize(
    ("pooling_type", "pairs", "message"),
    [
        (PoolingType.RANK, False, "m:latest is a reranker: use /api/rerank"),
        (PoolingType.MEAN, True, "m:latest is an embedding model, not a reranker: use /api/embed"),
        (PoolingType.CLS, True, "m:latest is an embedding model, not a reranker: use /api/embed"),
        (PoolingType.RANK, True, None),
        (PoolingType.MEAN, False, None),
        (PoolingType.CLS, False, None),
    ],
)
def test_a_reranker_takes_pairs_and_an_embedding_model_texts(
    pooling_type: int, pairs: bool, message: str | None
) -> None:
    model = stored(pooling_type)
    if message is None:
        check_model_kind(model, pairs)
        return
    with pytest.raises(InvalidInput) as raised:
        check_model_kind(model, pairs)
    assert raised.value.message == message


# -- the store is read off the loop -------------------------------------------------------------------


class StoreReads:
    """Records each read of one store (get, list) as made on the loop's thread or off it."""

    def __init__(self, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop_thread = threading.get_ident()  # made in a coroutine: the loop's thread
        self.on_loop: list[str] = []
        self.off_loop: list[str] = []
        real_get, real_list = store.get, store.list

        def get(name: str) -> StoredModel:
            self._record(f"get {name}")
            return real_get(name)

        def list_models() -> list[StoredModel]:
            self._record("list")
            return real_list()

        monkeypatch.setattr(store, "get", get)
        monkeypatch.setattr(store, "list", list_models)

    def _record(self, what: str) -> None:
        (self.on_loop if threading.get_ident() == self.loop_thread else self.off_loop).append(what)


async def test_the_helpers_read_the_store_on_the_default_executor(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    store.open()
    store.create("tiny", tiny_gguf)
    reads = StoreReads(store, monkeypatch)
    app = web.Application()
    app[STORE] = store
    assert (await stored_model(app, "tiny")).name == "tiny:latest"
    assert [model.name for model in await list_stored_models(app)] == ["tiny:latest"]
    assert (reads.on_loop, reads.off_loop) == ([], ["get tiny", "list"])


# Every route that reads the store, with a body that reaches the read.
ROUTES_THAT_READ: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/api/embed", {"model": "tiny", "input": "x"}),
    ("POST", "/api/embed", {"model": "tiny", "input": [], "keep_alive": 0}),  # the unload idiom
    ("POST", "/api/embeddings", {"model": "tiny", "prompt": "x"}),
    ("POST", "/v1/embeddings", {"model": "tiny", "input": "x"}),
    ("POST", "/api/rerank", {"model": "reranker", "query": "q", "documents": ["d"]}),
    ("POST", "/api/rerank", {"model": "reranker", "query": "q", "documents": []}),
    ("POST", "/api/show", {"model": "tiny"}),
    ("POST", "/api/tokenize", {"model": "tiny", "content": "x"}),  # the model is loaded: its runner answers
    ("POST", "/api/detokenize", {"model": "reranker", "tokens": [5]}),  # not loaded: a vocabulary runner
    ("POST", "/api/generate", {"model": "tiny", "keep_alive": 0}),
    ("GET", "/api/tags", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("DELETE", "/api/delete", {"model": "reranker"}),
]


async def test_no_handler_reads_the_store_on_the_loop(
    make_client: MakeClient, tiny_gguf: Path, reranker_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client({"tiny": tiny_gguf, "reranker": reranker_gguf})
    reads = StoreReads(client.server.app[STORE], monkeypatch)
    for method, path, body in ROUTES_THAT_READ:
        before = len(reads.off_loop)
        response = await client.request(method, path, json=body)
        assert response.status == 200, (path, await response.text())
        assert len(reads.off_loop) > before, f"{method} {path} read nothing from the store"
    assert reads.on_loop == []


def test_handlers_read_the_store_only_through_the_helpers_in_api_common() -> None:
    """Store reads (get, list) are written once, in api/common.py, with the rule beside them."""
    reads = re.compile(r"STORE\]\.(get|list)\b|\bstore\.(get|list)\(")
    found = [
        f"{path.name}:{number}"
        for path in sorted((ROOT / "daemon" / "api").glob("*.py"))
        if path.name != "common.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if reads.search(line)
    ]
    assert found == []
