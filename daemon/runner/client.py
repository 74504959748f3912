"""The daemon's side of a runner: starts the child, sends requests, matches answers, notices death."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from daemon.errors import (
    ContextExceeded,
    InvalidInput,
    ModelLoadFailed,
    ModelNotLoadable,
    RunnerCrashed,
    ShuttingDown,
)
from daemon.options import LlamaParams
from daemon.runner.protocol import FRAME_PREFIX, GROUP_SIGNALS, RunnerFacts, encode_frame, read_frame_blocking

log = logging.getLogger(__name__)
_STDERR_TAIL_LINES = 20
# A runner's stderr line is kept up to this long (llama.cpp's messages are short; a longer line is
# someone's dump), and read this much at a time.
_STDERR_LINE_MAX_BYTES = 4096
_STDERR_CHUNK_BYTES = 64 * 1024
# GGML_NO_BACKTRACE: on an abort, ggml would attach gdb to print a backtrace first (seconds before
# the daemon learns of the death, and the last stderr line, which says why, would be gdb's).
RUNNER_ENVIRONMENT: dict[str, str] = {"GGML_NO_BACKTRACE": "1"}
# Large blocks in their own mappings, returned when freed (see service.return_large_blocks_when_freed):
# the daemon and one all-MiniLM runner peaked at 227 MiB after the side-by-side workloads with the
# daemon's threshold fixed, 216 MiB with the runner's too (248 with neither).
RUNNER_MALLOC_DEFAULTS: dict[str, str] = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def runner_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """A runner's environment: the malloc default where the daemon's sets none, the daemon's, ours.

    libgomp's spin count was tried too: 10,000 spins at llama.cpp's barriers (against 300,000)
    kept a runner beside another busy runner fast, but made short requests 3x to 6x slower beside
    the daemon converting a model, so the default stays."""
    return {**RUNNER_MALLOC_DEFAULTS, **environment, **RUNNER_ENVIRONMENT}


# What a runner embeds: a text, token ids of its vocabulary, or (a reranker) a query/document pair.
RunnerInput = str | list[int] | dict[str, str]


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # (inputs, n_embd) float32, as pooled by the model (not normalised)
    token_count: int
    truncated_count: int
    inference_s: float  # from the request's first decode to its answer, measured in the runner
    decodes: list[tuple[int, int]]  # (tokens, sequences) of the decodes run since the last result
    windows: list[int]  # per input: 1, or the windows a long input was split into
    quick_decodes: list[tuple[int, int]] = field(default_factory=list)  # the same, on the quick lane
    # Token vectors (embed with tokens=True): `vectors` holds every input's token rows one after
    # another, token_rows[i] of them input i's; token_ids[i] its tokens; special_ids: those of the
    # tokens that are control or unknown tokens ([CLS], </s>, <unk>, ...). None for pooled vectors.
    token_rows: list[int] | None = None
    token_ids: list[list[int]] = field(default_factory=list)
    special_ids: list[int] = field(default_factory=list)

    def token_vectors(self) -> list[np.ndarray]:
        """Each input's (tokens, n_embd) rows, views of `vectors`."""
        assert self.token_rows is not None, "not a token-vector result"
        bounds = np.cumsum([0, *self.token_rows])
        return [self.vectors[start:end] for start, end in itertools.pairwise(bounds)]


def load_failure(label: str, header: Mapping[str, Any]) -> ModelLoadFailed:
    """A load_failed frame as an error: ModelNotLoadable, in llama.cpp's words, when llama.cpp
    refuses the file's architecture or vocabulary, or a task adapter (see protocol)."""
    if header.get("refused"):
        said = "; ".join(header.get("llama_cpp") or []) or header["message"]
        return ModelNotLoadable(f"{label} cannot be loaded by this emberd's llama.cpp: {said}")
    return ModelLoadFailed(f"failed to load {label}: {header['message']}")


