"""Who may call emberd: the Host-header guard, API keys and CORS. Policy as pure functions, applied
by middlewares (see api.app for their order)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from daemon.api.common import EXPOSED_HEADERS, SETTINGS, error_response
from daemon.api.docs import DOCS_FILES, DOCS_FILES_PREFIX, DOCS_PATH
from daemon.errors import InvalidConfig

log = logging.getLogger(__name__)
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Routes a load balancer or a liveness probe reaches without a key.
PROBE_PATHS = frozenset({"/", "/healthz", "/readyz"})
# Read-only pages a browser loads before its user can type a key: the API's description and the docs
# page (and the page's files, DOCS_FILES_PREFIX + one of DOCS_FILES). Only GET and HEAD of them are open.
OPEN_PAGES = frozenset({"/openapi.json", DOCS_PATH})
# Every path some request reaches without a key (what /openapi.json documents without a 401).
OPEN_PATHS = PROBE_PATHS | OPEN_PAGES
READ_METHODS = frozenset({"GET", "HEAD"})
CORS_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE_S = 600


# -- policy -----------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a listen address only takes connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """A Host header without its port, lower-cased: "LocalHost:11434" -> "localhost", "[::1]:80" -> "[::1]"."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    name, separator, port = value.rpartition(":")
    return name if separator and port.isdigit() and ":" not in name else value


def host_allowed(host_header: str | None, allowed_hosts: Sequence[str]) -> bool:
    """Whether a loopback-bound daemon may answer a request with this Host header.

    A web page can reach 127.0.0.1 through DNS rebinding, but its requests then carry the attacker's
    name as Host. A request with no Host at all (HTTP/1.0 tools) cannot come from a browser.
    """
    if host_header is None:
        return True
    name = host_name(host_header)
    return name in LOCAL_HOST_NAMES or name in (host_name(extra) for extra in allowed_hosts)


def origin_allowed(origin: str | None, cors_origins: Sequence[str]) -> bool:
    return origin is not None and (origin in cors_origins or "*" in cors_origins)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_parts(origin: str) -> tuple[str, str, int] | None:
    """("http", "localhost", 3000) for "http://LocalHost:3000"; None for "null" and anything that is
    not a scheme and an authority (an Origin header holds no path)."""
    scheme, separator, authority = origin.strip().lower().partition("://")
    if not separator or scheme not in _DEFAULT_PORTS or not authority or "/" in authority or "@" in authority:
        return None
    name = host_name(authority)
    port_text = authority[len(name) :].removeprefix(":")
    if not port_text:
        return scheme, name, _DEFAULT_PORTS[scheme]
    return (scheme, name, int(port_text)) if port_text.isdigit() else None


def cross_origin_refused(
    origin: str | None, fetch_site: str | None, scheme: str, host_header: str | None, cors_origins: Sequence[str]
) -> bool:
    """Whether a request a browser sent for a page of another site must be refused before any work.

    A page anywhere can POST to a loopback daemon with `Content-Type: text/plain` without a
    preflight, and the Host is then `localhost`: the Host guard cannot tell it from curl. The
    Origin header can. Allowed: no Origin (curl, SDKs: unless Sec-Fetch-Site says cross-site), the
    request's own origin, loopback pages on any port (as Ollama allows), and `cors_origins`.
    """
    if origin is None:
        return (fetch_site or "").strip().lower() == "cross-site"
    if origin_allowed(origin, cors_origins):
        return False
    parts = _origin_parts(origin)
    if parts is None:  # "null" (a sandboxed frame, a file:// page) or garbage
        return True
    origin_name = parts[1]
    if origin_name != "::1" and is_loopback(origin_name.strip("[]")):  # "::1" unbracketed is no host
        return False
    if host_header is None or scheme not in _DEFAULT_PORTS:
        return True
    own = _origin_parts(f"{scheme}://{host_header}")
    return own != parts


