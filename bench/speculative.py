"""Speculative decoding: what checking k drafts costs, and the batch-1 speed-up as a function of acceptance.

The scheduler and the model runner run in this one process, step by step, as the engine's synchronous loop runs
them (decode steps under CUDA graphs on the GPU, the checking steps eagerly), greedy with EOS ignored.

- ``verify``: for each batch size and k = 1..``--max-k``, the time of a step in which every request checks k
  drafts (all of them wrong, so every step keeps one token) over that of a decode step: ``vs_decode``.
- ``acceptance``: at batch 1, a draft that proposes the model's own greedy tokens, each right with probability p
  until the first wrong one (an oracle: what a draft of that quality would give, with no cost of its own), for
  k = ``--k`` and each p of ``--accept``: tokens/s over no speculation (``speedup``), with the mean accepted
  length measured.

In fp32 the output must equal the output without speculation; the run fails if it does not. In bf16 a step that
checks drafts (eager, several rows per request) and a decode step (a CUDA graph) round differently, so outputs may
part at a near-tie of random weights: each row reports ``same_output``, the share of requests whose output
equals the output without speculation.

On dummy weights a real draft model has no meaning, hence the oracle.

    python bench/speculative.py --config bench/configs/llama-3-8b.json          # GPU, dummy Llama-3-8B, bf16
    OMP_NUM_THREADS=2 python bench/speculative.py --device cpu --batch-sizes 1 2 --max-k 2 --output-len 8
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch

from tristream.bench.report import header, model_summary, now, write_report
from tristream.bench.throughput import add_model_args, bench_model, random_prompts, resolve_device
from tristream.config import EngineConfig
from tristream.gpu_proc.runner import ModelRunner
from tristream.gpu_proc.slot_state import Sequence
from tristream.model_config import ModelConfig
from tristream.protocol import TokenizedRequest
from tristream.sampling_params import SamplingParams
from tristream.scheduler_proc.scheduler import Scheduler


class OracleDraft:
    """Drafts that are the model's greedy continuation (``greedy``, by prompt), each right with probability ``p``
    until the first wrong one."""

    def __init__(self, greedy: dict[tuple[int, ...], list[int]], p: float, vocab: int, seed: int = 0) -> None:
        self.greedy, self.p, self.vocab = greedy, p, vocab
        self.rng = random.Random(seed)

    def propose(self, items: list[tuple[int, Sequence, int]]) -> list[list[int]]:
        out = []
        for _, seq, room in items:
            future = self.greedy[tuple(seq.token_ids[: seq.prompt_len])][len(seq.token_ids) - seq.prompt_len :]
            drafts, right = [], True
            for token in future[:room]:
                right = right and self.rng.random() < self.p
                drafts.append(token if right else (token + 1) % self.vocab)
            out.append(drafts + [0] * (room - len(drafts)))
        return out


class InProcess:
    """A scheduler and a model runner of one engine config in this process."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)
        self.config = config
        self.scheduler = Scheduler(config, self.runner.kv.num_pages)
        self.ids = 0

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float, int]:
        """Each prompt's greedy output, the seconds of every step after the first (the prefill), and their count."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        rids = []
        for prompt in prompts:
            self.ids += 1
            rids.append(f"r{self.ids}")
            assert self.scheduler.add(TokenizedRequest(rids[-1], prompt, params, [], time.time())) is None
        outputs: dict[str, list[int]] = {rid: [] for rid in rids}
        steps, start = 0, None
        while (plan := self.scheduler.schedule()) is not None:
            for delta in self.scheduler.on_result(self.runner.step(plan)):
                outputs[delta.request_id] += delta.token_ids
            if start is None:
                _sync(self.runner.device)
                start = time.perf_counter()
            else:
                steps += 1
        _sync(self.runner.device)
        return [outputs[rid] for rid in rids], time.perf_counter() - start, steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release() -> None:
    """Free the memory of runners no longer referenced, so that the next one sizes its KV cache as the first did."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_config(model, args: argparse.Namespace, k: int | None) -> EngineConfig:
    spec = {"method": "ngram", "num_tokens": k, "disable_by_batch_size": 1 << 20} if k else None
    return EngineConfig(
        model=model.path,
        load_format=model.load_format,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.input_len + args.output_len + 2 * args.max_k + 8,
        max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=max(2048, max(args.batch_sizes) * args.input_len),
        enable_prefix_caching=False,
        speculative=spec,
    )


def same_output(outputs: list[list[int]], greedy: list[list[int]], args: argparse.Namespace) -> float:
    """The share of requests whose output with speculation equals ``greedy``; in fp32 every one must."""
    same = sum(a == b for a, b in zip(outputs, greedy)) / len(greedy)
    assert same == 1 or args.dtype != "float32", "speculation changed the greedy output"
    return same


