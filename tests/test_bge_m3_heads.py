"""BGE-M3's three outputs through the daemon: a tiny random XLM-RoBERTa with random sparse and
ColBERT heads, saved by transformers and torch.save as FlagEmbedding saves them, created through
/api/create; emberd's dense, sparse and ColBERT outputs against FlagEmbedding's formulas computed
in torch on the same folder. And a hostile head file is refused without running anything."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson
import pytest
import torch
from aiohttp.test_utils import TestClient

from daemon.api.app import build_app
from daemon.api.common import STORE
from daemon.api.models import ShowAnswer
from daemon.config import Settings
from daemon.convert import convert_hf_directory
from daemon.errors import InvalidConfig, InvalidModelFile
from daemon.heads import read_state_dict
from daemon.hub import load_aliases
from tests.conftest import MakeClient
from tests.hub_server import FakeHub
from tests.tiny_models import add_bge_m3_heads, make_transformers_xlm_roberta_dir

Client = TestClient[Any, Any]
TEXTS = ["why is the sky blue?", "the sky is blue because the air scatters the blue light, the blue sky"]
TOLERANCE = 1e-3
# <s>, <pad>, </s>, <unk>: XLM-RoBERTa's CLS, pad, EOS and unknown tokens (FlagEmbedding's unused_tokens).
UNUSED_XLM_ROBERTA_TOKENS = {0, 1, 2, 3}


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bge-m3")
    directory = make_transformers_xlm_roberta_dir(root / "m3", pooling="cls", seed=5)
    return add_bge_m3_heads(directory, seed=6)


@pytest.fixture(scope="module")
def reference(m3_dir: Path) -> list[dict[str, Any]]:
    """FlagEmbedding's BGE_M3 formulas in torch, on the folder's own model and tokenizer: dense =
    the CLS row normalised; sparse = relu(sparse_linear(h)), the largest per token id, the CLS, EOS,
    pad and unknown tokens dropped, zero weights too; ColBERT = colbert_linear(h) of every token
    after the first, each normalised."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(m3_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(m3_dir))
    sparse = torch.nn.Linear(model.config.hidden_size, 1)
    sparse.load_state_dict(torch.load(m3_dir / "sparse_linear.pt", weights_only=True))
    colbert = torch.nn.Linear(model.config.hidden_size, model.config.hidden_size)
    colbert.load_state_dict(torch.load(m3_dir / "colbert_linear.pt", weights_only=True))
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert unused == UNUSED_XLM_ROBERTA_TOKENS
    answers = []
    with torch.no_grad():
        for text in TEXTS:
            encoded = tokenizer(text, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state[0]
            weights = torch.relu(sparse(hidden)).squeeze(-1)
            lexical: dict[int, float] = {}
            for token, weight in zip(encoded["input_ids"][0].tolist(), weights.tolist(), strict=True):
                if token not in unused and weight > 0:
                    lexical[token] = max(lexical.get(token, 0.0), weight)
            answers.append(
                {
                    "dense": torch.nn.functional.normalize(hidden[0], dim=-1).numpy(),
                    "sparse": lexical,
                    "colbert": torch.nn.functional.normalize(colbert(hidden[1:]), dim=-1).numpy(),
                }
            )
    return answers


@pytest.fixture
async def client(make_client: MakeClient, m3_dir: Path) -> Client:
    client = await make_client({})
    response = await client.post(
        "/api/create", json={"model": "m3", "from": str(m3_dir), "quantize": "f32", "stream": False}
    )
    assert response.status == 200, await response.text()
    return client


def assert_sparse_close(got: list[dict[str, Any]], expected: dict[int, float]) -> None:
    weights = {entry["index"]: entry["value"] for entry in got}
    assert [entry["index"] for entry in got] == sorted(weights)  # by token id, each once
    assert len(set(weights) & set(expected)) >= len(expected) - 1 and expected
    for token in set(weights) | set(expected):
        # A weight at the edge of relu may be in one set and not the other: then it is tiny.
        assert abs(weights.get(token, 0.0) - expected.get(token, 0.0)) <= TOLERANCE, token


async def test_dense_sparse_and_colbert_are_flagembeddings_from_one_decode(
    client: Client, reference: list[dict[str, Any]], m3_dir: Path
) -> None:
    response = await client.post(
        "/api/embed", json={"model": "m3", "input": TEXTS, "outputs": ["dense", "sparse", "colbert"]}
    )
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert answer["prompt_eval_count"] == sum(len(expected["colbert"]) + 1 for expected in reference)
    for index, expected in enumerate(reference):
        assert np.abs(np.asarray(answer["embeddings"][index]) - expected["dense"]).max() <= TOLERANCE
        assert_sparse_close(answer["sparse"][index], expected["sparse"])
        colbert = np.asarray(answer["colbert"][index])
        assert colbert.shape == expected["colbert"].shape
        assert np.abs(colbert - expected["colbert"]).max() <= TOLERANCE
    # The formulas alone, exactly: the heads in torch on llama.cpp's own token vectors (/embed_all)
    # and token ids (/api/tokenize), the special tokens as the folder's tokenizer names them.
    hidden = await (await client.post("/embed_all", json={"model": "m3", "inputs": TEXTS})).json()
    sparse_state = torch.load(m3_dir / "sparse_linear.pt", weights_only=True)
    colbert_state = torch.load(m3_dir / "colbert_linear.pt", weights_only=True)
    for index, vectors in enumerate(hidden):
        tokenized = await client.post("/api/tokenize", json={"model": "m3", "content": TEXTS[index]})
        ids = (await tokenized.json())["tokens"]
        tokens = torch.tensor(vectors)
        weights = torch.relu(tokens @ sparse_state["weight"].T + sparse_state["bias"]).squeeze(-1)
        exact: dict[int, float] = {}
        for token, weight in zip(ids, weights.tolist(), strict=True):
            if token not in UNUSED_XLM_ROBERTA_TOKENS and weight > 0:
                exact[token] = max(exact.get(token, 0.0), weight)
        got = {entry["index"]: entry["value"] for entry in answer["sparse"][index]}
        assert got.keys() == exact.keys() and exact
        assert all(abs(got[token] - exact[token]) <= 1e-5 for token in got)
        colbert = torch.nn.functional.normalize(tokens[1:] @ colbert_state["weight"].T + colbert_state["bias"], dim=-1)
        assert np.abs(np.asarray(answer["colbert"][index]) - colbert.numpy()).max() <= 1e-5
    # TEI's /embed_sparse gives the same weights; any subset of outputs answers only those.
    sparse = await (await client.post("/embed_sparse", json={"model": "m3", "inputs": TEXTS})).json()
    for got, expected in zip(sparse, reference, strict=True):
        assert_sparse_close(got, expected["sparse"])
    only = await (
        await client.post("/api/embed", json={"model": "m3", "input": TEXTS[0], "outputs": ["colbert"]})
    ).json()
    assert only["embeddings"] == [] and "sparse" not in only
    assert np.abs(np.asarray(only["colbert"][0]) - reference[0]["colbert"]).max() <= TOLERANCE
    # Without outputs, /api/embed is as it was: the pooled route, CLS as the model pools.
    plain = await (await client.post("/api/embed", json={"model": "m3", "input": TEXTS})).json()
    assert set(plain) >= {"embeddings"} and "sparse" not in plain and "colbert" not in plain
    for vector, expected in zip(plain["embeddings"], reference, strict=True):
        assert np.abs(np.asarray(vector) - expected["dense"]).max() <= TOLERANCE


async def test_a_model_without_heads_refuses_sparse_and_colbert_naming_it(
    make_client: MakeClient, tiny_gguf: Path, client: Client
) -> None:
    plain = await make_client({"tiny": tiny_gguf})
    for outputs in (["sparse"], ["dense", "colbert"]):
        response = await plain.post("/api/embed", json={"model": "tiny", "input": "a", "outputs": outputs})
        assert response.status == 400
        assert "tiny has no sparse and ColBERT heads" in (await response.json())["error"]
    response = await plain.post("/embed_sparse", json={"model": "tiny", "inputs": "a"})
    assert response.status == 400
    assert (await response.json())["error_type"] == "Validation"
    response = await plain.post("/api/embed", json={"model": "tiny", "input": "a", "outputs": ["lexical"]})
    assert response.status == 400
    for refused in ({"split_long_inputs": True}, {"embedding_type": "int8"}, {"outputs": []}):
        body = {"model": "m3", "input": "a", "outputs": ["sparse"], **refused}
        response = await client.post("/api/embed", json=body)
        assert response.status == 400, refused


async def test_the_heads_blob_lives_as_long_as_a_manifest_names_it(client: Client, m3_dir: Path) -> None:
    store = client.server.app[STORE]
    first = store.get("m3")
    assert first.heads is not None and first.heads.blob_path.is_file()
    response = await client.post(
        "/api/create", json={"model": "m3-copy", "from": str(m3_dir), "quantize": "f32", "stream": False}
    )
    assert response.status == 200
    assert store.get("m3-copy").heads == first.heads  # the same bytes: one blob
    assert (await client.delete("/api/delete", json={"model": "m3"})).status == 200
    assert first.heads.blob_path.is_file()  # m3-copy still names it
    assert (await client.delete("/api/delete", json={"model": "m3-copy"})).status == 200
    assert not first.heads.blob_path.exists()


async def test_show_lists_the_heads_of_a_model_that_has_them(
    make_client: MakeClient, tiny_gguf: Path, client: Client, m3_dir: Path
) -> None:
    response = await client.post("/api/show", json={"model": "m3"})
    assert response.status == 200
    raw = await response.read()
    msgspec.json.decode(raw, type=ShowAnswer)  # the declared schema (closed) holds it
    heads = orjson.loads(raw)["heads"]
    blob = client.server.app[STORE].get("m3").heads.blob_path
    hidden_size = json.loads((m3_dir / "config.json").read_text())["hidden_size"]  # colbert_linear: hidden -> hidden
    assert heads == {
        "outputs": ["sparse", "colbert"],
        "colbert_dimensions": hidden_size,
        "digest": hashlib.sha256(blob.read_bytes()).hexdigest(),
        "size": blob.stat().st_size,
    }
    plain = await make_client({"tiny": tiny_gguf})
    shown = await (await plain.post("/api/show", json={"model": "tiny"})).json()
    assert "heads" not in shown


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsACommand, _CallsEval])
async def test_a_hostile_head_file_is_refused_and_runs_nothing(
    make_client: MakeClient, m3_dir: Path, tmp_path: Path, payload: type
) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile-m3"
    shutil.copytree(m3_dir, hostile)
    torch.save({"weight": payload(marker), "bias": torch.zeros(1)}, hostile / "sparse_linear.pt")
    with pytest.raises(InvalidModelFile, match="never needs: refused"):
        read_state_dict(hostile / "sparse_linear.pt")
    client = await make_client({})
    response = await client.post("/api/create", json={"model": "evil", "from": str(hostile), "stream": False})
    assert response.status == 400
    assert "sparse_linear.pt" in (await response.json())["error"]
    assert not marker.exists()
    assert (await client.post("/api/show", json={"model": "evil"})).status == 404


