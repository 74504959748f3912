"""The runner child: `python -m daemon.runner.worker CONFIG_JSON`.

It owns one llama.cpp model. A reader thread takes requests off stdin; the main thread tokenizes
them and packs the sequences of the waiting requests into decodes under the token budget, so
concurrent requests share batches; requests take turns, shortest first (see take_batch), so a short
query never waits for a huge request to finish. If llama.cpp aborts, only this process dies.
Closing stdin asks it to finish what it holds and exit: the daemon alone decides when a runner
stops, so SIGINT, SIGTERM and SIGHUP sent to the whole process group (by a terminal or systemd)
are ignored, and the runner dies with the daemon if the daemon is killed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, overload

import numpy as np
import orjson

from daemon.errors import ContextExceeded, InvalidInput
from daemon.options import LlamaParams
from daemon.runner.batching import OVERDUE_AFTER_DECODES, QueuedRequest, take_batch
from daemon.runner.protocol import GROUP_SIGNALS, encode_frame, read_frame_blocking

_END = None
VOCABULARY_MESSAGES = ("tokenize", "detokenize")
_PR_SET_PDEATHSIG = 1


@dataclass
class _Sequence:
    row: int
    tokens: list[int]


class _PendingLengths(Sequence[int]):
    """The token counts of a request's sequences not decoded yet, without copying them."""

    def __init__(self, pending: list[_Sequence], start: int) -> None:
        self._pending = pending
        self._start = start

    def __len__(self) -> int:
        return len(self._pending) - self._start

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...
    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        if isinstance(index, slice):
            return [len(s.tokens) for s in self._pending[self._start :][index]]
        return len(self._pending[self._start + index].tokens)


@dataclass
class _Request:
    request_id: int
    output: np.ndarray
    remaining: int
    pending: list[_Sequence] = field(default_factory=list)  # shortest first
    next_pending: int = 0  # pending[next_pending:] are not decoded yet
    passed_over: int = 0  # decodes run in a row without any of its sequences
    token_count: int = 0
    truncated: int = 0
    first_decode_s: float | None = None  # perf_counter at the start of its first decode
    windows: list[int] = field(default_factory=list)  # per input: 1, or the windows a long one took
    weights: np.ndarray | None = None  # tokens of the windows pooled so far, per input (split inputs)

    def add(self, sequence: _Sequence, vector: np.ndarray) -> None:
        """A sequence's vector into its input's row: as it is, or weighted by its tokens when the
        input was split into windows (the mean is taken in finish_rows)."""
        if self.windows[sequence.row] == 1:
            self.output[sequence.row] = vector
            return
        assert self.weights is not None
        self.output[sequence.row] += vector * len(sequence.tokens)
        self.weights[sequence.row] += len(sequence.tokens)

    def finish_rows(self) -> None:
        if self.weights is not None:
            split = self.weights > 0
            self.output[split] /= self.weights[split, None]

    def queued(self) -> QueuedRequest:
        return QueuedRequest(_PendingLengths(self.pending, self.next_pending), self.passed_over)

    def take(self, count: int) -> list[_Sequence]:
        taken = self.pending[self.next_pending : self.next_pending + count]
        self.next_pending += count
        return taken


class _Writer:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self._stream.write(encode_frame(header, payload))
        self._stream.flush()


def _read_requests(stream: BinaryIO, inbox: queue.Queue[dict[str, Any] | None]) -> None:
    try:
        while (frame := read_frame_blocking(stream)) is not None:
            inbox.put(frame[0])
    finally:
        inbox.put(_END)


def answer_vocabulary(vocabulary: Any, message: dict[str, Any], writer: _Writer) -> None:
    """A tokenize or detokenize message, answered at once (no decode involved)."""
    request_id = message["id"]
    try:
        if message["type"] == "tokenize":
            tokens = vocabulary.tokenize(message["text"], message["add_special"])
            writer.send({"type": "tokens", "id": request_id, "tokens": tokens})
        else:
            writer.send({"type": "text", "id": request_id, "content": vocabulary.detokenize(message["tokens"])})
    except InvalidInput as error:
        writer.send({"type": "error", "id": request_id, "kind": "invalid_input", "message": error.message})


def serve_vocabulary(vocabulary: Any, inbox: queue.Queue[dict[str, Any] | None], writer: _Writer) -> None:
    """A vocabulary-only runner: tokenize and detokenize until the end marker."""
    while (message := inbox.get()) is not _END:
        if message["type"] in VOCABULARY_MESSAGES:
            answer_vocabulary(vocabulary, message, writer)


