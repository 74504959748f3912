"""llama.cpp behind one small class. Only runner code imports llama_cpp, and only in the child."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import mmap
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from daemon import libc
from daemon.errors import InvalidInput
from daemon.memory.offload import gpus_of, offloadable_layers
from daemon.options import MAX_SEQUENCES_PER_DECODE, QUICK_LANE_SEQUENCES, LlamaParams
from daemon.runner.batching import fit_tokens, special_token_split, split_windows, wrap_token_ids
from daemon.runner.devices import read_devices
from daemon.runner.protocol import RunnerFacts, parse_device_buffer_log, parse_llama_buffer_log

_PROBE_TEXT = "probe"
# The placeholders of a GGUF's rerank template, as llama.cpp's server fills them in.
_PLACEHOLDER = re.compile(r"\{query\}|\{document\}")


@dataclass
class TokenizedInput:
    windows: list[list[int]]  # one, unless a long input was split into windows
    truncated: bool


# llama.cpp's log lines about the buffers it allocates ("... buffer size = N MiB"), kept for the ready
# frame: what llama.cpp says it holds, beside what the daemon measures.
_BUFFER_LOG: list[str] = []
# llama.cpp's last error lines: a load that fails says why only there ("unknown model architecture"),
# and llama-cpp-python sends stderr to /dev/null while it loads.
_ERROR_LOG: collections.deque[str] = collections.deque(maxlen=4)


def _log_errors_only(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load time; keep its errors (they reach the daemon's log via stderr).
    line = text.decode("utf-8", errors="replace")
    if level >= 4:  # GGML_LOG_LEVEL_ERROR
        sys.stderr.write(line)
        _ERROR_LOG.append(line.strip())
    elif "buffer size" in line:
        _BUFFER_LOG.append(line)


def llama_errors() -> list[str]:
    """llama.cpp's last error lines (for a failed load's message)."""
    return list(_ERROR_LOG)


def llama_version() -> str:
    """The binding's version and the ggml library's version and commit it was built from."""
    described = f"llama-cpp-python {llama_cpp.__version__}"
    for library in sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*")):
        with contextlib.suppress(OSError, AttributeError):
            ggml = ctypes.CDLL(str(library))
            ggml.ggml_version.restype = ggml.ggml_commit.restype = ctypes.c_char_p
            return f"{described}, ggml {ggml.ggml_version().decode()} ({ggml.ggml_commit().decode()})"
    return described


_LOG_CALLBACK = llama_cpp.llama_log_callback(_log_errors_only)


class Vocabulary:
    """A model's own tokenizer (llama.cpp's), from a full load or a vocabulary-only one."""

    def __init__(self, model: internals.LlamaModel, append_eos: bool = False) -> None:
        self._model = model
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
        self._word_piece = llama_cpp.llama_vocab_type(model.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_WPM
        template = llama_cpp.llama_model_chat_template(model.model, b"rerank")
        # A reranker whose GGUF says how to lay out a pair (Qwen3-Reranker's instruction prompt), in
        # parts: runs of text (with the {query} and {document} placeholders) and special-token ids.
        self._pair_template = self._template_parts(template.decode("utf-8")) if template else None
        vocab = model.vocab
        # Otherwise llama.cpp's server layout (see pair_tokens): the special tokens before, between
        # and after the texts.
        eos = llama_cpp.llama_vocab_eos(vocab) if llama_cpp.llama_vocab_get_add_eos(vocab) else -1
        sep = llama_cpp.llama_vocab_sep(vocab) if llama_cpp.llama_vocab_get_add_sep(vocab) else -1
        bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else -1
        self._pair_specials = (
            [bos] if bos >= 0 else [],
            [token for token in (eos, sep) if token >= 0],
            [eos] if eos >= 0 else [sep] if sep >= 0 else [],
        )
        # A card whose inputs end with EOS (Qwen3-Embedding pools the EOS) on a GGUF whose tokenizer
        # does not add it (converted before its tokenizer.json said so): the EOS goes after each text.
        # Where the tokenizer adds it, llama.cpp already did, and a second one would be wrong.
        end = llama_cpp.llama_vocab_eos(vocab)
        self._appended_eos = end if append_eos and eos < 0 and end >= 0 else None

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        # special=False: text that spells "[SEP]" is text, not a control token.
        tokens = list(self._model.tokenize(text.encode("utf-8"), add_special, False))
        if add_special and self._appended_eos is not None:
            tokens.append(self._appended_eos)
        if tokens and min(tokens) < 0:
            # A vocabulary without an unknown token gives what it cannot spell the id -1, which
            # fails llama.cpp's whole decode (other requests' inputs with it): refuse this one alone.
            raise InvalidInput(
                "the input has characters this model's vocabulary has no token for, and the model has no"
                " unknown token ([UNK]) to stand in for them"
            )
        return tokens

    def _template_parts(self, template: str) -> list[str | int]:
        """The rerank template split at the control tokens it spells ("<|im_start|>"): the text runs
        between them are tokenized as plain text once the query and document are in, as llama.cpp
        and Hugging Face tokenize the text between special tokens. Only the template's own
        spellings become special tokens, never the query's or the document's."""
        literal = _PLACEHOLDER.sub("", template)
        specials = {
            self._piece(token): token
            for token in self._model.tokenize(literal.encode("utf-8"), False, True)
            if llama_cpp.llama_vocab_is_control(self._model.vocab, token)
        }
        if not specials:
            return [template]
        pattern = re.compile("|".join(re.escape(text) for text in sorted(specials, key=len, reverse=True)))
        parts: list[str | int] = []
        position = 0
        for match in pattern.finditer(template):
            parts += [template[position : match.start()], specials[match.group()]]
            position = match.end()
        parts.append(template[position:])
        return [part for part in parts if part != ""]

    def _piece(self, token: int) -> str:
        buffer = ctypes.create_string_buffer(256)
        written = llama_cpp.llama_token_to_piece(self._model.vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[: max(written, 0)].decode("utf-8", errors="replace")

    def pair_tokens(self, query: str, document: str) -> tuple[list[int], int]:
        """A reranker's query/document pair as tokens, and how many tokens follow the document (kept
        when the pair is cut). With the GGUF's rerank template (tokenizer.chat_template.rerank), the
        template with the texts in place, as llama.cpp's server renders it. Otherwise llama.cpp's
        server layout: [BOS] query [EOS] [SEP] document [EOS], each special token where the
        vocabulary adds it: a BERT vocabulary (no EOS) gives [CLS] q [SEP] d [SEP], an XLM-RoBERTa
        one <s> q </s></s> d </s>, as their Hugging Face tokenizers encode a pair."""
        if self._pair_template is None:
            start, middle, end = self._pair_specials
            query_tokens = self.tokenize(query, add_special=False)
            document_tokens = self.tokenize(document, add_special=False)
            return [*start, *query_tokens, *middle, *document_tokens, *end], len(end)
        texts = {"{query}": query, "{document}": document}
        tokens: list[int] = []
        after_document = 0
        for part in self._pair_template:
            if isinstance(part, int):
                part_tokens = [part]
            else:
                part_tokens = self.tokenize(_PLACEHOLDER.sub(lambda match: texts[match.group()], part), False)
            tokens += part_tokens
            after_document = 0 if isinstance(part, str) and "{document}" in part else after_document + len(part_tokens)
        return tokens, after_document

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
        n_ubatch=0,
        max_sequences=0,
        pooling_type=-1,  # no context: not known here
        gpu_offload=False,
        pid=os.getpid(),
        llama_version=llama_version(),
    )
    return Vocabulary(model, params.append_eos), facts, model


def _whole_pages(address: int, length: int) -> tuple[int, int]:
    """The whole pages inside [address, address + length): their start, and their length (0: none)."""
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    return start, max(end - start, 0)


def logits_pages(context: llama_cpp.llama_context_p, n_vocab: int, outputs: int) -> tuple[int, int]:
    """The whole pages of the logits rows of llama.cpp's output buffer for a decode of `outputs`
    outputs: the buffer's first n_vocab floats per output, and never past the embeddings, which
    llama.cpp places right after this decode's logits (llama_context::output_reserve)."""
    logits = llama_cpp.llama_get_logits(context)
    if not logits:
        return 0, 0
    start = ctypes.addressof(logits.contents)
    end = start + 4 * n_vocab * outputs
    embeddings = llama_cpp.llama_get_embeddings(context)
    if embeddings:
        end = min(end, ctypes.addressof(embeddings.contents))
    return _whole_pages(start, end - start)


