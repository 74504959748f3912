"""Running the daemon: sockets, signals, systemd notifications, and the shutdown sequence."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from daemon import libc
from daemon.api.access import API_KEYS
from daemon.api.app import build_app
from daemon.api.common import JOBS, LIFECYCLE, PULLS, SCHEDULER, STORE
from daemon.config import Settings
from daemon.errors import AddressInUse, EmberdError, UnknownModel
from daemon.jobs import CancelToken
from daemon.store import ModelStore

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The part of the shutdown budget kept for answering what the runners could not finish in time
# (503s), closing connections and exiting.
FINAL_RESERVE_FRACTION = 0.1
FINAL_RESERVE_MAX_S = 3.0


# Threads for the blocking calls of handlers (asyncio.to_thread: store reads, token decoding), as
# many as asyncio's default pool would grow to.
IO_THREADS = min(32, (os.cpu_count() or 1) + 4)


def start_io_threads(loop: asyncio.AbstractEventLoop, count: int = IO_THREADS) -> ThreadPoolExecutor:
    """The loop's default executor with all its threads started now. asyncio's own pool starts a
    thread whenever a call finds none idle, so under load it grows by one now and then until its
    cap, which a leak check cannot tell from a leak; this one's thread count never changes."""
    pool = ThreadPoolExecutor(count, thread_name_prefix="emberd-io")
    all_started = threading.Barrier(count)
    # Each call blocks until all have started, so no call finds a thread idle: `count` threads.
    for _ in range(count):
        pool.submit(all_started.wait, 10.0)
    loop.set_default_executor(pool)
    return pool


@dataclass(frozen=True)
class SystemdLink:
    """What systemd told us through the environment (Type=notify, WatchdogSec=)."""

    notify_socket: str | None = None
    watchdog_interval_s: float | None = None  # half of WATCHDOG_USEC, as sd_watchdog_enabled advises

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SystemdLink:
        interval_s = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            interval_s = int(usec) / 2e6
        return cls(environ.get("NOTIFY_SOCKET") or None, interval_s)


