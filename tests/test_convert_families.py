"""Conversion beyond BERT, as a user does it: a folder saved by transformers and sentence-transformers
(XLM-RoBERTa as bge-m3 / multilingual-e5 / bge-reranker-v2-m3, Qwen3 as Qwen3-Embedding), random
weights and a real tokenizer, created through /api/create. emberd's vectors are
sentence-transformers' on the same folder, its scores CrossEncoder's, its token ids the Hugging
Face tokenizer's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient
from sentence_transformers import CrossEncoder, SentenceTransformer
from transformers import AutoTokenizer

from tests.conftest import MakeClient
from tests.tiny_models import (
    make_transformers_qwen3_dir,
    make_transformers_qwen3_reranker_dir,
    make_transformers_xlm_roberta_dir,
)

Client = TestClient[Any, Any]
# Varied texts: several scripts, repeated and leading spaces, NFKC-normalised characters (full-width
# letters, a ligature), digits, contractions, a newline and a tab, a character no vocabulary has.
TEXTS = [
    "the sky is blue",
    "Les élèves étudient à l'école.",
    "東京は日本の首都です。",
    "  leading and   repeated   spaces ",
    "ｆｕｌｌｗｉｄｔｈ ﬁne",
    "numbers 12345 and 3.14 symbols!?",
    "I'll say it's\nfine\ttoday",
    "rocket 🚀 launch",
]
MIN_COSINE = 0.9999
QUERY = "why is the sky blue?"
DOCUMENTS = ["the sky is blue", "grass is green", "hello world", "Москва — столица России", "blue blue sky", "the"]
# llama.cpp's GELU (a table of f16 values) against torch's exact one, as in tests/test_rerank.py.
SCORE_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "bge-m3-like": make_transformers_xlm_roberta_dir(root / "bge-m3-like", pooling="cls", seed=1),
        "e5-like": make_transformers_xlm_roberta_dir(root / "e5-like", pooling="mean", seed=2),
        "qwen3-embedding-like": make_transformers_qwen3_dir(root / "qwen3-embedding-like", seed=3),
    }


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_transformers_xlm_roberta_dir(
        tmp_path_factory.mktemp("rerank") / "bge-reranker-like", classifier=True, seed=6
    )


async def post(client: Client, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


async def create(client: Client, name: str, folder: Path) -> tuple[int, Any]:
    return await post(client, "/api/create", {"model": name, "from": str(folder), "quantize": "f32", "stream": False})


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", ["bge-m3-like", "e5-like", "qwen3-embedding-like"])
async def test_vectors_and_token_ids_are_the_hugging_face_ones(
    make_client: MakeClient, folders: dict[str, Path], name: str
) -> None:
    folder = folders[name]
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    client = await make_client({})
    assert (await create(client, name, folder))[0] == 200

    status, body = await post(client, "/api/embed", {"model": name, "input": TEXTS})
    assert status == 200
    cosines = [
        cosine(np.array(vector), reference) for vector, reference in zip(body["embeddings"], expected, strict=True)
    ]
    assert min(cosines) >= MIN_COSINE, cosines
    for text in TEXTS:
        status, tokens = await post(client, "/api/tokenize", {"model": name, "content": text})
        assert (status, tokens["tokens"]) == (200, tokenizer(text)["input_ids"]), text


async def test_qwen3_appends_the_token_its_tokenizer_appends(make_client: MakeClient, folders: dict[str, Path]) -> None:
    """Qwen3-Embedding's post-processor appends <|endoftext|>; tokenizer_config names <|im_end|>."""
    folder = folders["qwen3-embedding-like"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    client = await make_client({})
    assert (await create(client, "qwen", folder))[0] == 200
    status, body = await post(client, "/api/tokenize", {"model": "qwen", "content": "the sky is blue"})
    assert status == 200
    assert body["tokens"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in body["tokens"]
    status, bare = await post(
        client, "/api/tokenize", {"model": "qwen", "content": "the sky is blue", "add_special": False}
    )
    assert bare["tokens"] == body["tokens"][:-1]


async def test_a_sentencepiece_model_without_tokenizer_json_converts_the_same(
    make_client: MakeClient, folders: dict[str, Path], tmp_path: Path
) -> None:
    """A folder with XLM-RoBERTa's sentencepiece.bpe.model and no tokenizer.json (emberd reads the
    protobuf itself): the same ids as Hugging Face's tokenizer, which converts the same file."""
    folder = shutil.copytree(folders["bge-m3-like"], tmp_path / "sentencepiece-only")
    (folder / "tokenizer.json").unlink()
    # The model transformers converted the folder's tokenizer.json from (tests/tiny_models.py).
    shutil.copy(folders["bge-m3-like"].parent / "bge-m3-like-sentencepiece" / "sentencepiece.bpe.model", folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folders["bge-m3-like"]))
    client = await make_client({})
    assert (await create(client, "spm", folder))[0] == 200
    for text in TEXTS:
        status, tokens = await post(client, "/api/tokenize", {"model": "spm", "content": text})
        assert (status, tokens["tokens"]) == (200, tokenizer(text)["input_ids"]), text


async def test_an_xlm_roberta_cross_encoder_scores_as_cross_encoder(
    make_client: MakeClient, reranker_folder: Path
) -> None:
    model = CrossEncoder(str(reranker_folder), device="cpu", activation_fn=torch.nn.Identity())
    expected = [float(score) for score in model.predict([(QUERY, document) for document in DOCUMENTS])]
    assert np.diff(np.sort(expected)).min() > 10 * SCORE_TOLERANCE  # far apart: the order means something
    client = await make_client({})
    assert (await create(client, "reranker", reranker_folder))[0] == 200
    status, body = await post(client, "/api/rerank", {"model": "reranker", "query": QUERY, "documents": DOCUMENTS})
    assert status == 200
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=SCORE_TOLERANCE)
    _, shown = await post(client, "/api/show", {"model": "reranker"})
    assert shown["capabilities"] == ["rerank"]


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def _without_sentence_transformers(folder: Path) -> None:
    (folder / "modules.json").unlink()
    shutil.rmtree(folder / "1_Pooling")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda folder: _write_json(folder / "config.json", {"model_type": "gpt2", "architectures": ["GPT2Model"]}),
            "emberd converts BERT, XLM-RoBERTa, Qwen3, ModernBERT, NomicBert models",
        ),
        (_without_sentence_transformers, "is a chat model, not an embedding model"),
        (
            lambda folder: _write_json(
                folder / "modules.json",
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                ],
            ),
            "module 'sentence_transformers.models.Dense' cannot run in llama.cpp",
        ),
        (
            lambda folder: _write_json(folder / "1_Pooling" / "config.json", {"pooling_mode": "max"}),
            "pooling 'max' in 1_Pooling/config.json is not supported",
        ),
    ],
)
async def test_folders_that_cannot_be_converted_get_a_clear_400(
    make_client: MakeClient, folders: dict[str, Path], tmp_path: Path, change: Any, message: str
) -> None:
    folder = shutil.copytree(folders["qwen3-embedding-like"], tmp_path / "folder")
    change(folder)
    client = await make_client({})
    status, body = await create(client, "bad", folder)
    assert status == 400
    assert message in body["error"]


