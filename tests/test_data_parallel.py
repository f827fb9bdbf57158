"""Data parallelism on CPU: two replicas of the bundled model behind one AsyncEngine give one engine's greedy
output, a repeated prefix goes back to the replica that caches it, and a replica that dies fails only its own
requests, leaves no process and is started again."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_gone  # pytest has imported the conftest under this name
from tristream import AsyncEngine, EngineDeadError, SamplingParams
from tristream.data_parallel import DataParallelEngine
from tristream.server.app import build_app

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3, 4,"]
SYSTEM = (
    "You are the assistant of a weather service. Answer in one sentence, name the city, give the temperature in "
    "degrees Celsius and say whether to take an umbrella. Never invent a forecast you were not given. "
)


@pytest.fixture(scope="module")
async def dp_engine():
    async with AsyncEngine(data_parallel_size=2, max_model_len=1024, check_invariants=True, log_level="WARNING") as e:
        yield e


async def tokens_of(engine: AsyncEngine, prompt, params: SamplingParams = GREEDY) -> list[int]:
    tokens = []
    async for out in engine.generate(prompt, params):
        tokens += out.outputs[0].token_ids
    return tokens


async def chat_tokens(engine: AsyncEngine, messages: list[dict]) -> list[int]:
    tokens = []
    async for out in engine.chat(messages, GREEDY):
        tokens += out.outputs[0].token_ids
    return tokens


async def test_two_replicas_give_the_greedy_output_of_one_engine(engine, dp_engine):
    assert isinstance(dp_engine, DataParallelEngine) and len(dp_engine.replicas) == 2
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    one = await asyncio.gather(*(tokens_of(engine, p) for p in PROMPTS), *(chat_tokens(engine, m) for m in chats))
    two = await asyncio.gather(*(tokens_of(dp_engine, p) for p in PROMPTS), *(chat_tokens(dp_engine, m) for m in chats))
    assert two == one
    assert all(stats.num_prompt_tokens > 0 for stats in await dp_engine.replica_stats())  # both replicas served
    n2 = SamplingParams(temperature=0.8, n=2, seed=5, max_tokens=8)
    outs = [out async for out in dp_engine.generate(PROMPTS[0], n2)]
    assert {o.index for out in outs for o in out.outputs} == {0, 1}


async def test_a_repeated_prefix_goes_to_the_replica_that_caches_it(dp_engine):
    await tokens_of(dp_engine, "An unrelated prompt about gardening and tomatoes:")  # replica 0, by load and size
    loads_before = [s.num_cache_hit_tokens for s in await dp_engine.replica_stats()]
    first = SYSTEM + "What is the weather in Paris?"
    await tokens_of(dp_engine, first)
    holder = max(range(2), key=lambda i: dp_engine.router.matches(first)[i])
    for city in ("Lyon", "Oslo", "Rome"):
        await tokens_of(dp_engine, SYSTEM + f"What is the weather in {city}?")
    hits = [s.num_cache_hit_tokens - b for s, b in zip(await dp_engine.replica_stats(), loads_before)]
    prefix_pages = len(await dp_engine.tokenize(SYSTEM)) // 16 * 16
    assert hits[holder] >= 3 * prefix_pages > 0
    assert hits[1 - holder] == 0
    total = await dp_engine.get_stats()
    assert total.num_cache_hit_tokens == sum(s.num_cache_hit_tokens for s in await dp_engine.replica_stats())


async def test_the_server_reports_each_replica(dp_engine):
    transport = httpx.ASGITransport(app=build_app(dp_engine, "m"))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        body = {"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        assert (await client.get("/health")).json() == {"status": "ok"}
        text = (await client.get("/metrics")).text
    engines = {
        s.labels["engine"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "tristream_kv_pages_total"
    }
    assert engines == {"0", "1"}


async def test_a_dead_replica_fails_only_its_requests_and_comes_back(engine, dp_engine):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    victim_pids = list(dp_engine.replicas[1].child_pids.values())
    counts = {"sea": 0, "hills": 0}

    async def run(request_id: str, prompt: str) -> int:
        async for out in dp_engine.generate(prompt, params, request_id=request_id):
            counts[request_id] += len(out.outputs[0].token_ids)
        return counts[request_id]

    tasks = {"sea": asyncio.ensure_future(run("sea", "Tell me about the sea."))}
    await asyncio.sleep(0.1)
    tasks["hills"] = asyncio.ensure_future(run("hills", "Write a long story about hills, rivers and forests."))
    while min(counts.values()) < 2:
        await asyncio.sleep(0.05)
    routes = dict(dp_engine._routes)
    assert sorted(routes.values()) == [0, 1]
    os.kill(dp_engine.replicas[1].child_pids["gpu"], signal.SIGKILL)
    victim = next(rid for rid, index in routes.items() if index == 1)
    with pytest.raises(EngineDeadError, match="gpu process died"):
        await asyncio.wait_for(tasks[victim], 30)
    assert dp_engine.healthy and dp_engine.degraded  # until the replica has started again, seconds later
    assert len(await tokens_of(dp_engine, "Still serving?")) == 16
    assert await asyncio.wait_for(tasks[next(rid for rid in routes if rid != victim)], 120) == 64
    assert wait_gone(victim_pids, timeout=10) == []
    for _ in range(240):
        if not dp_engine.degraded:
            break
        await asyncio.sleep(0.5)
    assert not dp_engine.degraded and set(dp_engine.replicas[1].child_pids.values()).isdisjoint(victim_pids)
    assert await tokens_of(dp_engine.replicas[1], PROMPTS[2]) == await tokens_of(engine, PROMPTS[2])
    pids = list(dp_engine.child_pids.values())
    await dp_engine.close()
    assert wait_gone(pids, timeout=10) == []