def verify_rows(model, args: argparse.Namespace, vocab: int, gen: torch.Generator) -> list[dict]:
    """Per batch size and k: seconds per step checking k wrong drafts per request, over a decode step's."""
    rows = []
    for batch in args.batch_sizes:
        prompts = random_prompts([args.input_len] * batch, vocab, gen)
        plain = InProcess(engine_config(model, args, None))
        plain.generate(prompts[:1], 2)  # warm-up
        greedy, seconds, steps = plain.generate(prompts, args.output_len)
        decode_s = seconds / steps
        by_prompt = {tuple(p): g for p, g in zip(prompts, greedy)}
        del plain
        _release()
        for k in range(1, args.max_k + 1):
            spec = InProcess(engine_config(model, args, k))
            spec.runner.proposer = OracleDraft(by_prompt, 0.0, vocab)
            spec.generate(prompts[:1], 2)
            outputs, seconds, steps = spec.generate(prompts, args.output_len)
            rows.append({"batch": batch, "k": k, "decode_ms": 1e3 * decode_s, "verify_ms": 1e3 * seconds / steps,
                         "vs_decode": seconds / steps / decode_s, "same_output": same_output(outputs, greedy, args)})  # fmt: skip
            del spec
            _release()
    return rows


def acceptance_rows(model, args: argparse.Namespace, vocab: int, gen: torch.Generator) -> list[dict]:
    """At batch 1: tokens/s with an oracle draft right with probability p, over no speculation."""
    prompts = random_prompts([args.input_len], vocab, gen)
    plain = InProcess(engine_config(model, args, None))
    plain.generate(prompts, 4)
    greedy, seconds, steps = plain.generate(prompts, args.output_len)
    base = steps / seconds
    del plain
    _release()
    spec = InProcess(engine_config(model, args, args.k))
    spec.generate(prompts, 4)
    rows = []
    for p in args.accept:
        spec.runner.proposer = OracleDraft({tuple(prompts[0]): greedy[0]}, p, vocab)
        before = spec.scheduler.counters.num_drafts, spec.scheduler.counters.num_accepted_tokens
        outputs, seconds, _ = spec.generate(prompts, args.output_len)
        same = same_output(outputs, greedy, args)
        drafts = spec.scheduler.counters.num_drafts - before[0]
        accepted = spec.scheduler.counters.num_accepted_tokens - before[1]
        tok_s = (args.output_len - 1) / seconds
        rows.append({"p": p, "k": args.k, "tok_per_s": tok_s, "baseline_tok_per_s": base, "speedup": tok_s / base,
                     "mean_accepted_length": 1 + accepted / max(drafts, 1), "same_output": same})  # fmt: skip
    return rows


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-k", type=int, default=8, help="the verify rows check k = 1..max-k drafts")
    parser.add_argument("--k", type=int, default=4, help="drafts per step of the acceptance rows")
    parser.add_argument("--accept", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="the oracle's p")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--out", default=None, help="the JSON report (default: the results folder)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    args = build_parser(prog).parse_args(argv)
    if not all(0 <= p <= 1 for p in args.accept) or args.max_k < 1 or args.k < 1:
        raise SystemExit("--accept takes probabilities in [0, 1]; --max-k and --k are >= 1")
    resolve_device(args)
    started = now()
    model = bench_model(args, args.input_len + args.output_len + 2 * args.max_k + 8)
    mc = ModelConfig.load(model.path)
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            verify = verify_rows(model, args, mc.vocab_size, gen)
            accept = acceptance_rows(model, args, mc.vocab_size, gen)
    finally:
        model.close()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    report = {
        **header("speculative", started),
        "gpu": gpu,
        "model": {"name": model.name, **model_summary(mc, args.dtype)},
        "settings": {k: getattr(args, k) for k in ("batch_sizes", "max_k", "k", "accept", "input_len", "output_len")},
        "verify": verify,
        "acceptance": accept,
    }
    write_report(report, "speculative", gpu, args.out)
    print(f"{'batch':>5s} {'k':>3s} {'decode ms':>10s} {'verify ms':>10s} {'vs_decode':>9s}")
    for r in verify:
        print(f"{r['batch']:5d} {r['k']:3d} {r['decode_ms']:10.2f} {r['verify_ms']:10.2f} {r['vs_decode']:9.2f}")
    print(f"{'p':>5s} {'k':>3s} {'accepted len':>12s} {'tok/s':>9s} {'speedup':>8s}")
    for r in accept:
        print(f"{r['p']:5.2f} {r['k']:3d} {r['mean_accepted_length']:12.2f} {r['tok_per_s']:9.1f} {r['speedup']:8.2f}")
    return report


if __name__ == "__main__":
    main()
