"""GET /docs: Swagger UI over /openapi.json, open without a key, loaded in a real browser (Debian's
headless Chromium, driven by Playwright) that lists every route and embeds with the key its user
types, and nothing loaded from another origin. The page's files answer without a key; the Host
guard and the origin rules still apply."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient
from playwright.sync_api import ConsoleMessage, Page, Request, expect, sync_playwright

from daemon.api.access import is_open
from tests.conftest import MakeClient
from tests.live import running_daemon

Client = TestClient[Any, Any]
KEY = "sk-emberd-docs-page-key-4321"
EVIL = "http://evil.example"
# The page's files, as its HTML names them (relative to /).
PAGE_FILES = {
    "docs/swagger-ui.css": "text/css",
    "docs/swagger-ui-bundle.js": "text/javascript",
    "docs/emberd-docs.js": "text/javascript",
    "docs/favicon-32x32.png": "image/png",
}
HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}
TINY_DIMENSIONS = 32  # tests/tiny_models.py's hidden size
# Debian's package (make test installs it): Playwright never downloads a browser here.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/docs", True),
        ("HEAD", "/docs", True),
        ("GET", "/openapi.json", True),
        ("HEAD", "/docs/swagger-ui-bundle.js", True),
        ("GET", "/docs/swagger-ui.css", True),
        ("GET", "/docs/emberd-docs.js", True),
        ("POST", "/docs", False),
        ("DELETE", "/openapi.json", False),
        ("POST", "/docs/swagger-ui.css", False),
        ("GET", "/docs/", False),
        ("GET", "/docs/swagger-editor-bundle.js", False),  # in the package, not on the page
        ("GET", "/docs/swagger-ui-bundle.js.map", False),
        ("GET", "/docs/x/swagger-ui.css", False),
        ("GET", "/docsswagger-ui.css", False),
        ("GET", "/api/tags", False),
        ("GET", "/metrics", False),
        ("POST", "/api/embed", False),
        # The probes, as before: any method reaches them (and their routes answer 405).
        ("GET", "/healthz", True),
        ("POST", "/", True),
    ],
)
def test_is_open(method: str, path: str, expected: bool) -> None:
    assert is_open(method, path) is expected


def page_links(html: str) -> set[str]:
    return set(re.findall(r'(?:src|href)="([^"]+)"', html))


async def keyed_client(make_client: MakeClient, tmp_path: Path) -> Client:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    return await make_client({}, api_keys_file=str(keys_file))


async def test_the_page_and_its_files_answer_without_a_key(make_client: MakeClient, tmp_path: Path) -> None:
    client = await keyed_client(make_client, tmp_path)
    response = await client.get("/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    html = await response.text()
    assert page_links(html) == set(PAGE_FILES)
    assert "<script>" not in html  # no inline script: the policy forbids them
    for link, content_type in PAGE_FILES.items():
        response = await client.get("/" + link)
        assert (response.status, response.content_type) == (200, content_type), link
        assert len(await response.read()) > 0, link
        assert (await client.head("/" + link)).status == 200, link
    bundle = await client.get("/docs/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in (await bundle.text())[:2000]
    init = await (await client.get("/docs/emberd-docs.js")).text()
    assert 'url: "openapi.json"' in init and "validatorUrl: null" in init
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert "/api/embed" in (await response.json())["paths"]
    assert (await client.head("/docs")).status == 200


async def test_only_reading_the_pages_files_is_open(make_client: MakeClient, tmp_path: Path) -> None:
    client = await keyed_client(make_client, tmp_path)
    with_key = {"Authorization": f"Bearer {KEY}"}
    assert (await client.get("/api/tags")).status == 401
    assert (await client.post("/docs")).status == 401
    assert (await client.post("/docs", headers=with_key)).status == 405
    # A file of the package the page does not load: not open, and not served at all.
    assert (await client.get("/docs/swagger-editor-bundle.js")).status == 401
    assert (await client.get("/docs/swagger-editor-bundle.js", headers=with_key)).status == 404
    assert (await client.get("/docs/swagger-ui-bundle.js.map", headers=with_key)).status == 404
    assert (await client.get("/docs/", headers=with_key)).status == 404


@pytest.mark.parametrize("path", ["/docs", "/docs/swagger-ui-bundle.js", "/openapi.json"])
async def test_the_host_guard_and_the_origin_rules_apply_to_the_page(
    make_client: MakeClient, tmp_path: Path, path: str
) -> None:
    client = await keyed_client(make_client, tmp_path)
    own_origin = str(client.make_url("")).rstrip("/")
    response = await client.get(path, headers={"Host": "evil.example"})
    assert response.status == 403
    assert "allowed_hosts" in (await response.json())["error"]
    response = await client.get(path, headers={"Origin": EVIL})
    assert response.status == 403
    assert "another origin" in (await response.json())["error"]
    # A page of another site that loads the file with <script src> sends no Origin, but says where it is.
    assert (await client.get(path, headers={"Sec-Fetch-Site": "cross-site"})).status == 403
    assert (await client.get(path, headers={"Origin": own_origin, "Sec-Fetch-Site": "same-origin"})).status == 200


def document_operations(url: str) -> set[tuple[str, str]]:
    """Every (METHOD, path) of /openapi.json, read without a key as the page reads it."""
    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as response:
        document = json.loads(response.read())
    return {
        (method.upper(), path) for path, item in document["paths"].items() for method in item if method in HTTP_METHODS
    }


def listed_operations(page: Page) -> set[tuple[str, str]]:
    rows = page.locator(".opblock").evaluate_all(
        """blocks => blocks.map(block => [
            block.querySelector('.opblock-summary-method').textContent.trim(),
            block.querySelector('.opblock-summary-path').getAttribute('data-path'),
        ])"""
    )
    return {(method, path) for method, path in rows}


def execute_embed(page: Page, body: str) -> tuple[str, str]:
    """Fill /api/embed's body, press Execute, and read the status and the body the page shows."""
    embed = page.locator(".opblock-post").filter(has=page.locator('[data-path="/api/embed"]'))
    embed.locator("textarea.body-param__text").fill(body)
    with page.expect_response(lambda response: response.url.endswith("/api/embed")):
        embed.locator("button.execute").click()
    answer = embed.locator(".live-responses-table .response").first
    expect(answer.locator(".response-col_status")).to_be_visible()
    status = answer.locator(".response-col_status").inner_text().strip()
    shown = answer.locator(".response-col_description .highlight-code pre").first.inner_text()
    return status, shown


