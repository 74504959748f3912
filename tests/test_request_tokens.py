"""The tokens of one request: capped by max_request_tokens before anything is tokenized (413 with
the numbers), held compactly and counted by the runner, and tokenized without holding up the
requests sent after it to the same runner (a stand-in engine, through the real pipe protocol)."""

from __future__ import annotations

import io
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest

from daemon.api.embedding import request_tokens_bound
from daemon.config import Settings
from daemon.errors import InvalidInput
from daemon.runner.engine import TokenizedInput
from daemon.runner.protocol import encode_frame, read_frame_blocking
from daemon.runner.worker import _Work, _Writer, serve, serve_vocabulary
from tests.conftest import MakeClient, scheduler_of
from tests.test_worker import FakeEngine

HUGE_TEXT = "h" * 100_000  # a request far too large for the reader thread to tokenize itself


# -- max_request_tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "limit_tokens", "split", "expected"),
    [
        ([], 512, False, 0),
        (["abc"], 512, False, 3 + 8),  # its bytes, and at most 8 special tokens around them
        (["é"], 512, False, 2 + 8),  # UTF-8 bytes, not characters
        (["abc", "x" * 1000], 512, False, 11 + 512),  # a long input counts as its context: it is cut
        (["abc", "x" * 1000], 512, True, 11 + 1008),  # unless it is split into windows
        ([[1, 2, 3]], 512, False, 3 + 8),  # token ids count as themselves
        ([{"query": "ab", "document": "cd"}], 512, False, 4 + 16),  # a pair has separators too
    ],
)
def test_the_bound_of_a_request_sums_its_inputs_bounds(
    inputs: list[Any], limit_tokens: int, split: bool, expected: int
) -> None:
    assert request_tokens_bound(inputs, limit_tokens, split) == expected


def test_the_default_admits_max_inputs_inputs_of_a_full_8192_token_context() -> None:
    settings = Settings()
    assert settings.max_inputs == 2048
    full_contexts = ["x" * 10_000] * 2048  # each longer than its 8,192-token context, so cut to it
    assert request_tokens_bound(full_contexts, 8192, False) == 2048 * 8192 <= settings.max_request_tokens


async def post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


@pytest.mark.parametrize(
    ("path", "body", "bound"),
    [
        # Two inputs of 30 bytes: 2 x (30 + 8) = 76 tokens at most (each within the 64-token context).
        ("/api/embed", {"model": "tiny", "input": ["a" * 30, "b" * 30]}, 76),
        ("/v1/embeddings", {"model": "tiny", "input": ["a" * 30, "b" * 30]}, 76),
        ("/api/embeddings", {"model": "tiny", "prompt": "a" * 50}, 58),
        ("/api/tokenize", {"model": "tiny", "content": "a" * 68}, 76),
        ("/api/detokenize", {"model": "tiny", "tokens": [5] * 76}, 76),
    ],
)
async def test_a_request_over_max_request_tokens_is_a_413_with_the_numbers(
    make_client: MakeClient, tiny_gguf: Path, path: str, body: dict[str, Any], bound: int
) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_request_tokens=50)
    status, answer = await post(client, path, body)
    assert status == 413
    message = answer["error"]["message"] if path.startswith("/v1/") else answer["error"]
    assert f"up to {bound} tokens" in message and "the limit is 50 (max_request_tokens)" in message, message
    assert scheduler_of(client).loaded() == []  # refused before anything was loaded or tokenized


async def test_a_request_at_max_request_tokens_is_served(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_request_tokens=76)
    status, answer = await post(client, "/api/embed", {"model": "tiny", "input": ["a" * 30, "b" * 30]})
    assert status == 200 and len(answer["embeddings"]) == 2


async def test_a_reranker_request_over_max_request_tokens_is_a_413(
    make_client: MakeClient, reranker_gguf: Path
) -> None:
    client = await make_client({"ranker": reranker_gguf}, max_request_tokens=50)
    body = {"model": "ranker", "query": "q" * 5, "documents": ["d" * 10, "e" * 10]}
    status, answer = await post(client, "/api/rerank", body)
    assert status == 413
    assert "up to 62 tokens" in answer["error"], answer  # 2 x (5 + 10 + 16)


# -- the runner holds tokens compactly, and counts them ---------------------------------------------


class WideEngine(FakeEngine):
    """Token ids past 256, which CPython does not share: a list holds an int object for each."""

    def tokenize(
        self, item: str, truncate: bool, limit: int | None, split: bool, keep_end: bool = False
    ) -> TokenizedInput:
        return TokenizedInput([[1000 + ord(character) for character in item]], False)


def test_queued_tokens_are_held_as_int32_and_counted() -> None:
    engine = WideEngine(hold_until_accepted=0)
    work = _Work(engine, _Writer(io.BytesIO()))
    try:
        texts = ["abcdefgh" * 12_500] * 8  # 800,000 tokens
        message = {"type": "embed", "id": 1, "texts": texts, "truncate": True}
        tracemalloc.start()
        try:
            work.accept(message)
            held_bytes, _peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert work.held_tokens == 800_000
        sequences = work.requests[1].pending
        assert all(sequence.tokens.dtype == np.int32 for sequence in sequences)
        assert sum(sequence.tokens.nbytes for sequence in sequences) == 4 * 800_000
        # Lists of ints would hold 36 bytes a token (an int object and a pointer): 28.8 MB here.
        assert held_bytes < 6 * 800_000, held_bytes
        work.accept({"type": "embed", "id": 2, "texts": ["xyz"], "truncate": True})
        assert work.held_tokens == 800_003
        work.handle({"type": "cancel", "id": 1})  # its tokens leave with it
        assert work.held_tokens == 3
        with work.lock:
            batch = work.take(quick=False)
            work.deliver(batch, np.zeros((len(batch), 2), dtype=np.float32))
        assert work.held_tokens == 0 and work.requests == {}
    finally:
        work.backlog.close()


