"""The pipe protocol between the daemon and a runner child.

A frame is: u32 header length, u32 payload length (big-endian), a JSON header, a binary payload.
Embeddings travel as raw little-endian float32 in the payload: a 384-float vector is 1.5 KB and
costs no JSON encoding on either side.

Child -> parent headers:
    {"type": "ready", "facts": {...}}                 once, after the model loaded
    {"type": "load_failed", "message": "...", "refused": bool, "llama_cpp": [line, ...]}
                                                      instead of ready, then the child exits; refused:
                                                      llama.cpp cannot load the file's architecture or
                                                      vocabulary (a vocabulary-only load fails too), or
                                                      a task adapter; llama_cpp: its error lines (the
                                                      adapter refused first, for an adapter)
    {"type": "result", "id": N, "rows": R, "dims": D, "token_count": T, "truncated": K,
     "inference_s": S, "decodes": [[tokens, sequences], ...], "quick_decodes": [...], "windows": [W, ...]}
                                                      S: first decode to answer; decodes: those run
                                                      since the previous result (quick_decodes: on the
                                                      quick lane's context); W: windows per input
    {"type": "result", ..., "rows": R, "dims": D, "token_rows": [n, ...], "token_ids": [[id, ...], ...],
     "special_ids": [id, ...]}                        the answer to an embed with "output": "tokens":
                                                      every token's vector of each input (special
                                                      tokens included, not pooled, not normalised),
                                                      input after input: R = the sum of token_rows,
                                                      n of them input i's, token_ids its tokens;
                                                      special_ids: those of the tokens that are
                                                      control or unknown tokens
    {"type": "error", "id": N, "kind": "context_exceeded" | "invalid_input" | "failed", "message": "..."}
    {"type": "renewed", "id": N}                      the context of renew N is a fresh one
    {"type": "tokens", "id": N, "tokens": [...]}      the answer to tokenize N
    {"type": "text", "id": N, "content": "..."}       the answer to detokenize N
    {"type": "sequences", "id": N, "sequences": [[[id, ...], ...], ...], "truncated": [bool, ...]}
                                                      the answer to tokenize_inputs N: per input, the
                                                      sequences an embed decodes (several: windows)
Parent -> child headers:
    {"type": "embed", "id": N, "texts": [text, [token ids] or {"query", "document"}, ...], "truncate": bool,
     "limit_tokens": L,
     "split": bool, "task": T, "keep_end": bool}      L: this request's context, at most the runner's;
                                                      split: long inputs in windows, pooled; T: its task
                                                      adapter (absent or null: the base model);
                                                      keep_end (absent: false): a cut input keeps its
                                                      end (Cohere's truncate START), not its start;
                                                      background (absent: false): a batch job's lines,
                                                      decoded when no other request waits
     "output": "tokens"                              (absent: pooled vectors) every token's vector, from
                                                      a context of pooling NONE opened at the first such
                                                      request; split is refused (invalid_input)
    {"type": "set_threads", "threads": N}             no answer; applies from the next decode
    {"type": "set_batch_tokens", "tokens": N}         no answer; the decode budget, capped at capacity
    {"type": "cancel", "id": N}                        no answer; drop request N's sequences not decoded yet
    {"type": "renew", "id": N}                         replace the context by a fresh one (gives back
                                                      the buffers a long decode grew), between decodes
    {"type": "tokenize", "id": N, "text": "...", "add_special": bool}    the model's own tokenizer
    {"type": "detokenize", "id": N, "tokens": [...]}  (also in a vocabulary-only runner)
    {"type": "tokenize_inputs", "id": N, "texts": [...], "truncate": bool, "limit_tokens": L,
     "split": bool, "keep_end": bool}                 an embed's fields: the sequences it would decode,
                                                      cut at L alone (also in a vocabulary-only runner)
    {"type": "embed", "id": N, "sequences": [[[id, ...], ...], ...], "limit_tokens": L, "task": T}
                                                      instead of texts: per input, sequences decoded as
                                                      given (a tokenize_inputs answer; nothing added or
                                                      cut), windows pooled as for split
"""

from __future__ import annotations

