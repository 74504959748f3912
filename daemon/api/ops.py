"""Operations: /healthz (alive), /readyz (for load balancers), /metrics (Prometheus)."""

from __future__ import annotations

from aiohttp import web

from daemon.api.common import LIFECYCLE, METRICS, json_response
from daemon.metrics import CONTENT_TYPE


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and its event loop turns. Touches neither the store nor a runner."""
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 while serving; 503 while starting (--ensure-model) and while draining after a stop signal."""
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.draining:
        return json_response({"status": "draining"}, status=503)
    if not lifecycle.ready:
        return json_response({"status": "starting"}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
