"""Typed vectors (int8, uint8, binary, ubinary, base64) and Cohere's /v2/embed: the integers are
sentence-transformers' `quantize_embeddings` of the float vectors with the model's calibrated
ranges; the ranges are llama.cpp's own vectors of the calibration texts; Cohere's real client reads
the answers; a text gets the same integers whatever else its request holds."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
from llama_cpp import Llama
from sentence_transformers.util.quantization import quantize_embeddings

from daemon.api.app import build_app
from daemon.api.common import STORE
from daemon.calibration import CALIBRATION_TEXTS, ranges_of
from daemon.config import Settings
from daemon.errors import InvalidInput
from daemon.store import ModelStore
from daemon.typed_vectors import QuantizationRanges, typed_vectors
from tests.conftest import REPO, MakeClient
from tests.live import running_daemon

TEXTS = ["the cat sat on the mat", "Der Hund schläft.", "why is the sky blue?", "x"]
ALL_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
LONG_TEXT = " ".join(f"word{index}" for index in range(40))
# The daemon's decode and llama-cpp-python's of one text differ by up to about 2e-4 a value on an f16
# model (measured: other batch shapes take other f16 matmul paths); a unit vector's values are ~0.1.
DECODE_SLACK = 3e-4

# -- the pure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "low", "high"),
    [
        ([[3.0, 4.0], [0.0, 1.0]], [0.0, 0.8], [0.6, 1.0]),  # unit rows first: [0.6, 0.8] and [0, 1]
        ([[0.12345, 0.0], [-0.5, 0.0]], [-1.0, 0.0], [1.0, 0.0]),  # one non-zero value: +-1
        ([[1.0, 1.0, 1.0, 1.0]], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_ranges_are_the_lowest_and_highest_value_of_the_unit_rows(
    rows: list[list[float]], low: list[float], high: list[float]
) -> None:
    ranges = ranges_of(np.array(rows, dtype=np.float32))
    assert ranges.low == pytest.approx(low, abs=1e-6)
    assert ranges.high == pytest.approx(high, abs=1e-6)


def test_ranges_are_rounded_outward_to_the_grid() -> None:
    # One unit row (sqrt(0.375), sqrt(0.625)) = (0.61237..., 0.79056...): low and high are its values,
    # the low rounded down and the high up.
    ranges = ranges_of(np.array([[0.375**0.5, 0.625**0.5]], dtype=np.float32))
    assert ranges.low == pytest.approx([0.6123, 0.7905], abs=1e-6)
    assert ranges.high == pytest.approx([0.6124, 0.7906], abs=1e-6)


def random_unit_rows(seed: int, count: int = 20, width: int = 37) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, width)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_int8_and_uint8_are_sentence_transformers_quantization_with_the_given_ranges(kind: str) -> None:
    calibration = random_unit_rows(1, 50)
    ranges = QuantizationRanges(calibration.min(axis=0), calibration.max(axis=0))
    vectors = random_unit_rows(2)  # some values fall outside the ranges: clipped, as ST clips
    expected = quantize_embeddings(vectors, kind, ranges=np.stack([ranges.low, ranges.high]))
    got = typed_vectors(vectors, kind, ranges)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_binary_and_ubinary_are_sentence_transformers_packed_signs(kind: str) -> None:
    vectors = random_unit_rows(3)  # 37 dimensions: the last byte is padded
    expected = quantize_embeddings(vectors, kind)
    got = typed_vectors(vectors, kind, None)
    assert got.shape == (20, 5) and got.dtype == expected.dtype and np.array_equal(got, expected)


def test_base64_is_the_little_endian_float32_bytes_of_each_vector() -> None:
    vectors = random_unit_rows(4, 3)
    encoded = typed_vectors(vectors, "base64", None)
    decoded = np.stack([np.frombuffer(base64.b64decode(text), dtype="<f4") for text in encoded])
    assert np.array_equal(decoded, vectors)


@pytest.mark.parametrize(
    "entry",
    [None, "ranges", {"low": [0.1]}, {"low": [0.1, 0.2], "high": [0.3]}, {"low": [0.5], "high": [0.1]}, {"low": []}],
)
def test_a_manifest_without_usable_ranges_reads_as_uncalibrated(entry: Any) -> None:
    assert QuantizationRanges.from_manifest(entry) is None


def test_ranges_of_another_width_are_refused() -> None:
    ranges = QuantizationRanges(np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(InvalidInput, match="3 dimensions"):
        typed_vectors(random_unit_rows(5, 2, 4), "int8", ranges)


# -- through the daemon, with Cohere's client -------------------------------------------------------


def llama_unit_vectors(gguf: Path, texts: list[str] | tuple[str, ...]) -> np.ndarray:
    """llama.cpp's own vectors of the texts, each alone, made unit-length here."""
    llm = Llama(model_path=str(gguf), embedding=True, verbose=False, n_ctx=512)
    try:
        rows = np.array([llm.embed(text, normalize=False) for text in texts], dtype=np.float64)
    finally:
        llm.close()
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def manifest_of(home: Path, name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((home / "models" / "manifests" / name / "latest.json").read_text())
    return manifest


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, minilm_gguf: Path) -> Any:
    """A daemon that calibrates at create, with all-MiniLM created through /api/create."""
    home = tmp_path_factory.mktemp("typed") / "home"
    with running_daemon(home, {}, {"EMBERD_CALIBRATE_ON_STORE": "true"}) as daemon:
        response = httpx.post(
            f"{daemon.url}/api/create", json={"model": "minilm", "from": str(minilm_gguf)}, timeout=120
        )
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines[-2:] == [{"status": "calibrating int8 and uint8 ranges"}, {"status": "success"}]
        yield daemon, home


