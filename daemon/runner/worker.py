"""The runner child: `python -m daemon.runner.worker CONFIG_JSON`.

It owns one llama.cpp model. A reader thread takes requests off stdin and tokenizes the small ones
itself; a large one is tokenized on a thread of its own (see _Backlog), so the reader goes on to the
next message meanwhile. The main thread packs the sequences of the waiting requests into decodes
under the token budget, so concurrent requests share batches; requests take turns, shortest first
(see take_batch), so a short query never waits for a huge request to finish. Queued tokens are held
as int32 arrays, 4 bytes each, and counted. If llama.cpp aborts, only this process dies.
Closing stdin asks it to finish what it holds and exit: the daemon alone decides when a runner
stops, so SIGINT, SIGTERM and SIGHUP sent to the whole process group (by a terminal or systemd)
are ignored, and the runner dies with the daemon if the daemon is killed.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, overload

import numpy as np
import orjson

from daemon import libc
from daemon.errors import ContextExceeded, InvalidInput
from daemon.options import QUICK_LANE_SEQUENCES, LlamaParams
from daemon.runner.batching import OVERDUE_AFTER_DECODES, QueuedRequest, is_short, quick_lane_opens, take_batch
from daemon.runner.protocol import GROUP_SIGNALS, encode_frame, read_frame_blocking
from daemon.vectors import MEAN_POOLING, window_share

VOCABULARY_MESSAGES = ("tokenize", "detokenize", "tokenize_inputs")
# A message whose texts (characters, or ids) are longer than this is tokenized on the backlog's
# thread, not the reader's: a few milliseconds of llama.cpp's tokenizer at most hold up the reader.
INLINE_TOKENIZE_CHARS = 16 * 1024
TOKEN_DTYPE = np.int32  # llama_token


@dataclass
class _Sequence:
    row: int
    tokens: np.ndarray  # int32: a Python list of ints takes 36 bytes a token (8 for its pointer)


def message_chars(message: dict[str, Any]) -> int:
    """How much a message asks the tokenizer to read: characters of its texts, or its ids; a cheap
    stand-in for its tokenizing time, to decide which thread tokenizes it."""
    if message["type"] == "tokenize":
        return len(message["text"])
    if message["type"] == "detokenize":
        return len(message["tokens"])
    if "sequences" in message:  # ids to check and copy, nothing to tokenize
        return sum(len(window) for windows in message["sequences"] for window in windows)
    return sum(
        sum(len(text) for text in item.values()) if isinstance(item, dict) else len(item) for item in message["texts"]
    )


class _Backlog:
    """The messages too large to tokenize on the reader thread, tokenized on a thread of their own,
    the smallest first; the reader goes on reading meanwhile, so one huge request does not hold up
    the requests sent after it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._jobs: list[tuple[int, int, Callable[[], None]]] = []  # (size, arrival, job): a heap
        self._arrivals = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tokenize-backlog", daemon=True)
        self._thread.start()

    def submit(self, size: int, job: Callable[[], None]) -> None:
        with self._changed:
            heapq.heappush(self._jobs, (size, next(self._arrivals), job))
            self._changed.notify()

    def close(self) -> None:
        """Finish the jobs submitted, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closing or bool(self._jobs))
                if not self._jobs:
                    return
                _size, _arrival, job = heapq.heappop(self._jobs)
            job()


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
    weights: np.ndarray | None = None  # the windows' weights summed so far, per input (split inputs)
    pooling_type: int = MEAN_POOLING  # the model's: how windows make an input's vector (window_share)
    task: str | None = None  # its task adapter (None: the base model); one per request
    # Token vectors ("output": "tokens"): each input's (tokens, n_embd) rows, and its token ids.
    tokens_output: bool = False
    background: bool = False  # a batch job's lines: see batching.take_batch
    token_vectors: list[np.ndarray] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def add(self, sequence: _Sequence, vector: np.ndarray) -> None:
        """A sequence's vector into its input's row: as it is, or its window's share (see
        vectors.window_share) when the input was split into windows (the mean is taken in
        finish_rows). For token vectors, the sequence's rows (no window: one sequence an input)."""
        if self.tokens_output:
            self.token_vectors[sequence.row] = vector
            return
        if self.windows[sequence.row] == 1:
            self.output[sequence.row] = vector
            return
        assert self.weights is not None
        share, weight = window_share(vector, len(sequence.tokens), self.pooling_type)
        self.output[sequence.row] += share
        self.weights[sequence.row] += weight

    def finish_rows(self) -> None:
        if self.weights is not None:
            split = self.weights > 0
            self.output[split] /= self.weights[split, None]

    def queued(self) -> QueuedRequest:
        return QueuedRequest(
            _PendingLengths(self.pending, self.next_pending),
            self.passed_over,
            self.task,
            self.tokens_output,
            self.background,
        )

    def take(self, count: int) -> list[_Sequence]:
        taken = self.pending[self.next_pending : self.next_pending + count]
        self.next_pending += count
        return taken