import re
import signal
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

FRAME_PREFIX = struct.Struct(">II")
# Signals a terminal or systemd sends to a whole process group. A runner ignores them: the daemon
# alone decides when it stops, by closing its stdin.
GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class RunnerFacts:
    """What a runner reports once its model is loaded (the "facts" of the ready frame)."""

    n_embd: int
    trained_context: int
    limit_tokens: int  # longest single input, special tokens included
    batch_tokens: int  # token budget of one decode, at load
    n_ubatch: int  # llama.cpp's: the most tokens of one ubatch, and the ceiling of batch_tokens
    max_sequences: int  # sequences one decode may hold
    pooling_type: int
    gpu_offload: bool  # this llama.cpp build can offload layers (CUDA, Metal, ...)
    pid: int
    # What llama.cpp says it allocated at load, bytes by kind: model, output, compute, kv (the quick
    # lane's context: quick_output, quick_compute, quick_kv).
    llama_buffer_bytes: dict[str, int] = field(default_factory=dict)
    llama_version: str = ""  # "llama-cpp-python 0.3.36, ggml 0.25.3 (0c1e570)"
    quick_lane_tokens: int = 0  # the quick lane's context; 0: none (see batching.quick_lane_opens)
    logits_given_back: bool = False  # see engine.writes_no_logits
    adapter_tasks: list[str] = field(default_factory=list)  # the task adapters loaded (daemon.adapters)
    # The GPU the offloaded layers went to ("" for none), and what llama.cpp says it allocated there,
    # bytes by kind (model, kv, compute): the device part the scheduler counts.
    device_name: str = ""
    device_buffer_bytes: dict[str, int] = field(default_factory=dict)
    offloaded_layers: int = 0


MAX_HEADER_BYTES = 256 * 1024 * 1024


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    header_bytes = orjson.dumps(header)
    return FRAME_PREFIX.pack(len(header_bytes), len(payload)) + header_bytes + payload


def read_frame_blocking(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """Read one frame from a blocking stream; None at end of stream."""
    prefix = stream.read(FRAME_PREFIX.size)
    if len(prefix) < FRAME_PREFIX.size:
        return None
    header_length, payload_length = FRAME_PREFIX.unpack(prefix)
    if header_length > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {header_length} bytes")
    header = stream.read(header_length)
    payload = stream.read(payload_length) if payload_length else b""
    if len(header) < header_length or len(payload) < payload_length:
        return None
    return orjson.loads(header), payload


_MIB = 1024 * 1024
_BUFFER_LINE = re.compile(r"(\w+)\s+buffer size\s*=\s*([0-9.]+)\s*MiB")
# The same lines with the buffer's owner before the kind: "Vulkan0 compute buffer size = 12.0 MiB".
_DEVICE_BUFFER_LINE = re.compile(r"(\S+)\s+(\w+)\s+buffer size\s*=\s*([0-9.]+)\s*MiB")


def parse_llama_buffer_log(lines: Iterable[str]) -> dict[str, int]:
    """What llama.cpp says it allocated, from its load-time log lines such as
    "CPU_Mapped model buffer size = 43.51 MiB" or "CPU compute buffer size = 12.0 MiB": bytes by
    kind (model, output, compute, KV), summed over devices."""
    sizes: dict[str, int] = {}
    for line in lines:
        for kind, mib in _BUFFER_LINE.findall(line):
            key = kind.lower()
            sizes[key] = sizes.get(key, 0) + round(float(mib) * _MIB)
    return sizes


def parse_device_buffer_log(lines: Iterable[str], device_name: str) -> dict[str, int]:
    """What llama.cpp says it allocated on one device (its buffers named `device_name`, such as
    "Vulkan0" or "CUDA0"; not the pinned host buffers, "Vulkan_Host"), bytes by kind."""
    sizes: dict[str, int] = {}
    for line in lines:
        for owner, kind, mib in _DEVICE_BUFFER_LINE.findall(line):
            if owner == device_name:
                key = kind.lower()
                sizes[key] = sizes.get(key, 0) + round(float(mib) * _MIB)
    return sizes