def test_create_calibrates_the_ranges_on_llama_cpps_own_vectors_of_the_calibration_texts(
    served: Any, minilm_gguf: Path
) -> None:
    _daemon, home = served
    stored = manifest_of(home, "minilm")["quantization_ranges"]
    reference = llama_unit_vectors(minilm_gguf, CALIBRATION_TEXTS)
    low, high = np.array(stored["low"]), np.array(stored["high"])
    assert low.shape == high.shape == (384,)
    # Within one 1e-4 step of the reference (the outward rounding is table-tested above), and the
    # difference of llama.cpp's f16 decode in another batch shape.
    assert np.abs(low - reference.min(axis=0)).max() <= 1e-4 + DECODE_SLACK
    assert np.abs(high - reference.max(axis=0)).max() <= 1e-4 + DECODE_SLACK


def cohere_client(daemon: Any, http: httpx.Client) -> cohere.ClientV2:
    return cohere.ClientV2(api_key="unused", base_url=daemon.url, httpx_client=http)


def test_coheres_client_gets_every_type_and_each_is_the_quantization_of_the_float_vectors(
    served: Any, minilm_gguf: Path
) -> None:
    daemon, home = served
    with httpx.Client(timeout=60) as http:
        answer = cohere_client(daemon, http).embed(
            texts=TEXTS, model="minilm", input_type="search_document", embedding_types=ALL_TYPES
        )
    embeddings = answer.embeddings
    floats = np.array(embeddings.float_, dtype=np.float32)
    reference = llama_unit_vectors(minilm_gguf, TEXTS)
    cosines = np.sum(floats * reference, axis=1) / np.linalg.norm(floats, axis=1)
    assert cosines.min() >= 0.9999
    stored = manifest_of(home, "minilm")["quantization_ranges"]
    ranges = np.array([stored["low"], stored["high"]], dtype=np.float32)
    for kind in ("int8", "uint8"):
        assert np.array_equal(np.array(getattr(embeddings, kind)), quantize_embeddings(floats, kind, ranges=ranges))
    for kind in ("binary", "ubinary"):
        assert np.array_equal(np.array(getattr(embeddings, kind)), quantize_embeddings(floats, kind))
    decoded = np.stack([np.frombuffer(base64.b64decode(text), dtype="<f4") for text in embeddings.base64 or []])
    assert np.array_equal(decoded, floats)
    assert answer.texts == TEXTS
    assert answer.meta is not None and answer.meta.billed_units is not None
    assert answer.meta.billed_units.input_tokens == sum(len(tokens(http_url(daemon), text)) for text in TEXTS)


def http_url(daemon: Any) -> str:
    return str(daemon.url)


def tokens(url: str, text: str) -> list[int]:
    answer = httpx.post(f"{url}/api/tokenize", json={"model": "minilm", "content": text}).json()
    return list(answer["tokens"])