class _Writer:
    """Frames to the daemon, from any thread: the reader's answers, and both lanes' results."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        frame = encode_frame(header, payload)
        with self._lock:
            self._stream.write(frame)
            self._stream.flush()


def input_sequences(tokenizer: Any, message: dict[str, Any]) -> Iterator[tuple[list[list[int]], bool]]:
    """Each input of an embed or tokenize_inputs message as the sequences decoded, and whether it
    was cut: tokenized by the runner's InputTokenizer, or with "sequences", as given (what an
    earlier tokenize_inputs answered: no special tokens added, nothing cut; ids and lengths checked)."""
    if "sequences" in message:
        for windows in message["sequences"]:
            for window in windows:
                tokenizer.vocabulary.check_ids(window)
                if not 0 < len(window) <= tokenizer.limit_tokens:
                    raise ContextExceeded(f"a sequence of {len(window)} tokens does not fit this runner's context")
            yield windows, False
        return
    limit, split, keep_end = message.get("limit_tokens"), message.get("split", False), message.get("keep_end", False)
    for item in message["texts"]:
        tokenized = (
            tokenizer.tokenize_pair(item["query"], item["document"], message["truncate"], limit)
            if isinstance(item, dict)  # a reranker's query/document pair
            else tokenizer.tokenize(item, message["truncate"], limit, split, keep_end)
        )
        yield tokenized.windows, tokenized.truncated


def answer_vocabulary(tokenizer: Any, message: dict[str, Any], writer: _Writer) -> None:
    """A tokenize, detokenize or tokenize_inputs message, answered at once (no decode involved).
    `tokenizer`: the runner's InputTokenizer (an engine, or a vocabulary-only runner's)."""
    request_id = message["id"]
    vocabulary = tokenizer.vocabulary
    try:
        if message["type"] == "tokenize":
            tokens = vocabulary.tokenize(message["text"], message["add_special"])
            writer.send({"type": "tokens", "id": request_id, "tokens": tokens})
        elif message["type"] == "tokenize_inputs":
            inputs = list(input_sequences(tokenizer, message))
            sequences = [windows for windows, _truncated in inputs]
            truncated = [truncated for _windows, truncated in inputs]
            writer.send({"type": "sequences", "id": request_id, "sequences": sequences, "truncated": truncated})
        else:
            writer.send({"type": "text", "id": request_id, "content": vocabulary.detokenize(message["tokens"])})
    except (ContextExceeded, InvalidInput) as error:
        kind = "context_exceeded" if isinstance(error, ContextExceeded) else "invalid_input"
        writer.send({"type": "error", "id": request_id, "kind": kind, "message": error.message})


def serve_vocabulary(tokenizer: Any, stream: BinaryIO, writer: _Writer) -> None:
    """A vocabulary-only runner: tokenize, detokenize and tokenize_inputs until stdin ends (a large message on the
    backlog's thread, so the small ones sent after it are answered meanwhile)."""
    backlog = _Backlog()
    try:
        while (frame := read_frame_blocking(stream)) is not None:
            message = frame[0]
            if message["type"] not in VOCABULARY_MESSAGES:
                continue
            if (size := message_chars(message)) > INLINE_TOKENIZE_CHARS:
                backlog.submit(size, functools.partial(answer_vocabulary, tokenizer, message, writer))
            else:
                answer_vocabulary(tokenizer, message, writer)
    finally:
        backlog.close()


Batch = list[tuple[_Request, _Sequence]]


class _Work:
    """The requests a runner holds, shared by the thread that reads them off stdin and the two lanes
    that decode them: the main context (the main thread) and the quick lane (its own thread, see
    batching.quick_lane_opens). Everything here is guarded by `lock`; `changed` wakes the lanes."""

    def __init__(self, engine: Any, writer: _Writer) -> None:
        self.engine = engine
        self.writer = writer
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.requests: dict[int, _Request] = {}  # in arrival order; answered (or cancelled) ones leave
        self.held_tokens = 0  # the tokens of the requests held (all their sequences, until answered)
        self.tokenizing: set[int] = set()  # requests on the backlog, not tokenized yet
        self.cancelled: set[int] = set()  # of those, the ones cancelled meanwhile
        self.backlog = _Backlog()
        self.renewals: list[int] = []  # renew messages, for the main lane between its decodes
        self.ended = False  # stdin ended: finish what is held, then exit
        self.closing = False  # the main lane is done: the quick lane exits
        self.batch_tokens = engine.facts.batch_tokens  # a request's num_batch changes it
        self.decodes: list[tuple[int, int]] = []  # (tokens, sequences) per decode, sent with the next result
        self.quick_decodes: list[tuple[int, int]] = []  # the same, of the quick lane
        self.served_overdue = False  # the last decode served an overdue request: the next goes by length
        self.quick_lane_open = False  # the main context runs a long decode: the quick lane may decode

    # -- the reader thread ------------------------------------------------------------------------

    def read(self, stream: BinaryIO) -> None:
        """Take messages off stdin until it ends. Requests are tokenized here (large ones on the
        backlog), while the lanes decode."""
        try:
            while (frame := read_frame_blocking(stream)) is not None:
                self.handle(frame[0])
        finally:
            with self.changed:
                self.ended = True
                self.changed.notify_all()

    def handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("embed", *VOCABULARY_MESSAGES) and (size := message_chars(message)) > INLINE_TOKENIZE_CHARS:
            if kind == "embed":
                with self.lock:  # the main lane waits for it before it exits
                    self.tokenizing.add(message["id"])
                self.backlog.submit(size, functools.partial(self.accept, message))
            else:
                self.backlog.submit(size, functools.partial(answer_vocabulary, self.engine, message, self.writer))
        elif kind == "embed":
            self.accept(message)
        elif kind in VOCABULARY_MESSAGES:
            answer_vocabulary(self.engine, message, self.writer)
        elif kind == "set_threads":
            self.engine.set_threads(message["threads"])  # takes effect from the next decode
        else:
            with self.changed:
                if kind == "cancel":  # the client left: its sequences not decoded yet leave, unanswered
                    self._drop(message["id"])
                    if message["id"] in self.tokenizing:
                        self.cancelled.add(message["id"])
                elif kind == "set_batch_tokens":
                    self.batch_tokens = max(1, min(message["tokens"], self.engine.facts.n_ubatch))
                elif kind == "renew":
                    self.renewals.append(message["id"])
                    self.changed.notify_all()

    def accept(self, message: dict[str, Any]) -> None:
        """Tokenize an embed request and queue it for the lanes (or answer its error)."""
        request_id = message["id"]
        try:
            request = self._tokenize(message)
        except (ContextExceeded, InvalidInput) as error:
            kind = "context_exceeded" if isinstance(error, ContextExceeded) else "invalid_input"
            with self.changed:
                cancelled = self._tokenized(request_id)
            if not cancelled:
                self.writer.send({"type": "error", "id": request_id, "kind": kind, "message": error.message})
            return
        if not request.windows:
            with self.changed:  # _result takes the decode records the lanes add to
                self._tokenized(request_id)
                header, payload = self._result(request)
            self.writer.send(header, payload)
            return
        with self.changed:
            if not self._tokenized(request_id):
                self.requests[request_id] = request
                self.held_tokens += request.token_count

    def _tokenize(self, message: dict[str, Any]) -> _Request:
        """A request's inputs as int32 arrays, one input at a time: no list of a whole request's
        tokens is ever held."""
        # Texts (or ids, or pairs), or the sequences the daemon tokenized before (see input_sequences).
        texts: list[Any] = message["texts"] if "texts" in message else message["sequences"]
        engine = self.engine
        split = message.get("split", False)
        request = _Request(message["id"], np.zeros((len(texts), engine.facts.n_embd), dtype=np.float32), 0)
        request.pooling_type = engine.facts.pooling_type
        request.task = message.get("task")
        request.background = bool(message.get("background", False))
        if message.get("output", "pooled") == "tokens":
            if split:
                raise InvalidInput("token vectors are not split into windows: send split false")
            request.tokens_output = True
            request.output = np.zeros((len(texts), 0), dtype=np.float32)  # the rows are in token_vectors
            request.token_vectors = [np.zeros((0, 0), dtype=np.float32)] * len(texts)
        if request.task is not None and request.task not in engine.facts.adapter_tasks:
            known = ", ".join(engine.facts.adapter_tasks) or "none"
            raise InvalidInput(f"this runner has no adapter of task {request.task!r}; its tasks: {known}")
        for row, (windows, truncated) in enumerate(input_sequences(engine, message)):
            request.truncated += truncated
            request.windows.append(len(windows))
            if request.tokens_output:
                if len(windows) != 1:  # given as sequences: one an input, no windows
                    raise InvalidInput("token vectors take one sequence an input, not windows")
                request.token_ids.append(windows[0])
            for window in windows:
                request.token_count += len(window)
                request.pending.append(_Sequence(row, np.array(window, dtype=TOKEN_DTYPE)))
        request.remaining = len(request.pending)
        if max(request.windows, default=1) > 1:
            request.weights = np.zeros(len(texts), dtype=np.float32)
        request.pending.sort(key=lambda sequence: len(sequence.tokens))
        return request

    def _tokenized(self, request_id: int) -> bool:
        """A request is tokenized (called with `lock` held): whether it was cancelled meanwhile. The
        main lane, which waits for the backlog before it exits, is woken."""
        self.tokenizing.discard(request_id)
        self.changed.notify_all()
        if request_id in self.cancelled:
            self.cancelled.discard(request_id)
            return True
        return False

    def _drop(self, request_id: int) -> _Request | None:
        """A request leaves (answered, failed or cancelled), and its tokens with it (`lock` held)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.held_tokens -= request.token_count
        return request

    # -- the lanes (called with `lock` held) ------------------------------------------------------

    def queued(self, short_only: bool = False) -> list[_Request]:
        return [
            request
            for request in self.requests.values()
            if request.next_pending < len(request.pending)
            and (not short_only or is_short(len(request.pending[request.next_pending].tokens)))
            and not (short_only and request.tokens_output)  # the quick lane's context pools
            and not (short_only and request.background)  # the quick lane is for interactive requests
        ]

    def take(self, quick: bool) -> Batch:
        """The next decode's sequences (see take_batch); for the quick lane, short ones only."""
        queued = self.queued(short_only=quick)
        if not queued:
            return []
        views = [request.queued() for request in queued]
        facts = self.engine.facts
        if quick:
            counts = take_batch(views, facts.quick_lane_tokens, QUICK_LANE_SEQUENCES, overdue_first=False)
        else:
            counts = take_batch(views, self.batch_tokens, facts.max_sequences, overdue_first=not self.served_overdue)
            self.served_overdue = any(
                count and view.passed_over >= OVERDUE_AFTER_DECODES for view, count in zip(views, counts, strict=True)
            )
        batch: Batch = []
        started_s = time.perf_counter()
        for request, count in zip(queued, counts, strict=True):
            if not quick or count:
                request.passed_over = 0 if count else request.passed_over + 1
            for sequence in request.take(count):
                batch.append((request, sequence))
            if count and request.first_decode_s is None:
                request.first_decode_s = started_s
        decodes = self.quick_decodes if quick else self.decodes
        decodes.append((sum(len(sequence.tokens) for _request, sequence in batch), len(batch)))
        return batch

    def deliver(self, batch: Batch, vectors: Sequence[np.ndarray]) -> list[tuple[dict[str, Any], bytes]]:
        """The vectors into their requests; the frames of the requests now complete."""
        frames = []
        for (request, sequence), vector in zip(batch, vectors, strict=True):
            request.add(sequence, vector)
            request.remaining -= 1
            if request.remaining == 0 and self._drop(request.request_id) is not None:
                frames.append(self._result(request))
        return frames

    def fail(self, batch: Batch, error: Exception) -> list[tuple[dict[str, Any], bytes]]:
        """A llama.cpp failure fails the requests it touched, not the runner."""
        failed = {request.request_id for request, _sequence in batch}
        for request_id in failed:
            self._drop(request_id)
        header = {"type": "error", "kind": "failed", "message": str(error)}
        return [({**header, "id": request_id}, b"") for request_id in failed]

    def _result(self, request: _Request) -> tuple[dict[str, Any], bytes]:
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
            "decodes": self.decodes.copy(),
            "quick_decodes": self.quick_decodes.copy(),
            "windows": request.windows,
        }
        self.decodes.clear()
        self.quick_decodes.clear()
        if request.tokens_output:
            # Every input's token rows one after another; token_rows says how many are each input's.
            rows = request.token_vectors
            header["rows"] = sum(len(vectors) for vectors in rows)
            header["dims"] = self.engine.token_dims
            header["token_rows"] = [len(vectors) for vectors in rows]
            header["token_ids"] = request.token_ids
            header["special_ids"] = self.engine.special_ids(itertools.chain.from_iterable(request.token_ids))
            payload = b"".join(np.ascontiguousarray(vectors, dtype=np.float32).tobytes() for vectors in rows)
            return header, payload
        return header, request.output.tobytes()