def test_a_browser_lists_every_route_and_embeds_with_the_key_its_user_types(tmp_path: Path, tiny_dir: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    with running_daemon(tmp_path / "home", {"tiny": tiny_dir}, {"EMBERD_API_KEYS_FILE": str(keys_file)}) as daemon:
        operations = document_operations(daemon.url)
        assert ("POST", "/api/embed") in operations and len(operations) > 20
        requests: list[Request] = []
        console: list[ConsoleMessage] = []
        page_errors: list[str] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.on("request", lambda request: requests.append(request))
                page.on("console", lambda message: console.append(message))
                page.on("pageerror", lambda error: page_errors.append(str(error)))
                response = page.goto(daemon.url + "/docs")
                assert response is not None and response.status == 200  # no key: the page is open

                # Every route of /openapi.json, and nothing else.
                expect(page.locator(".opblock")).to_have_count(len(operations))
                assert listed_operations(page) == operations

                embed = page.locator(".opblock-post").filter(has=page.locator('[data-path="/api/embed"]'))
                embed.locator(".opblock-summary").first.click()
                embed.locator("button.try-out__btn").click()
                body = json.dumps({"model": "tiny", "input": ["hello docs", "a second input"]})
                status, shown = execute_embed(page, body)
                assert status == "401", shown  # before "Authorize", the call carries no key

                page.locator("button.authorize").first.click()
                dialog = page.locator(".modal-ux")
                dialog.locator("input").first.fill(KEY)
                dialog.locator("button.authorize").click()
                dialog.locator("button.btn-done").click()
                status, shown = execute_embed(page, body)
                assert status == "200", shown
                vectors = json.loads(shown)["embeddings"]
                assert len(vectors) == 2 and all(len(vector) == TINY_DIMENSIONS for vector in vectors)
                assert all(isinstance(value, float) for vector in vectors for value in vector)
                page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)  # an artefact, not in the repo
                embeds = [request for request in requests if request.url == daemon.url + "/api/embed"]
                sent = [request.all_headers() for request in embeds]
            finally:
                browser.close()

    assert [request.method for request in embeds] == ["POST", "POST"]
    assert "authorization" not in sent[0]
    assert sent[1]["authorization"] == f"Bearer {KEY}"
    assert sent[1]["origin"] == daemon.url  # the page's own origin: the origin guard lets it through
    # Nothing from another origin: every request went to the daemon (data: images need none).
    own = urlsplit(daemon.url).netloc
    foreign = [request.url for request in requests if urlsplit(request.url).scheme != "data"]
    foreign = [url for url in foreign if urlsplit(url).netloc != own]
    assert foreign == []
    assert page_errors == []
    # The browser's only complaint: the 401 of the call made before "Authorize". A request the page's
    # policy blocked (a font or a script of another origin) would show here.
    errors = [message.text for message in console if message.type == "error"]
    assert errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
