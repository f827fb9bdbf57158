"""Prefix cache, chunked prefill, page size and preemption must not change greedy output."""

from __future__ import annotations

import asyncio

import pytest

from tristream import AsyncEngine, SamplingParams

SYSTEM = (
    "You are a careful assistant for a maritime museum. You answer questions about lighthouses, ships, tides "
    "and navigation, in plain words, and you say so when you do not know. "
)
QUESTIONS = [
    "Why were lighthouses painted with stripes?",
    "How did a Fresnel lens work?",
    "What did a keeper do every night?",
    "Why",
    "How far could the light be seen on a clear night, and what limited that distance in practice?",
    "Name a famous lighthouse.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


async def workload(engine: AsyncEngine, tokenizer) -> list[list[int]]:
    """Shared prefixes, repeated prompts, long and short prompts, and arrivals while others decode."""
    prompts = [tokenizer.encode(SYSTEM + q) for q in QUESTIONS]
    prompts += [tokenizer.encode(SYSTEM * 3 + "Summarize the above."), prompts[0], list(range(300, 301))]
    started = asyncio.Event()

    async def run(i: int) -> list[int]:
        if i % 2:
            await started.wait()
            await asyncio.sleep(0.02 * i)
        tokens: list[int] = []
        async for out in engine.generate(prompts[i], GREEDY):
            tokens += out.outputs[0].token_ids
            started.set()
        return tokens

    return await asyncio.gather(*(run(i) for i in range(len(prompts))))


@pytest.fixture(scope="module")
async def reference(engine, tokenizer) -> list[list[int]]:
    return await workload(engine, tokenizer)


@pytest.mark.parametrize(
    "args",
    [
        dict(enable_prefix_caching=False, page_size=16, max_num_batched_tokens=2048),
        dict(enable_prefix_caching=True, page_size=1, max_num_batched_tokens=8),
        dict(enable_prefix_caching=False, page_size=1, max_num_batched_tokens=64),
        dict(enable_prefix_caching=True, page_size=16, max_num_batched_tokens=64, schedule_policy="lpm"),
        dict(enable_prefix_caching=True, page_size=16, max_num_batched_tokens=8),
    ],
    ids=["cache-off", "cache-ps1-chunk8", "cache-off-ps1-chunk64", "cache-ps16-chunk64-lpm", "cache-ps16-chunk8"],
)
async def test_greedy_output_is_independent_of_scheduling(reference, tokenizer, args):
    async with AsyncEngine(max_model_len=1024, check_invariants=True, log_level="WARNING", **args) as engine:
        assert await workload(engine, tokenizer) == reference
        stats = await engine.get_stats()
        if args["enable_prefix_caching"]:
            assert stats.num_cache_hit_tokens > 0
        else:
            assert stats.num_cache_hit_tokens == 0 and stats.num_cached_pages == 0


async def test_a_kv_starved_engine_finishes_everything_with_identical_output(engine, tokenizer):
    prompts = [tokenizer.encode(f"{SYSTEM}Question {i}: {QUESTIONS[i % len(QUESTIONS)]}") for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def run_all(engine: AsyncEngine) -> list[list[int]]:
        async def one(p):
            tokens = []
            async for out in engine.generate(p, params):
                tokens += out.outputs[0].token_ids
            return tokens

        return await asyncio.gather(*(one(p) for p in prompts))

    roomy = await run_all(engine)
    args = dict(kv_cache_tokens=2 * 128, page_size=16)
    async with AsyncEngine(max_model_len=128, log_level="WARNING", check_invariants=True, **args) as starved_engine:
        starved = await run_all(starved_engine)
        assert (await starved_engine.get_stats()).num_preemptions > 0
    assert starved == roomy
    assert all(len(t) == 24 for t in starved)


async def test_second_chat_turn_hits_the_whole_first_turn(engine):
    params = SamplingParams(temperature=0, max_tokens=40)
    history = [{"role": "user", "content": "Name three famous lighthouses and say where they are."}]
    first = [out async for out in engine.chat(history, params)]
    reply = "".join(o.outputs[0].text for o in first)
    first_turn = len(first[-1].prompt_token_ids) + first[-1].metrics.num_generated_tokens
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Which one is the oldest?"}]
    second = [out async for out in engine.chat(history, params)]
    cached = second[-1].num_cached_tokens
    page = engine.child_config.page_size
    # Everything but the last sampled token has KV; caching is by whole pages.
    assert first_turn - 1 - page < cached <= first_turn
    assert all(o.num_cached_tokens == cached for o in second)


async def test_a_request_larger_than_the_kv_cache_is_an_error_and_others_complete():
    async with AsyncEngine(max_model_len=512, kv_cache_tokens=128, log_level="ERROR") as engine:
        ok = asyncio.ensure_future(
            asyncio.gather(
                *(
                    _tokens(
                        engine.generate(f"Story {i}:", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
                    )
                    for i in range(3)
                )
            )
        )
        with pytest.raises(ValueError, match="KV cache holds only 128 tokens"):
            await _tokens(engine.generate(list(range(1000, 1200)), SamplingParams(max_tokens=4)))
        assert [len(t) for t in await ok] == [20, 20, 20]
        long, outs = await _tokens(
            engine.generate(list(range(1000, 1100)), SamplingParams(temperature=0, ignore_eos=True)), True
        )
        assert len(long) == 28 and outs[-1].outputs[0].finish_reason == "length"


async def _tokens(stream, with_outputs: bool = False):
    tokens, outs = [], []
    async for out in stream:
        tokens += out.outputs[0].token_ids
        outs.append(out)
    return (tokens, outs) if with_outputs else tokens
