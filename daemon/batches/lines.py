"""OpenAI's Batch API, as pure functions: an input file's lines checked, the objects the routes
answer (file, batch), and the lines of the output and error files.

No I/O here: daemon.batches.database keeps the state, daemon.batches.processor runs the lines.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

BATCH_ENDPOINT: Final = "/v1/embeddings"
COMPLETION_WINDOW: Final = "24h"
COMPLETION_WINDOW_S: Final = 24 * 3600
PURPOSE: Final = "batch"
# Lines per chunk: the unit a daemon claims, embeds and records in one transaction. Small enough that
# a daemon killed mid-chunk loses little work, large enough that the runner's decodes stay full.
CHUNK_LINES: Final = 64
MAX_CUSTOM_ID_CHARS: Final = 512

# The statuses OpenAI documents, and which ones are final.
VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
FINAL_STATUSES: Final = frozenset({FAILED, COMPLETED, EXPIRED, CANCELLED})
# What each status may become (tested as a table): the processor and the cancel route follow it.
# A batch fails in validation, or later when the disk fills.
NEXT_STATUSES: Final = {
    VALIDATING: frozenset({IN_PROGRESS, FAILED, CANCELLING}),
    IN_PROGRESS: frozenset({FINALIZING, CANCELLING, EXPIRED, FAILED}),
    FINALIZING: frozenset({COMPLETED, EXPIRED, CANCELLED, FAILED}),
    CANCELLING: frozenset({FINALIZING, CANCELLED, FAILED}),
}


def new_id(prefix: str) -> str:
    """An id in OpenAI's shape: "file-...", "batch_...", "batch_req_..."."""
    return prefix + secrets.token_hex(12)


def may_become(status: str, after: str) -> bool:
    return after in NEXT_STATUSES.get(status, frozenset())


@dataclass(frozen=True)
class InputLine:
    """One request of an input file: its custom_id, its place, and its body (None with `error`: the
    line goes to the error file with that status and message)."""

    number: int  # 1-based line number in the input file
    custom_id: str
    body: dict[str, Any] | None
    error_status: int = 0
    error_message: str = ""


@dataclass
class Validated:
    """An input file read: its requests in chunks (encode_lines: a chunk's lines, and how many), or
    why the whole batch fails (OpenAI's `errors`). Requests are kept encoded, never as parsed
    objects: a large file costs about its own size."""

    chunks: list[tuple[bytes, int]] = field(default_factory=list)
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


def validation_error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def read_input_line(number: int, raw: bytes, endpoint: str) -> InputLine | dict[str, Any]:
    """One line of an input file: a request (its body may still be refused when it runs), a request
    for the error file (another endpoint or method, a body that is not an object), or a validation
    error (not JSON, no custom_id: the line cannot be answered, so the batch fails)."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return validation_error("invalid_json_line", f"line {number} is not valid JSON", number)
    if not isinstance(line, dict):
        return validation_error("invalid_request", f"line {number} is not a JSON object", number)
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return validation_error("missing_required_parameter", f"line {number} has no custom_id", number, "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        message = f"line {number}: custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters"
        return validation_error("invalid_value", message, number, "custom_id")
    url, method, body = line.get("url"), line.get("method"), line.get("body")
    if url != endpoint:
        return InputLine(number, custom_id, None, 400, f"url must be the batch's endpoint {endpoint}, got {url!r}")
    if method != "POST":
        return InputLine(number, custom_id, None, 400, f"method must be POST, got {method!r}")
    if not isinstance(body, dict):
        return InputLine(number, custom_id, None, 400, "body must be a JSON object")
    return InputLine(number, custom_id, body)


def validate_input(lines: Iterable[bytes], endpoint: str, chunk_lines: int = CHUNK_LINES) -> Validated:
    """An input file's lines (as a file iterates them, or split; blank lines skipped) in chunks of
    `chunk_lines`, with duplicate custom_ids a validation error. The lines are read as they come:
    the file itself is never whole in memory."""
    validated = Validated()
    seen: dict[str, int] = {}
    chunk: list[InputLine] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        read = read_input_line(number, raw, endpoint)
        if isinstance(read, dict):
            validated.errors.append(read)
            continue
        if read.custom_id in seen:
            message = f"line {number}: custom_id {read.custom_id!r} is also on line {seen[read.custom_id]}"
            validated.errors.append(validation_error("duplicate_custom_id", message, number, "custom_id"))
            continue
        seen[read.custom_id] = number
        chunk.append(read)
        if len(chunk) == chunk_lines:
            validated.chunks.append((encode_lines(chunk), len(chunk)))
            chunk = []
    if chunk:
        validated.chunks.append((encode_lines(chunk), len(chunk)))
    validated.total = len(seen)
    if not validated.total and not validated.errors:
        validated.errors.append(validation_error("empty_file", "the input file has no requests", None))
    if validated.errors:
        validated.chunks = []
    return validated


def lines_of_parts(parts: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a content stored in parts (a line may span parts), each with its newline as a
    file's iteration gives them, the last one without if the content ends without."""
    pending = b""
    for part in parts:
        *whole, pending = (pending + part).split(b"\n")
        for line in whole:
            yield line + b"\n"
    if pending:
        yield pending


def encode_lines(lines: list[InputLine]) -> bytes:
    """A chunk's requests as stored: one JSON array per line."""
    return b"\n".join(
        orjson.dumps([line.number, line.custom_id, line.body, line.error_status, line.error_message]) for line in lines
    )


def decode_lines(stored: bytes) -> list[InputLine]:
    lines = []
    for raw in stored.splitlines():
        number, custom_id, body, status, message = orjson.loads(raw)
        lines.append(InputLine(number, custom_id, body, status, message))
    return lines


def output_line(custom_id: str, status: int, body: dict[str, Any]) -> bytes:
    """A line of the output file (2xx) or of the error file (others), as OpenAI writes them."""
    return orjson.dumps(
        {
            "id": new_id("batch_req_"),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
            "error": None,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def file_object(file_id: str, filename: str, purpose: str, size_bytes: int, created_at: int) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size_bytes,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }


def new_batch(batch_id: str, input_file_id: str, endpoint: str, metadata: Any, now_s: int) -> dict[str, Any]:
    """A batch object as POST /v1/batches first answers it."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": COMPLETION_WINDOW,
        "status": VALIDATING,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now_s,
        "in_progress_at": None,
        "expires_at": now_s + COMPLETION_WINDOW_S,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


# The timestamp field each status sets when a batch enters it.
STATUS_TIMESTAMPS: Final = {
    IN_PROGRESS: "in_progress_at",
    FINALIZING: "finalizing_at",
    COMPLETED: "completed_at",
    FAILED: "failed_at",
    EXPIRED: "expired_at",
    CANCELLING: "cancelling_at",
    CANCELLED: "cancelled_at",
}


def moved(batch: dict[str, Any], status: str, now_s: int) -> dict[str, Any]:
    """The batch in `status`, its timestamp set."""
    return {**batch, "status": status, STATUS_TIMESTAMPS[status]: now_s}
