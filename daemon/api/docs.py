"""GET /docs: Swagger UI over /openapi.json, for people to read the API and try it from a browser.

Swagger UI's built files come from the swagger-ui-py package (its static/ folder), so the page works
offline: nothing loads from another origin, and the Content-Security-Policy below holds the browser
to that. The page and its files are open without an API key (a browser cannot send a Bearer header
to load a page; see access.is_open); the calls "Try it out" makes carry the key the user types in
"Authorize", and meet the Host guard and the origin rules as every call does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

from aiohttp import web

DOCS_PATH: Final = "/docs"
DOCS_FILES_PREFIX: Final = "/docs/"
# Our own script, served from this string: the page runs no inline script, so the policy can forbid them.
INIT_SCRIPT_NAME: Final = "emberd-docs.js"
# The files of the package the page loads, and no other (not its editor, nor its source maps), with
# their types (not guessed: Python's guess for .js differs between versions).
PACKAGE_FILES: Final = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_FILES: Final = frozenset({*PACKAGE_FILES, INIT_SCRIPT_NAME})

# Links are relative (docs/..., openapi.json), so the page also works behind a proxy that adds a prefix.
PAGE_HTML: Final = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>emberd API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/emberd-docs.js"></script>
</body>
</html>
"""

# BaseLayout, not the standalone one: no top bar (its links and its box for another document's URL).
# validatorUrl null: no badge fetched from the online validator. The key typed in "Authorize" stays
# in the page's memory (persistAuthorization is off): a reload forgets it, and it never reaches disk.
INIT_SCRIPT: Final = """"use strict";
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  deepLinking: true,
  displayRequestDuration: true,
  validatorUrl: null,
  persistAuthorization: false,
});
"""

# 'unsafe-inline' for styles only: Swagger UI's React components set style attributes.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILE_HEADERS: Final = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def swagger_ui_dir() -> Path:
    """The static/ folder of the swagger-ui-py package, found without importing it (its code pulls
    in template engines emberd does not use)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is missing: /docs needs it (pip install swagger-ui-py)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def add_routes(app: web.Application) -> None:
    """GET (and HEAD) /docs and /docs/NAME, one of DOCS_FILES."""
    static_dir = swagger_ui_dir()
    missing = sorted(name for name in PACKAGE_FILES if not (static_dir / name).is_file())
    if missing:
        raise RuntimeError(f"swagger-ui-py at {static_dir} lacks {', '.join(missing)}: /docs needs them")

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE_HTML, content_type="text/html", headers=PAGE_HEADERS)

    async def docs_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == INIT_SCRIPT_NAME:
            return web.Response(text=INIT_SCRIPT, content_type="text/javascript", headers=FILE_HEADERS)
        content_type = PACKAGE_FILES.get(name)
        if content_type is None:
            raise web.HTTPNotFound()
        # ETag and Last-Modified come with it: a browser revalidates instead of fetching 1.5 MB again.
        return web.FileResponse(static_dir / name, headers={**FILE_HEADERS, "Content-Type": content_type})

    app.router.add_get(DOCS_PATH, page)
    app.router.add_get(DOCS_FILES_PREFIX + "{name}", docs_file)
