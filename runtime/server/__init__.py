"""The OpenAI-compatible HTTP server: ``serve(engine, ...)`` or ``build_app(engine, ...)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator

import uvicorn

from tristream.engine import AsyncEngine, EngineDeadError
from tristream.media import MediaPolicy
from tristream.model_files import model_name
from tristream.openai_api import DEFAULT_MAX_REQUEST_BYTES, RequestDefaults
from tristream.server.app import build_app
from tristream.server.metrics import ThroughputLog

__all__ = ["build_app", "serve"]

logger = logging.getLogger("tristream.server")
# Seconds between the throughput lines of a busy server.
STATS_INTERVAL = 5.0


class _Server(uvicorn.Server):
    """A uvicorn server that takes SIGINT and SIGTERM on the running loop, so the engine shuts down after it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def serve(
    engine: AsyncEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: str | None = None,
    announce: bool = False,
    default_lora: str | None = None,
    defaults: RequestDefaults | None = None,
    log_requests: bool = True,
    stats_interval: float | None = STATS_INTERVAL,
    media: MediaPolicy | None = None,
    enable_lora_runtime_loading: bool = False,
    lora_root: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Start ``engine`` and serve it over HTTP until SIGINT or SIGTERM, or until the engine dies.

    Prints the address once it listens (``port=0`` picks a free port); ``announce``
    also prints the web chat's address. Requests naming the served model run the
    LoRA adapter ``default_lora``, one of the engine's start-up adapters (None: the base model);
    ``defaults`` fill in what requests leave out. Logs a line per request with ``log_requests``, and
    the throughput every ``stats_interval`` seconds while busy. ``media`` (None: the engine's own) says where
    requests may take images from. With ``enable_lora_runtime_loading``, clients load adapters from folders
    under ``lora_root`` (None: any folder, with a warning) and unload them. A request body of more than
    ``max_request_bytes`` is a 413. If an engine process dies, raises ``EngineDeadError`` saying which and why.
    """
    if media is not None:
        engine.media = media
    async with engine:
        name = served_model_name or model_name(engine.config.model)
        adapters = engine.lora_adapters
        if default_lora is not None and default_lora not in adapters:
            raise ValueError(
                f"default_lora {default_lora!r} is not one of the engine's LoRA adapters "
                f"({', '.join(adapters) or 'none'})"
            )
        if name in adapters:
            raise ValueError(f"a LoRA adapter is named {name!r}, like the served model; rename one")
        app = build_app(
            engine, name, api_key, default_lora, defaults, enable_lora_runtime_loading, lora_root, max_request_bytes
        )
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3, access_log=log_requests
        )
        if log_requests:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        server = _Server(config)
        tasks = [asyncio.ensure_future(_watch(server, engine, name, announce))]
        if stats_interval:
            tasks.append(asyncio.ensure_future(_log_stats(engine, stats_interval)))
        try:
            await server.serve()
        finally:
            for task in tasks:
                task.cancel()
        if not engine.healthy:
            raise EngineDeadError(await _death(engine))


async def _watch(server: uvicorn.Server, engine: AsyncEngine, name: str, announce: bool) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    url = f"http://{host}:{port}"
    print(f"tristream: serving {name} at {url}/v1", flush=True)
    if announce:
        print(f"tristream: web chat at {url}/", flush=True)
    while not server.should_exit:
        if not engine.healthy:
            print("tristream: an engine process stopped; shutting the server down", file=sys.stderr, flush=True)
            server.should_exit = True
        await asyncio.sleep(0.5)


async def _log_stats(engine: AsyncEngine, interval: float) -> None:
    """Log the throughput line every ``interval`` seconds while the engine is busy."""
    log = ThroughputLog()
    while True:
        with contextlib.suppress(EngineDeadError, asyncio.TimeoutError):
            line = log.line(await engine.get_stats(), time.monotonic())
            if line is not None:
                logger.info(line)
        await asyncio.sleep(interval)


async def _death(engine: AsyncEngine) -> str:
    """Why the engine stopped, as a call to it says once the engine has taken in that a process died."""
    while True:
        try:
            await engine.get_stats(timeout=1.0)
        except EngineDeadError as e:
            return str(e)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.1)
