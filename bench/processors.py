"""Sampling at the cost of greedy: each sampling setting's output tok/s over greedy's, one engine, one run.

The rows are the settings real traffic sends (``ROWS``): greedy; temperature 0.7 with top_p 0.95;
LMDeploy's defaults (temperature 0.8, top_k 40, top_p 0.8); top_p 0.95 with repetition_penalty 1.1; and
every processor at once (penalties, logit_bias, min_tokens, top-k/top-p/min_p, logprobs; with a
tokenizer also bad_words and a stop string). For each batch size, each row generates
``--output-len`` tokens for every one of ``batch`` fresh random prompts of ``--input-len`` tokens
through ``LLM.generate`` (prefix cache off), and its output tok/s is divided by greedy's at that batch
(``vs_greedy``).

A second view times the sampler alone on a batch of random logits of the model's vocabulary, per row,
also against greedy: what the sampling costs without the model around it.

    python bench/processors.py --config bench/configs/llama-3-8b.json        # GPU: dummy Llama-3-8B, bf16
    OMP_NUM_THREADS=2 python bench/processors.py --device cpu --batch-sizes 8 --input-len 32 --output-len 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from tristream import LLM, SamplingParams
from tristream.bench.report import header, model_summary, now, write_report
from tristream.bench.throughput import (
    add_bench_engine_args,
    add_model_args,
    bench_model,
    random_prompts,
    resolve_device,
)
from tristream.cli import engine_args
from tristream.gpu_proc.sampler import Sampler, SamplingState
from tristream.model_config import ModelConfig


def every_processor(max_tokens: int, text: bool) -> SamplingParams:
    """Every logit processor at once; bad_words and a stop string only with a tokenizer."""
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
        max_tokens=max_tokens,
        ignore_eos=True,
    )


ROWS: dict[str, Callable[[int, bool], SamplingParams]] = {
    "greedy": lambda n, text: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
    "temperature 0.7, top_p 0.95": lambda n, text: SamplingParams(
        temperature=0.7, top_p=0.95, max_tokens=n, ignore_eos=True
    ),
    "temperature 0.8, top_k 40, top_p 0.8": lambda n, text: SamplingParams(
        temperature=0.8, top_k=40, top_p=0.8, max_tokens=n, ignore_eos=True
    ),
    "top_p 0.95, repetition_penalty 1.1": lambda n, text: SamplingParams(
        top_p=0.95, repetition_penalty=1.1, max_tokens=n, ignore_eos=True
    ),
    "every processor": every_processor,
}


def engine_rows(llm: LLM, batch: int, args: argparse.Namespace, vocab: int, text: bool) -> dict[str, dict]:
    """Output tok/s of each row at ``batch`` requests, each row on fresh prompts."""
    gen = torch.Generator().manual_seed(batch)
    llm.generate(random_prompts([args.input_len] * batch, vocab, gen), ROWS["greedy"](8, text), use_tqdm=False)
    out = {}
    for name, params in ROWS.items():
        prompts = random_prompts([args.input_len] * batch, vocab, gen)
        start = time.perf_counter()
        results = llm.generate(prompts, params(args.output_len, text), use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
        out[name] = {"output_tokens": tokens, "seconds": seconds, "output_tok_per_s": tokens / seconds}
    for row in out.values():
        row["vs_greedy"] = row["output_tok_per_s"] / out["greedy"]["output_tok_per_s"]
    return out


def sampler_rows(batch: int, vocab: int, device: torch.device, repeats: int) -> dict[str, dict]:
    """The sampler alone per row: seconds per call on ``batch`` rows of random logits, tokens read back."""
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    slots, ids = torch.arange(batch, device=device), list(range(batch))
    out = {}
    for name, params in ROWS.items():
        state = SamplingState(batch, vocab, [2], device)
        for slot in ids:
            bad_words = [[1000, 2000]] if params is every_processor else None
            state.set(slot, params(64, False), list(range(100, 140)), 8, bad_words)
        sampler = Sampler(state)
        sampler.sample(logits, slots, ids)[0].tolist()
        start = time.perf_counter()
        for _ in range(repeats):
            sampler.sample(logits, slots, ids)[0].tolist()
        out[name] = {"seconds_per_call": (time.perf_counter() - start) / repeats}
    for row in out.values():
        row["vs_greedy"] = out["greedy"]["seconds_per_call"] / row["seconds_per_call"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--sampler-repeats", type=int, default=50, help="calls per row when timing the sampler alone")
    parser.add_argument("--out", default=None, help="the JSON report (default: the results folder)")
    add_bench_engine_args(parser)
    args = parser.parse_args(argv)
    resolve_device(args)
    started = now()
    model = bench_model(args, args.input_len + args.output_len + 8)
    engine = {**engine_args(args), "model": model.path, "load_format": model.load_format}
    engine.update(max_num_seqs=max(args.batch_sizes), max_model_len=args.input_len + args.output_len + 8)
    mc = ModelConfig.load(model.path)
    try:
        with LLM(**engine) as llm:
            text = not engine.get("skip_tokenizer_init") and not model.dummy
            engine_result = {str(b): engine_rows(llm, b, args, mc.vocab_size, text) for b in args.batch_sizes}
    finally:
        model.close()
    device = torch.device(args.device)
    alone = {str(b): sampler_rows(b, mc.vocab_size, device, args.sampler_repeats) for b in args.batch_sizes}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    report = {
        **header("processors", started),
        "gpu": gpu,
        "model": {"name": model.name, **model_summary(mc, args.dtype)},
        "settings": {k: v for k, v in vars(args).items() if k in ("batch_sizes", "input_len", "output_len")},
        "rows": {name: repr(params(args.output_len, True)) for name, params in ROWS.items()},
        "engine": engine_result,
        "sampler_alone": alone,
    }
    write_report(report, "processors", gpu, args.out)
    print(f"{'row':40s} " + " ".join(f"{'b' + str(b) + ' tok/s':>12s} {'vs_greedy':>9s}" for b in args.batch_sizes))
    for name in ROWS:
        cells = [engine_result[str(b)][name] for b in args.batch_sizes]
        print(f"{name:40s} " + " ".join(f"{c['output_tok_per_s']:12.0f} {c['vs_greedy']:9.3f}" for c in cells))
    print("sampler alone, vs greedy: " + "; ".join(
        f"b{b}: " + ", ".join(f"{alone[str(b)][n]['vs_greedy']:.2f}" for n in ROWS) for b in args.batch_sizes
    ))  # fmt: skip


if __name__ == "__main__":
    main()
