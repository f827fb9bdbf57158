"""The cost of LoRA adapters: decode and prefill with adapters against the same engine without them.

Three runs of a dummy-weight model in bf16, each on its own engine or request mix:
an engine without LoRA slots (the peer), the same model with ``--adapters`` random
rank-``--rank`` adapters on all seven projections serving base-model requests, and the
same engine serving requests spread round-robin over every adapter. Also times the
shrink and expand kernels of the q/k/v projection alone (replayed from a CUDA graph), against
the dense matmul of its shape.

    python3 bench/lora.py --config bench/configs/llama-3-8b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from tristream import AsyncEngine
from tristream.bench.latency import run_batch
from tristream.bench.report import CONFIGS, git_info, model_summary, now, write_report
from tristream.lora import MODULES, module_shape, weight_name
from tristream.model_config import ModelConfig


def max_len(args: argparse.Namespace) -> int:
    return max(args.input_len + args.output_len, args.prefill_len) + 8


def write_adapter(folder: pathlib.Path, mc: ModelConfig, rank: int, seed: int) -> str:
    """A PEFT-format adapter of random matrices on every projection of every layer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(mc.num_layers):
        for module in MODULES:
            n_in, n_out = module_shape(mc, module)
            pre = "base_model.model."
            tensors[pre + weight_name(layer, module, "lora_A.weight")] = (
                torch.randn(rank, n_in, generator=gen) * 0.01
            ).to(torch.bfloat16)
            tensors[pre + weight_name(layer, module, "lora_B.weight")] = (
                torch.randn(n_out, rank, generator=gen) * 0.01
            ).to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES), "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def kernel_time(mc: ModelConfig, rank: int, slots: int, batch: int) -> dict:
    """Microseconds of the qkv shrink+expand for ``batch`` decode rows over ``slots`` adapters, and of
    the qkv projection's own dense matmul."""
    from tristream.kernels.lora import lora_expand, lora_shrink

    dev, dt = torch.device("cuda"), torch.bfloat16
    h, out = mc.hidden_size, (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    x = torch.randn(batch, h, device=dev, dtype=dt)
    w = torch.randn(out, h, device=dev, dtype=dt)
    a = torch.randn(slots, 3 * rank, h, device=dev, dtype=dt)
    b = torch.randn(slots, out, 3 * rank, device=dev, dtype=dt)
    indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    ids = (torch.arange(batch, device=dev) % slots).int()
    y = x @ w.T

    def lora() -> None:
        lora_expand(lora_shrink(x, a, indptr, ids, 1), b, indptr, ids, y, 1)

    def timed(fn, calls: int = 50, reps: int = 20) -> float:
        """Device time per call, replayed from a CUDA graph as the engine runs it (no launch gaps)."""
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / (reps * calls)

    dense = torch.empty_like(y)
    return {"batch": batch, "lora_qkv_us": timed(lora), "dense_qkv_us": timed(lambda: torch.matmul(x, w.T, out=dense))}


async def run_engine(folder: pathlib.Path, args: argparse.Namespace, mc: ModelConfig, adapters: dict[str, str]) -> dict:
    """Decode per batch size and one prefill, for base requests and (with adapters) adapter requests."""
    runs: dict[str, list[dict]] = {}
    async with AsyncEngine(
        model=str(folder),
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=max_len(args),
        max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=max(args.prefill_len, 2048),
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        log_level="WARNING",
        lora_adapters=adapters or None,
        max_lora_rank=args.rank if adapters else None,
    ) as engine:
        mixes = {"base": [None]} | ({"adapters": list(adapters)} if adapters else {})
        await run_batch(engine, 2, args.input_len, 4, mc.vocab_size, seed=0, loras=mixes[list(mixes)[-1]])
        for mix, loras in mixes.items():
            rows = []
            for batch in args.batch_sizes:
                r = await run_batch(
                    engine, batch, args.input_len, args.output_len, mc.vocab_size, seed=batch, loras=loras
                )
                rows.append(r)
                print(
                    f"{'lora engine' if adapters else 'plain engine'} {mix:8s} batch {batch:4d}: "
                    f"TPOT {r['tpot_s'] * 1e3:7.2f} ms  {r['output_tok_per_s']:9.1f} tok/s",
                    flush=True,
                )
            pre = await run_batch(engine, 1, args.prefill_len - 8, 1, mc.vocab_size, seed=7, loras=loras[:1])
            runs[mix] = rows + [{"prefill_tokens": args.prefill_len - 8, "ttft_s": pre["ttft_p50_s"]}]
    return runs


async def main(args: argparse.Namespace) -> dict:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tristream-lora-bench-"))
    config = json.loads(pathlib.Path(args.config).read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_len(args))
    (folder / "config.json").write_text(json.dumps(config))
    mc = ModelConfig.load(str(folder))
    adapters = {f"a{i}": write_adapter(folder / f"a{i}", mc, args.rank, seed=i) for i in range(args.adapters)}
    plain = await run_engine(folder, args, mc, {})
    lora = await run_engine(folder, args, mc, adapters)
    shutil.rmtree(folder, ignore_errors=True)
    table = []
    for i, batch in enumerate(args.batch_sizes):
        peer = plain["base"][i]["tpot_s"]
        table.append(
            {
                "batch": batch,
                "plain_tpot_s": peer,
                "lora_engine_base_tpot_ratio": lora["base"][i]["tpot_s"] / peer,
                "lora_engine_adapters_tpot_ratio": lora["adapters"][i]["tpot_s"] / peer,
            }
        )
    prefill = {
        "tokens": args.prefill_len - 8,
        "plain_ttft_s": plain["base"][-1]["ttft_s"],
        "lora_engine_base_ratio": lora["base"][-1]["ttft_s"] / plain["base"][-1]["ttft_s"],
        "lora_engine_adapters_ratio": lora["adapters"][-1]["ttft_s"] / plain["base"][-1]["ttft_s"],
    }
    return {
        "benchmark": "lora",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model_config": args.config,
        "model": model_summary(mc, "bfloat16"),
        **git_info(),
        "timestamp": now(),
        "adapters": args.adapters,
        "rank": args.rank,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "runs": {"plain": plain, "lora": lora},
        "decode_vs_plain": table,
        "prefill_vs_plain": prefill,
        "qkv_kernels": [kernel_time(mc, args.rank, args.adapters, b) for b in args.batch_sizes],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIGS / "llama-3-8b.json"))
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = asyncio.run(main(args))
    write_report(report, "lora", report["device"], args.out)
    print(f"\n{'batch':>6} {'plain TPOT':>11} {'LoRA engine, base':>18} {'LoRA engine, adapters':>22}")
    for r in report["decode_vs_plain"]:
        print(
            f"{r['batch']:6d} {r['plain_tpot_s'] * 1e3:8.2f} ms {r['lora_engine_base_tpot_ratio']:17.3f}x "
            f"{r['lora_engine_adapters_tpot_ratio']:21.3f}x"
        )
    p = report["prefill_vs_plain"]
    print(
        f"prefill {p['tokens']}: plain {p['plain_ttft_s'] * 1e3:.1f} ms, LoRA engine base "
        f"{p['lora_engine_base_ratio']:.3f}x, adapters {p['lora_engine_adapters_ratio']:.3f}x"
    )
    for k in report["qkv_kernels"]:
        print(
            f"qkv batch {k['batch']:4d}: LoRA shrink+expand {k['lora_qkv_us']:.1f} us, dense qkv {k['dense_qkv_us']:.1f} us"
        )
