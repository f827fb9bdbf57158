"""Beam search against independent samples: step time and KV pages.

The same --num-prompts random prompts of --prompt-len tokens run twice, each time on a fresh engine with the
prefix cache on: as beam searches of --beam-width beams (``use_beam_search``, n = the width), and as that many
independent samples (n = the width, temperature 1). Both generate --max-tokens tokens per sequence (EOS
ignored), so both runs produce the same number of tokens. The model is a config.json with dummy weights
(default: Llama-3-8B in bf16 on the GPU); ``--bundled`` runs the bundled SmolLM2 model instead (a CPU smoke
test). Each engine serves a short warm-up request first.

Figures per run: wall time of the ``generate`` call, scheduler steps, wall time per step, and per step the
device time (``gpu_busy_s``), the device's idle time between steps (``gpu_idle_s``) and the scheduler's time,
from ``LLM.get_stats()`` before and after. KV pages in use are ``num_pages - num_free_pages`` (cached pages
count: beams share their prefix through the cache), less those in use before the run; a thread samples them
every --interval s, and the report keeps their peak and mean. Ratios are beam search over samples. A beam
search is never pipelined (each step's tokens are chosen from the step before's logprobs), so its wall time per
step includes the device's wait for the scheduler; the samples' steps overlap with planning. On a GPU the copy
bandwidth and the bf16 matmul rate are measured first.

    python bench/beam.py                   # GPU: dummy Llama-3-8B, bf16
    OMP_NUM_THREADS=1 python bench/beam.py --bundled --device cpu --num-prompts 2 --prompt-len 24 \\
        --max-tokens 8 --out /tmp/beam.json
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import threading
import time

import torch

from tristream import LLM, SamplingParams
from tristream.bench.report import header, model_summary, now, write_report
from tristream.bench.throughput import add_dummy_engine_args, dummy_model, random_prompts, resolve_device, sample_stats
from tristream.cli import engine_args
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model


def mode_params(mode: str, args: argparse.Namespace) -> SamplingParams:
    """A beam search of ``--beam-width`` beams, or as many independent samples."""
    common = dict(n=args.beam_width, max_tokens=args.max_tokens, ignore_eos=True)
    if mode == "beam_search":
        return SamplingParams(use_beam_search=True, **common)
    return SamplingParams(temperature=1.0, seed=args.seed, **common)


def in_use(stats) -> int:
    return stats.num_pages - stats.num_free_pages


def measure(model: str, engine: dict, prompts: list[list[int]], params: SamplingParams, args) -> dict:
    """One run on a fresh engine: its times per step and its KV pages in use."""
    with LLM(model, **engine) as llm:
        llm.generate([prompts[0][:8]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        before = llm.get_stats()
        stop, samples = threading.Event(), []
        thread = threading.Thread(target=sample_stats, args=(llm, stop, args.interval, samples))
        thread.start()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        stop.set()
        thread.join()
        after = llm.get_stats()
    steps = after.num_steps - before.num_steps
    pages = [in_use(s) - in_use(before) for _, s in samples] or [in_use(after) - in_use(before)]
    return {
        "wall_s": wall,
        "output_tokens": sum(len(o.token_ids) for out in outs for o in out.outputs),
        "num_steps": steps,
        "step_s": wall / steps,
        "gpu_busy_per_step_s": (after.gpu_busy_s - before.gpu_busy_s) / steps,
        "gpu_idle_per_step_s": (after.gpu_idle_s - before.gpu_idle_s) / steps,
        "scheduler_per_step_s": (after.scheduler_s - before.scheduler_s) / steps,
        "kv_pages_peak": max(pages),
        "kv_pages_mean": sum(pages) / len(pages),
        "kv_pages_total": after.num_pages,
        "num_stats_samples": len(samples),
    }


def main(args: argparse.Namespace) -> dict:
    started = now()
    resolve_device(args)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    ceilings = None
    if gpu:
        from tristream.bench.ceilings import bf16_ceilings

        ceilings = bf16_ceilings()
    max_len = args.prompt_len + args.max_tokens + 16
    folder = None if args.bundled else dummy_model(args.config, max_len)
    model = resolve_model(None) if args.bundled else str(folder)
    mc = ModelConfig.load(model)
    engine = {**engine_args(args), "max_model_len": max_len, "enable_prefix_caching": True}
    if args.bundled:
        engine["load_format"] = "auto"
    gen = torch.Generator().manual_seed(args.seed)
    prompts = random_prompts([args.prompt_len] * args.num_prompts, mc.vocab_size, gen)
    runs = {}
    for mode in ("beam_search", "samples"):
        runs[mode] = measure(model, engine, prompts, mode_params(mode, args), args)
        r = runs[mode]
        print(
            f"{mode:12s} {r['wall_s']:7.2f} s  {r['num_steps']:5d} steps  {1e3 * r['step_s']:8.2f} ms/step"
            f"  gpu {1e3 * r['gpu_busy_per_step_s']:8.2f} ms/step  KV pages peak {r['kv_pages_peak']}",
            flush=True,
        )
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    beam, samples = runs["beam_search"], runs["samples"]
    vs_samples = {
        "step_s": beam["step_s"] / samples["step_s"],
        "gpu_busy_per_step_s": beam["gpu_busy_per_step_s"] / samples["gpu_busy_per_step_s"],
        "wall_s": beam["wall_s"] / samples["wall_s"],
        "kv_pages_peak": beam["kv_pages_peak"] / max(samples["kv_pages_peak"], 1),
    }
    name = "bundled SmolLM2-135M-Instruct" if args.bundled else pathlib.Path(args.config).stem + " (dummy weights)"
    return {
        **header("beam", started),
        "gpu": gpu,
        "model_config": None if args.bundled else args.config,
        "model": {"name": name, **model_summary(mc, args.dtype)},
        "engine": engine,
        "settings": {
            "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "beam_width": args.beam_width,
            "seed": args.seed,
            "stats_interval_s": args.interval,
        },
        "ceilings": ceilings,
        "runs": runs,
        "beam_search_vs_samples": vs_samples,
        "definitions": {
            "step_s": "wall time of the generate call / scheduler steps",
            "*_per_step_s": "delta of the LLM.get_stats() counter / delta num_steps",
            "kv_pages_*": "num_pages - num_free_pages, less its value before the run, sampled every stats_interval_s",
            "beam_search_vs_samples": "beam search run's figure / samples run's figure",
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundled", action="store_true", help="the bundled SmolLM2 model in place of --config")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between KV page samples")
    p.add_argument("--out", default=None, help="the JSON report (default: bench/results/beam-<gpu>.json)")
    add_dummy_engine_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    report = main(args)
    write_report(report, "beam", report["gpu"], args.out)