def test_torch_files_of_other_layouts_read_as_torch_reads_them(tmp_path: Path) -> None:
    """bfloat16 and float16 storages, a transposed (strided) view, and a storage shared by two
    tensors at an offset, against torch's own values."""
    base = torch.randn(6, 4)
    tensors = {
        "weight": base.t(),
        "half": torch.randn(3, 5).half(),
        "bf16": torch.randn(2, 7).bfloat16(),
        "bias": base.reshape(-1)[5:9],
    }
    torch.save(tensors, tmp_path / "layouts.pt")
    loaded = read_state_dict(tmp_path / "layouts.pt")
    for key, tensor in tensors.items():
        assert np.array_equal(loaded[key], tensor.float().numpy()), key
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(InvalidModelFile, match="zip"):
        read_state_dict(tmp_path / "legacy.pt")


@pytest.fixture
def m3_hub(m3_dir: Path, tmp_path: Path) -> Iterator[FakeHub]:
    """A local Hub: the tiny model's GGUF in one repo, its heads in another (as gpustack/bge-m3-GGUF
    and BAAI/bge-m3 are)."""
    gguf = tmp_path / "m3-f32.gguf"
    convert_hf_directory(m3_dir, gguf, "f32", "m3")
    hub = FakeHub()
    hub.add_repo("Owner/M3-GGUF", {"m3-F32.gguf": gguf.read_bytes()})
    hub.add_repo("Owner/m3", {name: (m3_dir / name).read_bytes() for name in ("sparse_linear.pt", "colbert_linear.pt")})
    hub.add_repo("Owner/no-heads", {"README.md": b"# none"})
    hub.start()
    yield hub
    hub.stop()