def is_open(method: str, path: str) -> bool:
    """Whether a request needs no API key: the probes, and reading the pages and files a browser
    loads before its user can type a key (the calls the docs page makes carry the key)."""
    if path in PROBE_PATHS:
        return True
    if method not in READ_METHODS:
        return False
    name = path.removeprefix(DOCS_FILES_PREFIX)
    return path in OPEN_PAGES or (name != path and name in DOCS_FILES)


def parse_api_keys(text: str) -> list[str]:
    """One key a line; blank lines and lines starting with # are ignored."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class ApiKeys:
    """The keys of `api_keys_file`, kept as sha256 digests and compared in constant time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digests: list[bytes] = []
        self.reload()

    def reload(self) -> int:
        """Read the file again (on SIGHUP); InvalidConfig, keeping the old keys, if it is unusable."""
        try:
            keys = parse_api_keys(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidConfig(f"api_keys_file: cannot read {self.path}: {error}") from None
        if not keys:
            raise InvalidConfig(f"api_keys_file: {self.path} holds no keys")
        self._digests = [_digest(key) for key in keys]
        return len(keys)

    def accepts(self, presented: str) -> bool:
        # Every key is compared, and digests have one length, so the time says nothing about the keys.
        wanted = _digest(presented)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(digest, wanted)
        return found


API_KEYS = web.AppKey("api_keys", ApiKeys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()


def bearer_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _vary_origin(existing: str | None) -> str:
    """A Vary header that names Origin, whatever it named before."""
    parts = [part.strip() for part in (existing or "").split(",") if part.strip()]
    if "origin" not in (part.lower() for part in parts):
        parts.append("Origin")
    return ", ".join(parts)


# -- middlewares ------------------------------------------------------------------------------------


@web.middleware
async def host_guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if is_loopback(settings.host) and not host_allowed(request.headers.get("Host"), settings.allowed_hosts):
        return error_response(
            request, 403, "forbidden: this Host header is not local; add it to allowed_hosts (EMBERD_ALLOWED_HOSTS)"
        )
    return await handler(request)


@web.middleware
async def origin_guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a page of another site, before the body is read: nothing it sends is acted on, and
    its answer tells it nothing (not even whether a path exists)."""
    headers = request.headers
    if cross_origin_refused(
        headers.get("Origin"),
        headers.get("Sec-Fetch-Site"),
        request.scheme,
        headers.get("Host"),
        request.app[SETTINGS].cors_origins,
    ):
        message = "forbidden: requests from a page of another origin are refused; add it to cors_origins"
        return error_response(request, 403, message, {"Vary": "Origin"})
    return await handler(request)


@web.middleware
async def cors_preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights for allowed origins; the other responses get their headers from
    `add_cors_headers`, which also reaches streamed responses."""
    cors_origins = request.app[SETTINGS].cors_origins
    origin = request.headers.get("Origin")
    if not cors_origins or request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return await handler(request)
    if not origin_allowed(origin, cors_origins):
        return error_response(request, 403, "forbidden: this origin is not in cors_origins", {"Vary": "Origin"})
    assert origin is not None
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", CORS_HEADERS),
        "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
        "Vary": "Origin",
    }
    return web.Response(status=204, headers=headers)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers on every answer to an allowed origin, errors included."""
    cors_origins = request.app[SETTINGS].cors_origins
    if not cors_origins:
        return
    response.headers["Vary"] = _vary_origin(response.headers.get("Vary"))
    origin = request.headers.get("Origin")
    if origin_allowed(origin, cors_origins) and "Access-Control-Allow-Origin" not in response.headers:
        assert origin is not None
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSED_HEADERS)


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    api_keys = request.app.get(API_KEYS)
    if api_keys is None or is_open(request.method, request.path):
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not api_keys.accepts(token):
        # The presented key is never logged or echoed.
        message = "unauthorized: a valid API key is required (Authorization: Bearer KEY)"
        return error_response(request, 401, message, {"WWW-Authenticate": 'Bearer realm="emberd"'})
    return await handler(request)