def vocabulary_refusal(model_path: Path, timeout_s: float) -> str | None:
    """Why llama.cpp cannot load a file's architecture and vocabulary, or None when it can: a
    vocabulary-only runner (no weights, no context; a third of a second), started and ended here,
    in the calling thread (a job's), so llama.cpp reads the file outside the daemon's process."""
    params = LlamaParams(
        n_gpu_layers=0,
        main_gpu=0,
        use_mmap=True,
        n_ctx=0,
        n_batch=0,
        n_ubatch=0,
        n_threads=1,
        n_threads_batch=1,
        limit_tokens=0,
        batch_tokens=0,
        vocab_only=True,
    )
    config = orjson.dumps({"model_path": str(model_path), "params": params.__dict__, "parent_pid": os.getpid()})
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)  # as RunnerProcess.start does
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.runner.worker", config.decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=runner_environment(os.environ),
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    try:
        stdout, stderr = process.communicate(b"", timeout=timeout_s)  # stdin ends: it exits once loaded
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return f"llama.cpp took longer than {timeout_s:g}s to load its vocabulary"
    frame = read_frame_blocking(io.BytesIO(stdout))
    if frame is not None and frame[0]["type"] == "ready":
        return None
    if frame is not None and frame[0]["type"] == "load_failed":
        return "; ".join(frame[0].get("llama_cpp") or []) or str(frame[0]["message"])
    lines = [line for line in StderrLines().feed(stderr + b"\n") if line.strip()]
    said = f": {lines[-1]}" if lines else ""  # llama.cpp's assert message, most often
    return f"llama.cpp {_describe_exit(process.returncode)} as it loaded the vocabulary{said}"


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "closed its pipe"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


# Runner starts under way on the event loop's thread, and the mask the first one found (see
# _group_signals_blocked).
_STARTS_BLOCKING = 0
_MASK_BEFORE_STARTS: set[int | signal.Signals] = set()


@contextlib.contextmanager
def _group_signals_blocked() -> Iterator[None]:
    """The group's signals blocked on the event loop's thread while runners start. Starts overlap
    (a vocabulary runner and a model load; each awaits its spawn), so each cannot restore the mask
    it found: the second would restore the first's blocked one, and the daemon would ignore SIGTERM
    for good. The last start to finish restores the mask from before the first."""
    global _STARTS_BLOCKING, _MASK_BEFORE_STARTS
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    if _STARTS_BLOCKING == 0:
        _MASK_BEFORE_STARTS = set(previous)
    _STARTS_BLOCKING += 1
    try:
        yield
    finally:
        _STARTS_BLOCKING -= 1
        if _STARTS_BLOCKING == 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, _MASK_BEFORE_STARTS)


