"""Running the daemon: sockets, signals, systemd notifications, and the shutdown sequence."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from daemon.api.app import build_app
from daemon.config import Settings
from daemon.errors import UnknownModel
from daemon.store import ModelStore

log = logging.getLogger(__name__)


def sd_notify(notify_socket: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    if not notify_socket:
        return
    address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def ensure_models(store: ModelStore, wanted: Sequence[tuple[str, Path]]) -> None:
    """Create each NAME from PATH unless the store already has it (the default model, offline)."""
    store.open()
    for name, source in wanted:
        try:
            store.get(name)
        except UnknownModel:
            log.info("creating %s from %s", name, source)
            store.create(name, source, progress=functools.partial(log.info, "%s: %s", name))


async def serve(settings: Settings, notify_socket: str | None = None) -> None:
    app = build_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    log.info("emberd listening on %s:%d, models in %s", settings.host, settings.port, settings.home)
    sd_notify(notify_socket, "READY=1\nSTATUS=serving")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    # Shutdown, in order:
    # 1. tell systemd, so it does not think we hung;
    sd_notify(notify_socket, "STOPPING=1")
    log.info("shutting down: finishing accepted requests (up to %gs)", settings.shutdown_timeout_s)
    # 2. runner.cleanup() stops listening, lets in-flight handlers finish within shutdown_timeout,
    # 3. then runs the app's cleanup contexts: the scheduler stops admitting and stops every runner.
    await runner.cleanup()
    log.info("stopped")
