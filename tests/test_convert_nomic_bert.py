"""NomicBert conversion (nomic-embed-text v1, v1.5) as a user does it: a random NomicBertModel saved
by transformers and sentence-transformers (mean pooling, the tiny WordPiece vocabulary, an embedding
with rows past it), the same folder with the Hub's remote-code config, and with transformers' own
separate q/k/v weight names, created through /api/create. emberd's vectors are sentence-transformers'
on the folder (the Hub one: on the folder it was made from), its token ids the Hugging Face tokenizer's."""

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
from tests.tiny_models import (
    NOMIC_BERT_ROPE_THETA,
    as_hub_nomic_bert_dir,
    as_separate_qkv_nomic_bert_dir,
    make_transformers_nomic_bert_dir,
)

# The shared texts and a longer one: RoPE's base shows more over more positions.
NOMIC_TEXTS = [*TEXTS, "why is the sky blue? the sky is blue because the world is blue, and the grass is green"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nomic-bert")
    native = make_transformers_nomic_bert_dir(root / "nomic-native", seed=1)
    return {
        # transformers 5's config names; the Hub's weight names (fused Wqkv), as save_pretrained writes them.
        "nomic-native": native,
        # nomic-embed-text-v1.5's config.json: n_embd, rotary_emb_base, n_positions 8192.
        "nomic-hub": as_hub_nomic_bert_dir(native, root / "nomic-hub"),
        # transformers' own weight names: q_proj, k_proj, v_proj apart, up_proj, gate_proj.
        "nomic-separate": as_separate_qkv_nomic_bert_dir(native, root / "nomic-separate"),
    }


@pytest.fixture(scope="module")
def expected(folders: dict[str, Path]) -> np.ndarray:
    """sentence-transformers' vectors on the native folder: all three folders hold its weights."""
    return SentenceTransformer(str(folders["nomic-native"]), device="cpu").encode(NOMIC_TEXTS, convert_to_numpy=True)


@pytest.mark.parametrize("name", ["nomic-native", "nomic-hub", "nomic-separate"])
async def test_vectors_and_token_ids_are_the_hugging_face_ones(
    make_client: MakeClient, folders: dict[str, Path], expected: np.ndarray, name: str
) -> None:
    folder = folders[name]
    if name != "nomic-hub":  # transformers reads this folder itself (the Hub's config needs remote code)
        own = SentenceTransformer(str(folder), device="cpu").encode(NOMIC_TEXTS, convert_to_numpy=True)
        assert np.allclose(own, expected, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(folders["nomic-native"]))
    client = await make_client({})
    assert (await create(client, name, folder))[0] == 200

    status, body = await post(client, "/api/embed", {"model": name, "input": NOMIC_TEXTS})
    assert status == 200
    cosines = [
        cosine(np.array(vector), reference) for vector, reference in zip(body["embeddings"], expected, strict=True)
    ]
    assert min(cosines) >= MIN_COSINE, cosines
    for text in NOMIC_TEXTS:
        status, tokens = await post(client, "/api/tokenize", {"model": name, "content": text})
        assert (status, tokens["tokens"]) == (200, tokenizer(text)["input_ids"]), text


@pytest.mark.parametrize(
    ("name", "context"),
    [
        ("nomic-native", 512),  # max_position_embeddings
        ("nomic-hub", 2048),  # n_positions 8192, max_trained_positions 2048: llama.cpp's converter writes 2048
    ],
)
async def test_the_context_and_rope_base_are_nomic_embed_texts(
    make_client: MakeClient, folders: dict[str, Path], name: str, context: int
) -> None:
    client = await make_client({})
    assert (await create(client, name, folders[name]))[0] == 200
    status, shown = await post(client, "/api/show", {"model": name})
    assert status == 200
    info = shown["model_info"]
    assert info["general.architecture"] == "nomic-bert"
    assert info["nomic-bert.context_length"] == context
    assert info["nomic-bert.rope.freq_base"] == NOMIC_BERT_ROPE_THETA


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        # nomic-embed-text-v2-moe's layout
        ("nomic-hub", {"moe_every_n_layers": 2, "num_experts": 8}, "mixture-of-experts layers"),
        ("nomic-hub", {"activation_function": "gelu"}, "activation 'gelu' is not converted"),
        ("nomic-native", {"hidden_act": "gelu"}, "activation 'gelu' is not converted"),
        ("nomic-hub", {"rotary_emb_interleaved": True}, "rotary_emb_interleaved is True"),
        ("nomic-hub", {"qkv_proj_bias": True}, "qkv_proj_bias is True"),
        ("nomic-hub", {"prenorm": True}, "prenorm is True"),
        (
            "nomic-native",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 2.0}},
            "RoPE scaling is not converted",
        ),
        ("nomic-native", {"architectures": ["NomicBertForSequenceClassification"]}, "classifiers are not converted"),
        ("nomic-hub", {"n_embd": None}, "config.json lacks n_embd"),
        ("nomic-native", {"vocab_size": 50}, "more tokens than the embedding has rows"),
    ],
)
async def test_folders_that_cannot_be_converted_get_a_clear_400(
    make_client: MakeClient,
    folders: dict[str, Path],
    tmp_path: Path,
    name: str,
    changes: dict[str, Any],
    message: str,
) -> None:
    folder = shutil.copytree(folders[name], tmp_path / "folder")
    _edit_json(folder / "config.json", **changes)
    client = await make_client({})
    status, body = await create(client, "bad", folder)
    assert status == 400
    assert message in body["error"]
