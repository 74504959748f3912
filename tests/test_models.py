"""daemon.api.models: request bodies decoded into their models, and the messages a client gets for
a body the models refuse (the dialects' own, as before the models)."""

from __future__ import annotations

import pytest
from msgspec import UNSET

from daemon.api import models
from daemon.api.models import (
    Body,
    CreateRequest,
    DetokenizeRequest,
    EmbedRequest,
    OpenAIEmbedRequest,
    RerankRequest,
    TokenizeRequest,
    decode_body,
)
from daemon.errors import InvalidInput, MissingBody


@pytest.mark.parametrize(
    ("kind", "raw", "message"),
    [
        (EmbedRequest, b"[1]", "request body must be a JSON object"),
        (EmbedRequest, b"null", "request body must be a JSON object"),
        (EmbedRequest, b'{"input": [1]}', "invalid input type"),
        (EmbedRequest, b'{"input": {"text": "x"}}', "invalid input type"),
        (EmbedRequest, b'{"truncate": "yes"}', "truncate must be true or false"),
        (EmbedRequest, b'{"dimensions": true}', "dimensions must be an integer"),
        (EmbedRequest, b'{"dimensions": 2.5}', "dimensions must be an integer"),
        (EmbedRequest, b'{"dimensions": 1e400}', "dimensions: Number out of range"),
        (EmbedRequest, b'{"name": 7}', "model must be a string"),
        (EmbedRequest, b'{"keep_alive": true}', "keep_alive must be a duration string or a number of seconds"),
        (EmbedRequest, b'{"options": [1]}', "options must be an object"),
        (EmbedRequest, b'{"options": {"num_ctx": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "nested too deeply"),
        (OpenAIEmbedRequest, b'{"input": [true]}', "invalid input"),
        (OpenAIEmbedRequest, b'{"input": [[]]}', "invalid input"),
        (OpenAIEmbedRequest, b'{"input": [[1, "a"]]}', "invalid input"),
        (OpenAIEmbedRequest, b'{"dimensions": 0}', "dimensions must be a positive integer"),
        (OpenAIEmbedRequest, b'{"dimensions": "8"}', "dimensions must be an integer"),
        (OpenAIEmbedRequest, b'{"encoding_format": 1}', "encoding_format must be float or base64"),
        (RerankRequest, b'{"documents": "d"}', "documents must be an array"),
        (RerankRequest, b'{"documents": [5]}', 'documents must be strings (or {"text": ...} objects)'),
        (RerankRequest, b'{"documents": [{"title": "x"}]}', 'documents must be strings (or {"text": ...} objects)'),
        (RerankRequest, b'{"documents": [{"text": 5}]}', 'documents must be strings (or {"text": ...} objects)'),
        (RerankRequest, b'{"top_n": 0}', "top_n must be a positive integer"),
        (TokenizeRequest, b'{"add_special": "no"}', "add_special must be true or false"),
        (DetokenizeRequest, b'{"tokens": [101, true]}', "tokens must be an array of integers"),
        (DetokenizeRequest, b'{"tokens": "101"}', "tokens must be an array of integers"),
        (CreateRequest, b'{"from": 5}', "from must be a path on the daemon's machine"),
        (CreateRequest, b'{"prompts": {"q": 5}}', "create: prompts must map names to texts of at most 4096 characters"),
        (CreateRequest, b'{"default_prompt_name": []}', "create: default_prompt_name must be a string"),
    ],
)
def test_a_refused_body_gets_the_dialects_message(kind: type[Body], raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        decode_body(raw, kind)
    assert message in refused.value.message


# Invalid UTF-8 in a field the models read; in one they skip (unknown to emberd) it goes unchecked.
@pytest.mark.parametrize(
    "raw", [b"{", b'{"model": "tiny",}', b"not json", b'{"model": "\\ud800"}', b'{"input": "\xff"}']
)
def test_a_body_that_is_not_json_is_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidInput) as refused:
        decode_body(raw, EmbedRequest)
    assert refused.value.message.startswith("invalid JSON in request body: ")


def test_an_empty_body_is_a_missing_body() -> None:
    with pytest.raises(MissingBody):
        decode_body(b" \n", EmbedRequest)


def test_null_is_absent_unknown_fields_are_ignored_and_the_legacy_name_is_read() -> None:
    body = decode_body(b'{"name": "tiny", "input": null, "truncate": null, "temperature": 1}', EmbedRequest)
    assert (body.model_name, body.texts, body.truncate) == ("tiny", [], None)
    assert decode_body(b'{"model": "a", "name": "b", "input": ["x", "y"]}', EmbedRequest).model_name == "a"
    assert decode_body(b'{"input": "x"}', EmbedRequest).texts == ["x"]


def test_create_tells_an_absent_quantize_from_a_null_one() -> None:
    assert decode_body(b'{"from": "x"}', CreateRequest).quantize is UNSET
    assert decode_body(b'{"from": "x", "quantize": null}', CreateRequest).quantize is None


def test_every_message_names_a_field_of_its_model() -> None:
    kinds = [kind for kind in vars(models).values() if isinstance(kind, type) and issubclass(kind, Body)]
    assert len(kinds) >= 10
    for kind in kinds:
        fields = set(kind.__struct_encode_fields__)
        for key in [*kind.problems, *kind.bounds]:
            assert key.split("[", 1)[0].split(".", 1)[0] in fields, (kind.__name__, key)
        assert set(kind.required) <= fields, kind.__name__