def _decode(work: _Work, batch: Batch, quick: bool = False) -> None:
    """One decode of `batch` (with no lock held), on the main context or the quick lane's; its
    answers sent. If llama.cpp fails a decode that packed several requests, each is decoded again
    on its own, so only a request that fails alone is failed."""
    sequences = [sequence.tokens.tolist() for _request, sequence in batch]  # one decode's: ctypes takes ints
    task = batch[0][0].task  # one task a decode (see take_batch), and one output kind
    if batch[0][0].tokens_output:
        embed = work.engine.embed_tokens  # the quick lane never takes token vectors (see queued)
    else:
        embed = work.engine.embed_quick if quick else work.engine.embed_batch
    try:
        vectors = embed(sequences) if task is None else embed(sequences, task)  # None: the base model
    except Exception as error:  # a llama.cpp failure fails the requests it touched, not the runner
        by_request: dict[int, Batch] = {}
        for request, sequence in batch:
            by_request.setdefault(request.request_id, []).append((request, sequence))
        if len(by_request) > 1:
            for alone in by_request.values():
                _decode(work, alone, quick)
            return
        with work.lock:
            frames = work.fail(batch, error)
    else:
        with work.lock:
            frames = work.deliver(batch, vectors)
    for header, payload in frames:
        work.writer.send(header, payload)


