"""llama.cpp behind one small class. Only runner code imports llama_cpp, and only in the child."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from daemon.errors import InvalidInput
from daemon.options import MAX_SEQUENCES_PER_DECODE, LlamaParams
from daemon.runner.batching import fit_tokens, special_token_split, split_windows, wrap_token_ids
from daemon.runner.protocol import RunnerFacts, parse_llama_buffer_log

_PROBE_TEXT = "probe"


@dataclass
class TokenizedInput:
    windows: list[list[int]]  # one, unless a long input was split into windows
    truncated: bool


# llama.cpp's log lines about the buffers it allocates ("... buffer size = N MiB"), kept for the ready
# frame: what llama.cpp says it holds, beside what the daemon measures.
_BUFFER_LOG: list[str] = []


def _log_errors_only(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load time; keep its errors (they reach the daemon's log via stderr).
    line = text.decode("utf-8", errors="replace")
    if level >= 4:  # GGML_LOG_LEVEL_ERROR
        sys.stderr.write(line)
    elif "buffer size" in line:
        _BUFFER_LOG.append(line)


def llama_version() -> str:
    """The binding's version and the ggml library's version and commit it was built from."""
    described = f"llama-cpp-python {llama_cpp.__version__}"
    for library in sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*")):
        with contextlib.suppress(OSError, AttributeError):
            ggml = ctypes.CDLL(str(library))
            ggml.ggml_version.restype = ggml.ggml_commit.restype = ctypes.c_char_p
            return f"{described}, ggml {ggml.ggml_version().decode()} ({ggml.ggml_commit().decode()})"
    return described


def _release_freed_memory() -> None:
    """Hand memory glibc keeps after free() back to the system (a freed context's buffers)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


_LOG_CALLBACK = llama_cpp.llama_log_callback(_log_errors_only)


class Vocabulary:
    """A model's own tokenizer (llama.cpp's), from a full load or a vocabulary-only one."""

    def __init__(self, model: internals.LlamaModel) -> None:
        self._model = model
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
        self._word_piece = llama_cpp.llama_vocab_type(model.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_WPM

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        # special=False: text that spells "[SEP]" is text, not a control token.
        return list(self._model.tokenize(text.encode("utf-8"), add_special, False))

    def check_ids(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise InvalidInput(f"token id {token} is outside the model's vocabulary (0..{self.n_vocab - 1})")

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of token ids; special tokens ([CLS], <s>, ...) are left out, as a text has none
        (before detokenizing: llama.cpp would leave the space that follows them)."""
        self.check_ids(tokens)
        tokens = [token for token in tokens if not llama_cpp.llama_vocab_is_control(self._model.vocab, token)]
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            written = llama_cpp.llama_detokenize(self._model.vocab, ids, len(tokens), buffer, size, True, False)
            if written >= 0:
                text = buffer.raw[:written].decode("utf-8", errors="replace")
                # WordPiece puts a space before every word, the first too; BERT's own decoder drops
                # it (its tokenizer never keeps a leading space of the text).
                return text.removeprefix(" ") if self._word_piece else text
            size = -written  # the size it needs
        raise RuntimeError("llama.cpp could not detokenize")


def load_vocabulary(model_path: str, params: LlamaParams) -> tuple[Vocabulary, RunnerFacts, internals.LlamaModel]:
    """A vocabulary-only load: the tokenizer without weights or a context (a few MB)."""
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.vocab_only = True
    model = internals.LlamaModel(path_model=model_path, params=model_params, verbose=False)
    facts = RunnerFacts(
        n_embd=model.n_embd(),
        trained_context=model.n_ctx_train(),
        limit_tokens=params.limit_tokens,
        batch_tokens=0,
        capacity_tokens=0,
        max_sequences=0,
        pooling_type=-1,  # no context: not known here
        gpu_offload=False,
        pid=os.getpid(),
        llama_version=llama_version(),
    )
    return Vocabulary(model), facts, model


class EmbeddingEngine:
    """One model and one context, used from a single thread."""

    def __init__(self, model_path: str, params: LlamaParams) -> None:
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = params.n_gpu_layers
        model_params.main_gpu = params.main_gpu
        model_params.use_mmap = params.use_mmap
        self._model = internals.LlamaModel(path_model=model_path, params=model_params, verbose=False)
        self.vocabulary = Vocabulary(self._model)

        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = params.n_ctx
        context_params.n_batch = params.n_batch
        context_params.n_ubatch = params.n_ubatch
        context_params.n_threads = params.n_threads
        context_params.n_threads_batch = params.n_threads_batch
        context_params.embeddings = True
        context_params.kv_unified = True
        max_sequences = min(params.n_batch, MAX_SEQUENCES_PER_DECODE, llama_cpp.llama_max_parallel_sequences())
        context_params.n_seq_max = max_sequences
        self._context_params = context_params
        self._context = internals.LlamaContext(model=self._model, params=context_params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False)

        pooling_type = llama_cpp.llama_pooling_type(self._context.ctx)
        ranks = pooling_type == llama_cpp.LLAMA_POOLING_TYPE_RANK
        self.facts = RunnerFacts(
            # A reranker's "vector" is its classifier's scores (one for a relevance score).
            n_embd=llama_cpp.llama_model_n_cls_out(self._model.model) if ranks else self._model.n_embd(),
            trained_context=self._model.n_ctx_train(),
            limit_tokens=params.limit_tokens,
            batch_tokens=params.batch_tokens,
            # The budget's ceiling: a packed decode stays within one ubatch. A single input longer
            # than the budget is decoded alone; a model that splits takes it in several ubatches.
            capacity_tokens=params.n_ubatch,
            max_sequences=max_sequences,
            pooling_type=pooling_type,
            gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
            pid=os.getpid(),
            llama_buffer_bytes=parse_llama_buffer_log(_BUFFER_LOG),
            llama_version=llama_version(),
        )
        probe_with_specials = self.vocabulary.tokenize(_PROBE_TEXT, add_special=True)
        self._head_specials, self._tail_specials = special_token_split(
            probe_with_specials, self.vocabulary.tokenize(_PROBE_TEXT, add_special=False)
        )
        # A reranker pair's special tokens (see tokenize_pair): before, between and after.
        vocab = self._model.vocab
        eos = llama_cpp.llama_vocab_eos(vocab) if llama_cpp.llama_vocab_get_add_eos(vocab) else -1
        sep = llama_cpp.llama_vocab_sep(vocab) if llama_cpp.llama_vocab_get_add_sep(vocab) else -1
        bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else -1
        self._pair_specials = (
            [bos] if bos >= 0 else [],
            [token for token in (eos, sep) if token >= 0],
            [eos] if eos >= 0 else [sep] if sep >= 0 else [],
        )
        # The special tokens themselves, to wrap inputs that arrive as token ids.
        self._head_tokens = probe_with_specials[: self._head_specials]
        self._tail_tokens = probe_with_specials[len(probe_with_specials) - self._tail_specials :]

    def tokenize(
        self, item: str | list[int], truncate: bool, limit_tokens: int | None = None, split: bool = False
    ) -> TokenizedInput:
        """A text, or token ids of this model's vocabulary (wrapped in the special tokens, as a
        text would be), cut to the context (or to a request's shorter `limit_tokens`), or with
        `split`, in overlapping windows of the context (see split_windows)."""
        if isinstance(item, str):
            tokens = self.vocabulary.tokenize(item, add_special=True)
        else:
            self.vocabulary.check_ids(item)
            tokens = wrap_token_ids(item, self._head_tokens, self._tail_tokens)
        limit = min(limit_tokens or self.facts.limit_tokens, self.facts.limit_tokens)
        if split:
            return TokenizedInput(split_windows(tokens, self._head_specials, self._tail_specials, limit), False)
        fitted, truncated = fit_tokens(tokens, self._head_specials, self._tail_specials, limit, truncate)
        return TokenizedInput([fitted], truncated)

    def tokenize_pair(
        self, query: str, document: str, truncate: bool, limit_tokens: int | None = None
    ) -> TokenizedInput:
        """A query/document pair for a reranker, as llama.cpp's server lays it out: [BOS] query
        [EOS] [SEP] document [EOS], each special token where the vocabulary adds it (a BERT
        vocabulary, which has no EOS, ends with its separator: [CLS] q [SEP] d [SEP]). A pair over
        the context is cut at the document's end."""
        start, middle, end = self._pair_specials
        tokens = [
            *start,
            *self.vocabulary.tokenize(query, add_special=False),
            *middle,
            *self.vocabulary.tokenize(document, add_special=False),
            *end,
        ]
        limit = min(limit_tokens or self.facts.limit_tokens, self.facts.limit_tokens)
        fitted, truncated = fit_tokens(tokens, 0, len(end), limit, truncate)
        return TokenizedInput([fitted], truncated)

    def set_threads(self, threads: int) -> None:
        self._context_params.n_threads = threads
        self._context_params.n_threads_batch = threads
        llama_cpp.llama_set_n_threads(self._context.ctx, threads, threads)

    def renew_context(self) -> None:
        """A fresh context in place of one that grew: llama.cpp touches its compute and output
        buffers as far as the largest decode went and keeps them; a new context starts small again.
        The weights stay mapped."""
        self._context.close()
        _release_freed_memory()
        self._context = internals.LlamaContext(model=self._model, params=self._context_params, verbose=False)

    def embed_batch(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled embeddings (not normalised) of sequences that fit one decode together."""
        batch = self._batch
        batch.reset()
        for seq_id, tokens in enumerate(sequences):
            batch.add_sequence(tokens, seq_id, True)
        self._context.kv_cache_clear()
        self._context.decode(batch)
        n_embd = self.facts.n_embd
        output = np.empty((len(sequences), n_embd), dtype=np.float32)
        for seq_id in range(len(sequences)):
            pointer = llama_cpp.llama_get_embeddings_seq(self._context.ctx, seq_id)
            if not pointer:
                raise RuntimeError(f"llama.cpp returned no embedding for sequence {seq_id}")
            output[seq_id] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
        return output

    def close(self) -> None:
        self._batch.close()
        self._context.close()
        self._model.close()