def writes_no_logits(model: internals.LlamaModel, on_gpu: bool) -> bool:
    """Whether llama.cpp never writes the logits part of this model's output buffer: an encoder
    (non-causal attention: BERT and its kin) has no output projection, so only the zeroing at the
    buffer's allocation touches it. On a GPU the buffer may be pinned host memory: left alone."""
    if on_gpu:
        return False
    buffer = ctypes.create_string_buffer(64)

    def meta(key: str) -> str:
        written = llama_cpp.llama_model_meta_val_str(model.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode() if written >= 0 else ""

    architecture = meta("general.architecture")
    return bool(architecture) and architecture != "t5" and meta(f"{architecture}.attention.causal") == "false"


class _Lane:
    """A llama.cpp context and its batch, used from one thread at a time: the main context, or the
    quick lane's (see batching.quick_lane_opens)."""

    def __init__(
        self, model: internals.LlamaModel, params: llama_cpp.llama_context_params, logits_unused: bool
    ) -> None:
        self._model = model
        self._params = params
        self.n_embd = 0  # set once the pooling type is known (see EmbeddingEngine)
        self.threads = params.n_threads
        self.task: str | None = None  # the task adapter applied on this context (None: the base model)
        self._logits_unused = logits_unused
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
        self._open_context()
        self._batch = internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False)

    def _open_context(self) -> None:
        self.context = internals.LlamaContext(model=self._model, params=self._params, verbose=False)
        self.task = None  # a fresh context has no adapter
        self.logits_pages_given_back = 0  # this context's, over all its decodes
        self._give_back_logits(0)  # the rows llama.cpp zeroed as it made the context

    def _give_back_logits(self, outputs: int) -> None:
        """llama.cpp's output buffer keeps n_vocab logits for every output of the largest decode so
        far (every token of an embedding decode), and zeroes all of it each time it grows: 55 MiB
        for one 450-token document with all-MiniLM's 30,522 tokens. An encoder never writes them
        (see writes_no_logits), so after each decode the pages of them that are in memory go back:
        asked of the kernel (mincore), not counted here, so a llama.cpp that zeroes the buffer at
        other times too (every decode) still has them given back. Called after the decode's
        outputs were read: it synchronises with the decode, and nothing read is in the range."""
        if not self._logits_unused:
            return
        rows = max(outputs, self._params.n_seq_max)  # as llama.cpp sizes the buffer
        start, length = logits_pages(self.context.ctx, self._n_vocab, rows)
        resident = libc.resident_pages(start, length)
        if resident:
            libc.give_back_pages(start, length)
            self.logits_pages_given_back += resident

    def use_adapter(self, task: str | None, adapters: Mapping[str, Any]) -> None:
        """The task's adapter on this context, alone (None: none), if another is on it. llama.cpp
        re-reserves its compute graph at the next decode after a change, so a decode of the same
        task as the last one changes nothing."""
        if task == self.task:
            return
        if task is None:
            llama_cpp.llama_set_adapters_lora(self.context.ctx, None, 0, None)
        else:
            chosen = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapters[task])
            llama_cpp.llama_set_adapters_lora(self.context.ctx, chosen, 1, (ctypes.c_float * 1)(ADAPTER_SCALE))
        self.task = task

    def use_threads(self, threads: int) -> None:
        if threads != self.threads:
            llama_cpp.llama_set_n_threads(self.context.ctx, threads, threads)
            self._params.n_threads = self._params.n_threads_batch = self.threads = threads

    def _decode(self, sequences: Sequence[Sequence[int]]) -> internals.LlamaBatch:
        """One decode of these sequences (one a sequence id, every token an output), from an empty
        KV cache; the batch it decoded."""
        batch = self._batch
        batch.reset()
        for seq_id, tokens in enumerate(sequences):
            batch.add_sequence(tokens, seq_id, True)
        self.context.kv_cache_clear()
        self.context.decode(batch)
        return batch

    def embed(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        batch = self._decode(sequences)
        output = np.empty((len(sequences), self.n_embd), dtype=np.float32)
        for seq_id in range(len(sequences)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.context.ctx, seq_id)
            if not pointer:
                raise RuntimeError(f"llama.cpp returned no embedding for sequence {seq_id}")
            output[seq_id] = np.ctypeslib.as_array(pointer, shape=(self.n_embd,))
        self._give_back_logits(batch.n_tokens())  # after the outputs are copied out
        return output

    def embed_tokens(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Every token's vector of each sequence, on a context with pooling NONE: llama.cpp keeps
        the outputs of the tokens marked as outputs (all of them here) one after another, in the
        batch's order."""
        batch = self._decode(sequences)
        n_tokens = batch.n_tokens()
        pointer = llama_cpp.llama_get_embeddings(self.context.ctx)
        if not pointer:
            raise RuntimeError("llama.cpp returned no token embeddings")
        rows = np.ctypeslib.as_array(pointer, shape=(n_tokens, self.n_embd))
        bounds = np.cumsum([0, *(len(tokens) for tokens in sequences)])
        output = [rows[start:end].copy() for start, end in itertools.pairwise(bounds)]
        self._give_back_logits(n_tokens)  # after the outputs are copied out
        return output

    def renew(self) -> None:
        self.context.close()
        libc.trim_heap()  # a freed context's buffers, which glibc would keep
        self._open_context()

    def close(self) -> None:
        self._batch.close()
        self.context.close()


# An adapter's scale, as llama.cpp's tools apply one (--lora): it multiplies alpha / rank, which
# makes the update PEFT's (jina-embeddings-v3's own scaling).
ADAPTER_SCALE = 1.0


class AdapterRefused(RuntimeError):
    """llama.cpp refused a task adapter of a model it loaded (the worker reports it as refused)."""


def load_adapters(model: internals.LlamaModel, adapters: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Each (task, path) adapter loaded onto the model, once: its llama_adapter_lora pointer by task.
    llama.cpp frees them with the model. A file it refuses (tensors the model lacks, shapes that do
    not fit) fails the load with its reason."""
    loaded: dict[str, Any] = {}
    for task, path in adapters:
        _ERROR_LOG.clear()  # the model loaded: what it logged is moot, and the reason is the adapter's
        pointer = llama_cpp.llama_adapter_lora_init(model.model, path.encode("utf-8"))
        if not pointer:  # the worker adds llama.cpp's error lines (llama_errors) to the message
            raise AdapterRefused(f"llama.cpp refused the adapter of task {task!r} ({Path(path).name})")
        loaded[task] = pointer
    return loaded


def _offloaded_layers(n_gpu_layers: int, n_layer: int) -> int:
    """The layers llama.cpp offloads for n_gpu_layers (-1: all), the output layer counted."""
    most = offloadable_layers(n_layer)
    return most if n_gpu_layers < 0 else min(n_gpu_layers, most)


def _context_params(
    n_tokens: int,
    n_ubatch: int,
    threads: int,
    max_sequences: int,
    on_gpu: bool = False,
    pooling_type: int | None = None,
) -> llama_cpp.llama_context_params:
    params: llama_cpp.llama_context_params = llama_cpp.llama_context_default_params()
    # A runner with no layer offloaded stays on the CPU: a GPU build would otherwise send large
    # batches' matrix products to the device (op_offload) and reserve a compute buffer there, which
    # the scheduler does not count for it (measured on Vulkan: 17 MiB, and vectors off by 0.006).
    params.op_offload = on_gpu
    params.n_ctx = params.n_batch = n_tokens
    params.n_ubatch = n_ubatch
    params.n_threads = params.n_threads_batch = threads
    params.embeddings = True
    params.kv_unified = True
    params.n_seq_max = max_sequences
    if pooling_type is not None:  # None: the model's own (its GGUF's pooling_type)
        params.pooling_type = pooling_type
    return params


class InputTokenizer:
    """An embed request's inputs as the token sequences decoded: the model's special tokens around
    them, cut or split at the context. A loaded engine's, and a vocabulary-only runner's (so the
    daemon learns the exact sequences, for its vector cache, without loading the model)."""

    def __init__(self, vocabulary: Vocabulary, limit_tokens: int) -> None:
        self.vocabulary = vocabulary
        self.limit_tokens = limit_tokens  # the longest sequence; a request's own limit may be shorter
        probe_with_specials = vocabulary.tokenize(_PROBE_TEXT, add_special=True)
        self._head_specials, self._tail_specials = special_token_split(
            probe_with_specials, vocabulary.tokenize(_PROBE_TEXT, add_special=False)
        )
        # The special tokens themselves, to wrap inputs that arrive as token ids.
        self._head_tokens = probe_with_specials[: self._head_specials]
        self._tail_tokens = probe_with_specials[len(probe_with_specials) - self._tail_specials :]

    def tokenize(
        self,
        item: str | list[int],
        truncate: bool,
        limit_tokens: int | None = None,
        split: bool = False,
        keep_end: bool = False,
    ) -> TokenizedInput:
        """A text, or token ids of this model's vocabulary (wrapped in the special tokens, as a
        text would be), cut to the context (or to a request's shorter `limit_tokens`; `keep_end`:
        its end is kept, not its beginning), or with `split`, in overlapping windows of the context
        (see split_windows)."""
        if isinstance(item, str):
            tokens = self.vocabulary.tokenize(item, add_special=True)
        else:
            self.vocabulary.check_ids(item)
            tokens = wrap_token_ids(item, self._head_tokens, self._tail_tokens)
        limit = min(limit_tokens or self.limit_tokens, self.limit_tokens)
        if split:
            return TokenizedInput(split_windows(tokens, self._head_specials, self._tail_specials, limit), False)
        fitted, truncated = fit_tokens(tokens, self._head_specials, self._tail_specials, limit, truncate, keep_end)
        return TokenizedInput([fitted], truncated)

    def tokenize_pair(
        self, query: str, document: str, truncate: bool, limit_tokens: int | None = None
    ) -> TokenizedInput:
        """A query/document pair for a reranker, laid out as llama.cpp's server does (see
        Vocabulary.pair_tokens). A pair over the context is cut at the document's end."""
        tokens, after_document = self.vocabulary.pair_tokens(query, document)
        limit = min(limit_tokens or self.limit_tokens, self.limit_tokens)
        fitted, truncated = fit_tokens(tokens, 0, after_document, limit, truncate)
        return TokenizedInput([fitted], truncated)


class EmbeddingEngine(InputTokenizer):
    """One model, its main context, and the quick lane's context when it has one. The main context
    and the quick lane's may decode at the same time, each from its own thread."""

    def __init__(self, model_path: str, params: LlamaParams, adapters: Sequence[tuple[str, str]] = ()) -> None:
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = params.n_gpu_layers
        model_params.main_gpu = params.main_gpu
        model_params.use_mmap = params.use_mmap
        # One GPU holds every offloaded layer (main_gpu): the scheduler counts each device's memory,
        # and llama.cpp's default would spread the layers over every GPU by their free memory.
        model_params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        gpus = gpus_of(read_devices()) if gpu_offload and params.n_gpu_layers != 0 else []
        device_name = gpus[params.main_gpu].name if 0 <= params.main_gpu < len(gpus) else ""
        self._model = internals.LlamaModel(path_model=model_path, params=model_params, verbose=False)
        self.vocabulary = Vocabulary(self._model, params.append_eos)
        # Task adapters (daemon.adapters), before the contexts: their buffers are in the main log.
        self._adapters = load_adapters(self._model, adapters)

        max_sequences = min(params.n_batch, MAX_SEQUENCES_PER_DECODE, llama_cpp.llama_max_parallel_sequences())
        # On a GPU a second context would take its memory for little: a GPU decode is quick anyway.
        on_gpu = bool(device_name)  # layers offloaded to a device this build sees
        logits_unused = writes_no_logits(self._model, on_gpu)
        main_params = _context_params(params.n_batch, params.n_ubatch, params.n_threads, max_sequences, on_gpu)
        self._main = _Lane(self._model, main_params, logits_unused)
        self._threads = params.n_threads
        # Token vectors need a context with pooling NONE (llama.cpp fixes pooling per context): the
        # main context's sizes, opened at the first request for them (see embed_tokens).
        self._token_lane_params = (params.n_batch, params.n_ubatch, max_sequences, on_gpu, logits_unused)
        self._tokens: _Lane | None = None
        self.token_dims = self._model.n_embd()  # a token vector's floats (a reranker's too)
        pooling_type = llama_cpp.llama_pooling_type(self._main.context.ctx)
        ranks = pooling_type == llama_cpp.LLAMA_POOLING_TYPE_RANK
        # A reranker's "vector" is its classifier's scores (one for a relevance score).
        n_embd = llama_cpp.llama_model_n_cls_out(self._model.model) if ranks else self._model.n_embd()
        self._main.n_embd = n_embd
        main_buffers = parse_llama_buffer_log(_BUFFER_LOG)
        device_buffers = parse_device_buffer_log(_BUFFER_LOG, device_name) if device_name else {}
        _BUFFER_LOG.clear()
        quick_tokens = 0 if on_gpu else params.quick_lane_tokens  # llama_params: only beside a context that holds it
        self._quick: _Lane | None = None
        if quick_tokens:
            self._quick = _Lane(
                self._model, _context_params(quick_tokens, quick_tokens, 1, QUICK_LANE_SEQUENCES), logits_unused
            )
            self._quick.n_embd = n_embd
        quick_buffers = parse_llama_buffer_log(_BUFFER_LOG)
        self.facts = RunnerFacts(
            n_embd=n_embd,
            trained_context=self._model.n_ctx_train(),
            limit_tokens=params.limit_tokens,
            batch_tokens=params.batch_tokens,
            # The budget's ceiling: a packed decode stays within one ubatch. A single input longer
            # than the budget is decoded alone; a model that splits takes it in several ubatches.
            n_ubatch=params.n_ubatch,
            max_sequences=max_sequences,
            pooling_type=pooling_type,
            gpu_offload=gpu_offload,
            pid=os.getpid(),
            llama_buffer_bytes=main_buffers | {f"quick_{kind}": size for kind, size in quick_buffers.items()},
            quick_lane_tokens=quick_tokens,
            logits_given_back=logits_unused,
            llama_version=llama_version(),
            adapter_tasks=list(self._adapters),
            device_name=device_name,
            device_buffer_bytes=device_buffers,
            offloaded_layers=_offloaded_layers(params.n_gpu_layers, self._n_layer()) if device_name else 0,
        )
        InputTokenizer.__init__(self, self.vocabulary, params.limit_tokens)

    def _n_layer(self) -> int:
        return int(llama_cpp.llama_model_n_layer(self._model.model))

    @property
    def threads(self) -> int:
        """The main context's threads (the quick lane has one)."""
        return self._threads

    def set_threads(self, threads: int) -> None:
        self._threads = threads

    def renew_context(self) -> None:
        """A fresh main context in place of one that grew: llama.cpp touches its compute and output
        buffers as far as the largest decode went and keeps them; a new context starts small again.
        The weights stay mapped. (The quick lane's context is small and never grows.) The token
        lane's context, if open, is closed: it opens again when next asked for."""
        self._main.renew()
        self._close_token_lane()

    def _close_token_lane(self) -> None:
        if self._tokens is not None:
            self._tokens.close()
            self._tokens = None
            libc.trim_heap()

    def embed_batch(self, sequences: Sequence[Sequence[int]], task: str | None = None) -> np.ndarray:
        """Pooled embeddings (not normalised) of sequences that fit one decode together, on the main
        context (its threads as set_threads last said), with the task's adapter (None: none)."""
        self._main.use_threads(self._threads)
        self._main.use_adapter(task, self._adapters)
        return self._main.embed(sequences)

    def embed_tokens(self, sequences: Sequence[Sequence[int]], task: str | None = None) -> list[np.ndarray]:
        """Every token's vector (not pooled, not normalised) of sequences that fit one decode
        together, special tokens included, on the token lane's context (pooling NONE), opened at
        the first call: a model never asked for token vectors pays nothing for it. It runs on the
        main lane's thread, with its threads."""
        if self._tokens is None:
            n_tokens, n_ubatch, max_sequences, on_gpu, logits_unused = self._token_lane_params
            params = _context_params(
                n_tokens, n_ubatch, self._threads, max_sequences, on_gpu, llama_cpp.LLAMA_POOLING_TYPE_NONE
            )
            self._tokens = _Lane(self._model, params, logits_unused)
            self._tokens.n_embd = self.token_dims
        self._tokens.use_threads(self._threads)
        self._tokens.use_adapter(task, self._adapters)
        return self._tokens.embed_tokens(sequences)

    def special_ids(self, tokens: Iterable[int]) -> list[int]:
        """Those of `tokens` that are control tokens ([CLS], <s>, </s>, <pad>, ...) or the unknown
        token, once each, in order."""
        marked = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        vocab = self._model.vocab
        return sorted(token for token in set(tokens) if llama_cpp.llama_vocab_get_attr(vocab, token) & marked)

    def embed_quick(self, sequences: Sequence[Sequence[int]], task: str | None = None) -> np.ndarray:
        """embed_batch on the quick lane's context: short sequences, on one thread."""
        assert self._quick is not None, "this engine has no quick lane"
        self._quick.use_adapter(task, self._adapters)
        return self._quick.embed(sequences)

    def close(self) -> None:
        if self._quick is not None:
            self._quick.close()
        self._close_token_lane()
        self._main.close()
        self._model.close()