def test_a_texts_integers_do_not_depend_on_the_rest_of_its_request(served: Any) -> None:
    daemon, _home = served
    with httpx.Client(timeout=60) as http:
        client = cohere_client(daemon, http)
        alone = client.embed(texts=[TEXTS[0]], model="minilm", input_type="search_query", embedding_types=["int8"])
        crowded = client.embed(
            texts=[TEXTS[1], "a very different text about tax law", TEXTS[0]],
            model="minilm",
            input_type="search_query",
            embedding_types=["int8"],
        )
    assert alone.embeddings.int8 is not None and crowded.embeddings.int8 is not None
    assert alone.embeddings.int8[0] == crowded.embeddings.int8[2]


def test_every_dialect_gives_the_same_integers(served: Any) -> None:
    daemon, _home = served
    with httpx.Client(timeout=60) as http:
        cohere_answer = http.post(
            f"{daemon.url}/v2/embed",
            json={"model": "minilm", "texts": TEXTS, "embedding_types": ["uint8", "ubinary"]},
        ).json()
        for kind in ("uint8", "ubinary"):
            ollama = http.post(
                f"{daemon.url}/api/embed", json={"model": "minilm", "input": TEXTS, "embedding_type": kind}
            ).json()
            openai = http.post(
                f"{daemon.url}/v1/embeddings", json={"model": "minilm", "input": TEXTS, "encoding_format": kind}
            ).json()
            assert ollama["embeddings"] == cohere_answer["embeddings"][kind]
            assert [item["embedding"] for item in openai["data"]] == cohere_answer["embeddings"][kind]


def float_of(http: httpx.Client, url: str, body: dict[str, Any]) -> np.ndarray:
    answer = http.post(f"{url}/v2/embed", json={"model": "minilm", "embedding_types": ["float"], **body})
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["embeddings"]["float"][0], dtype=np.float32)


def text_vector(http: httpx.Client, url: str, text: str) -> np.ndarray:
    answer = http.post(f"{url}/api/embed", json={"model": "minilm", "input": text})
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["embeddings"][0], dtype=np.float32)


def test_truncate_start_keeps_the_end_of_the_text_and_end_its_beginning(served: Any) -> None:
    daemon, _home = served
    url = http_url(daemon)
    content = tokens(url, LONG_TEXT)[1:-1]  # without [CLS] and [SEP]
    words = LONG_TEXT.split()
    # Each word is two tokens ("word", "##N"): 10 tokens with [CLS] and [SEP] hold four words.
    first, last = " ".join(words[:4]), " ".join(words[-4:])
    assert tokens(url, first)[1:-1] == content[:8] and tokens(url, last)[1:-1] == content[-8:]
    with httpx.Client(timeout=60) as http:
        start = float_of(http, url, {"texts": [LONG_TEXT], "truncate": "START", "max_tokens": 10})
        end = float_of(http, url, {"texts": [LONG_TEXT], "truncate": "END", "max_tokens": 10})
        assert float(np.dot(start, text_vector(http, url, last))) >= 0.9999
        assert float(np.dot(end, text_vector(http, url, first))) >= 0.9999
        assert float(np.dot(start, end)) < 0.99
        refused = http.post(
            f"{url}/v2/embed", json={"model": "minilm", "texts": [LONG_TEXT], "truncate": "NONE", "max_tokens": 10}
        )
    assert refused.status_code == 400
    assert refused.json() == {"message": "the input length exceeds the context length"}


