"""Cost of the logit processors: every processor active versus greedy only, on the same batch.

Two views of the same question:
- end to end through AsyncEngine: steady decode time per step for a batch of
  requests, greedy versus all processors (penalties, bias, bad_words, min_tokens,
  top-k/top-p/min_p sampling, stop strings, logprobs);
- in process: the sampler alone on that batch's logits, as a fraction of a
  model decode step.

    python bench/processors.py --batch 16 --new-tokens 64          # CPU, bundled model, fp32
    python bench/processors.py --config bench/configs/llama-3-8b.json --batch 64   # GPU, dummy bf16

A ``--config`` model has dummy weights and no tokenizer, so bad_words and stop
strings (which need one) are left out of "all processors" there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shutil
import statistics
import tempfile
import time

import torch
from report import header, model_summary, now

from tristream import AsyncEngine, SamplingParams
from tristream.gpu_proc.sampler import Sampler, SamplingState
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper and the ships that pass by at night."


def all_processors(seed: int, new_tokens: int, text: bool = True) -> SamplingParams:
    return SamplingParams(
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        logit_bias={13: 1.0, 28: -1.0},
        bad_words=["the ship"] if text else None,
        min_tokens=8,
        stop=["zzzz"] if text else None,
        logprobs=5,
        max_tokens=new_tokens,
        ignore_eos=True,
        seed=seed,
    )


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)


async def engine_step_time(batch: int, new_tokens: int, processors: bool, engine_args: dict) -> float:
    """Median steady-decode step time: every request has its first token and none has finished."""
    text = not engine_args.get("skip_tokenizer_init")
    async with AsyncEngine(max_model_len=512, max_num_seqs=max(batch, 8), log_level="WARNING", **engine_args) as engine:

        async def one(i: int) -> list[float]:
            params = all_processors(i, new_tokens, text) if processors else greedy(new_tokens)
            prompt = f"{PROMPT} ({i})" if text else [1000 + (i * 37 + j) % 20000 for j in range(64)]
            times = []
            async for out in engine.generate(prompt, params):
                times += [time.perf_counter()] * len(out.outputs[0].token_ids)
            return times

        await one(-1)
        runs = await asyncio.gather(*(one(i) for i in range(batch)))
    begin, end = max(t[0] for t in runs), min(t[-1] for t in runs)
    steps = statistics.mean(sum(begin < x <= end for x in t) for t in runs)
    return (end - begin) / steps


def sampler_time(batch: int, vocab: int, processors: bool, device: torch.device, repeats: int = 50) -> float:
    """The sampler alone on one batch of logits, including reading the tokens back to the host."""
    state = SamplingState(batch, vocab, [2], device)
    for slot in range(batch):
        params = all_processors(slot, 64) if processors else greedy(64)
        state.set(slot, params, list(range(100, 140)), 8, [[1000, 2000]] if processors else None)
    sampler = Sampler(state)
    slots, ids = torch.arange(batch, device=device), list(range(batch))
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    sampler.sample(logits, slots, ids)[0].tolist()
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(logits, slots, ids)[0].tolist()
    return (time.perf_counter() - start) / repeats


def sampler_profile(batch: int, vocab: int, device: torch.device, steps: int = 20) -> list[dict]:
    """The sampler's heaviest operations with every processor on, per call."""
    from torch.profiler import ProfilerActivity, profile

    state = SamplingState(batch, vocab, [2], device)
    for slot in range(batch):
        state.set(slot, all_processors(slot, 64), list(range(100, 140)), 8)
    sampler, slots, ids = Sampler(state), torch.arange(batch, device=device), list(range(batch))
    logits = torch.randn(batch, vocab, device=device)
    sampler.sample(logits, slots, ids)[0].tolist()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            sampler.sample(logits, slots, ids)[0].tolist()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    return [{"op": e.key, "us_per_call": getattr(e, key) / steps} for e in events[:15]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--config", default=None, help="a config.json to run with dummy bf16 weights (GPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="only print the sampler's heaviest operations")
    args = parser.parse_args()
    if args.profile:
        vocab = (
            ModelConfig.load(resolve_model(None)).vocab_size
            if not args.config
            else json.load(open(args.config))["vocab_size"]
        )
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for row in sampler_profile(args.batch, vocab, device):
            print(f"{row['us_per_call']:9.1f} us  {row['op']}")
        return
    started = now()
    folder = None
    if args.config:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="tristream-bench-"))
        shutil.copy(args.config, folder / "config.json")
        engine_args = dict(
            model=str(folder),
            load_format="dummy",
            dtype="bfloat16",
            skip_tokenizer_init=True,
            enable_prefix_caching=False,
        )
        name, dtype = pathlib.Path(args.config).stem + " (dummy weights)", "bfloat16"
    else:
        engine_args, name, dtype = {}, "SmolLM2-135M-Instruct (bundled)", "float32"
    mc = ModelConfig.load(str(folder) if folder else resolve_model(None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = {
        mode: asyncio.run(engine_step_time(args.batch, args.new_tokens, mode == "all", engine_args))
        for mode in ("greedy", "all")
    }
    sample = {mode: sampler_time(args.batch, mc.vocab_size, mode == "all", device) for mode in ("greedy", "all")}
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    report = {
        **header("processors", started),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "model": {"name": name, **model_summary(mc, dtype)},
        "settings": {
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "all_processors": repr(all_processors(0, args.new_tokens, not args.config)),
        },
        "engine_step_s": step,
        "engine_overhead_fraction": (step["all"] - step["greedy"]) / step["all"],
        "sampler_s": sample,
        "sampler_fraction_of_step": {mode: sample[mode] / step[mode] for mode in sample},
    }
    suffix = "" if device.type == "cpu" else "-" + report["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    out = pathlib.Path(args.out or REPO / "bench" / "results" / f"processors{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    print(f"batch {args.batch}, {report['gpu'] or 'CPU'} {dtype:9s} | greedy   | all processors")
    print(f"engine decode step            | {step['greedy'] * 1e3:6.1f} ms | {step['all'] * 1e3:6.1f} ms")
    print(f"sampler alone                 | {sample['greedy'] * 1e3:6.2f} ms | {sample['all'] * 1e3:6.2f} ms")
    print(
        f"sampler share of the step     | {100 * report['sampler_fraction_of_step']['greedy']:5.1f} %  | "
        f"{100 * report['sampler_fraction_of_step']['all']:5.1f} %"
    )
    print(f"processors' overhead on the step: {100 * report['engine_overhead_fraction']:.1f} %")


if __name__ == "__main__":
    main()