class StderrLines:
    """Splits a byte stream into lines, each cut at `max_bytes`: it holds at most that much of a
    line, however long the line is."""

    def __init__(self, max_bytes: int = _STDERR_LINE_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._line = bytearray()
        self._cut = False  # the line under way is past max_bytes: the rest of it is dropped

    def feed(self, chunk: bytes) -> list[str]:
        """The lines `chunk` ends, without their line ends."""
        *ended, rest = chunk.split(b"\n")
        finished = []
        for piece in ended:
            self._take(piece)
            finished.append(self._flush())
        self._take(rest)
        return finished

    def finish(self) -> list[str]:
        """The last line, if the stream ended without a line end."""
        return [self._flush()] if self._line else []

    def _take(self, piece: bytes) -> None:
        room = self._max_bytes - len(self._line)
        if len(piece) > room:
            self._cut = True
        self._line += piece[: max(0, room)]

    def _flush(self) -> str:
        text = self._line.decode("utf-8", errors="replace").rstrip()
        if self._cut:
            text += " [cut]"
        self._line.clear()
        self._cut = False
        return text


class RunnerProcess:
    """A live child process serving one model."""

    def __init__(self, process: asyncio.subprocess.Process, label: str) -> None:
        self._process = process
        self.label = label
        self.facts: RunnerFacts | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.largest_decode_tokens = 0  # since the context was last renewed
        self.quick_lane_decoded = False  # its buffers touched (the quick lane's context is never renewed)
        self._ids = itertools.count(1)
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._ready: asyncio.Future[RunnerFacts] = asyncio.get_running_loop().create_future()
        self._exit_callbacks: list[Callable[[RunnerProcess], None]] = []
        self._stopping = False
        self._killed = False
        self.exited = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._read_frames(), name=f"runner-frames-{label}"),
            asyncio.create_task(self._read_stderr(), name=f"runner-stderr-{label}"),
        ]

    @classmethod
    async def start(
        cls,
        model_path: Path,
        params: LlamaParams,
        label: str,
        load_timeout_s: float,
        environment: Mapping[str, str] | None = None,
        adapters: Sequence[tuple[str, Path]] = (),
    ) -> RunnerProcess:
        """A runner of the model, with its task adapters (task, path) loaded (daemon.adapters)."""
        config = orjson.dumps(
            {
                "model_path": str(model_path),
                "params": params.__dict__,
                "parent_pid": os.getpid(),
                "adapters": [(task, str(path)) for task, path in adapters],
            }
        ).decode()
        # The child inherits a signal mask that blocks the group's signals until it ignores them,
        # so a Ctrl-C or a systemd stop that arrives while it starts cannot kill it (see worker).
        with _group_signals_blocked():
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "daemon.runner.worker",
                config,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=runner_environment(environment if environment is not None else os.environ),
                limit=1 << 20,
            )
        runner = cls(process, label)
        try:
            async with asyncio.timeout(load_timeout_s):
                await runner._ready
        except TimeoutError:
            await runner.kill()
            raise ModelLoadFailed(f"loading {label} took longer than {load_timeout_s:g}s") from None
        except (ModelLoadFailed, asyncio.CancelledError):
            # A load abandoned by its request (the client left) must not leave a process behind.
            await asyncio.shield(runner.kill())
            raise
        return runner

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def unused_quick_lane_tokens(self) -> int:
        """The quick lane's tokens until its first decode (what a measurement does not hold yet), then 0."""
        if self.facts is None or self.quick_lane_decoded:
            return 0
        return self.facts.quick_lane_tokens

    @property
    def stopping(self) -> bool:
        """The daemon asked it to stop (an exit now is not a crash)."""
        return self._stopping

    def on_exit(self, callback: Callable[[RunnerProcess], None]) -> None:
        self._exit_callbacks.append(callback)

    async def embed(
        self,
        texts: Sequence[RunnerInput],
        truncate: bool,
        limit_tokens: int | None = None,
        split: bool = False,
        task: str | None = None,
        keep_end: bool = False,
        tokens: bool = False,
        background: bool = False,
    ) -> EmbedResult:
        """Embed texts, or token-id lists of the model's own vocabulary, cut at `limit_tokens` (at
        most the runner's own limit; `keep_end`: keeping their end), with the task's adapter (None:
        the base model)."""
        message: dict[str, Any] = {
            "texts": texts,
            "truncate": truncate,
            "limit_tokens": limit_tokens,
            "split": split,
            "task": task,
            **({"keep_end": True} if keep_end else {}),
            **({"output": "tokens"} if tokens else {}),
        }
        return await self._embed(message, background)

    async def embed_sequences(
        self, sequences: Sequence[Sequence[Sequence[int]]], task: str | None = None, background: bool = False
    ) -> EmbedResult:
        """Embed inputs given as the sequences decoded (per input, one or its windows, as
        tokenize_inputs answered them): nothing added, nothing cut; windows pooled as for split."""
        return await self._embed({"sequences": sequences, "truncate": False, "task": task}, background)

    async def _embed(self, fields: dict[str, Any], background: bool) -> EmbedResult:
        """Send an embed frame with these fields and wait for its answer; a client that leaves
        cancels what the runner has not decoded yet."""
        if not self.alive or self._stopping:
            raise ShuttingDown(f"runner for {self.label} is stopping")
        request_id = next(self._ids)
        future: asyncio.Future[EmbedResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        assert self._process.stdin is not None
        try:
            message = {"type": "embed", "id": request_id, **fields, **({"background": True} if background else {})}
            self._process.stdin.write(encode_frame(message))
            await self._process.stdin.drain()
            return await future
        except (BrokenPipeError, ConnectionResetError):
            await self.exited.wait()
            return await future
        except asyncio.CancelledError:
            self._send_cancel(request_id)  # the client left: drop what is not decoded yet
            raise
        finally:
            self._pending.pop(request_id, None)

    async def tokenize_inputs(
        self,
        texts: Sequence[RunnerInput],
        truncate: bool,
        limit_tokens: int,
        split: bool = False,
        keep_end: bool = False,
    ) -> tuple[list[list[list[int]]], list[bool]]:
        """The sequences embed would decode for these inputs with these fields, cut at `limit_tokens`
        (this runner's own limit does not cap it), per input; and which inputs were cut."""
        message = {
            "type": "tokenize_inputs",
            "texts": texts,
            "truncate": truncate,
            "limit_tokens": limit_tokens,
            "split": split,
            "keep_end": keep_end,
        }
        answer: tuple[list[list[list[int]]], list[bool]] = await self._ask(message)
        return answer

    async def renew_context(self) -> None:
        """Have the runner replace its context by a fresh one, giving back what its largest decode
        made llama.cpp touch (see EmbeddingEngine.renew_context)."""
        if self.alive and not self._stopping:
            await self._ask({"type": "renew"})

    async def tokenize(self, text: str, add_special: bool) -> list[int]:
        """The model's own token ids for a text (with its special tokens if `add_special`)."""
        tokens: list[int] = await self._ask({"type": "tokenize", "text": text, "add_special": add_special})
        return tokens

    async def detokenize(self, tokens: list[int]) -> str:
        """The text of the model's token ids (special tokens left out)."""
        content: str = await self._ask({"type": "detokenize", "tokens": tokens})
        return content

    async def _ask(self, message: dict[str, Any]) -> Any:
        """Send a message that gets one answer frame, and wait for that answer."""
        if not self.alive or self._stopping:
            raise ShuttingDown(f"runner for {self.label} is stopping")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(encode_frame({**message, "id": request_id}))
            return await future
        finally:
            self._pending.pop(request_id, None)

    def _send_cancel(self, request_id: int) -> None:
        if self.alive and self._process.stdin is not None and not self._process.stdin.is_closing():
            self._process.stdin.write(encode_frame({"type": "cancel", "id": request_id}))

    def set_threads(self, threads: int) -> None:
        """Change the runner's llama.cpp threads from its next decode on (no answer is awaited)."""
        if self.alive and not self._stopping and self._process.stdin is not None:
            self._process.stdin.write(encode_frame({"type": "set_threads", "threads": threads}))

    def set_batch_tokens(self, tokens: int) -> None:
        """Change the runner's decode budget from its next decode on (capped at its capacity)."""
        if self.alive and not self._stopping and self._process.stdin is not None:
            self._process.stdin.write(encode_frame({"type": "set_batch_tokens", "tokens": tokens}))

    async def _read_frames(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            while True:
                prefix = await stdout.readexactly(FRAME_PREFIX.size)
                header_length, payload_length = FRAME_PREFIX.unpack(prefix)
                header = orjson.loads(await stdout.readexactly(header_length))
                payload = await stdout.readexactly(payload_length) if payload_length else b""
                self._dispatch(header, payload)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        returncode = await self._process.wait()
        await self._stderr_drained()
        self._fail_all(returncode)

    async def _stderr_drained(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._tasks[1]), timeout=1.0)

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> None:
        kind = header["type"]
        if kind == "ready":
            self.facts = RunnerFacts(**header["facts"])
            if not self._ready.done():  # a load that timed out was cancelled: its late frame is moot
                self._ready.set_result(self.facts)
            return
        if kind == "load_failed":
            if not self._ready.done():
                self._ready.set_exception(load_failure(self.label, header))
            return
        future = self._pending.get(header["id"])
        if future is None or future.done():
            return
        if kind == "renewed":
            self.largest_decode_tokens = 0
            future.set_result(None)
        elif kind == "tokens":
            future.set_result(header["tokens"])
        elif kind == "text":
            future.set_result(header["content"])
        elif kind == "sequences":
            future.set_result((header["sequences"], header["truncated"]))
        elif kind == "result":
            vectors = np.frombuffer(payload, dtype="<f4").reshape(header["rows"], header["dims"])
            decodes = [(tokens, sequences) for tokens, sequences in header["decodes"]]
            self.largest_decode_tokens = max([self.largest_decode_tokens, *(tokens for tokens, _ in decodes)])
            self.quick_lane_decoded = self.quick_lane_decoded or bool(header["quick_decodes"])
            future.set_result(
                EmbedResult(
                    vectors,
                    header["token_count"],
                    header["truncated"],
                    header["inference_s"],
                    decodes,
                    header["windows"],
                    [(tokens, sequences) for tokens, sequences in header["quick_decodes"]],
                    header.get("token_rows"),
                    header.get("token_ids", []),
                    header.get("special_ids", []),
                )
            )
        elif header.get("kind") == "context_exceeded":
            future.set_exception(ContextExceeded(header["message"]))
        elif header.get("kind") == "invalid_input":
            future.set_exception(InvalidInput(header["message"]))
        else:
            future.set_exception(RunnerCrashed(f"model runner failed: {header['message']}"))

    def _fail_all(self, returncode: int | None) -> None:
        self.exited.set()
        how = _describe_exit(returncode)
        last_line = next((line for line in reversed(self._stderr_tail) if line.strip()), "")
        said = f": {last_line}" if last_line else ""  # llama.cpp's assert message, most often
        detail = f"model runner for {self.label} {how}{said}"
        if not self._stopping:
            log.warning("%s", detail)
        if not self._ready.done():
            self._ready.set_exception(ModelLoadFailed(f"failed to load {self.label}: runner {how}{said}"))
        # A runner the daemon killed (a stop out of time, at shutdown) leaves its requests a 503.
        error: Exception = (
            ShuttingDown(f"server is shutting down: the runner for {self.label} stopped before answering")
            if self._killed
            else RunnerCrashed(detail)
        )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for callback in self._exit_callbacks:
            callback(self)

    async def _read_stderr(self) -> None:
        """Keep the last lines the runner writes, each cut at _STDERR_LINE_MAX_BYTES. Read in chunks,
        not lines: a line longer than the stream's limit would end readline() with an error, and a
        runner whose stderr nobody reads blocks once the pipe fills."""
        stderr = self._process.stderr
        assert stderr is not None
        lines = StderrLines()
        while chunk := await stderr.read(_STDERR_CHUNK_BYTES):
            for text in lines.feed(chunk):
                self._keep_stderr_line(text)
        for text in lines.finish():
            self._keep_stderr_line(text)

    def _keep_stderr_line(self, text: str) -> None:
        self._stderr_tail.append(text)
        log.debug("runner %s: %s", self.label, text)

    async def stop(self, timeout_s: float) -> None:
        """Finish what the runner holds, then let it exit; kill it if it takes too long."""
        self._stopping = True
        if self.alive and self._process.stdin is not None:
            with contextlib.suppress(Exception):
                self._process.stdin.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self.exited.wait()
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        self._stopping = True
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        await self._process.wait()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5.0)
