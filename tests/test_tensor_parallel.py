"""Tensor parallelism on CPU: two gpu_proc ranks over gloo give what one gives, and a lost rank takes the engine down."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.conftest import (  # pytest has imported the conftest under this name
    TINY,
    generate_all,
    hf_greedy,
    make_lora_adapter,
    tiny_engine,
    wait_gone,
)
from tristream import LLM, AsyncEngine, EngineDeadError, SamplingParams
from tristream.outputs import accumulate

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
async def tp_engine():
    async with AsyncEngine(tensor_parallel_size=2, max_model_len=1024, max_loras=1, log_level="WARNING") as eng:
        yield eng


async def test_lora_adapter_split_over_two_ranks(tp_engine, model_dir, tokenizer, tmp_path) -> None:
    """Each rank holds its rows of B (q/k/v, gate/up) and columns of A (o, down): greedy equals peft's merged model."""
    merged = make_lora_adapter(
        model_dir,
        tmp_path / "a",
        3,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    await tp_engine.load_lora("a", str(tmp_path / "a"))
    try:
        for prompt in PROMPTS[:2]:
            ids = tokenizer(prompt).input_ids
            final = None
            async for out in tp_engine.generate(
                ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, lora="a")
            ):
                final = accumulate(final, out)
            assert final.outputs[0].token_ids == hf_greedy(merged, ids, 12)
    finally:
        await tp_engine.unload_lora("a")


def assert_same(tp1: list, tp2: list, tolerance: float) -> None:
    for (tokens1, logprobs1), (tokens2, logprobs2) in zip(tp1, tp2):
        assert tokens2 == tokens1
        for step1, step2 in zip(logprobs1, logprobs2):
            assert list(step2) == list(step1)
            assert max(abs(step1[t] - step2[t]) for t in step1) < tolerance


async def test_two_ranks_give_the_greedy_tokens_and_logprobs_of_one(engine, tp_engine):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    one, two = await asyncio.gather(generate_all(engine, PROMPTS, params), generate_all(tp_engine, PROMPTS, params))
    assert all(len(tokens) == 24 for tokens, _ in two)
    assert_same(one, two, tolerance=1e-4)


async def test_two_ranks_sample_with_seeds_as_one_does(engine, tp_engine):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11, max_tokens=16, ignore_eos=True)
    one, two = await asyncio.gather(generate_all(engine, PROMPTS, params), generate_all(tp_engine, PROMPTS, params))
    assert [t for t, _ in two] == [t for t, _ in one]


async def test_two_ranks_serve_prompt_logprobs_and_prefix_hits(engine, tp_engine):
    prompt = "A long shared system prompt about the weather, then a question: is it raining?"
    with_prompt_logprobs = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    firsts = {}
    for name, eng in (("one", engine), ("two", tp_engine)):
        async for out in eng.generate(prompt, with_prompt_logprobs):
            firsts.setdefault(name, out)
    one, two = firsts["one"].prompt_logprobs, firsts["two"].prompt_logprobs
    assert two[0] is None and len(two) == len(firsts["two"].prompt_token_ids)
    for step1, step2 in zip(one[1:], two[1:]):
        assert list(step2) == list(step1) and max(abs(step1[t] - step2[t]) for t in step1) < 1e-4
    again = [out async for out in tp_engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4))]
    assert again[0].num_cached_tokens >= len(firsts["two"].prompt_token_ids) // 16 * 16 > 0


async def test_replicated_kv_heads_and_a_padded_vocabulary_match_one_rank(tiny_model):
    prompts = [[5, 17, 99, 3, 250], [7] * 12, list(range(40, 70))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = []
    for tp in (1, 2):
        async with tiny_engine(tiny_model, tp) as eng:
            results.append(await generate_all(eng, prompts, params))
    assert_same(*results, tolerance=1e-5)
    assert all(max(tokens) < TINY["vocab_size"] for tokens, _ in results[1])


async def test_a_dead_rank_fails_pending_requests_and_leaves_no_process(tiny_model):
    engine = tiny_engine(tiny_model, 2)
    await engine.start()
    pids = list(engine.child_pids.values())
    assert len(pids) == 4
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    got = 0

    async def consume():
        nonlocal got
        async for _ in engine.generate([1, 2, 3], params):
            got += 1
            if got == 2:
                os.kill(engine.child_pids["gpu1"], signal.SIGKILL)

    with pytest.raises(EngineDeadError, match="gpu1 process died"):
        await asyncio.wait_for(consume(), 30)
    await engine.close()
    assert wait_gone(pids, timeout=10) == []


async def test_a_rank_lost_during_start_up_fails_the_start(tiny_model):
    engine = tiny_engine(tiny_model, 2)
    start = asyncio.ensure_future(engine.start())
    while "gpu1" not in engine.child_pids:
        await asyncio.sleep(0.01)
    os.kill(engine.child_pids["gpu1"], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="gpu1 process died"):
        await asyncio.wait_for(start, 60)
    assert wait_gone(engine.child_pids.values(), timeout=10) == []


def test_llm_with_two_ranks_shuts_down_at_once(tiny_model):
    with LLM(
        model=tiny_model,
        load_format="dummy",
        skip_tokenizer_init=True,
        tensor_parallel_size=2,
        max_model_len=256,
        log_level="ERROR",
    ) as llm:
        pids = list(llm.engine.child_pids.values())
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    assert wait_gone(pids, timeout=2.0) == []


async def test_a_split_that_does_not_fit_the_model_is_refused_before_start(tiny_model):
    engine = tiny_engine(tiny_model, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        await engine.start()
    assert engine.child_pids == {}
