"""Cost of the logit processors: every processor active versus greedy only, on the same batch (CPU).

Two views of the same question:
- end to end through AsyncEngine: steady decode time per step for a batch of
  requests, greedy versus all processors (penalties, bias, bad_words, min_tokens,
  top-k/top-p/min_p sampling, stop strings, logprobs);
- in process: the sampler alone on that batch's logits, as a fraction of a
  model decode step.

    python bench/processors.py --batch 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import time

import torch
from report import header, model_summary, now

from tristream import AsyncEngine, SamplingParams
from tristream.gpu_proc.sampler import Sampler, SamplingState
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper and the ships that pass by at night."


def all_processors(seed: int, new_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
        repetition_penalty=1.1, logit_bias={13: 1.0, 28: -1.0}, bad_words=["the ship"], min_tokens=8,
        stop=["zzzz"], logprobs=5, max_tokens=new_tokens, ignore_eos=True, seed=seed,
    )


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)


async def engine_step_time(batch: int, new_tokens: int, processors: bool) -> float:
    """Median steady-decode step time: every request has its first token and none has finished."""
    async with AsyncEngine(max_model_len=512, log_level="WARNING") as engine:
        async def one(i: int) -> list[float]:
            params = all_processors(i, new_tokens) if processors else greedy(new_tokens)
            times = []
            async for out in engine.generate(f"{PROMPT} ({i})", params):
                times += [time.perf_counter()] * len(out.outputs[0].token_ids)
            return times

        await one(-1)
        runs = await asyncio.gather(*(one(i) for i in range(batch)))
    begin, end = max(t[0] for t in runs), min(t[-1] for t in runs)
    steps = statistics.mean(sum(begin < x <= end for x in t) for t in runs)
    return (end - begin) / steps


def sampler_time(batch: int, vocab: int, processors: bool, repeats: int = 50) -> float:
    state = SamplingState(batch, vocab, [2], torch.device("cpu"))
    for slot in range(batch):
        params = all_processors(slot, 64) if processors else greedy(64)
        state.set(slot, params, list(range(100, 140)), 8, [[1000, 2000]] if processors else None)
    sampler = Sampler(state)
    slots, ids = torch.arange(batch), list(range(batch))
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    sampler.sample(logits, slots, ids)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(logits, slots, ids)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "processors.json"))
    args = parser.parse_args()
    mc = ModelConfig.load(resolve_model(None))
    started = now()
    step = {mode: asyncio.run(engine_step_time(args.batch, args.new_tokens, mode == "all")) for mode in ("greedy", "all")}
    sample = {mode: sampler_time(args.batch, mc.vocab_size, mode == "all") for mode in ("greedy", "all")}
    report = {
        **header("processors", started),
        "model": {"name": "SmolLM2-135M-Instruct (bundled)", **model_summary(mc, "float32")},
        "settings": {"batch": args.batch, "new_tokens": args.new_tokens, "all_processors": repr(all_processors(0, args.new_tokens))},
        "engine_step_s": step,
        "engine_overhead_fraction": (step["all"] - step["greedy"]) / step["all"],
        "sampler_s": sample,
        "sampler_fraction_of_step": {mode: sample[mode] / step[mode] for mode in sample},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    print(f"batch {args.batch}, CPU fp32          | greedy   | all processors")
    print(f"engine decode step            | {step['greedy'] * 1e3:6.1f} ms | {step['all'] * 1e3:6.1f} ms")
    print(f"sampler alone                 | {sample['greedy'] * 1e3:6.2f} ms | {sample['all'] * 1e3:6.2f} ms")
    print(f"sampler share of the step     | {100 * report['sampler_fraction_of_step']['greedy']:5.1f} %  | "
          f"{100 * report['sampler_fraction_of_step']['all']:5.1f} %")
    print(f"processors' overhead on the step: {100 * report['engine_overhead_fraction']:.1f} %")


if __name__ == "__main__":
    main()