def _quick_lane(work: _Work) -> None:
    """Short inputs on the quick lane's context while the main context runs a long decode."""
    while True:
        with work.changed:
            work.changed.wait_for(lambda: work.closing or (work.quick_lane_open and bool(work.queued(short_only=True))))
            if work.closing:
                return
            batch = work.take(quick=True)
        _decode(work, batch, quick=True)


def serve(engine: Any, stream: BinaryIO, writer: _Writer) -> None:
    """Answer every request read from `stream` until it ends, batching across requests."""
    work = _Work(engine, writer)
    threading.Thread(target=work.read, args=(stream,), daemon=True).start()
    quick_lane = threading.Thread(target=_quick_lane, args=(work,), daemon=True)
    if engine.facts.quick_lane_tokens:
        quick_lane.start()
    try:
        while True:
            with work.changed:
                work.changed.wait_for(
                    lambda: work.renewals or (work.ended and not work.tokenizing) or bool(work.queued())
                )
                renewals, work.renewals = work.renewals, []
                batch = [] if renewals else work.take(quick=False)
                if not renewals and not batch:
                    return  # stdin ended, and nothing is left or being tokenized
                if batch:
                    shortest = min(len(sequence.tokens) for _request, sequence in batch)
                    work.quick_lane_open = quick_lane_opens(
                        engine.threads, shortest, quick_lane=bool(engine.facts.quick_lane_tokens)
                    )
                    work.changed.notify_all()
            for renewal in renewals:
                engine.renew_context()
                writer.send({"type": "renewed", "id": renewal})
            if batch:
                _decode(work, batch)
                with work.lock:
                    work.quick_lane_open = False
    finally:
        with work.changed:
            work.closing = True
            work.changed.notify_all()
        if quick_lane.is_alive():
            quick_lane.join()
        work.backlog.close()  # tokenize or detokenize messages still on it are answered first


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
        libc.die_with_parent(signal.SIGKILL)
        if os.getppid() != parent_pid:  # the daemon died before prctl took effect
            os._exit(1)


