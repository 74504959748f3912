"""The runner child: `python -m daemon.runner.worker CONFIG_JSON`.

It owns one llama.cpp model. A reader thread takes requests off stdin; the main thread tokenizes
them and packs the sequences of every waiting request, in arrival order, into decodes under the
token budget, so concurrent requests share batches. If llama.cpp aborts, only this process dies.
Closing stdin asks it to finish what it holds and exit: the daemon alone decides when a runner
stops, so SIGINT, SIGTERM and SIGHUP sent to the whole process group (by a terminal or systemd)
are ignored, and the runner dies with the daemon if the daemon is killed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import orjson

from daemon.errors import ContextExceeded, InvalidInput
from daemon.options import LlamaParams
from daemon.runner.batching import take_batch
from daemon.runner.protocol import GROUP_SIGNALS, encode_frame, read_frame_blocking

_END = None
_PR_SET_PDEATHSIG = 1


@dataclass
class _Request:
    request_id: int
    output: np.ndarray
    remaining: int
    token_count: int = 0
    truncated: int = 0
    failed: bool = False
    first_decode_s: float | None = None  # perf_counter at the start of its first decode


@dataclass
class _Sequence:
    request: _Request
    row: int
    tokens: list[int] = field(default_factory=list)


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


def serve(engine: Any, inbox: queue.Queue[dict[str, Any] | None], writer: _Writer) -> None:
    """Answer every request in `inbox` until its end marker, batching across requests."""
    waiting: deque[_Sequence] = deque()
    requests: dict[int, _Request] = {}  # answered ones leave
    ended = False
    facts = engine.facts
    decodes: list[tuple[int, int]] = []  # (tokens, sequences) per decode, sent with the next result
    budget_tokens = facts.batch_tokens  # a request's num_batch changes it (set_batch_tokens)

    def accept(message: dict[str, Any]) -> None:
        request_id = message["id"]
        texts: list[str | list[int]] = message["texts"]
        try:
            limit = message.get("limit_tokens")
            tokenized = [engine.tokenize(text, message["truncate"], limit) for text in texts]
        except ContextExceeded as error:
            writer.send({"type": "error", "id": request_id, "kind": "context_exceeded", "message": error.message})
            return
        except InvalidInput as error:
            writer.send({"type": "error", "id": request_id, "kind": "invalid_input", "message": error.message})
            return
        request = _Request(request_id, np.empty((len(texts), facts.n_embd), dtype=np.float32), len(texts))
        requests[request_id] = request
        for row, item in enumerate(tokenized):
            request.token_count += len(item.tokens)
            request.truncated += item.truncated
            waiting.append(_Sequence(request, row, item.tokens))
        if not texts:
            finish(request)

    def cancel(request_id: int) -> None:
        """The client left: its sequences not decoded yet leave the queue, and no answer is sent."""
        nonlocal waiting
        request = requests.pop(request_id, None)
        if request is not None:
            request.failed = True
            waiting = deque(sequence for sequence in waiting if sequence.request is not request)

    def finish(request: _Request) -> None:
        requests.pop(request.request_id, None)
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
        }
        decodes.clear()
        writer.send(header, request.output.tobytes())

    while not (ended and not waiting):
        # Block only when idle; otherwise pick up whatever arrived while the last decode ran.
        try:
            while True:
                message = inbox.get(block=not waiting and not ended)
                if message is _END:
                    ended = True
                    break
                if message["type"] == "set_threads":
                    engine.set_threads(message["threads"])  # takes effect from the next decode
                    continue
                if message["type"] == "cancel":
                    cancel(message["id"])
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
        if not waiting:
            continue
        head = itertools.islice(waiting, facts.max_sequences)
        count = take_batch([len(s.tokens) for s in head], budget_tokens, facts.max_sequences)
        batch = [waiting.popleft() for _ in range(count)]
        batch = [s for s in batch if not s.request.failed]
        if not batch:
            continue
        started_s = time.perf_counter()
        for sequence in batch:
            if sequence.request.first_decode_s is None:
                sequence.request.first_decode_s = started_s
        decodes.append((sum(len(s.tokens) for s in batch), len(batch)))
        try:
            vectors = engine.embed_batch([s.tokens for s in batch])
        except Exception as error:  # a llama.cpp failure fails the requests it touched, not the runner
            for request in {id(s.request): s.request for s in batch}.values():
                request.failed = True
                requests.pop(request.request_id, None)
                writer.send({"type": "error", "id": request.request_id, "kind": "failed", "message": str(error)})
            continue
        for sequence, vector in zip(batch, vectors, strict=True):
            request = sequence.request
            request.output[sequence.row] = vector
            request.remaining -= 1
            if request.remaining == 0:
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
    try:
        from daemon.runner.engine import EmbeddingEngine

        engine = EmbeddingEngine(config["model_path"], LlamaParams(**config["params"]))
    except Exception as error:
        writer.send({"type": "load_failed", "message": f"{type(error).__name__}: {error}"})
        return 1
    facts = engine.facts
    writer.send({"type": "ready", "facts": dataclasses.asdict(facts)})
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_requests, args=(sys.stdin.buffer, inbox), daemon=True).start()
    serve(engine, inbox, writer)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
