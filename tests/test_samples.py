"""n and best_of samples, and prompt logprobs, on the shared engine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tristream import SamplingParams
from tristream.tokenizer_proc.main import sample_seed


async def whole(stream) -> tuple[dict[int, dict], list]:
    """Each sample's concatenated tokens, text, logprobs and finish reason; and every streamed output."""
    samples: dict[int, dict] = {}
    outs = []
    async for out in stream:
        outs.append(out)
        for o in out.outputs:
            s = samples.setdefault(o.index, {"tokens": [], "text": "", "logprobs": [], "reason": None})
            s["tokens"] += o.token_ids
            s["text"] += o.text
            s["logprobs"] += o.logprobs or []
            s["reason"], s["cumulative"] = o.finish_reason, o.cumulative_logprob
    return samples, outs


async def test_n_samples_differ_and_compute_the_prompt_once(engine, tokenizer):
    prompt = "List of made-up island names, number 7731:"
    length = len(tokenizer.encode(prompt))
    params = SamplingParams(n=4, temperature=1.0, max_tokens=10, ignore_eos=True, seed=11)
    before = await engine.get_stats()
    samples, outs = await whole(engine.generate(prompt, params))
    after = await engine.get_stats()
    assert sorted(samples) == [0, 1, 2, 3]
    assert len({tuple(s["tokens"]) for s in samples.values()}) == 4
    assert all(len(s["tokens"]) == 10 and s["reason"] == "length" for s in samples.values())
    assert all(s["text"] == tokenizer.decode(s["tokens"], skip_special_tokens=True) for s in samples.values())
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert after.num_prompt_tokens - before.num_prompt_tokens == 4 * length
    computed = 4 * length - (after.num_cache_hit_tokens - before.num_cache_hit_tokens)
    assert computed == length + 3, "the other samples compute only the last prompt token"
    assert after.num_running == 0 and after.num_free_pages + after.num_cached_pages == after.num_pages


async def test_each_sample_equals_a_lone_request_with_its_seed(engine):
    """The copied KV is right: sample i decodes exactly like a fresh request with sample i's seed."""
    prompt = "Once upon a time in a village by the sea, there lived a"
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_tokens=16, ignore_eos=True, seed=2024)
    samples, _ = await whole(engine.generate(prompt, params))
    lone = await asyncio.gather(
        *(
            whole(
                engine.generate(
                    prompt,
                    SamplingParams(
                        temperature=0.8, top_p=0.95, max_tokens=16, ignore_eos=True, seed=sample_seed(2024, i)
                    ),
                )
            )
            for i in range(3)
        )
    )
    assert [samples[i]["tokens"] for i in range(3)] == [one[0][0]["tokens"] for one in lone]


async def test_best_of_returns_the_n_most_likely_samples(engine):
    prompt = "The three best things about rainy days are"
    params = SamplingParams(n=2, best_of=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=99)
    samples, outs = await whole(engine.generate(prompt, params))
    assert len(outs) == 1 and outs[0].finished, "best_of > n returns once, at the end"
    assert sorted(samples) == [0, 1] and all(s["logprobs"] == [] for s in samples.values())
    candidates = []
    for i in range(4):
        lone = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=sample_seed(99, i), logprobs=0)
        one, _ = await whole(engine.generate(prompt, lone))
        candidates.append((sum(next(iter(step.values())) for step in one[0]["logprobs"]), one[0]["tokens"]))
    candidates.sort(key=lambda c: -c[0])
    assert [samples[i]["tokens"] for i in (0, 1)] == [c[1] for c in candidates[:2]]
    assert [samples[i]["cumulative"] for i in (0, 1)] == pytest.approx([c[0] for c in candidates[:2]], abs=1e-4)


async def test_aborting_a_request_stops_all_its_samples(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=500, ignore_eos=True)
    stream = engine.generate("Tell me a very long story about a dragon.", params)
    seen = 0
    async for out in stream:
        seen += 1
        if seen == 10:
            await engine.abort(out.request_id)
    for _ in range(100):
        stats = await engine.get_stats()
        if stats.num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages


async def test_prompt_logprobs_are_the_models_own(engine, tokenizer, hf_model):
    prompt = "Water boils at one hundred degrees Celsius at sea level."
    ids = tokenizer.encode(prompt)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for _ in range(2):  # the second run would hit the prefix cache, but prompt logprobs recompute the prompt
        _, outs = await whole(engine.generate(prompt, params))
        first = outs[0]
        assert first.num_cached_tokens == 0
        plp = first.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] is None
        assert all(o.prompt_logprobs is None for o in outs[1:])
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        for pos in range(1, len(ids)):
            entry, row = plp[pos], ref[pos - 1]
            assert set(entry) == {ids[pos], *row.topk(3).indices.tolist()}
            for token, value in entry.items():
                assert value == pytest.approx(row[token].item(), abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be"),
        (dict(n=3, best_of=2), "best_of must be"),
        (dict(prompt_logprobs=21), "prompt_logprobs must be"),
    ],
)
def test_bad_sample_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
