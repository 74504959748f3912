"""Access control for a LAN: the Host guard, API keys (re-read on SIGHUP), CORS, max_inputs, and
request log lines that never hold input text or keys."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from daemon.api.access import ApiKeys, bearer_token, host_allowed, host_name, is_loopback, parse_api_keys
from daemon.errors import InvalidConfig
from tests.conftest import MakeClient, scheduler_of
from tests.live import running_daemon, wait_for

Client = TestClient[Any, Any]
KEY, OTHER_KEY = "sk-emberd-first-key-1234", "sk-emberd-second-key-5678"


@pytest.mark.parametrize(
    ("header", "allowed", "expected"),
    [
        ("localhost", (), True),
        ("LocalHost:11434", (), True),
        ("127.0.0.1", (), True),
        ("127.0.0.1:8080", (), True),
        ("[::1]", (), True),
        ("[::1]:11434", (), True),
        (None, (), True),  # HTTP/1.0 tools send no Host; a browser always does
        ("evil.example", (), False),
        ("evil.example:11434", (), False),
        ("localhost.evil.example", (), False),
        ("127.0.0.2", (), False),
        ("::1", (), False),  # not a valid Host without brackets
        ("", (), False),
        ("embed.lan:11434", ("embed.lan",), True),
        ("EMBED.LAN", ("embed.lan:80",), True),
        ("other.lan", ("embed.lan",), False),
    ],
)
def test_host_allowed(header: str | None, allowed: tuple[str, ...], expected: bool) -> None:
    assert host_allowed(header, allowed) is expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_host_name_drops_the_port_only() -> None:
    assert [host_name(h) for h in ("a.b:1", "[::1]:2", "A.B", "[::1]")] == ["a.b", "[::1]", "a.b", "[::1]"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), (None, None)],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


def test_api_keys_file_format_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n{KEY}\n\n  {OTHER_KEY}  \n")
    assert parse_api_keys(path.read_text()) == [KEY, OTHER_KEY]
    keys = ApiKeys(path)
    assert keys.accepts(KEY) and keys.accepts(OTHER_KEY)
    assert not keys.accepts(KEY[:-1]) and not keys.accepts("")
    path.write_text("# nothing\n")
    with pytest.raises(InvalidConfig, match="holds no keys"):
        keys.reload()
    assert keys.accepts(KEY)  # a bad file keeps the keys read before
    path.unlink()
    with pytest.raises(InvalidConfig, match="cannot read"):
        ApiKeys(path)


async def test_a_foreign_host_header_gets_403_in_both_dialects(tiny_client: Client) -> None:
    response = await tiny_client.post("/api/embed", json={"model": "tiny", "input": "a"}, headers={"Host": "evil.test"})
    assert response.status == 403
    assert "allowed_hosts" in (await response.json())["error"]
    response = await tiny_client.get("/v1/models", headers={"Host": "evil.test:11434"})
    assert response.status == 403
    assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert not scheduler_of(tiny_client).loaded()  # refused before any work
    response = await tiny_client.post("/api/embed", json={"model": "tiny", "input": "a"}, headers={"Host": "localhost"})
    assert response.status == 200


async def test_allowed_hosts_extend_the_list_and_a_lan_bind_has_no_guard(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, allowed_hosts=("embed.lan",))
    assert (await client.get("/api/tags", headers={"Host": "embed.lan:11434"})).status == 200
    assert (await client.get("/api/tags", headers={"Host": "evil.test"})).status == 403
    lan = await make_client({}, host="0.0.0.0")
    assert (await lan.get("/api/tags", headers={"Host": "evil.test"})).status == 200


async def test_api_keys_guard_every_route_but_the_probes(
    make_client: MakeClient, tiny_gguf: Path, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    client = await make_client({"tiny": tiny_gguf}, api_keys_file=str(keys_file))
    for path in ("/", "/healthz", "/readyz"):
        assert (await client.get(path)).status in (200, 503)
    for method, path in (("GET", "/api/tags"), ("GET", "/metrics"), ("POST", "/api/embed"), ("GET", "/v1/models")):
        response = await client.request(method, path, json={"model": "tiny", "input": "a"})
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await client.post(
        "/api/embed", json={"model": "tiny", "input": "a"}, headers={"Authorization": "Bearer nope"}
    )
    assert (response.status, await response.json()) == (
        401,
        {"error": "unauthorized: a valid API key is required (Authorization: Bearer KEY)"},
    )
    response = await client.post(
        "/v1/embeddings", json={"model": "tiny", "input": "a"}, headers={"Authorization": "Bearer x"}
    )
    body = await response.json()
    assert (response.status, body["error"]["type"], body["error"]["code"]) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    response = await client.post(
        "/api/embed", json={"model": "tiny", "input": "a"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status == 200


async def test_cors_is_off_by_default(tiny_client: Client) -> None:
    preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST"}
    response = await tiny_client.options("/api/embed", headers=preflight)
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await tiny_client.get("/api/tags", headers={"Origin": "http://app.test"})
    assert response.status == 403  # a page of another origin, not listed (tests/test_origins.py)
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await tiny_client.get("/api/tags", headers={"Origin": "http://localhost:3000"})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_answers_preflights_for_listed_origins_only(make_client: MakeClient, tiny_gguf: Path) -> None:
    client = await make_client({"tiny": tiny_gguf}, cors_origins=("http://app.test",))
    preflight = {
        "Origin": "http://app.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    response = await client.options("/api/embed", headers=preflight)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "http://app.test"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
    assert response.headers["Vary"] == "Origin"
    response = await client.options("/api/embed", headers={**preflight, "Origin": "http://evil.test"})
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers

    response = await client.post(
        "/api/embed", json={"model": "tiny", "input": "a"}, headers={"Origin": "http://app.test"}
    )
    assert response.headers["Access-Control-Allow-Origin"] == "http://app.test"
    assert "X-Emberd-Truncated-Inputs" in response.headers["Access-Control-Expose-Headers"]
    assert response.headers["Vary"] == "Origin"
    response = await client.get("/api/tags", headers={"Origin": "http://evil.test"})
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.headers["Vary"] == "Origin"  # caches must not reuse an answer across origins
    response = await client.post("/api/embed", json={"model": "missing"}, headers={"Origin": "http://app.test"})
    assert (response.status, response.headers["Access-Control-Allow-Origin"]) == (404, "http://app.test")


async def test_max_inputs_is_a_413_that_names_the_limit_before_any_work(
    make_client: MakeClient, tiny_gguf: Path
) -> None:
    client = await make_client({"tiny": tiny_gguf}, max_inputs=4)
    response = await client.post("/api/embed", json={"model": "tiny", "input": ["a"] * 5})
    assert response.status == 413
    assert "the limit is 4 (max_inputs)" in (await response.json())["error"]
    response = await client.post("/v1/embeddings", json={"model": "tiny", "input": [[1, 2]] * 5})
    body = await response.json()
    assert (response.status, body["error"]["type"]) == (413, "invalid_request_error")
    assert not scheduler_of(client).loaded()
    assert (await client.post("/api/embed", json={"model": "tiny", "input": ["a"] * 4})).status == 200


def test_keys_reload_on_sighup_and_no_key_or_text_reaches_the_log(tmp_path: Path, tiny_dir: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    environ = {"EMBERD_API_KEYS_FILE": str(keys_file), "EMBERD_LOG_FORMAT": "json"}
    secret_text = "the quarterly numbers nobody may read"
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, environ) as daemon:
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=KEY)
        answer = client.embeddings.create(model="tiny", input=[secret_text, "b"])
        assert len(answer.data) == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=daemon.url + "/v1", api_key=OTHER_KEY, max_retries=0).embeddings.create(
                model="tiny", input="a"
            )
        keys_file.write_text(OTHER_KEY + "\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "API keys loaded" in daemon.log_text())
        assert status_of(daemon.url + "/api/tags", KEY) == 401
        assert status_of(daemon.url + "/api/tags", OTHER_KEY) == 200
        log = daemon.log_text()
    assert KEY not in log and OTHER_KEY not in log and secret_text not in log
    lines = [json.loads(line) for line in log.splitlines()]
    [line] = [entry for entry in lines if entry.get("route") == "/v1/embeddings" and entry["status"] == 200]
    assert line["logger"] == "emberd.access" and line["method"] == "POST"
    assert (line["model"], line["inputs"], line["tokens"]) == ("tiny:latest", 2, answer.usage.prompt_tokens)
    assert line["queue_ms"] >= 0 and line["inference_ms"] > 0 and line["total_ms"] >= line["inference_ms"]
    assert any(entry.get("route") == "/api/tags" and entry["status"] == 401 for entry in lines)


def status_of(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_a_model_name_cannot_forge_a_line_of_the_text_log(tmp_path: Path, tiny_dir: Path) -> None:
    forged = "tiny\n2026-01-01 00:00:00,000 INFO emberd.access: POST /api/embed 200 model=forged"
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, {"EMBERD_LOG_FORMAT": "text"}) as daemon:
        for path, body in [
            ("/api/embed", {"model": forged, "input": "a"}),
            ("/api/embed", {"model": "tiny status=200 inputs=9", "input": "a"}),
            ("/v1/embeddings", {"model": "x\u2028y\r\x1b[2J", "input": "a"}),
        ]:
            status, _ = post_json_status(daemon.url + path, body)
            assert status in (400, 404)
        status_of(daemon.url + "/api/x%0aPOST%20/api/embed%20200", KEY)  # a path with a line break
        wait_for(lambda: daemon.log_text().count("emberd.access") >= 4)
        log = daemon.log_text()
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert "\u2028" not in log and "\x1b" not in log and "\r" not in log
    assert any('model="x\\u2028y\\r\\u001b[2J"' in line for line in lines)
    [quoted] = [line for line in lines if "inputs=9" in line]
    assert 'model="tiny status=200 inputs=9" inputs=1 ' in quoted


def post_json_status(url: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()