async def test_an_alias_with_heads_repo_pulls_the_heads_with_the_gguf(
    aiohttp_client: Any, m3_hub: FakeHub, tmp_path: Path, reference: list[dict[str, Any]]
) -> None:
    aliases = tmp_path / "models.toml"
    gguf = 'repo = "Owner/M3-GGUF"\nfile = "m3-F32.gguf"\nrevision = "main"\n'
    aliases.write_text(
        f'["m3-alias"]\n{gguf}heads_repo = "Owner/m3"\n\n["m3-headless"]\n{gguf}heads_repo = "Owner/no-heads"\n'
    )
    settings = Settings(
        home=tmp_path / "home", models_file=str(aliases), hub_endpoint=m3_hub.url, calibrate_on_store=False
    )
    client: Client = await aiohttp_client(build_app(settings))
    response = await client.post("/api/pull", json={"model": "m3-alias", "stream": False})
    assert response.status == 200, await response.text()
    sparse = await (await client.post("/embed_sparse", json={"model": "m3-alias", "inputs": TEXTS})).json()
    for got, expected in zip(sparse, reference, strict=True):
        assert_sparse_close(got, expected["sparse"])
    for name in ("sparse_linear.pt", "colbert_linear.pt"):
        assert m3_hub.downloads[hashlib.sha256(m3_hub.repos["Owner/m3"].files[name]).hexdigest()] == 1
    assert not any(client.server.app[STORE].downloads_dir.iterdir())  # the staged head files are gone
    response = await client.post("/api/pull", json={"model": "m3-headless", "stream": False})
    assert response.status == 404
    assert "no head file sparse_linear.pt" in (await response.json())["error"]


