"""The shipped aliases against their model cards (docs/models.md), and the card conventions an alias
carries: checked when the file is read, kept in the manifest, and acted on (append_eos)."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient
from gguf import GGUFReader

from daemon.api.app import build_app
from daemon.config import Settings
from daemon.errors import InvalidConfig
from daemon.hub import load_aliases
from daemon.store import ModelStore
from tests.hub_server import FakeHub
from tests.tiny_models import copy_gguf, make_tiny_causal_gguf

Client = TestClient[Any, Any]
ROOT = Path(__file__).parent.parent
MODELS_DOC = ROOT / "docs" / "models.md"
MODELS_FILE = ROOT / "configs" / "models.toml"
CARD_REPO = "Owner/Tiny-Qwen3-Embedding-GGUF"


# -- the alias file's new fields are checked -------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('append_eos = "yes"', ["'card-model'", "append_eos must be true or false", "'yes'"]),
        ('pooling = "average"', ["'card-model'", "pooling must be one of none, mean, cls, last, rank", "'average'"]),
        ("normalize = 1", ["'card-model'", "normalize must be true or false", "1"]),
        ("append_eso = true", ["'card-model'", "unknown field 'append_eso'"]),
    ],
)
def test_a_bad_convention_field_names_the_alias_and_the_field(tmp_path: Path, line: str, words: list[str]) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        f'["ok-model"]\nrepo = "a/b"\nrevision = "main"\n\n["card-model"]\nrepo = "a/b"\nrevision = "main"\n{line}\n'
    )
    with pytest.raises(InvalidConfig) as raised:
        load_aliases(path)
    assert str(path) in raised.value.message
    for word in words:
        assert word in raised.value.message


def test_the_convention_fields_are_read_and_default_to_unset(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '["with-card"]\nrepo = "a/b"\nrevision = "main"\nappend_eos = true\npooling = "last"\nnormalize = true\n\n'
        '["without"]\nrepo = "a/b"\nrevision = "main"\n'
    )
    aliases = load_aliases(path)
    card = aliases["with-card:latest"].prompts
    assert (card.append_eos, card.pooling, card.normalize) == (True, "last", True)
    plain = aliases["without:latest"].prompts
    assert (plain.append_eos, plain.pooling, plain.normalize) == (False, None, None)


# -- append_eos: the daemon ends each input with EOS where the GGUF's tokenizer does not -------------


@pytest.fixture(scope="module")
def causal_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("cards")
    adds = make_tiny_causal_gguf(directory / "adds-eos.gguf")  # tokenizer.ggml.add_eos_token = true
    lacks = copy_gguf(adds, directory / "no-eos.gguf", {"tokenizer.ggml.add_eos_token": False})
    return {"adds-eos.gguf": adds, "no-eos.gguf": lacks}


@pytest.fixture
def card_hub(causal_files: dict[str, Path]) -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.add_repo(CARD_REPO, {name: path.read_bytes() for name, path in causal_files.items()})
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
async def card_client(aiohttp_client: Any, tmp_path: Path, card_hub: FakeHub) -> Client:
    commit = card_hub.repos[CARD_REPO].commit
    aliases = {
        "card-eos": ("no-eos.gguf", "append_eos = true\n"),  # the case append_eos is for
        "no-card": ("no-eos.gguf", ""),
        "card-eos-on-eos": ("adds-eos.gguf", "append_eos = true\n"),  # the GGUF adds it already
        "gguf-eos": ("adds-eos.gguf", ""),  # llama.cpp's own EOS: the reference
    }
    path = tmp_path / "models.toml"
    path.write_text(
        "".join(
            f'["{name}"]\nrepo = "{CARD_REPO}"\nfile = "{file}"\nrevision = "{commit}"\n{extra}\n'
            for name, (file, extra) in aliases.items()
        )
    )
    settings = Settings(
        home=tmp_path / "home", models_file=str(path), hub_endpoint=card_hub.url, calibrate_on_store=False
    )
    client: Client = await aiohttp_client(build_app(settings))
    for name in aliases:
        response = await client.post("/api/pull", json={"model": name, "stream": False})
        assert response.status == 200, await response.text()
    return client


async def embed_one(client: Client, model: str, text: str) -> tuple[np.ndarray, int]:
    response = await client.post("/api/embed", json={"model": model, "input": text})
    assert response.status == 200, await response.text()
    body = await response.json()
    return np.array(body["embeddings"][0], np.float32), body["prompt_eval_count"]


async def tokens_of(client: Client, model: str, text: str) -> list[int]:
    response = await client.post("/api/tokenize", json={"model": model, "content": text})
    assert response.status == 200, await response.text()
    tokens: list[int] = (await response.json())["tokens"]
    return tokens


async def test_append_eos_ends_each_input_with_the_eos_the_gguf_names(
    card_client: Client, causal_files: dict[str, Path]
) -> None:
    eos = int(GGUFReader(causal_files["no-eos.gguf"]).fields["tokenizer.ggml.eos_token_id"].contents())
    text = "word word"
    appended = await tokens_of(card_client, "card-eos", text)
    assert appended[-1] == eos
    # The same ids llama.cpp gives when the GGUF's own tokenizer adds the EOS, and one more than without.
    assert appended == await tokens_of(card_client, "gguf-eos", text)
    assert appended[:-1] == await tokens_of(card_client, "no-card", text)
    # Where the GGUF adds it already, none is added twice.
    assert await tokens_of(card_client, "card-eos-on-eos", text) == appended

    vector, count = await embed_one(card_client, "card-eos", text)
    reference, reference_count = await embed_one(card_client, "gguf-eos", text)
    without, without_count = await embed_one(card_client, "no-card", text)
    assert count == reference_count == len(appended) == without_count + 1
    # Last-token pooling pools the EOS: the vector llama.cpp makes when it adds the EOS itself.
    np.testing.assert_allclose(vector, reference, atol=1e-5)
    assert float(vector @ without) < 0.999


async def test_append_eos_is_kept_in_the_manifest(card_client: Client, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "home")  # read back from disk, as after a restart
    assert store.get("card-eos").prompts.append_eos is True
    assert store.get("no-card").prompts.append_eos is False
    manifest = orjson.loads((store.manifests_dir / "card-eos" / "latest.json").read_bytes())
    assert manifest["append_eos"] is True


# -- the shipped aliases against docs/models.md ("Aliases and their model cards") ----------------------


def documented_cards() -> dict[str, dict[str, Any]]:
    """What docs/models.md says of each alias, parsed from the page alone (not through the loader):
    "### `name`, `name`" headings, then "- Prompt `NAME`: `JSON string`", "- Pooling: `x`" (or "not
    recorded"), "- Normalize: `true`", "- append_eos: `false`" and "- Status: ..." lines."""
    text = MODELS_DOC.read_text(encoding="utf-8")
    section = text.split("\n## Aliases and their model cards\n", 1)[1].split("\n## ", 1)[0]
    cards: dict[str, dict[str, Any]] = {}
    for block in section.split("\n### ")[1:]:
        heading, _, body = block.partition("\n")
        if heading.strip() == "Not added":
            continue
        lines = [line for line in body.splitlines() if line.startswith("- ")]
        card: dict[str, Any] = {"prompts": {}}
        for line in lines:
            if prompt := re.fullmatch(r"- Prompt `([^`]+)`: `(\".*\")`", line):
                card["prompts"][prompt.group(1)] = json.loads(prompt.group(2))
            elif line.startswith("- Prompts: none"):
                card["no_prompts"] = True
            elif field := re.match(r"- (Pooling|Normalize|append_eos|Status): (.*)", line):
                key, value = field.group(1).lower(), field.group(2)
                if key == "status":
                    card[key] = value
                elif value.startswith("not recorded"):
                    card[key] = None
                else:
                    quoted = re.match(r"`([^`]+)`", value)
                    assert quoted, f"{heading}: {line!r} quotes no value"
                    card[key] = json.loads(quoted.group(1)) if key != "pooling" else quoted.group(1)
        for name in re.findall(r"`([^`]+)`", heading):
            assert name not in cards, f"{name} is documented twice"
            cards[name] = card
    return cards


def configured_aliases() -> dict[str, dict[str, Any]]:
    """configs/models.toml as TOML, without the loader."""
    return tomllib.loads(MODELS_FILE.read_text(encoding="utf-8"))


def test_every_alias_is_documented_and_every_documented_alias_exists() -> None:
    assert sorted(documented_cards()) == sorted(configured_aliases())


@pytest.mark.parametrize("name", sorted(configured_aliases()))
def test_an_alias_carries_what_its_card_section_quotes(name: str) -> None:
    card = documented_cards()[name]
    alias = configured_aliases()[name]
    assert card.get("status", "").startswith(("card read", "card not read")), f"{name}: no status"
    assert set(card) >= {"pooling", "normalize", "append_eos"}, f"{name}: a field is not documented"
    assert bool(card["prompts"]) != bool(card.get("no_prompts")), f"{name}: prompts, or 'Prompts: none'"
    # Byte for byte: the page's JSON-quoted strings against the file's.
    assert {key: text.encode() for key, text in alias.get("prompts", {}).items()} == {
        key: text.encode() for key, text in card["prompts"].items()
    }
    assert alias.get("pooling") == card["pooling"]
    assert alias.get("normalize") == card["normalize"]
    assert alias.get("append_eos", False) == card["append_eos"]


def test_the_shipped_aliases_load_with_their_conventions() -> None:
    aliases = load_aliases(MODELS_FILE)
    qwen = aliases["qwen3-embedding:latest"].prompts
    assert (qwen.append_eos, qwen.pooling, qwen.normalize) == (True, "last", True)
    assert qwen.prompts["query"].endswith("\nQuery:")
    assert all(alias.prompts.append_eos == name.startswith("qwen3-embedding") for name, alias in aliases.items())