# Qwen3-Reranker's prompt, as its model card lays out a pair; the score is P("yes") against "no".
QWEN3_RERANK_PROMPT = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct"
    ' provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


async def test_a_qwen3_reranker_scores_as_transformers(make_client: MakeClient, tmp_path: Path) -> None:
    from transformers import Qwen3ForCausalLM

    folder = make_transformers_qwen3_reranker_dir(tmp_path / "qwen3-reranker-tiny", seed=5)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = Qwen3ForCausalLM.from_pretrained(str(folder)).eval()
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    expected = []
    for document in DOCUMENTS:
        prompt = QWEN3_RERANK_PROMPT.format(query=QUERY, document=document)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        expected.append(float(torch.softmax(logits[[yes, no]], dim=0)[0]))
    assert max(expected) - min(expected) > 0.1  # the documents' scores differ: a wrong head would show
    client = await make_client({})
    assert (await create(client, "qwen3-reranker", folder))[0] == 200
    status, body = await post(
        client, "/api/rerank", {"model": "qwen3-reranker", "query": QUERY, "documents": DOCUMENTS}
    )
    assert status == 200
    scores = {result["index"]: result["relevance_score"] for result in body["results"]}
    assert [scores[index] for index in range(len(DOCUMENTS))] == pytest.approx(expected, abs=1e-3)
