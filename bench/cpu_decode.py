"""CPU decode throughput: tristream against Hugging Face transformers on the bundled model.

Both run the same fp32 weights, the same prompts (token ids), greedy, with a fixed
number of new tokens. Decode tokens/s is the tokens generated after the first one
divided by (end-to-end time - time to first token); for a batch, the time to first
token is when every request has its first token. transformers' time to first token
is estimated by timing a generate of one new token.

tristream also runs with int8 weights (``quantization="int8"``; ``int8_vs_fp32`` is its
decode tok/s over fp32's), and, when ``llama_cpp`` (llama-cpp-python) is installed,
llama.cpp runs the bundled GGUF itself (its Q4_1 weights) at batch 1, on the same
threads.

    python bench/cpu_decode.py --batch-sizes 1 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tristream import AsyncEngine, SamplingParams
from tristream.bench.report import RESULTS, header, model_summary, now
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined "
    "movable metal type with an oil-based ink and a screw press,",
    "To make a good cup of tea you need fresh water, a warm pot and patience. First, bring the water to a boil, "
    "then pour a little into the pot to warm it, and",
    "Photosynthesis is the process by which green plants turn light, water and carbon dioxide into sugar and "
    "oxygen. It takes place mostly in the leaves, inside",
    "A binary search tree keeps its keys in order: every key in the left subtree is smaller than the root and "
    "every key in the right subtree is larger. To insert",
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp and a small "
    "notebook in which he wrote down the ships that",
    "In economics, inflation is a general rise in the prices of goods and services over time. When prices rise, "
    "each unit of money buys fewer things, which means",
    "Mount Everest, the highest mountain above sea level, sits on the border between Nepal and China. Climbers "
    "usually approach it from the south side, where",
    "Dear team, thank you all for the hard work on the release last week. Before the next planning meeting I "
    "would like everyone to think about three questions:",
]


def summarize(runs: list[dict], batch: int, new_tokens: int) -> dict:
    """Medians over the timed runs, and the throughputs they give."""
    e2e = statistics.median(r["e2e_s"] for r in runs)
    ttft = statistics.median(r["ttft_s"] for r in runs)
    decode_tokens = batch * (new_tokens - 1)
    return {
        "e2e_s": e2e,
        "ttft_s": ttft,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / (e2e - ttft) if e2e > ttft else None,
        "output_tokens": batch * new_tokens,
        "e2e_tok_s": batch * new_tokens / e2e,
        "runs": runs,
    }


# ---------------------------------------------------------------- tristream


async def tristream_once(engine: AsyncEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    """One batch submitted at once; times from the earliest arrival."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    async def one(ids: list[int]) -> tuple[list[int], object]:
        tokens, metrics = [], None
        async for out in engine.generate(ids, params):
            tokens.extend(out.outputs[0].token_ids)
            metrics = out.metrics
        return tokens, metrics

    results = await asyncio.gather(*(one(p) for p in prompts))
    start = min(m.arrival_time for _, m in results)
    for tokens, _ in results:
        assert len(tokens) == new_tokens, f"expected {new_tokens} tokens, got {len(tokens)}"
    return {
        "e2e_s": max(m.finished_time for _, m in results) - start,
        "ttft_s": max(m.first_token_time for _, m in results) - start,
        "tokens": [t for t, _ in results],
    }


async def bench_tristream(
    prompts: list[list[int]], batch_sizes: list[int], new_tokens: int, repeats: int, quantization: str | None = None
) -> dict:
    max_len = max(len(p) for p in prompts) + new_tokens
    engine_args = dict(
        device="cpu",
        dtype="float32",
        quantization=quantization,
        max_model_len=max_len,
        max_num_seqs=max(batch_sizes),
        kv_cache_tokens=max(batch_sizes) * max_len,
        log_level="WARNING",
    )
    out = {"engine_args": engine_args}
    async with AsyncEngine(None, **engine_args) as engine:
        for bs in batch_sizes:  # warm-up
            await tristream_once(engine, prompts[:bs], min(8, new_tokens))
        for bs in batch_sizes:
            runs = [await tristream_once(engine, prompts[:bs], new_tokens) for _ in range(repeats)]
            tokens = runs[0]["tokens"]
            for r in runs:
                del r["tokens"]
            out[bs] = summarize(runs, bs, new_tokens) | {"tokens": tokens}
    return out


# ---------------------------------------------------------------- transformers


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[float, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=eos
        )
    elapsed = time.perf_counter() - start
    return elapsed, out[:, batch["input_ids"].shape[1] :]


def bench_transformers(
    model_dir: str, prompts: list[list[int]], batch_sizes: list[int], new_tokens: int, repeats: int
) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.pad_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for bs in batch_sizes:  # warm-up
        hf_generate(model, tokenizer, prompts[:bs], min(8, new_tokens))
    for bs in batch_sizes:
        runs = []
        tokens = None
        for _ in range(repeats):
            ttft, _ = hf_generate(model, tokenizer, prompts[:bs], 1)
            e2e, generated = hf_generate(model, tokenizer, prompts[:bs], new_tokens)
            assert generated.shape == (bs, new_tokens)
            tokens = generated.tolist()
            runs.append({"e2e_s": e2e, "ttft_s": ttft})
        out[bs] = summarize(runs, bs, new_tokens) | {"tokens": tokens}
    return out


