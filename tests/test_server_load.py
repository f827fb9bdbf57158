"""Many concurrent streaming clients, a third of which hang up mid-stream."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

PROMPTS = [
    "Tell me about the sea.",
    "Name three colours.",
    "What is a cat?",
    "Describe a mountain.",
    "Why do birds sing?",
]
MAX_TOKENS = 12
# Clients that hang up ask for far more tokens than they read, so only an abort can end their requests.
LONG = 400


async def stream_chat(http: httpx.AsyncClient, prompt: str, hang_up_after: int | None) -> tuple[str, str | None, bool]:
    """The streamed text, the finish reason, and whether [DONE] arrived; hangs up after that many events."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "max_tokens": MAX_TOKENS if hang_up_after is None else LONG,
    }
    text, reason, done, events = "", None, False, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            reason = choice["finish_reason"] or reason
            if hang_up_after is not None and events >= hang_up_after:
                break
    return text, reason, done


async def test_hundred_streams_with_random_hang_ups_leave_no_pages_behind(live_server, scrape):
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=300, limits=limits) as http:
        expected = {}
        for prompt in PROMPTS:
            r = await http.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            expected[prompt] = r.json()["choices"][0]["message"]["content"]
        before = scrape(live_server)
        plan = [(PROMPTS[i % len(PROMPTS)], rng.randint(1, 6) if i % 3 == 0 else None) for i in range(100)]
        results = await asyncio.gather(*(stream_chat(http, p, hang_up) for p, hang_up in plan))

        for (prompt, hang_up), (text, reason, done) in zip(plan, results):
            if hang_up is None:
                assert done and reason == "length" and text == expected[prompt], prompt
            else:
                assert not done and expected[prompt].startswith(text)

        idle = None
        for _ in range(100):
            idle = scrape(live_server)
            if (
                idle["tristream_num_requests_running{engine=0}"] == 0
                and idle["tristream_num_requests_waiting{engine=0}"] == 0
            ):
                break
            await asyncio.sleep(0.1)
        assert (
            idle["tristream_num_requests_running{engine=0}"] == 0
            and idle["tristream_num_requests_waiting{engine=0}"] == 0
        )
        # Idle, every page that is not free belongs to the prefix cache.
        assert idle["tristream_kv_pages_used{engine=0}"] == idle["tristream_kv_pages_cached{engine=0}"]
        hung_up = sum(h is not None for _, h in plan)
        aborted = idle["tristream_requests_total{finish_reason=abort}"] - before.get(
            "tristream_requests_total{finish_reason=abort}", 0
        )
        assert aborted == hung_up
        assert (await http.get("/health")).status_code == 200