def test_an_alias_whose_heads_repo_is_not_a_repo_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('["m3"]\nrepo = "Owner/M3-GGUF"\nrevision = "main"\nheads_repo = "bge-m3"\n')
    with pytest.raises(InvalidConfig, match="heads_repo must be a repo id"):
        load_aliases(path)
    path.write_text('["m3"]\nrepo = "Owner/M3-GGUF"\nrevision = "main"\nheads_repo = "BAAI/bge-m3"\n')
    assert load_aliases(path)["m3:latest"].heads_repo == "BAAI/bge-m3"


async def test_the_answers_and_errors_match_the_openapi_document(client: Client) -> None:
    from daemon.api.app import ERROR_STATUS
    from daemon.api.openapi import build_document
    from tests.openapi_check import Contract

    contract = Contract(build_document(ERROR_STATUS))
    calls: list[tuple[str, Any, int]] = [
        ("/api/embed", {"model": "m3", "input": TEXTS, "outputs": ["dense", "sparse", "colbert"]}, 200),
        ("/api/embed", {"model": "m3", "input": "a", "outputs": ["sparse"], "dimensions": 8}, 200),
        ("/embed_all", {"model": "m3", "inputs": TEXTS, "truncate": True, "normalize": True}, 200),
        ("/embed_sparse", {"model": "m3", "inputs": "a"}, 200),
        ("/embed_sparse", {"model": "nope", "inputs": "a"}, 404),
        ("/embed_all", {"model": "m3", "inputs": "a " * 200}, 400),
    ]
    for path, body, expected in calls:
        assert contract.check_request("POST", path, body) == [], (path, body)
        response = await client.post(path, json=body)
        raw = await response.read()
        assert response.status == expected, raw[:300]
        assert contract.check_answer("POST", path, response.status, response.headers["Content-Type"], raw) == []