def serve(engine: Any, inbox: queue.Queue[dict[str, Any] | None], writer: _Writer) -> None:
    """Answer every request in `inbox` until its end marker, batching across requests."""
    requests: dict[int, _Request] = {}  # in arrival order; answered (or cancelled) ones leave
    ended = False
    facts = engine.facts
    decodes: list[tuple[int, int]] = []  # (tokens, sequences) per decode, sent with the next result
    budget_tokens = facts.batch_tokens  # a request's num_batch changes it (set_batch_tokens)
    served_overdue = False  # the last decode served an overdue request: the next one goes by length

    def accept(message: dict[str, Any]) -> None:
        request_id = message["id"]
        texts: list[str | list[int] | dict[str, str]] = message["texts"]
        try:
            limit, split = message.get("limit_tokens"), message.get("split", False)
            tokenized = [
                engine.tokenize_pair(item["query"], item["document"], message["truncate"], limit)
                if isinstance(item, dict)  # a reranker's query/document pair
                else engine.tokenize(item, message["truncate"], limit, split)
                for item in texts
            ]
        except ContextExceeded as error:
            writer.send({"type": "error", "id": request_id, "kind": "context_exceeded", "message": error.message})
            return
        except InvalidInput as error:
            writer.send({"type": "error", "id": request_id, "kind": "invalid_input", "message": error.message})
            return
        windows = [len(item.windows) for item in tokenized]
        request = _Request(request_id, np.zeros((len(texts), facts.n_embd), dtype=np.float32), sum(windows))
        request.windows = windows
        if max(windows, default=1) > 1:
            request.weights = np.zeros(len(texts), dtype=np.float32)
        for row, item in enumerate(tokenized):
            request.truncated += item.truncated
            for window in item.windows:
                request.token_count += len(window)
                request.pending.append(_Sequence(row, window))
        request.pending.sort(key=lambda sequence: len(sequence.tokens))
        requests[request_id] = request
        if not texts:
            finish(request)

    def cancel(request_id: int) -> None:
        """The client left: its sequences not decoded yet leave the queue, and no answer is sent."""
        requests.pop(request_id, None)

    def waiting() -> bool:
        return any(request.next_pending < len(request.pending) for request in requests.values())

    def finish(request: _Request) -> None:
        requests.pop(request.request_id, None)
        request.finish_rows()
        started_s = request.first_decode_s
        header = {
            "type": "result",
            "id": request.request_id,
            "rows": request.output.shape[0],
            "dims": request.output.shape[1],
            "token_count": request.token_count,
            "truncated": request.truncated,
            "inference_s": 0.0 if started_s is None else time.perf_counter() - started_s,
            "decodes": decodes.copy(),
            "windows": request.windows,
        }
        decodes.clear()
        writer.send(header, request.output.tobytes())

    while not (ended and not waiting()):
        # Block only when idle; otherwise pick up whatever arrived while the last decode ran.
        try:
            while True:
                message = inbox.get(block=not ended and not waiting())
                if message is _END:
                    ended = True
                    break
                if message["type"] == "set_threads":
                    engine.set_threads(message["threads"])  # takes effect from the next decode
                    continue
                if message["type"] == "cancel":
                    cancel(message["id"])
                    continue
                if message["type"] in VOCABULARY_MESSAGES:
                    answer_vocabulary(engine.vocabulary, message, writer)
                    continue
                if message["type"] == "renew":
                    engine.renew_context()
                    writer.send({"type": "renewed", "id": message["id"]})
                    continue
                if message["type"] == "set_batch_tokens":
                    budget_tokens = max(1, min(message["tokens"], facts.capacity_tokens))
                    continue
                accept(message)
        except queue.Empty:
            pass
        queued = [request for request in requests.values() if request.next_pending < len(request.pending)]
        if not queued:
            continue
        views = [request.queued() for request in queued]
        counts = take_batch(views, budget_tokens, facts.max_sequences, overdue_first=not served_overdue)
        served_overdue = any(
            count and view.passed_over >= OVERDUE_AFTER_DECODES for view, count in zip(views, counts, strict=True)
        )
        batch: list[tuple[_Request, _Sequence]] = []
        for request, count in zip(queued, counts, strict=True):
            request.passed_over = 0 if count else request.passed_over + 1
            batch += [(request, sequence) for sequence in request.take(count)]
        started_s = time.perf_counter()
        for request, _sequence in batch:
            if request.first_decode_s is None:
                request.first_decode_s = started_s
        decodes.append((sum(len(sequence.tokens) for _request, sequence in batch), len(batch)))
        try:
            vectors = engine.embed_batch([sequence.tokens for _request, sequence in batch])
        except Exception as error:  # a llama.cpp failure fails the requests it touched, not the runner
            for request in {request.request_id: request for request, _sequence in batch}.values():
                requests.pop(request.request_id, None)
                writer.send({"type": "error", "id": request.request_id, "kind": "failed", "message": str(error)})
            continue
        for (request, sequence), vector in zip(batch, vectors, strict=True):
            request.add(sequence, vector)
            request.remaining -= 1
            if request.remaining == 0 and request.request_id in requests:
                finish(request)


def _leave_stopping_to_the_daemon(parent_pid: int) -> None:
    """Ignore the group's signals, and die with the daemon.

    The daemon starts runners with these signals blocked, so none can arrive before they are
    ignored here. On Linux the kernel kills a runner whose daemon died (PR_SET_PDEATHSIG); on every
    system, stdin reaching its end (the daemon's pipe closed) ends the runner too.
    """
    for signum in GROUP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the daemon died before prctl took effect
            os._exit(1)


def main() -> int:
    config = orjson.loads(sys.argv[1])
    _leave_stopping_to_the_daemon(config["parent_pid"])
    # The protocol owns the original stdout; anything native code prints goes to stderr instead.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    writer = _Writer(protocol_out)
    params = LlamaParams(**config["params"])
    try:
        from daemon.runner.engine import EmbeddingEngine, load_vocabulary

        if params.vocab_only:
            vocabulary, facts, _model = load_vocabulary(config["model_path"], params)
        else:
            engine = EmbeddingEngine(config["model_path"], params)
            facts = engine.facts
    except Exception as error:
        writer.send({"type": "load_failed", "message": f"{type(error).__name__}: {error}"})
        return 1
    writer.send({"type": "ready", "facts": dataclasses.asdict(facts)})
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_requests, args=(sys.stdin.buffer, inbox), daemon=True).start()
    if params.vocab_only:
        serve_vocabulary(vocabulary, inbox, writer)
        return 0
    serve(engine, inbox, writer)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