# -- one huge request does not hold up the others -----------------------------------------------------


class AnswerWatch(_Writer):
    """Sets `answered` once the answer to message `watched` was written."""

    def __init__(self, stream: BinaryIO, watched: int) -> None:
        super().__init__(stream)
        self.watched = watched
        self.answered = threading.Event()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        super().send(header, payload)
        if header.get("id") == self.watched:
            self.answered.set()


class HeldTokenizer:
    """Tokenizing HUGE_TEXT waits until the short request's answer was written: it can only be
    written meanwhile if the huge one is not tokenized on the thread that reads the requests."""

    def __init__(self, writer: AnswerWatch) -> None:
        self.writer = writer
        self.answered_first: bool | None = None

    def hold(self, text: str) -> None:
        if text == HUGE_TEXT:
            self.answered_first = self.writer.answered.wait(10)


class HeldEngine(FakeEngine):
    def __init__(self, held: HeldTokenizer) -> None:
        super().__init__(hold_until_accepted=0)
        self.held = held
        self.vocabulary = HeldVocabulary(held)

    def tokenize(
        self, item: str, truncate: bool, limit: int | None, split: bool, keep_end: bool = False
    ) -> TokenizedInput:
        self.held.hold(item)
        return super().tokenize(item, truncate, limit, split)


class HeldVocabulary:
    def __init__(self, held: HeldTokenizer) -> None:
        self.held = held

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        self.held.hold(text)
        if not text:
            raise InvalidInput("nothing to tokenize")
        return [ord(character) for character in text[:4]]

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(token) for token in tokens)


def serve_through_a_pipe(target: Any, engine: Any, writer: _Writer, frames: list[bytes]) -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as stdin, open(write_end, "wb") as to_runner:
        serving = threading.Thread(target=target, args=(engine, stdin, writer))
        serving.start()
        for frame in frames:
            to_runner.write(frame)
            to_runner.flush()
        to_runner.close()
        serving.join(30)
    assert not serving.is_alive()


def answers_in_order(output: io.BytesIO) -> list[dict[str, Any]]:
    output.seek(0)
    headers = []
    while (frame := read_frame_blocking(output)) is not None:
        headers.append(frame[0])
    return headers


def test_a_huge_embed_request_does_not_hold_up_a_short_one_sent_after_it() -> None:
    output = io.BytesIO()
    writer = AnswerWatch(output, watched=2)
    held = HeldTokenizer(writer)
    frames = [
        encode_frame({"type": "embed", "id": 1, "texts": [HUGE_TEXT], "truncate": True}),
        encode_frame({"type": "embed", "id": 2, "texts": ["why?"], "truncate": True}),
        encode_frame({"type": "tokenize", "id": 3, "text": "a query", "add_special": True}),
    ]
    serve_through_a_pipe(serve, HeldEngine(held), writer, frames)
    assert held.answered_first is True, "the short request waited for the huge one to be tokenized"
    answers = answers_in_order(output)
    order = [header["id"] for header in answers]
    assert order.index(2) < order.index(1)  # the short one answered first (id 3 may come either side of 1)
    assert sorted((header["id"], header["type"]) for header in answers) == [(1, "result"), (2, "result"), (3, "tokens")]


@pytest.mark.parametrize("target", [serve, serve_vocabulary])
def test_a_huge_tokenize_request_does_not_hold_up_a_short_one_sent_after_it(target: Any) -> None:
    output = io.BytesIO()
    writer = AnswerWatch(output, watched=2)
    held = HeldTokenizer(writer)
    engine = HeldEngine(held)
    frames = [
        encode_frame({"type": "tokenize", "id": 1, "text": HUGE_TEXT, "add_special": True}),
        encode_frame({"type": "tokenize", "id": 2, "text": "a query", "add_special": True}),
        encode_frame({"type": "tokenize", "id": 3, "text": "", "add_special": True}),
    ]
    # Both serve an InputTokenizer (the engine): its vocabulary answers tokenize and detokenize.
    serve_through_a_pipe(target, engine, writer, frames)
    assert held.answered_first is True, "the short request waited for the huge one to be tokenized"
    answers = answers_in_order(output)
    order = [header["id"] for header in answers]
    assert order.index(2) < order.index(1)  # the short one answered first (id 3 may come either side of 1)
    assert {"type": "tokens", "id": 1, "tokens": [ord("h")] * 4} in answers
    assert {"type": "tokens", "id": 2, "tokens": [ord(c) for c in "a qu"]} in answers
    assert {"type": "error", "id": 3, "kind": "invalid_input", "message": "nothing to tokenize"} in answers


def test_a_huge_request_cancelled_while_it_is_tokenized_is_never_answered() -> None:
    output = io.BytesIO()
    writer = AnswerWatch(output, watched=3)
    held = HeldTokenizer(writer)  # the huge request is tokenized once the cancel was read, and request 3 answered
    frames = [
        encode_frame({"type": "embed", "id": 1, "texts": [HUGE_TEXT], "truncate": True}),
        encode_frame({"type": "cancel", "id": 1}),
        encode_frame({"type": "embed", "id": 3, "texts": ["why?"], "truncate": True}),
    ]
    serve_through_a_pipe(serve, HeldEngine(held), writer, frames)
    assert held.answered_first is True
    assert [(header["id"], header["type"]) for header in answers_in_order(output)] == [(3, "result")]
