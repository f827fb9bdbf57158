"""The streaming client of bench/serving.py, spread over processes so that it is not the bottleneck.

Each client process holds one end of a pipe. For each run the parent sends it its
share of the requests (their bodies and send times) and the moment the run starts;
the process streams them from /v1/completions with an asyncio httpx client, at
most ``limit`` at once, and sends back one ``Result`` per request and the CPU
seconds it spent. This module imports only what the client needs, since every
client process imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx

# Seconds between handing out a run and its start: every process has its share and its loop running by then.
START_LEAD_S = 1.0


@dataclass
class Result:
    """One request as the client saw it: its send time (``time.time()``) and times in seconds from then."""

    send: float = 0.0
    ok: bool = False
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def read_event(r: Result, event: dict, start: float) -> None:
    """Count one streamed event: a text chunk's time, the usage's token counts, or an error."""
    if "error" in event:
        r.error = str(event["error"])[:300]
        return
    choices = event.get("choices") or []
    if choices and choices[0].get("text"):
        r.chunk_times.append(time.perf_counter() - start)
    if event.get("usage"):
        r.output_tokens = event["usage"]["completion_tokens"]
        r.prompt_tokens = event["usage"].get("prompt_tokens") or r.prompt_tokens


async def stream(http: httpx.AsyncClient, body: dict) -> Result:
    """Send ``body`` to /v1/completions now and read its stream to the end. Without usage in the stream, the
    output tokens are its text chunks."""
    prompt = body["prompt"]
    r = Result(send=time.time(), prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
    start = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                r.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        read_event(r, json.loads(line[6:]), start)
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    r.e2e = time.perf_counter() - start
    r.output_tokens = r.output_tokens or len(r.chunk_times)
    r.ttft = r.chunk_times[0] if r.chunk_times else None
    r.ok = r.error is None and r.ttft is not None
    return r


async def send_at(http: httpx.AsyncClient, body: dict, at: float, slots: asyncio.Semaphore | None) -> Result:
    """Stream ``body`` at the time ``at`` (``time.time()``), or once a slot is free after it."""
    await asyncio.sleep(max(0.0, at - time.time()))
    async with slots or contextlib.nullcontext():
        return await stream(http, body)


async def run_share(url: str, headers: dict, requests: list[tuple[float, dict]], limit: int | None) -> list[Result]:
    """Every (send time, body) of ``requests``, at most ``limit`` in flight at once (None: no limit)."""
    slots = asyncio.Semaphore(limit) if limit else None
    room = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=room) as http:
        return list(await asyncio.gather(*(send_at(http, body, at, slots) for at, body in requests)))


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run``, on uvloop when it is installed: a lighter client at high concurrency."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def client_process(conn: Connection) -> None:
    """Run each share the parent sends, and send back its results and the CPU seconds spent; None ends."""
    while (share := conn.recv()) is not None:
        cpu = time.process_time()
        results = run_loop(run_share(share["url"], share["headers"], share["requests"], share["limit"]))
        conn.send({"results": results, "cpu_s": time.process_time() - cpu})
    conn.close()


def split_limit(total: int | None, parts: int) -> list[int | None]:
    """``total`` in-flight requests split as evenly as can be over ``parts`` processes (None: no limit)."""
    if total is None:
        return [None] * parts
    return [total // parts + (i < total % parts) for i in range(parts)]


class ClientPool:
    """``size`` client processes, started at once and kept for every run; a context manager."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(
        self, url: str, headers: dict, bodies: list[dict], delays: list[float], concurrency: int | None
    ) -> tuple[list[Result], list[float], float]:
        """Send ``bodies[i]`` ``delays[i]`` seconds after the run's start, request i from process i mod the
        processes in use (no more than ``concurrency``, which they share); the results in the order of
        ``bodies``, the CPU seconds of each process in use, and the start (``time.time()``)."""
        used = min(len(self.conns), len(bodies), concurrency or len(bodies))
        t0 = time.time() + START_LEAD_S
        for p, limit in enumerate(split_limit(concurrency, used)):
            requests = [(t0 + delays[i], bodies[i]) for i in range(p, len(bodies), used)]
            self.conns[p].send({"url": url, "headers": headers, "requests": requests, "limit": limit})
        results: list[Result | None] = [None] * len(bodies)
        cpu = []
        for p in range(used):
            try:
                reply = self.conns[p].recv()
            except EOFError:
                raise RuntimeError(f"client process {p} died") from None
            results[p::used] = reply["results"]
            cpu.append(reply["cpu_s"])
        return results, cpu, t0

    def close(self) -> None:
        """Stop every client process."""
        for conn, proc in zip(self.conns, self.procs):
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
