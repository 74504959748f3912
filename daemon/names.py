"""Model names: "all-minilm", "nomic-embed-text:v1.5", "hf.co/{owner}/{repo}[:{quant}]".

Names are case-insensitive for the store (canonical form: lower case, with a tag); a Hub name
keeps its original spelling for the requests to the Hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.errors import InvalidModelName, UnknownModel

MAX_NAME_LENGTH = 200
DEFAULT_TAG = "latest"
HUB_PREFIXES = ("hf.co/", "huggingface.co/")
_SEGMENT = r"[a-z0-9][a-z0-9._-]*"
_NAME_PATTERN = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*(?::{_SEGMENT})?")


def _strip_hub_prefix(name: str) -> tuple[bool, str]:
    lowered = name.lower()
    for prefix in HUB_PREFIXES:
        if lowered.startswith(prefix):
            return True, name[len(prefix) :]
    return False, name


def canonical_name(name: str) -> str:
    """ "All-MiniLM" -> "all-minilm:latest"; "huggingface.co/A/B" -> "hf.co/a/b:latest".

    Raises InvalidModelName for names that could escape the store, and UnknownModel for "".
    """
    candidate = name.strip(" ").lower()
    if not candidate:
        raise UnknownModel(f"model '{name}' not found")
    if len(candidate) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"invalid model name: longer than {MAX_NAME_LENGTH} characters")
    if ".." in candidate or not _NAME_PATTERN.fullmatch(candidate):
        raise InvalidModelName(f"invalid model name {name!r}")
    is_hub, rest = _strip_hub_prefix(candidate)
    if is_hub:
        if rest.split(":")[0].count("/") != 1:
            raise InvalidModelName(f"invalid model name {name!r}: expected hf.co/{{owner}}/{{repo}}[:{{quant}}]")
        candidate = "hf.co/" + rest
    return candidate if ":" in candidate else f"{candidate}:{DEFAULT_TAG}"


@dataclass(frozen=True)
class HubName:
    repo_id: str  # as the user spelled it: the Hub's URLs are case-sensitive on some mirrors
    tag: str | None  # quant to pick, None for "the best for embeddings"


def parse_hub_name(name: str) -> HubName | None:
    """The repo and tag of an hf.co/... name, or None for other names. Validates like canonical_name."""
    canonical_name(name)
    is_hub, rest = _strip_hub_prefix(name.strip(" "))
    if not is_hub:
        return None
    repo_id, _, tag = rest.partition(":")
    return HubName(repo_id, tag if tag and tag.lower() != DEFAULT_TAG else None)
