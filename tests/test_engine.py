"""AsyncEngine on the bundled model: correctness against transformers, streaming, abort, seeds, bad input."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import hf_greedy  # pytest has imported the conftest under this name
from tristream import SamplingParams

TEXT = (
    "The history of the lighthouse is a story of fire, glass and patience. Long before electric lamps, keepers "
    "climbed narrow stairs every evening to trim wicks and polish lenses, so that ships could find their way past "
    "rocks and shallow banks. The earliest towers burned wood or coal in open braziers; later came oil lamps with "
    "reflectors, and in the nineteenth century the Fresnel lens, whose rings of prisms bent scattered light into a "
    "single powerful beam visible for many miles. Each light had its own rhythm of flashes, a signature that sailors "
    "looked up in printed lists to know exactly where they were. Keepers recorded the weather, rescued crews from "
    "wrecks, and sometimes lived for months on islands with only their families and a few goats for company. Today "
    "most lighthouses are automated, watched by sensors and solar panels, yet many still stand as museums where "
    "visitors climb the same spiral steps and look out over the water, imagining the long nights of the past. "
    "Engineers who built them faced waves that could move stones weighing tons, and they learned to dovetail granite "
    "blocks together so that the whole tower behaved like a single rock. Some of those towers have stood for more "
    "than two hundred years, surviving storms that destroyed harbours and villages nearby."
)
LENGTHS = [1, 3, 17, 40, 64, 129, 200, 300]
NEW_TOKENS = 40


async def collect(stream) -> tuple[list[int], list[str], list]:
    tokens, texts, outs = [], [], []
    async for out in stream:
        tokens += out.outputs[0].token_ids
        texts.append(out.outputs[0].text)
        outs.append(out)
    return tokens, texts, outs


async def test_greedy_matches_transformers_with_concurrent_arrivals(engine, tokenizer, hf_model):
    ids = tokenizer.encode(TEXT + "\n\n" + TEXT.upper())
    assert len(ids) > max(LENGTHS) + 8 * len(LENGTHS)
    prompts = [ids[3 * i : 3 * i + n] for i, n in enumerate(LENGTHS)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first_running = asyncio.Event()

    async def run(i: int) -> list[int]:
        if i >= 4:
            await first_running.wait()
            await asyncio.sleep(0.05 * (i - 4))
        tokens = []
        async for out in engine.generate(prompts[i], params):
            tokens += out.outputs[0].token_ids
            if len(tokens) >= 3:
                first_running.set()
        return tokens

    ours = await asyncio.gather(*(run(i) for i in range(len(prompts))))
    for n, prompt, got in zip(LENGTHS, prompts, ours):
        assert got == hf_greedy(hf_model, prompt, NEW_TOKENS), f"prompt of {n} tokens diverges from transformers"


async def test_stream_deltas_concatenate_with_chinese_and_emoji(engine, tokenizer):
    messages = [{"role": "user", "content": "Translate into Chinese: Good morning, how are you today?"}]
    tokens, texts, outs = await collect(engine.chat(messages, SamplingParams(temperature=0, max_tokens=48)))
    text = "".join(texts)
    assert all("\ufffd" not in t for t in texts)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text
    assert any(ord(ch) >= 0x1F300 for ch in text), text
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    final = outs[-1]
    assert final.outputs[0].finish_reason in ("stop", "length")
    assert final.metrics.num_generated_tokens == len(tokens)
    assert final.metrics.num_prompt_tokens == len(final.prompt_token_ids) > 0
    assert final.metrics.arrival_time <= final.metrics.first_token_time <= final.metrics.finished_time
    assert final.metrics.time_in_queue >= 0


async def wait_idle(engine, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await engine.get_stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        assert asyncio.get_running_loop().time() < deadline, stats
        await asyncio.sleep(0.05)


async def test_abort_mid_stream_frees_pages(engine):
    idle = await wait_idle(engine)
    assert idle.num_free_pages + idle.num_cached_pages == idle.num_pages
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    outs = []
    async for out in engine.generate("Tell me a long story about dragons.", params, request_id="to-abort"):
        outs.append(out)
        if len(outs) == 3:
            busy = await engine.get_stats()
            assert busy.num_running == 1 and busy.num_free_pages + busy.num_cached_pages < busy.num_pages
            await engine.abort("to-abort")
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in outs) < 500
    stats = await wait_idle(engine)
    assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages


async def test_closing_the_stream_aborts_the_request(engine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    stream = engine.generate("Count from one to one thousand.", params)
    async for _ in stream:
        break
    await stream.aclose()
    stats = await wait_idle(engine)
    assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages


async def test_cancelling_the_consumer_aborts_the_request(engine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate("List every country in the world.", params):
            started.set()

    task = asyncio.ensure_future(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await wait_idle(engine)
    assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages


async def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, seed=1234, ignore_eos=True)
    prompt = "Once upon a time"
    alone, _, _ = await collect(engine.generate(prompt, seeded))
    others = [
        engine.generate("The weather today", SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)),
        engine.generate("In a distant galaxy", SamplingParams(temperature=0, max_tokens=10)),
        engine.generate("Recipe for soup:", SamplingParams(temperature=0.5, top_k=5, max_tokens=40, ignore_eos=True)),
        engine.generate(prompt, SamplingParams(temperature=0.9, max_tokens=24, seed=99, ignore_eos=True)),
    ]
    results = await asyncio.gather(*(collect(s) for s in [*others[:2], engine.generate(prompt, seeded), *others[2:]]))
    assert results[2][0] == alone
    assert results[4][0] != alone  # another seed draws another sequence


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ([], "empty"),
        ([5, 49152], "outside the vocabulary"),
        ([-1, 5], "outside the vocabulary"),
        ("max_model_len tokens", "max_model_len"),
        (12, "a string, a list of token ids or a prompt dict"),
        ("a lone surrogate \ud800", "could not be tokenized"),
    ],
)
async def test_bad_prompts_fail_alone(engine, prompt, match):
    if prompt == "max_model_len tokens":
        prompt = list(range(10, 10 + engine.child_config.max_model_len))
    with pytest.raises(ValueError, match=match):
        await collect(engine.generate(prompt, SamplingParams(max_tokens=4)))
    tokens, _, _ = await collect(engine.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    assert len(tokens) == 4


async def test_bad_chat_messages_fail_alone(engine):
    for messages in ([], [{"content": "no role"}], "not a list of messages"):
        with pytest.raises(ValueError, match="messages"):
            await collect(engine.chat(messages, SamplingParams(max_tokens=4)))
    tokens, _, _ = await collect(
        engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3, ignore_eos=True))
    )
    assert len(tokens) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_k_minus_one_is_off_as_in_vllm():
    assert SamplingParams(top_k=-1).top_k == 0 == SamplingParams().top_k
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1.0)


async def test_max_tokens_stop_token_and_eos(engine, tokenizer):
    tokens, _, outs = await collect(
        engine.generate("The sea", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    )
    assert len(tokens) == 7 and outs[-1].outputs[0].finish_reason == "length"
    stop_at = tokens[3]
    cut, _, outs = await collect(
        engine.generate("The sea", SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[stop_at]))
    )
    assert cut == tokens[: tokens.index(stop_at) + 1] and outs[-1].outputs[0].finish_reason == "stop"
    reply, _, outs = await collect(
        engine.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=200))
    )
    assert outs[-1].outputs[0].finish_reason == "stop" and reply[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


async def test_generation_stops_at_max_model_len(engine):
    prompt = list(range(100, 100 + engine.child_config.max_model_len - 5))
    tokens, _, outs = await collect(engine.generate(prompt, SamplingParams(temperature=0, ignore_eos=True)))
    assert len(tokens) == 5 and outs[-1].outputs[0].finish_reason == "length"


async def test_duplicate_request_id_is_rejected(engine):
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    first = engine.generate("Hello there", params, request_id="dup")
    await first.__anext__()
    with pytest.raises(ValueError, match="already running"):
        await collect(engine.generate("Hello again", params, request_id="dup"))
    rest, _, _ = await collect(first)
    assert len(rest) > 0


async def test_min_tokens_holds_eos_back(engine, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    short, _, _ = await collect(engine.chat(messages, SamplingParams(temperature=0, max_tokens=200)))
    assert short[-1] == eos and len(short) < 20
    longer, _, outs = await collect(engine.chat(messages, SamplingParams(temperature=0, min_tokens=20, max_tokens=200)))
    assert len(longer) > 20 and eos not in longer[:20]


async def test_penalties_and_bias_reach_the_sampler(engine):
    prompt = "Reply using only emojis: I love pizza and rockets 🍕🚀"
    plain, _, _ = await collect(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)))
    repeats = len(plain) - len(set(plain))
    penalized, _, _ = await collect(
        engine.generate(
            prompt,
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0),
        )
    )
    assert len(penalized) - len(set(penalized)) < repeats
    biased, _, _ = await collect(
        engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={plain[0]: -100, 42: 100})
        )
    )
    assert biased == [42] * 6


async def test_logprobs_stream_with_their_tokens(engine):
    outs = [
        o
        async for o in engine.generate(
            "The sea", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
        )
    ]
    tokens = sum((o.outputs[0].token_ids for o in outs), [])
    steps = sum((o.outputs[0].logprobs for o in outs), [])
    assert len(steps) == len(tokens) == 6
    for token, step in zip(tokens, steps):
        (first, lp), *top = step.items()
        assert first == token and lp == max(step.values()) and lp <= 0
        assert [t for t, _ in top] and top[0][1] >= top[-1][1]
    plain = [o async for o in engine.generate("The sea", SamplingParams(temperature=0, max_tokens=2))]
    assert all(o.outputs[0].logprobs is None for o in plain)


async def test_generation_config_runs_like_the_sampling_params_it_means(engine):
    from tristream import GenerationConfig

    greedy, _, _ = await collect(
        engine.generate("Tides are", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    )
    lmdeploy, _, _ = await collect(
        engine.generate("Tides are", GenerationConfig(max_new_tokens=8, ignore_eos=True, temperature=0.9))
    )
    assert lmdeploy == greedy


async def test_gpu_idle_time_is_the_time_in_flight_without_a_step(engine):
    before = await engine.get_stats()
    start = time.monotonic()
    async for _ in engine.generate("Count to ten:", SamplingParams(max_tokens=6, ignore_eos=True)):
        await asyncio.sleep(0.1)  # read slowly: the request is in flight past its last step, the device idle
    elapsed = time.monotonic() - start
    after = await engine.get_stats()
    busy, idle = after.gpu_busy_s - before.gpu_busy_s, after.gpu_idle_s - before.gpu_idle_s
    assert busy > 0 and idle > 0
    assert busy + idle == pytest.approx(elapsed, abs=0.05 + 0.1 * elapsed)
