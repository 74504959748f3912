"""The runner's serving loop (daemon.runner.worker.serve) with an engine that stands in for llama.cpp:
frames in, frames out, through the real pipe protocol."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from daemon.runner.engine import TokenizedInput
from daemon.runner.protocol import RunnerFacts, encode_frame, read_frame_blocking
from daemon.runner.worker import _Writer, serve

POISON = 666  # a token id the fake llama.cpp fails any decode holding it on


class FakeEngine:
    """Token ids are the characters' code points; a vector is [sum of its tokens, count]. The first
    decode waits until `hold_until_accepted` requests were tokenized, so the next one packs them."""

    def __init__(self, hold_until_accepted: int) -> None:
        self.facts = RunnerFacts(
            n_embd=2, trained_context=512, limit_tokens=512, batch_tokens=256, n_ubatch=512,
            max_sequences=64, pooling_type=1, gpu_offload=False, pid=0,
        )  # fmt: skip
        self.threads = 2
        self.vocabulary = None
        self.decodes: list[list[list[int]]] = []
        self._accepted = 0
        self._hold_until_accepted = hold_until_accepted
        self._all_accepted = threading.Event()

    def tokenize(
        self, item: str, truncate: bool, limit: int | None, split: bool, keep_end: bool = False
    ) -> TokenizedInput:
        self._accepted += 1
        if self._accepted >= self._hold_until_accepted:
            self._all_accepted.set()
        return TokenizedInput([[ord(character) for character in item]], False)

    def embed_batch(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        if not self.decodes:
            assert self._all_accepted.wait(10), "the requests were not all read"
        self.decodes.append([list(tokens) for tokens in sequences])
        if any(POISON in tokens for tokens in sequences):
            raise RuntimeError("llama_decode returned -1")
        return np.array([[sum(tokens), len(tokens)] for tokens in sequences], dtype=np.float32)


def run(engine: FakeEngine, requests: list[list[str]]) -> dict[int, tuple[dict[str, Any], bytes]]:
    """Serve these embed requests (ids 1, 2, ...) until stdin ends; the answers by id."""
    frames = b"".join(
        encode_frame({"type": "embed", "id": index, "texts": texts, "truncate": True})
        for index, texts in enumerate(requests, start=1)
    )
    output = io.BytesIO()
    serve(engine, io.BytesIO(frames), _Writer(output))
    output.seek(0)
    answers = {}
    while (frame := read_frame_blocking(output)) is not None:
        answers[frame[0]["id"]] = frame
    return answers


def test_a_decode_that_fails_for_one_request_fails_that_request_alone() -> None:
    engine = FakeEngine(hold_until_accepted=4)
    answers = run(engine, [["warm"], ["ok", "fine"], ["bad " + chr(POISON)], ["good"]])
    assert answers[3][0]["type"] == "error" and "llama_decode returned -1" in answers[3][0]["message"]
    for request_id, texts in ((1, ["warm"]), (2, ["ok", "fine"]), (4, ["good"])):
        header, payload = answers[request_id]
        assert header["type"] == "result", header
        vectors = np.frombuffer(payload, dtype="<f4").reshape(header["rows"], header["dims"])
        assert vectors.tolist() == [[sum(map(ord, text)), len(text)] for text in texts]
    # The requests were packed into one decode, which failed; each was then decoded alone.
    packed = next(decode for decode in engine.decodes if any(POISON in tokens for tokens in decode))
    assert len(packed) >= 3
    assert [[ord(character) for character in "bad " + chr(POISON)]] in engine.decodes


class QuickLaneEngine(FakeEngine):
    """A main context that holds a long decode until the quick lane has answered a short input."""

    def __init__(self) -> None:
        super().__init__(hold_until_accepted=0)
        self.facts = dataclasses.replace(self.facts, quick_lane_tokens=64)
        self.long_decode_started = threading.Event()
        self.quick_decoded = threading.Event()
        self.quick: list[list[list[int]]] = []

    def embed_batch(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        self.long_decode_started.set()
        assert self.quick_decoded.wait(10), "the quick lane did not answer while the long decode ran"
        return super().embed_batch(sequences)

    def embed_quick(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        self.quick.append([list(tokens) for tokens in sequences])
        self.quick_decoded.set()
        return np.array([[sum(tokens), len(tokens)] for tokens in sequences], dtype=np.float32)


def test_a_short_input_is_answered_on_the_quick_lane_while_a_long_decode_runs() -> None:
    engine = QuickLaneEngine()
    document, query = "a long document " * 8, "why?"
    read_end, write_end = os.pipe()
    output = io.BytesIO()
    with open(read_end, "rb") as stdin, open(write_end, "wb") as to_runner:
        serving = threading.Thread(target=serve, args=(engine, stdin, _Writer(output)))
        serving.start()
        to_runner.write(encode_frame({"type": "embed", "id": 1, "texts": [document], "truncate": True}))
        to_runner.flush()
        assert engine.long_decode_started.wait(10)
        # The main context is busy with the document: the query goes to the quick lane.
        to_runner.write(encode_frame({"type": "embed", "id": 2, "texts": [query], "truncate": True}))
        to_runner.flush()
        assert engine.quick_decoded.wait(10)
        # A second document, after the query: the main context again.
        to_runner.write(encode_frame({"type": "embed", "id": 3, "texts": [document], "truncate": True}))
        to_runner.close()
        serving.join(10)
    assert not serving.is_alive()
    assert engine.quick == [[[ord(character) for character in query]]]
    output.seek(0)
    answers = []
    while (frame := read_frame_blocking(output)) is not None:
        answers.append((frame[0]["id"], frame[0]["quick_decodes"]))
    assert sorted(answers) == [(1, []), (2, [[4, 1]]), (3, [])]  # (tokens, sequences) of the quick decode
