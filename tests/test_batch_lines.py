"""The Batch API's pure rules: an input file's lines checked and chunked, and the status table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.batches.database import SQLiteBatchDatabase
from daemon.batches.lines import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    decode_lines,
    lines_of_parts,
    may_become,
    validate_input,
)
from daemon.batches.processor import validate_stored_input

ENDPOINT = "/v1/embeddings"


def line(custom_id: Any, body: Any = None, url: str = ENDPOINT, method: str = "POST") -> bytes:
    fields = {"custom_id": custom_id, "method": method, "url": url, "body": body or {"model": "m", "input": "x"}}
    return json.dumps(fields).encode()


def test_lines_are_chunked_in_order_and_blank_lines_skipped() -> None:
    content = b"\n".join([line("a"), b"", line("b"), b"   ", line("c"), line("d"), line("e")])
    validated = validate_input(content.splitlines(), ENDPOINT, chunk_lines=2)
    assert validated.errors == [] and validated.total == 5
    assert [count for _lines, count in validated.chunks] == [2, 2, 1]
    requests = [request for lines, _count in validated.chunks for request in decode_lines(lines)]
    assert [(request.number, request.custom_id) for request in requests] == [
        (1, "a"),
        (3, "b"),
        (5, "c"),
        (6, "d"),
        (7, "e"),
    ]


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (line("x", url="/v1/chat/completions"), 400, "url must be the batch's endpoint"),
        (line("x", method="GET"), 400, "method must be POST"),
        (json.dumps({"custom_id": "x", "method": "POST", "url": ENDPOINT, "body": [1]}).encode(), 400, "body must be"),
    ],
)
def test_a_request_for_another_endpoint_or_without_an_object_body_goes_to_the_error_file(
    raw: bytes, status: int, message: str
) -> None:
    validated = validate_input(raw.splitlines(), ENDPOINT)
    assert validated.errors == []
    (request,) = decode_lines(validated.chunks[0][0])
    assert request.body is None and request.error_status == status and message in request.error_message


@pytest.mark.parametrize(
    ("content", "code", "line_number"),
    [
        (b"{not json", "invalid_json_line", 1),
        (line("a") + b"\n[1, 2]", "invalid_request", 2),
        (line("a") + b"\n" + line(""), "missing_required_parameter", 2),
        (line("a") + b"\n" + line(7), "missing_required_parameter", 2),
        (line("a") + b"\n" + line("b") + b"\n" + line("a"), "duplicate_custom_id", 3),
        (line("x" * 513), "invalid_value", 1),
        (b"\n\n", "empty_file", None),
    ],
)
def test_a_line_that_cannot_be_answered_fails_validation(content: bytes, code: str, line_number: int | None) -> None:
    validated = validate_input(content.splitlines(), ENDPOINT)
    assert [(error["code"], error["line"]) for error in validated.errors] == [(code, line_number)]
    assert validated.chunks == []


@pytest.mark.parametrize(
    ("status", "after", "allowed"),
    [
        (VALIDATING, IN_PROGRESS, True),
        (VALIDATING, FAILED, True),
        (VALIDATING, COMPLETED, False),
        (IN_PROGRESS, FINALIZING, True),
        (IN_PROGRESS, CANCELLING, True),
        (IN_PROGRESS, EXPIRED, True),
        (IN_PROGRESS, FAILED, True),  # the disk filled
        (IN_PROGRESS, COMPLETED, False),  # through finalizing
        (FINALIZING, COMPLETED, True),
        (CANCELLING, CANCELLED, True),
        (CANCELLING, IN_PROGRESS, False),
        (COMPLETED, CANCELLING, False),  # final
        (CANCELLED, IN_PROGRESS, False),
        (FAILED, IN_PROGRESS, False),
    ],
)
def test_the_status_table(status: str, after: str, allowed: bool) -> None:
    assert may_become(status, after) is allowed


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([b'{"a": 1}\n{"b": 2}\n'], [b'{"a": 1}\n', b'{"b": 2}\n']),
        ([b'{"a": ', b'1}\n{"b"', b": 2}"], [b'{"a": 1}\n', b'{"b": 2}']),  # lines across parts; no final newline
        ([b"one\n", b"", b"two\r\n"], [b"one\n", b"two\r\n"]),  # an empty part; CRLF kept for the JSON reader
        ([b"\n\n", b"x"], [b"\n", b"\n", b"x"]),
        ([], []),
    ],
)
def test_lines_of_parts_are_a_files_lines(parts: list[bytes], expected: list[bytes]) -> None:
    assert list(lines_of_parts(parts)) == expected


def test_a_file_iterated_and_its_parts_validate_alike(tmp_path: Path) -> None:
    content = b"".join(
        orjson.dumps({"custom_id": f"c{n}", "method": "POST", "url": ENDPOINT, "body": {"input": "x" * n}}) + b"\r\n"
        for n in range(9)
    )
    path = tmp_path / "input.jsonl"
    path.write_bytes(content)
    with path.open("rb") as source:
        from_file = validate_input(source, ENDPOINT, chunk_lines=4)
    from_parts = validate_input(lines_of_parts([content[i : i + 7] for i in range(0, len(content), 7)]), ENDPOINT, 4)
    assert from_file == from_parts
    assert (from_file.total, [count for _, count in from_file.chunks], from_file.errors) == (9, [4, 4, 1], [])


def test_a_stored_input_validates_as_its_lines_are_read_and_a_deleted_one_fails(tmp_path: Path) -> None:
    database = SQLiteBatchDatabase(tmp_path / "batches", "test")
    database.files_dir.mkdir(parents=True)
    database.stored_path("file-1").write_bytes(line("a") + b"\n" + line("b") + b"\n")
    validated = validate_stored_input(database, {"input_file_id": "file-1", "endpoint": ENDPOINT})
    assert (validated.total, validated.errors) == (2, [])
    gone = validate_stored_input(database, {"input_file_id": "file-2", "endpoint": ENDPOINT})
    assert [error["code"] for error in gone.errors] == ["file_not_found"]