def bench_llama_cpp(prompts: list[list[int]], new_tokens: int, repeats: int) -> dict | None:
    """llama.cpp on the bundled GGUF at batch 1 (the first prompt's ids), greedy, if llama-cpp-python is there."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from tristream.model_files import default_model_path

    llm = Llama(default_model_path(), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    runs, tokens = [], []
    for i in range(repeats + 1):  # the first run warms up
        llm.reset()
        start, first, tokens = time.perf_counter(), None, []
        for token in llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            first = first or time.perf_counter()
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        if i:
            runs.append({"e2e_s": time.perf_counter() - start, "ttft_s": first - start})
    return summarize(runs, 1, new_tokens) | {"tokens": [tokens], "version": __import__("llama_cpp").__version__}


# ---------------------------------------------------------------- main


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy tokens agree up to the first difference, averaged."""
    fractions = []
    for x, y in zip(a, b):
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        fractions.append(same / len(x))
    return sum(fractions) / len(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=None, help="cut each prompt (28-39 tokens) to this many")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is kept)")
    parser.add_argument("--out", default=str(RESULTS / "cpu_decode.json"))
    args = parser.parse_args()
    if max(args.batch_sizes) > len(PROMPTS) or min(args.batch_sizes) < 1:
        parser.error(f"batch sizes must be in 1..{len(PROMPTS)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")

    started = now()
    model_dir = resolve_model(None)
    mc = ModelConfig.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(p)["input_ids"][: args.prompt_tokens] for p in PROMPTS]  # 28-39 tokens, mean 32

    print(
        f"tristream: batch sizes {args.batch_sizes}, {args.new_tokens} new tokens, {args.repeats} runs each ...",
        flush=True,
    )
    ours = asyncio.run(bench_tristream(prompts, args.batch_sizes, args.new_tokens, args.repeats))
    print("tristream, int8 weights ...", flush=True)
    int8 = asyncio.run(bench_tristream(prompts, args.batch_sizes, args.new_tokens, args.repeats, "int8"))
    print("transformers ...", flush=True)
    theirs = bench_transformers(model_dir, prompts, args.batch_sizes, args.new_tokens, args.repeats)
    print("llama.cpp (if installed) ...", flush=True)
    llama = bench_llama_cpp(prompts, args.new_tokens, args.repeats)

    results = {}
    for bs in args.batch_sizes:
        a, b, q = ours[bs], theirs[bs], int8[bs]
        results[str(bs)] = {
            "tristream": {k: v for k, v in a.items() if k != "tokens"},
            "tristream_int8": {k: v for k, v in q.items() if k != "tokens"},
            "int8_vs_fp32": q["decode_tok_s"] / a["decode_tok_s"] if q["decode_tok_s"] and a["decode_tok_s"] else None,
            "int8_greedy_agreement": agreement(q["tokens"], a["tokens"]),
            "transformers": {k: v for k, v in b.items() if k != "tokens"},
            "ratio_decode_tok_s": a["decode_tok_s"] / b["decode_tok_s"]
            if a["decode_tok_s"] and b["decode_tok_s"]
            else None,
            "ratio_e2e_tok_s": a["e2e_tok_s"] / b["e2e_tok_s"],
            "greedy_agreement": agreement(a["tokens"], b["tokens"]),
        }
    if llama is not None:
        results["1"]["llama_cpp"] = {k: v for k, v in llama.items() if k != "tokens"}
        results["1"]["llama_cpp_vs_tristream_int8"] = llama["decode_tok_s"] / int8[1]["decode_tok_s"]

    report = {
        **header("cpu_decode", started),
        "model": {
            "name": pathlib.Path(model_dir).name,
            "source": "bundled default model (model=None), dequantized to fp32",
            **model_summary(mc, "float32"),
        },
        "settings": {
            "batch_sizes": args.batch_sizes,
            "new_tokens": args.new_tokens,
            "prompt_lengths": [len(p) for p in prompts[: max(args.batch_sizes)]],
            "repeats": args.repeats,
            "greedy": True,
            "tristream_engine_args": ours["engine_args"],
            "decode_tok_s": "batch * (new_tokens - 1) / (e2e_s - ttft_s), medians over runs",
            "e2e_tok_s": "batch * new_tokens / e2e_s",
        },
        "results": results,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    columns = f"{'batch':>5} | {'system':<14} | {'TTFT s':>7} | {'e2e s':>7} | {'decode tok/s':>12} | {'e2e tok/s':>9}"
    print(columns)
    print("-" * len(columns))
    for bs in args.batch_sizes:
        r = results[str(bs)]
        for name in ("tristream", "tristream_int8", "transformers", "llama_cpp"):
            if name not in r:
                continue
            x = r[name]
            decode = f"{x['decode_tok_s']:.1f}" if x["decode_tok_s"] else "n/a"
            print(
                f"{bs:>5} | {name:<14} | {x['ttft_s']:>7.3f} | {x['e2e_s']:>7.2f} | {decode:>12} | {x['e2e_tok_s']:>9.1f}"
            )
        ratio = f"{r['ratio_decode_tok_s']:.2f}" if r["ratio_decode_tok_s"] else "n/a"
        print(
            f"{bs:>5} | {'ratio':<14} | {'':>7} | {'':>7} | {ratio:>12} | {r['ratio_e2e_tok_s']:>9.2f}"
            f"   (greedy agreement {r['greedy_agreement']:.0%}); int8 {r['int8_vs_fp32']:.2f}x fp32's decode tok/s "
            f"(greedy agreement {r['int8_greedy_agreement']:.0%})"
        )
    print(
        f"\nCPU: {report['device']['cpu_model']} ({report['device']['cpu_count']} cores), torch threads {report['torch_threads']}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
