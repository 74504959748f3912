"""ModernBERT conversion as a user does it: folders saved by transformers and sentence-transformers
(mean pooling as modernbert-embed-base, CLS as gte-modernbert-base with the Hub's config layout),
random weights, a byte-level BPE tokenizer laid out as ModernBERT's, local windows shorter than the
texts so that the local and global layers differ, created through /api/create. emberd's vectors are
sentence-transformers' on the same folder, its token ids the Hugging Face tokenizer's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from tests.conftest import MakeClient
from tests.test_convert_families import MIN_COSINE, TEXTS, cosine, create, post
from tests.tiny_models import MODERN_BERT_ADDED, make_transformers_modern_bert_dir

# The shared texts and one with a token ModernBERT's tokenizer adds (not special: matched whole).
MODERN_BERT_TEXTS = [*TEXTS, f"write to {MODERN_BERT_ADDED} today"]
FULL, SLIDING = "full_attention", "sliding_attention"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modern-bert")
    return {
        # transformers 5's config: layer_types (global, local, local) and rope_parameters.
        "modernbert-embed-like": make_transformers_modern_bert_dir(root / "modernbert-embed-like", "mean", seed=1),
        # The Hub's config: global_attn_every_n_layers 3, global_rope_theta, local_rope_theta.
        "gte-modernbert-like": make_transformers_modern_bert_dir(
            root / "gte-modernbert-like", "cls", seed=2, hub_config=True
        ),
        # A local first layer: not every n-th layer global, so a flag per layer.
        "local-first": make_transformers_modern_bert_dir(
            root / "local-first", "mean", seed=3, layer_types=[SLIDING, FULL, SLIDING]
        ),
        # No local layer: no window written (llama.cpp aborts on a window no layer uses).
        "all-global": make_transformers_modern_bert_dir(root / "all-global", "cls", seed=4, layer_types=[FULL] * 3),
    }


@pytest.mark.parametrize("name", ["modernbert-embed-like", "gte-modernbert-like", "local-first", "all-global"])
async def test_vectors_and_token_ids_are_the_hugging_face_ones(
    make_client: MakeClient, folders: dict[str, Path], name: str
) -> None:
    folder = folders[name]
    expected = SentenceTransformer(str(folder), device="cpu").encode(MODERN_BERT_TEXTS, convert_to_numpy=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    client = await make_client({})
    assert (await create(client, name, folder))[0] == 200

    status, body = await post(client, "/api/embed", {"model": name, "input": MODERN_BERT_TEXTS})
    assert status == 200
    cosines = [
        cosine(np.array(vector), reference) for vector, reference in zip(body["embeddings"], expected, strict=True)
    ]
    assert min(cosines) >= MIN_COSINE, cosines
    for text in MODERN_BERT_TEXTS:
        status, tokens = await post(client, "/api/tokenize", {"model": name, "content": text})
        assert (status, tokens["tokens"]) == (200, tokenizer(text)["input_ids"]), text


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tokenizer(folder: Path, **changes: Any) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"].update(changes)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda folder: _edit_json(folder / "config.json", norm_bias=True), "norm_bias set"),
        (
            lambda folder: _edit_json(folder / "config.json", layer_types=[SLIDING] * 3),
            "every layer attends locally",
        ),
        (
            lambda folder: _edit_json(folder / "config.json", architectures=["ModernBertForSequenceClassification"]),
            "ModernBERT cross-encoders (rerankers) are not converted",
        ),
        (lambda folder: _edit_json(folder / "config.json", hidden_activation="tanh"), "hidden_activation 'tanh'"),
        (lambda folder: _edit_tokenizer(folder, add_prefix_space=True), "pre-tokenizer is not GPT-2's"),
    ],
)
async def test_folders_that_cannot_be_converted_get_a_clear_400(
    make_client: MakeClient, folders: dict[str, Path], tmp_path: Path, change: Any, message: str
) -> None:
    folder = shutil.copytree(folders["modernbert-embed-like"], tmp_path / "folder")
    change(folder)
    client = await make_client({})
    status, body = await create(client, "bad", folder)
    assert status == 400
    assert message in body["error"]