def test_coheres_client_raises_on_cohere_error_bodies(served: Any) -> None:
    daemon, _home = served
    with httpx.Client(timeout=60) as http, pytest.raises(cohere.BadRequestError) as raised:
        cohere_client(daemon, http).embed(
            texts=["x"], model="minilm", input_type="search_query", embedding_types=["int4"]
        )
    assert raised.value.body == {
        "message": "embedding_types must be among float, int8, uint8, binary, ubinary, base64; got 'int4'"
    }


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v2/embed", {"texts": ["x"], "embedding_types": ["int8"], "normalize": False}, "leave normalize on"),
        ("/v2/embed", {"texts": ["x"], "embedding_types": ["uint8"], "output_dimension": 8}, "leave out dimensions"),
        ("/v2/embed", {"texts": ["x"], "truncate": "MIDDLE"}, "truncate must be NONE, START or END"),
        ("/v2/embed", {"texts": ["x"], "input_type": "image"}, "input_type must be one of"),
        ("/v2/embed", {"texts": ["x"], "images": ["data:image/png;base64,AAAA"]}, "images and inputs are not served"),
        ("/v2/embed", {"texts": "x"}, "texts must be an array of strings"),
        ("/v2/embed", {"model": "minilm"}, "texts is required"),
        ("/api/embed", {"input": "x", "embedding_type": "int8", "dimensions": 8}, "leave out dimensions"),
        ("/api/embed", {"input": "x", "embedding_type": "int16"}, "embedding_type must be among"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8", "dimensions": 8}, "leave out dimensions"),
    ],
)
def test_bad_typed_requests_get_a_400_in_the_dialects_body(
    served: Any, path: str, body: dict[str, Any], message: str
) -> None:
    daemon, _home = served
    answer = httpx.post(f"{daemon.url}{path}", json={"model": "minilm", **body}, timeout=60)
    assert answer.status_code == 400
    error = answer.json()
    text = error["message"] if path.startswith("/v2/") else error["error"]
    text = text if isinstance(text, str) else text["message"]
    assert message in text


def test_normalize_false_on_v2_gives_the_pooled_vector_as_api_embed_does(served: Any) -> None:
    daemon, _home = served
    with httpx.Client(timeout=60) as http:
        cohere_answer = http.post(
            f"{daemon.url}/v2/embed", json={"model": "minilm", "texts": TEXTS, "normalize": False}
        ).json()
        ollama = http.post(f"{daemon.url}/api/embed", json={"model": "minilm", "input": TEXTS, "normalize": False})
    raw = np.array(cohere_answer["embeddings"]["float"])
    assert np.array_equal(raw, np.array(ollama.json()["embeddings"]))
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).min() > 0.01  # all-MiniLM's pooled vectors are not unit


# -- calibration later, and kept to its model -------------------------------------------------------


async def test_a_pull_calibrates_before_it_reports_success(aiohttp_client: Any, fake_hub: Any, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", hub_endpoint=fake_hub.url, calibrate_on_store=True)
    client = await aiohttp_client(build_app(settings))
    response = await client.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0"})
    lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert lines[-2:] == [{"status": "calibrating int8 and uint8 ranges"}, {"status": "success"}]
    stored = client.server.app[STORE].get(f"hf.co/{REPO}:Q8_0")
    assert stored.quantization_ranges is not None
    assert len(stored.quantization_ranges.low) == stored.facts.embedding_length


async def test_a_model_stored_without_ranges_is_calibrated_at_its_first_int8_request(
    make_client: MakeClient, minilm_gguf: Path, tmp_path: Path
) -> None:
    client = await make_client({"minilm": minilm_gguf})
    home = tmp_path / "home"
    assert "quantization_ranges" not in manifest_of(home, "minilm")
    first = await client.post("/api/embed", json={"model": "minilm", "input": TEXTS, "embedding_type": "int8"})
    assert first.status == 200, await first.text()
    stored = manifest_of(home, "minilm")["quantization_ranges"]
    reference = llama_unit_vectors(minilm_gguf, CALIBRATION_TEXTS)
    assert np.abs(np.array(stored["low"]) - reference.min(axis=0)).max() <= 1e-4 + DECODE_SLACK
    floats = await client.post("/api/embed", json={"model": "minilm", "input": TEXTS})
    expected = quantize_embeddings(
        np.array((await floats.json())["embeddings"], dtype=np.float32),
        "int8",
        ranges=np.array([stored["low"], stored["high"]], dtype=np.float32),
    )
    assert np.array_equal(np.array((await first.json())["embeddings"]), expected)


def test_ranges_are_not_recorded_for_a_model_created_again_meanwhile(tmp_path: Path, tiny_gguf: Path) -> None:
    store = ModelStore(tmp_path / "home")
    store.open()
    before = store.create("m", tiny_gguf)
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes() + b"\0" * 32)  # other bytes: another digest
    store.create("m", other)
    ranges = QuantizationRanges(np.zeros(3, np.float32), np.ones(3, np.float32))
    assert store.record_quantization_ranges("m", before.digest, ranges) is False
    assert store.get("m").quantization_ranges is None
    assert store.record_quantization_ranges("m", store.get("m").digest, ranges) is True
    recorded = store.get("m").quantization_ranges
    assert recorded is not None and np.array_equal(recorded.high, ranges.high)