def _vocabulary_loads(engine_module: Any, model_path: str, params: LlamaParams) -> bool:
    """Whether a vocabulary-only load of the file succeeds (after a full load failed)."""
    try:
        engine_module.load_vocabulary(model_path, dataclasses.replace(params, vocab_only=True))
    except Exception:
        return False
    return True


def main() -> int:
    config = orjson.loads(sys.argv[1])
    _leave_stopping_to_the_daemon(config["parent_pid"])
    # The protocol owns the original stdout; anything native code prints goes to stderr instead.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    writer = _Writer(protocol_out)
    params = LlamaParams(**config["params"])
    try:
        from daemon.runner.engine import EmbeddingEngine, InputTokenizer, load_vocabulary

        if params.vocab_only:
            vocabulary, facts, _model = load_vocabulary(config["model_path"], params)
            # No context to bound it: each tokenize_inputs message's own limit cuts its inputs.
            tokenizer = InputTokenizer(vocabulary, sys.maxsize)
        else:
            adapters = [(task, path) for task, path in config.get("adapters", [])]
            engine = EmbeddingEngine(config["model_path"], params, adapters)
            facts = engine.facts
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        engine_module = sys.modules.get("daemon.runner.engine")  # absent if importing it failed
        said = engine_module.llama_errors() if engine_module is not None else []
        if said:  # llama-cpp-python's exception does not say why; llama.cpp's log does
            message += f" (llama.cpp: {'; '.join(said)})"
        adapter_refused = engine_module is not None and isinstance(error, engine_module.AdapterRefused)
        if adapter_refused:  # which adapter llama.cpp refused, before its reason
            said = [str(error), *said]
        # Refused: llama.cpp cannot load the file's architecture or vocabulary (a vocabulary-only load,
        # which reads nothing else, fails too), or one of its task adapters, as opposed to its weights
        # or this machine failing it.
        refused = engine_module is not None and (
            adapter_refused or params.vocab_only or not _vocabulary_loads(engine_module, config["model_path"], params)
        )
        writer.send({"type": "load_failed", "message": message, "refused": refused, "llama_cpp": said})
        return 1
    writer.send({"type": "ready", "facts": dataclasses.asdict(facts)})
    if params.vocab_only:
        serve_vocabulary(tokenizer, sys.stdin.buffer, writer)
        return 0
    serve(engine, sys.stdin.buffer, writer)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
