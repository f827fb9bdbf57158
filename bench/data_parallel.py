"""Data parallelism: N replicas against one engine, and cache-aware routing against round-robin.

- ``scaling``: the fixed throughput workload (``--num-prompts`` prompts of ``--input-len`` random token ids,
  ``--output-len`` tokens each, vLLM's benchmark_throughput sampling), all at once, through
  ``AsyncEngine(data_parallel_size=N)`` and through one engine: output tok/s and ``speedup`` (target 1.9 at N=2).
  It needs N × tp GPUs; with fewer the report says so and leaves it out.
- ``routing``: a prefix-heavy workload through the N replicas, routed by the engine's prefix router and then
  round-robin: ``--systems`` system prompts of ``--system-len`` tokens, each opening ``--conversations``
  conversations of ``--turns`` turns; a turn is the conversation so far plus ``--turn-len`` new tokens,
  answered with ``--answer-len`` tokens. The conversations run at once, the turns of each in order. Each routing
  runs fresh prompts on the same replicas: prefix-cache hit rate and output tok/s, ``vs_round_robin``.
  ``--same-gpu`` runs every replica on GPU 0, so that one GPU can compare the routings (set ``--kv-cache-tokens``
  so that the replicas fit side by side).

    python bench/data_parallel.py --config bench/configs/llama-3-8b.json                # 2 GPUs: both parts
    python bench/data_parallel.py --config bench/configs/llama-3-8b.json --parts routing --same-gpu \\
        --kv-cache-tokens 100000                                                       # one GPU: routing only
    OMP_NUM_THREADS=1 python bench/data_parallel.py --device cpu --num-prompts 8 --input-len 16 --output-len 8 \\
        --systems 2 --conversations 2 --turns 2 --system-len 64 --turn-len 8 --answer-len 4
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from tristream import AsyncEngine
from tristream.bench.report import header, model_summary, now, write_report
from tristream.bench.throughput import (
    RESULTS,
    add_bench_engine_args,
    add_model_args,
    bench_model,
    random_prompts,
    resolve_device,
    vllm_params,
)
from tristream.cli import engine_args
from tristream.model_config import ModelConfig


class RoundRobin:
    """The routing that the prefix router is measured against: each request to the next replica that runs."""

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas, self.turn = num_replicas, 0

    def choose(self, key: str, loads: list[int], alive: list[bool]) -> int:
        while not alive[self.turn % self.num_replicas]:
            self.turn += 1
        self.turn += 1
        return (self.turn - 1) % self.num_replicas

    def forget(self, replica: int) -> None:
        pass


async def generate(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = []
    async for out in engine.generate(prompt, vllm_params(max_tokens)):
        tokens += out.outputs[0].token_ids
    return tokens


async def scaling_run(engine: AsyncEngine, prompts: list[list[int]], output_len: int) -> dict:
    start = time.perf_counter()
    outputs = await asyncio.gather(*(generate(engine, p, output_len) for p in prompts))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tok_per_s": sum(map(len, outputs)) / seconds}


async def conversations(engine: AsyncEngine, args: argparse.Namespace, vocab: int, seed: int) -> dict:
    """The routing workload once, on fresh prompts from ``seed``: hit rate and output tok/s."""
    gen = torch.Generator().manual_seed(seed)
    systems = random_prompts([args.system_len] * args.systems, vocab, gen)
    turns = [random_prompts([args.turn_len] * args.turns, vocab, gen) for _ in range(args.systems * args.conversations)]

    async def talk(index: int) -> int:
        history, generated = list(systems[index % args.systems]), 0
        for turn in turns[index]:
            history += turn
            answer = await generate(engine, history, args.answer_len)
            history += answer
            generated += len(answer)
        return generated

    before = await engine.get_stats()
    start = time.perf_counter()
    generated = sum(await asyncio.gather(*(talk(i) for i in range(len(turns)))))
    seconds = time.perf_counter() - start
    after = await engine.get_stats()
    prompt = after.num_prompt_tokens - before.num_prompt_tokens
    hits = after.num_cache_hit_tokens - before.num_cache_hit_tokens
    return {
        "seconds": seconds,
        "output_tok_per_s": generated / seconds,
        "prompt_tokens": prompt,
        "hit_rate": hits / prompt,
    }


async def scaling(args: argparse.Namespace, engine: dict, vocab: int) -> dict:
    needed = args.replicas * args.tensor_parallel_size
    if args.device == "cuda" and torch.cuda.device_count() < needed:
        return {"skipped": f"needs {needed} GPUs, torch sees {torch.cuda.device_count()}"}
    prompts = random_prompts([args.input_len] * args.num_prompts, vocab, torch.Generator().manual_seed(args.seed))
    runs = {}
    for replicas in (1, args.replicas):
        async with AsyncEngine(**engine, data_parallel_size=replicas) as llm:
            await scaling_run(llm, prompts[: args.replicas * 2], 4)  # warm-up
            runs[str(replicas)] = await scaling_run(llm, prompts, args.output_len)
        print(f"{replicas} replica(s): {runs[str(replicas)]['output_tok_per_s']:.1f} output tok/s", flush=True)
    return {"runs": runs, "speedup": runs[str(args.replicas)]["output_tok_per_s"] / runs["1"]["output_tok_per_s"]}


async def routing(args: argparse.Namespace, engine: dict, vocab: int) -> dict:
    llm = AsyncEngine(**{**engine, "enable_prefix_caching": True}, data_parallel_size=args.replicas)
    if args.same_gpu:
        for replica in llm.replicas:
            replica._first_device = 0
    async with llm:
        await scaling_run(llm, random_prompts([16] * 4, vocab, torch.Generator().manual_seed(1)), 4)  # warm-up
        runs = {"prefix": await conversations(llm, args, vocab, args.seed + 10)}
        llm.router = RoundRobin(args.replicas)
        runs["round_robin"] = await conversations(llm, args, vocab, args.seed + 20)
    for name, r in runs.items():
        print(f"{name}: hit rate {r['hit_rate']:.1%}, {r['output_tok_per_s']:.1f} output tok/s", flush=True)
    prefix, rr = runs["prefix"], runs["round_robin"]
    return {"runs": runs, "vs_round_robin": prefix["output_tok_per_s"] / rr["output_tok_per_s"]}


async def run(args: argparse.Namespace) -> dict:
    started = now()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    max_len = max(args.input_len + args.output_len, args.system_len + args.turns * (args.turn_len + args.answer_len))
    model = bench_model(args, max_len)
    mc = ModelConfig.load(model.path)
    engine = {**engine_args(args), "model": model.path, "load_format": model.load_format, "max_model_len": max_len}
    engine.pop("data_parallel_size")
    report = {
        **header("data_parallel", started),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "model": {"name": model.name, **model_summary(mc, args.dtype)},
        "engine": {**engine, "model": model.name},
        "settings": {k: v for k, v in vars(args).items() if k in SETTINGS},
        "sampling": "temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output length (vLLM benchmark_throughput)",
    }
    try:
        if "scaling" in args.parts:
            report["scaling"] = await scaling(args, engine, mc.vocab_size)
        if "routing" in args.parts:
            report["routing"] = await routing(args, engine, mc.vocab_size)
    finally:
        model.close()
    report["finished"] = now()
    return report


SETTINGS = ("parts", "replicas", "num_prompts", "input_len", "output_len", "systems", "conversations", "turns")
SETTINGS += ("system_len", "turn_len", "answer_len", "same_gpu", "seed")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    add_bench_engine_args(parser, skip_tokenizer_init=True)
    parser.add_argument("--parts", nargs="+", default=["scaling", "routing"], choices=["scaling", "routing"])
    parser.add_argument("--replicas", type=int, default=2, help="data-parallel replicas to compare with one engine")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--systems", type=int, default=8, help="routing: shared system prompts")
    parser.add_argument("--conversations", type=int, default=8, help="routing: conversations per system prompt")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--turn-len", type=int, default=64)
    parser.add_argument("--answer-len", type=int, default=64)
    parser.add_argument("--same-gpu", action="store_true", help="routing: every replica on GPU 0")
    parser.add_argument("--out", default=None, help=f"default: {RESULTS}/data-parallel-<gpu or cpu>.json")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the benchmark of the command line ``argv`` and write its report; the report."""
    args = build_parser(prog).parse_args(argv)
    resolve_device(args)
    report = asyncio.run(run(args))
    write_report(report, "data-parallel", report["gpu"], args.out)
    return report


if __name__ == "__main__":
    main()
