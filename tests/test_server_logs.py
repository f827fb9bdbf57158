"""What ``tristream serve`` logs: the KV cache at start-up, a line per request, the throughput while busy, and
which engine process died and why."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import LiveServer, start_server, wait_gone  # pytest has imported the conftest under this name
from tristream.protocol import SchedulerStats
from tristream.server.metrics import ThroughputLog


def stats(prompt: int, generated: int, hits: int = 0, running: int = 0, waiting: int = 0, free: int = 100):
    return SchedulerStats(
        num_prompt_tokens=prompt,
        num_generated_tokens=generated,
        num_cache_hit_tokens=hits,
        token=0,
        num_pages=200,
        num_free_pages=free,
        num_running=running,
        num_waiting=waiting,
        num_cached_pages=0,
    )


def test_the_throughput_line_while_busy():
    log = ThroughputLog()
    assert log.line(stats(0, 0), 10.0) is None, "the first reading only sets the baseline"
    assert log.line(stats(0, 0), 15.0) is None, "idle"
    line = log.line(stats(100, 50, hits=25, running=2, waiting=1, free=50), 20.0)
    assert line == (
        "Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 10.0 tokens/s, Running: 2 reqs, "
        "Waiting: 1 reqs, KV cache usage: 75.0%, Prefix cache hit rate: 25.0%"
    )
    assert "Avg generation throughput: 2.0 tokens/s" in log.line(stats(100, 60), 25.0), "finished since"
    assert log.line(stats(100, 60), 30.0) is None


def wait_for(server: LiveServer, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in list(server.log) if text in line]
        if found:
            return found[0]
        assert server.proc.poll() is None or text in "".join(server.log), "".join(server.log)
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the server's output:\n{''.join(server.log)}")


def children(parent: int) -> dict[str, int]:
    """The pid of each child of ``parent``, by its title (``tristream::gpu0``, ...)."""
    kids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == parent:
                kids[title] = int(entry)
    return kids


@pytest.mark.timeout(600)
def test_serve_logs_and_says_which_engine_process_died():
    server = start_server("--max-model-len", "512")
    try:
        assert "KV cache:" in wait_for(server, "KV cache:")
        r = httpx.post(
            server.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 2}, timeout=120
        )
        assert r.status_code == 200
        assert '"POST /v1/completions HTTP/1.1" 200' in wait_for(server, "POST /v1/completions")
        body = {"prompt": "Tell me everything about the sea.", "max_tokens": 480, "ignore_eos": True}
        long = threading.Thread(
            target=lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=600), daemon=True
        )
        long.start()
        line = wait_for(server, "Avg generation throughput")
        assert "Running: 1 reqs" in line and "KV cache usage" in line and "Prefix cache hit rate" in line
        kids = children(server.proc.pid)
        assert {"tristream::gpu0", "tristream::tokenizer", "tristream::scheduler"} <= set(kids)
        os.kill(kids["tristream::gpu0"], signal.SIGKILL)
        assert server.proc.wait(60) == 1
        assert "tristream: error: the gpu process died (killed by SIGKILL)" in wait_for(server, "tristream: error")
        assert wait_gone(kids.values()) == []
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
