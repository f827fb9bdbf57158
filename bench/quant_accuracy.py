"""How far quantized weights move a model's next-token log-probabilities from the unquantized model's.

Dummy weights in a real model's shape (default Llama-3-8B), drawn once from the engine's seed, in bf16 on
the GPU: the unquantized model, then the same weights quantized at load (fp8 per channel, fp8 in 128 x 128
blocks, int4 with groups of 128). Or, with ``--model``, a real checkpoint (``--model bundled``: the bundled
SmolLM2 on the CPU, in fp32, against fp8 per channel and int8). Each runs the same random prompts (prefill,
then greedy decode steps along the unquantized model's own tokens, so every model sees the same text), and at
each step that model's 20 most likely tokens give ``|logprob - its logprob|``: its mean and its max are
reported per method, with the share of steps whose most likely token is its.

Random weights make a chaotic model: over 32 layers any perturbation grows until the outputs no longer
correlate, so on dummy weights the figures measure that growth more than the quantization.
Writes bench/results/quant-accuracy-<device>.json.

    python3 bench/quant_accuracy.py
    python3 bench/quant_accuracy.py --model bundled
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch

from tristream.bench.report import CONFIGS, git_info, now, write_report
from tristream.config import EngineConfig
from tristream.gpu_proc.runner import ModelRunner
from tristream.model_files import resolve_model
from tristream.protocol import BatchPlan, NewSequence
from tristream.sampling_params import SamplingParams

METHODS = {"fp8": ("fp8", None), "fp8_block": ("fp8", [128, 128]), "int4": ("awq", None)}
REAL_METHODS = {"fp8": ("fp8", None), "int8": ("int8", None)}


def logprobs(
    folder: str, prompts: list[list[int]], forced: list[list[int]] | None, quantization: str | None, dummy: bool
):
    """Log-probabilities [steps, prompts, vocab] after each prompt and each forced token (None: the model's
    own greedy tokens, which are returned too)."""
    config = EngineConfig(
        model=folder, load_format="dummy" if dummy else "auto", dtype="bfloat16" if dummy else "float32",
        quantization=quantization, max_model_len=1024, kv_cache_tokens=len(prompts) * 1024, enforce_eager=True,
        skip_tokenizer_init=True,
    )  # fmt: skip
    runner = ModelRunner(config)
    steps = len(forced[0]) if forced else 8
    captured, forward = [], runner.model.forward
    runner.model.forward = lambda batch, kv: captured.append(forward(batch, kv).float().log_softmax(-1)) or captured[-1]
    greedy = SamplingParams(temperature=0, seed=0)
    new = [NewSequence(i, p, 0, 0, greedy) for i, p in enumerate(prompts)]
    pages = [(i, list(range(1 + 64 * i, 1 + 64 * (i + 1)))) for i in range(len(prompts))]
    slots = list(range(len(prompts)))
    runner.step(
        BatchPlan(
            0, new=new, pages=pages, slots=slots, num_tokens=[len(p) for p in prompts], sample=[True] * len(slots)
        )
    )
    tokens = [[int(captured[-1][i].argmax())] for i in slots]
    for step in range(steps):
        if forced:  # the unquantized model's token in place of the one this model just sampled
            for slot, tokens_of in zip(slots, forced):
                runner.slots.seqs[slot].token_ids[-1] = tokens_of[step]
        runner.step(BatchPlan(step + 1, slots=slots, num_tokens=[1] * len(slots), sample=[True] * len(slots)))
        for i in slots:
            tokens[i].append(int(captured[-1][i].argmax()))
    result = torch.stack(captured[: steps + 1]).cpu()
    del runner
    torch.cuda.empty_cache()
    return result, [t[:steps] for t in tokens]


def main(args: argparse.Namespace) -> dict:
    dummy = args.model is None
    folder = (
        tempfile.mkdtemp(prefix="tristream-quant-")
        if dummy
        else resolve_model(None if args.model == "bundled" else args.model)
    )
    config = json.loads(pathlib.Path(args.config if dummy else f"{folder}/config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, config["vocab_size"] - 100, (n,), generator=gen).tolist() for n in (16, 64, 200, 500)]
    results = {}
    if dummy:
        (pathlib.Path(folder) / "config.json").write_text(json.dumps(config))
    base, tokens = logprobs(folder, prompts, None, None, dummy)
    top = base.topk(20, dim=-1).indices
    for name, (method, block) in (METHODS if dummy else REAL_METHODS).items():
        quant_config = {**config, "quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
        if dummy:
            (pathlib.Path(folder) / "config.json").write_text(json.dumps(quant_config if block else config))
        ours, _ = logprobs(folder, prompts, tokens, method, dummy)
        delta = (ours.gather(-1, top) - base.gather(-1, top)).abs()
        same = (ours.argmax(-1) == base.argmax(-1)).float().mean().item()
        results[name] = {
            "mean_abs_dlogprob_top20": delta.mean().item(),
            "max_abs_dlogprob_top20": delta.max().item(),
            "same_top1": same,
        }
        print(
            f"{name:9}: |dlogprob| over the unquantized model's top 20: mean {delta.mean():.4f}, max {delta.max():.3f}; top-1 the same at {100 * same:.1f}% of steps",
            flush=True,
        )
    return {
        "benchmark": "quant_accuracy",
        "device": torch.cuda.get_device_name() if dummy else "cpu",
        "torch": torch.__version__,
        "model_config": args.config if dummy else args.model,
        "weights": "dummy, bf16" if dummy else "the checkpoint's, fp32",
        **git_info(),
        "timestamp": now(),
        "prompt_lens": [len(p) for p in prompts],
        "steps_per_prompt": len(tokens[0]) + 1,
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIGS / "llama-3-8b.json"))
    parser.add_argument("--model", default=None, help="a real checkpoint, or 'bundled' (default: dummy weights)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = main(args)
    write_report(report, "quant-accuracy", report["device"], args.out)
