"""Logging: plain text or one JSON object a line (journald, Loki), and the per-request line.

A request line carries the route, model, status, counts and timings, never input text and never a
key: the access-log middleware builds it from RequestStats, not from the request body or headers.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

ACCESS_LOGGER = "emberd.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...the record's `fields`}."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


def escape_controls(text: str) -> str:
    """Text with every line break and control character written as an escape ("\\n", "\\x1b",
    "\\u2028"): a client's model name or path cannot start a line of its own in the text log."""
    if text.isprintable():
        return text
    escaped = []
    for character in text:
        if character.isprintable() or character == " ":
            escaped.append(character)
        elif character in "\n\r\t":
            escaped.append(repr(character)[1:-1])
        elif ord(character) < 0x100:
            escaped.append(f"\\x{ord(character):02x}")
        else:
            escaped.append(f"\\u{ord(character):04x}" if ord(character) < 0x10000 else f"\\U{ord(character):08x}")
    return "".join(escaped)


class TextFormatter(logging.Formatter):
    """The text format, one line a record: the message's control characters are escaped (a
    traceback, which this process writes, still follows on lines of its own)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = escape_controls(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class MalformedHttpFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP (an unknown method, a bad request line, a header too
    long) as an error with a traceback, though the client gets its 400 and nothing is wrong here:
    one line at info, so garbage sent to the port cannot fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            message = error.message.decode(errors="replace") if isinstance(error.message, bytes) else error.message
            first_line = str(message).strip().splitlines()[0] if message else type(error).__name__
            record.msg, record.args = "%s: %s (%d)", (record.getMessage(), first_line, error.code)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(existing, MalformedHttpFilter) for existing in server_log.filters):
        server_log.addFilter(MalformedHttpFilter())


def field_text(value: Any) -> str:
    """A value as the text line writes it: as is when it is one plain word, else quoted and escaped
    as a JSON string, so a client's value cannot add fields (`model=a status=200`) or lines."""
    text = str(value)
    if text and all(character.isprintable() and character not in ' "=\\' for character in text):
        return text
    return orjson.dumps(text).decode()


def request_line(fields: dict[str, Any]) -> str:
    """The text form: "POST /api/embed 200 model=all-minilm:latest inputs=2 tokens=16 ... total_ms=5.1"."""
    head = " ".join(field_text(fields[key]) for key in ("method", "route", "status"))
    rest = " ".join(
        f"{key}={field_text(value)}" for key, value in fields.items() if key not in ("method", "route", "status")
    )
    return f"{head} {rest}"


def log_request(fields: dict[str, Any]) -> None:
    logging.getLogger(ACCESS_LOGGER).info("%s", request_line(fields), extra={"fields": fields})
