"""A Llama-3-8B-shaped dummy model in bf16 split over two GPUs: its logits against one GPU's.

Both engines draw the same dummy weights. The split sums partial products in another
order and rounds them to bf16 before the all-reduce, so the logprobs agree within
bf16 tolerance, and greedy tokens agree until the first near-tie.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest
import torch

from tristream import AsyncEngine, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "bench" / "configs" / "llama-3-8b.json"
PROMPT_LENS = [5, 300, 1500]
STEPS = 24
TOP = 20
# In logprob (nats): the top logits of the dummy model are about 6, where one bf16 ulp is 1/32.
TOLERANCE = 4 / 32
NEAR_TIE = 2 * TOLERANCE


async def run(model: str, tp: int, prompts: list[list[int]]) -> list[tuple[list[int], list[dict[int, float]]]]:
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=TOP)
    async with AsyncEngine(model=model, load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=tp,
                           max_model_len=2048, max_num_seqs=8, gpu_memory_utilization=0.5, log_level="WARNING") as eng:

        async def one(prompt):
            tokens, logprobs = [], []
            async for out in eng.generate(prompt, params):
                tokens += out.outputs[0].token_ids
                logprobs += out.outputs[0].logprobs
            return tokens, logprobs

        return await asyncio.gather(*(one(p) for p in prompts))


def test_two_gpus_give_the_logits_of_one(tmp_path):
    (tmp_path / "config.json").write_text(CONFIG.read_text())
    vocab = json.loads(CONFIG.read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocab - 100, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    one = asyncio.run(run(str(tmp_path), 1, prompts))
    two = asyncio.run(run(str(tmp_path), 2, prompts))
    worst, compared = 0.0, 0
    for (tokens1, logprobs1), (tokens2, logprobs2) in zip(one, two):
        for step, (a, b) in enumerate(zip(logprobs1, logprobs2)):
            shared = set(a) & set(b)
            assert len(shared) >= TOP // 2, f"step {step}: the top {TOP} tokens hardly overlap"
            worst = max(worst, max(abs(a[t] - b[t]) for t in shared))
            compared += 1
            top = sorted(a.values(), reverse=True)
            if tokens1[step] != tokens2[step]:
                assert top[0] - top[1] < NEAR_TIE, f"step {step}: tokens differ without a near-tie"
                break
    assert compared >= len(PROMPT_LENS)
    assert worst < TOLERANCE, f"largest logprob difference {worst:.4f}"
    print(f"\nTP=2 against TP=1: {compared} steps compared, largest top-{TOP} logprob difference {worst:.4f}")