def sd_notify(notify_socket: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    if not notify_socket:
        return
    address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


async def feed_watchdog(notify_socket: str | None, interval_s: float) -> None:
    """WATCHDOG=1 from the event loop itself: a loop blocked past WatchdogSec gets us restarted."""
    while True:
        sd_notify(notify_socket, "WATCHDOG=1")
        await asyncio.sleep(interval_s)


def ensure_models(store: ModelStore, wanted: Sequence[tuple[str, Path]], token: CancelToken) -> None:
    """Create each NAME from PATH unless the store already has it (the default model, offline)."""
    for name, source in wanted:
        try:
            store.get(name)
        except UnknownModel:
            log.info("creating %s from %s", name, source)
            store.create(name, source, progress=functools.partial(log.info, "%s: %s", name), token=token)


# glibc raises its mmap threshold each time a large block is freed, and from then on keeps freed
# request bodies and answers in its heaps, where fragmentation holds them: the daemon's RSS crept
# from 105 to 109 MiB over a 10-minute soak, and peaked at 89 MiB after the side-by-side workloads.
# A fixed threshold gives large blocks their own mappings, returned when freed: flat in the soak
# (99.9 to 100.1 MiB in CI), a peak of 63 MiB after the workloads (the same speed, within the noise
# of one run).
DAEMON_MMAP_THRESHOLD_BYTES = 128 * 1024


def return_large_blocks_when_freed(environ: Mapping[str, str]) -> bool:
    """Fix glibc's mmap threshold for the daemon (not the runners: llama.cpp sizes its own buffers),
    unless the user set MALLOC_MMAP_THRESHOLD_ themselves. Whether it was set."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    return libc.set_mmap_threshold(DAEMON_MMAP_THRESHOLD_BYTES)


def address_in_use_message(host: str, port: int) -> str:
    """One line for a taken address: which, what probably holds it, how to pick another."""
    holder = "Ollama, probably (its default port), or another emberd" if port == 11434 else "another program"
    return (
        f"{host}:{port} is already in use ({holder}); stop it, or pick another address with "
        f"EMBERD_HOST={host}:{port + 1} (or --host)"
    )


async def serve(settings: Settings, wanted: Sequence[tuple[str, Path]] = (), systemd: SystemdLink | None = None) -> int:
    """Serve until SIGINT or SIGTERM, then shut down within settings.shutdown_timeout_s.

    Returns the exit status. A second stop signal exits at once (status 128 + signal).
    """
    systemd = systemd or SystemdLink()
    start_io_threads(asyncio.get_running_loop())
    app = build_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, and so its request in the
    # runner (the sequences not decoded yet are dropped); every path is written to survive that.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=FINAL_RESERVE_MAX_S, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError as bind_error:
        await runner.cleanup()
        if bind_error.errno != errno.EADDRINUSE:
            raise
        raise AddressInUse(address_in_use_message(settings.host, settings.port)) from None
    log.info("emberd listening on %s:%d, models in %s", settings.host, settings.port, settings.home)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signum.name)
            logging.shutdown()
            # Runners die with us (PR_SET_PDEATHSIG, and their stdin closes); partial downloads stay.
            os._exit(128 + signum)
        log.info("%s: shutting down (a second one exits at once)", signum.name)
        stop.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, reload_api_keys, app)
    watchdog = None
    if systemd.watchdog_interval_s is not None:
        watchdog = asyncio.create_task(feed_watchdog(systemd.notify_socket, systemd.watchdog_interval_s))

    status = 0
    lifecycle = app[LIFECYCLE]
    # Listening already (so /healthz answers), but not ready until the models to ensure exist.
    ensured = asyncio.ensure_future(app[JOBS].run(lambda token: ensure_models(app[STORE], wanted, token)))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ensured, stopped], return_when=asyncio.FIRST_COMPLETED)
    if ensured.done() and ensured.exception() is None:
        lifecycle.ready = True
        sd_notify(systemd.notify_socket, "READY=1\nSTATUS=serving")
        log.info("ready")
        await stopped
    elif ensured.done():
        failure = ensured.exception()
        message = failure.message if isinstance(failure, EmberdError) else repr(failure)
        log.error("cannot serve: --ensure-model failed: %s", message)
        status = 1
    stopped.cancel()

    await shut_down(app, runner, site, settings, systemd.notify_socket)
    if watchdog is not None:
        watchdog.cancel()
    if app[JOBS].running:
        # A job thread blocked in a read past the budget: the budget wins (its partial file stays).
        log.warning("exiting with %d long jobs still stopping", app[JOBS].running)
        logging.shutdown()
        os._exit(status)
    with contextlib.suppress(BaseException):
        await ensured
    return status


async def shut_down(
    app: web.Application, runner: web.AppRunner, site: web.TCPSite, settings: Settings, notify_socket: str | None
) -> None:
    """The shutdown sequence; all of it fits in settings.shutdown_timeout_s."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + settings.shutdown_timeout_s
    reserve_s = min(FINAL_RESERVE_MAX_S, settings.shutdown_timeout_s * FINAL_RESERVE_FRACTION)
    lifecycle = app[LIFECYCLE]

    # 1. Not ready any more: /readyz answers 503, and systemd hears that we are stopping.
    lifecycle.draining = True
    sd_notify(notify_socket, "STOPPING=1")
    log.info("draining: finishing accepted requests (budget %gs)", settings.shutdown_timeout_s)
    # 2. Lame duck: keep serving while load balancers notice the 503 (drain_delay, 0 by default).
    if settings.drain_delay_s > 0:
        await asyncio.sleep(settings.drain_delay_s)
    # 3. Stop listening. Idle keep-alive connections close now, busy ones after their answer.
    await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    # 4. Long jobs stop at their next chunk; a pull's stream ends with an error line, and its
    #    partial file stays for the next pull to resume.
    app[JOBS].cancel_all()
    # 5. Every accepted request gets its answer, until the deadline less the reserve.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline_s - reserve_s):
            await lifecycle.idle.wait()
    # 6. Stop the runners: each finishes what it holds and exits when its stdin closes. One still
    #    busy at the deadline is killed, and its requests are answered 503.
    await app[SCHEDULER].close(max(0.0, deadline_s - reserve_s - loop.time()))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline_s - reserve_s):
            await app[PULLS].wait_finished()
    # 7. Let the handlers write those last answers, then close connections and the app.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline_s - loop.time())):
            await lifecycle.idle.wait()
    await runner.cleanup()
    log.info("stopped")


def reload_api_keys(app: web.Application) -> None:
    """SIGHUP: read api_keys_file again; a file that cannot be used keeps the old keys."""
    api_keys = app.get(API_KEYS)
    if api_keys is None:
        log.info("SIGHUP: no api_keys_file is set; nothing to reload")
        return
    try:
        count = api_keys.reload()
    except EmberdError as error:
        log.error("SIGHUP: %s; keeping the keys read before", error.message)
        return
    log.info("SIGHUP: %d API keys loaded from %s", count, api_keys.path)
