"""Answers checked against emberd's OpenAPI document (/openapi.json): used by tests/test_openapi.py
and tests/reliability/fuzz_routes.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")


@dataclass(frozen=True)
class Operation:
    method: str  # upper case, as sent
    path: str  # the template: /v1/models/{model}
    spec: dict[str, Any]

    @property
    def request_schema(self) -> dict[str, Any] | None:
        """The JSON body's schema (None: no body, or a multipart upload's form)."""
        request = self.spec.get("requestBody")
        if request is None or "application/json" not in request["content"]:
            return None
        schema: dict[str, Any] = request["content"]["application/json"]["schema"]
        return schema


def _path_pattern(template: str) -> re.Pattern[str]:
    # aiohttp's {model:.+}: a model name may hold slashes; other parameters (file and batch ids) not.
    pattern = ""
    for piece in re.split(r"(\{[^}]+\})", template):
        pattern += (".+" if piece == "{model}" else "[^/]+") if piece.startswith("{") else re.escape(piece)
    return re.compile("^" + pattern + "$")


class Contract:
    """The document's operations, and validators for their request and answer schemas."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.operations = [
            Operation(method.upper(), path, spec)
            for path, item in document["paths"].items()
            for method, spec in item.items()
            if method in METHODS
        ]
        self._patterns = [(_path_pattern(op.path), op) for op in self.operations]
        self._validators: dict[str, Draft202012Validator] = {}

    def operation(self, method: str, path: str) -> Operation | None:
        path = path.split("?", 1)[0]
        for pattern, op in self._patterns:
            if op.method == method.upper() and pattern.match(path):
                return op
        return None

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """A schema with its top-level $ref followed (#/components/schemas/...)."""
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            schema = self.document["components"]["schemas"][name]
        return schema

    def validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        key = json.dumps(schema, sort_keys=True)
        found = self._validators.get(key)
        if found is None:
            # The components ride along, so "#/components/schemas/X" resolves against this root.
            root = {**schema, "components": self.document["components"]}
            found = Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)
            self._validators[key] = found
        return found

    def schema_errors(self, schema: dict[str, Any], instance: Any) -> list[str]:
        return [error.message[:200] for error in self.validator(schema).iter_errors(instance)]

    def check_request(self, method: str, path: str, document: Any) -> list[str]:
        op = self.operation(method, path)
        if op is None or op.request_schema is None:
            return [f"{method} {path} takes no JSON body"]
        return self.schema_errors(op.request_schema, document)

    def check_answer(self, method: str, path: str, status: int, content_type: str, body: bytes) -> list[str]:
        """What is wrong with an answer by the document: an undocumented status, media type or
        shape. An answer to a route the document does not have is not checked here."""
        op = self.operation(method, path)
        if op is None:
            return []
        label = f"{method} {op.path} -> {status}"
        response = op.spec["responses"].get(str(status))
        if response is None:
            return [f"{label}: status not documented"]
        content = response.get("content")
        if content is None:
            return [] if not body else [f"{label}: a body where none is documented"]
        media = content_type.split(";", 1)[0].strip()
        if media not in content:
            return [f"{label}: media type {media!r} not documented"]
        schema = content[media]["schema"]
        try:
            if media == "application/x-ndjson":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                return [f"{label}: {error}" for line in lines for error in self.schema_errors(schema, line)]
            instance = body.decode() if media.startswith("text/") else json.loads(body)
        except ValueError as error:
            return [f"{label}: unreadable {media} body: {error}"]
        return [f"{label}: {error}" for error in self.schema_errors(schema, instance)]
