"""TEI's POST /embed_all (every token's vector) and POST /embed_sparse (BGE-M3's lexical weights),
each with a `model` field, since emberd serves several models (errors in TEI's body, see
common.error_body); and /api/embed's `outputs` (dense, sparse, colbert), from one decode.

*emberd goes further:* TEI serves one model a process and refuses /embed_sparse but for a SPLADE
model; here any stored model gives token vectors, and a BGE-M3 with its heads sidecar (see
daemon.heads) gives sparse weights, all from llama.cpp's pooling-NONE decode in the runner.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from aiohttp import web

from daemon.api.common import (
    SETTINGS,
    TRUNCATED_HEADER,
    admitted,
    check_input_count,
    json_response,
    read_model,
)
from daemon.api.embedding import Embedded, embed_inputs, stored_or_pulled
from daemon.api.models import EmbedRequest, SparseRequest, TEIRequest, TokenVectorsRequest
from daemon.errors import InvalidInput
from daemon.heads import Heads, colbert_vectors, load_heads, pool_tokens, sparse_weights
from daemon.store import StoredModel
from daemon.vectors import check_finite, finish_embeddings, normalize_rows


def keeps_end(truncation_direction: str | None) -> bool:
    """TEI's truncation_direction: left cuts an input's start, keeping its end."""
    return (truncation_direction or "right").lower() == "left"


def checked_texts(request: web.Request, body: TEIRequest) -> tuple[str, list[str]]:
    """The model's name and the texts of a TEI request, or InvalidInput / 413 for what is missing or
    too many."""
    name = body.model_name
    if not name.strip():
        raise InvalidInput("model is required")
    if body.inputs is None:
        raise InvalidInput("inputs is required")
    texts = body.texts
    check_input_count(len(texts), request.app[SETTINGS])
    return name, texts


async def token_vectors(request: web.Request, name: str, texts: list[str], body: TEIRequest) -> Embedded:
    """Every token's vector of each text from one pooling-NONE decode, checked finite."""
    embedded = await embed_inputs(
        request,
        name,
        texts,
        body.truncate is True,
        {},
        None,
        body.prompt_name,
        keep_end=keeps_end(body.truncation_direction),
        tokens=True,
    )
    assert embedded.token_vectors is not None
    for vectors in embedded.token_vectors:
        check_finite(vectors)
    return embedded


@admitted(queue_slot=True)
async def embed_all(request: web.Request) -> web.Response:
    """{"inputs", "model", "truncate", "normalize"} -> per input, per token (special tokens
    included), its vector: as the model gives it, or unit length with normalize."""
    body = await read_model(request, TokenVectorsRequest)
    name, texts = checked_texts(request, body)
    if not texts:
        return json_response([])
    embedded = await token_vectors(request, name, texts, body)
    assert embedded.token_vectors is not None
    answer = [normalize_rows(vectors) if body.normalize else vectors for vectors in embedded.token_vectors]
    return json_response(answer, headers=embedded.provenance)


@admitted(queue_slot=True)
async def embed_sparse(request: web.Request) -> web.Response:
    """{"inputs", "model", "truncate"} -> per input, [{"index": token id, "value": weight}], by
    token id: BGE-M3's sparse head on each token (see heads.sparse_weights)."""
    body = await read_model(request, SparseRequest)
    name, texts = checked_texts(request, body)
    heads = await heads_of(await stored_or_pulled(request.app, name), name, "/embed_sparse")
    if not texts:
        return json_response([])
    embedded = await token_vectors(request, name, texts, body)
    return json_response(sparse_answer(heads, embedded), headers=embedded.provenance)


def sparse_answer(heads: Heads, embedded: Embedded) -> list[list[dict[str, Any]]]:
    """Per input, its sparse weights as TEI writes them: [{"index": token id, "value": weight}]."""
    assert embedded.token_vectors is not None
    return [
        [{"index": index, "value": value} for index, value in sparse_weights(heads, vectors, ids, embedded.special_ids)]
        for vectors, ids in zip(embedded.token_vectors, embedded.token_ids, strict=True)
    ]


async def heads_of(stored: StoredModel, name: str, wanted: str) -> Heads:
    """A model's BGE-M3 heads (read off the loop, cached by blob); InvalidInput naming the model
    when it has none."""
    if stored.heads is None:
        raise InvalidInput(
            f"{name} has no sparse and ColBERT heads: {wanted} needs a BGE-M3 model created from a folder with"
            " sparse_linear.pt and colbert_linear.pt, or pulled by an alias with heads_repo"
        )
    return await asyncio.get_running_loop().run_in_executor(None, load_heads, stored.heads.blob_path)


async def embed_outputs(
    request: web.Request, body: EmbedRequest, options: dict[str, Any], keep_alive_s: float | None, started_ns: int
) -> web.Response:
    """/api/embed with `outputs` naming sparse or colbert: every token's vector from one decode, and
    from them the dense vector (pooled as the model pools, then normalised and cut as /api/embed
    does), the sparse weights and the ColBERT vectors (daemon.heads)."""
    name, texts = body.model_name, body.texts
    outputs = set(body.outputs or ())
    if not outputs:
        raise InvalidInput("outputs must name at least one of dense, sparse and colbert")
    if (body.embedding_type or "float").lower() != "float":
        raise InvalidInput("embedding_type goes with dense vectors alone: leave it out with sparse or colbert outputs")
    if body.split_long_inputs:
        raise InvalidInput("split_long_inputs does not go with sparse or colbert outputs: an input is one decode")
    stored = await stored_or_pulled(request.app, name)
    heads = await heads_of(stored, name, f"outputs {sorted(outputs - {'dense'})}")
    embedded = await embed_inputs(
        request,
        name,
        texts,
        body.truncate is not False,
        options,
        keep_alive_s,
        body.prompt_name,
        task=body.task,
        tokens=True,
    )
    assert embedded.token_vectors is not None
    for vectors in embedded.token_vectors:
        check_finite(vectors)
    answer: dict[str, Any] = {"model": name, "embeddings": []}
    if "dense" in outputs:
        pooled = np.stack([pool_tokens(vectors, stored.facts.pooling_type) for vectors in embedded.token_vectors])
        answer["embeddings"] = finish_embeddings(pooled, body.dimensions, body.normalize is not False)
    answer.update(
        total_duration=time.perf_counter_ns() - started_ns,
        load_duration=embedded.load_duration_ns,
        prompt_eval_count=embedded.token_count,
    )
    if "sparse" in outputs:
        answer["sparse"] = sparse_answer(heads, embedded)
    if "colbert" in outputs:
        answer["colbert"] = [colbert_vectors(heads, vectors) for vectors in embedded.token_vectors]
    return json_response(answer, headers={TRUNCATED_HEADER: str(embedded.truncated_count), **embedded.provenance})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/embed_all", embed_all)
    app.router.add_post("/embed_sparse", embed_sparse)
