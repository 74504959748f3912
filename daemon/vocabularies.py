"""The models' own tokenizers for /api/tokenize and /api/detokenize, and for the vector cache.

A loaded model's runner answers itself. For a model that is not loaded, the model is not loaded
whole: a vocabulary-only runner (llama.cpp's vocab_only load: no weights, no context, a few MB
beside the interpreter) answers, and is kept a minute for the next call. The vector cache asks
either for the exact sequences an embed would decode (`input_sequences`): its keys, known before
anything loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from daemon.config import Settings
from daemon.options import llama_params, resolve_load_options
from daemon.runner.client import RunnerInput, RunnerProcess
from daemon.scheduler import RunnerFactory, Scheduler
from daemon.store import StoredModel, loadable_facts

log = logging.getLogger(__name__)
VOCABULARY_KEEP_S = 60.0
MAX_VOCABULARY_RUNNERS = 4


@dataclass(frozen=True)
class InputSequences:
    """An embed request's inputs as the runner would decode them."""

    sequences: list[list[list[int]]]  # per input: its sequence, or a split input's windows
    truncated: list[bool]  # per input: cut to the context
    llama_version: str  # the llama.cpp that tokenized them (and would decode them)


class Vocabularies:
    def __init__(self, settings: Settings, scheduler: Scheduler, runner_factory: RunnerFactory) -> None:
        self._settings = settings
        self._scheduler = scheduler
        self._runner_factory = runner_factory
        self._runners: OrderedDict[str, RunnerProcess] = OrderedDict()  # by key (_vocabulary_runner), oldest first
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._starting: dict[str, asyncio.Lock] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    async def tokenize(self, model: StoredModel, text: str, add_special: bool) -> list[int]:
        async with self._runner(model) as runner:
            return await runner.tokenize(text, add_special)

    async def detokenize(self, model: StoredModel, tokens: list[int]) -> str:
        async with self._runner(model) as runner:
            return await runner.detokenize(tokens)

    async def input_sequences(
        self,
        model: StoredModel,
        inputs: Sequence[RunnerInput],
        truncate: bool,
        limit_tokens: int,
        split: bool = False,
        keep_end: bool = False,
    ) -> InputSequences:
        """The token sequences an embed of `inputs` with these fields decodes (its truncation, windows
        and special tokens: the runner's own code, see InputTokenizer), cut at `limit_tokens`."""
        async with self._runner(model, limit_tokens) as runner:
            sequences, truncated = await runner.tokenize_inputs(inputs, truncate, limit_tokens, split, keep_end)
            return InputSequences(sequences, truncated, runner.facts.llama_version if runner.facts else "")

    @contextlib.asynccontextmanager
    async def _runner(self, model: StoredModel, limit_tokens: int = 0) -> AsyncIterator[RunnerProcess]:
        """The loaded model's runner, unless its context is shorter than `limit_tokens` (it would cut
        there) or it is being replaced (it takes no new messages); else the vocabulary-only runner,
        which cuts at a message's limit alone."""
        async with self._scheduler.lease_if_loaded(model) as loaded:
            cuts_as_asked = loaded is not None and (loaded.facts is None or loaded.facts.limit_tokens >= limit_tokens)
            if loaded is not None and cuts_as_asked and not loaded.stopping:
                yield loaded
                return
        yield await self._vocabulary_runner(model)

    async def _vocabulary_runner(self, model: StoredModel) -> RunnerProcess:
        # By the file, and by whether the card appends EOS: two names of one file may tokenize apart.
        key = model.digest + (" append_eos" if model.prompts.append_eos else "")
        async with self._starting.setdefault(key, asyncio.Lock()):
            runner = self._runners.get(key)
            if runner is None or not runner.alive:
                # The checks a load makes first: a file llama.cpp aborts on is refused in its words
                # (ModelNotLoadable), not a runner that dies as it reads the vocabulary.
                await asyncio.to_thread(loadable_facts, model)
                load = resolve_load_options(self._settings, {})
                params = replace(
                    llama_params(load, model.facts.context_length, model.facts.block_count),
                    vocab_only=True,
                    append_eos=model.prompts.append_eos,
                )
                runner = await self._runner_factory(model, params)
                self._runners[key] = runner
                while len(self._runners) > MAX_VOCABULARY_RUNNERS:
                    self._stop(next(iter(self._runners)))
            self._runners.move_to_end(key)
            if (timer := self._timers.pop(key, None)) is not None:
                timer.cancel()
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(VOCABULARY_KEEP_S, self._stop, key)
            return runner

    def _stop(self, digest: str) -> None:
        runner = self._runners.pop(digest, None)
        if (timer := self._timers.pop(digest, None)) is not None:
            timer.cancel()
        if runner is not None:
            # Messages already sent are answered first: the runner reads its pipe to the end.
            task = asyncio.ensure_future(runner.stop(self._settings.shutdown_timeout_s))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        for digest in list(self._runners):
            self._stop(digest)
        await asyncio.gather(*self._stopping)
