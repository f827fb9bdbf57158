"""Latency and throughput of a model through the engine, against the hardware's ceilings on the GPU.

Runs through AsyncEngine (three processes; on the GPU CUDA graphs and Triton kernels,
bf16): batch sizes x input lengths of random token ids with a fixed output length
(greedy, EOS ignored), then one long prefill. The model is ``--model``'s real
weights (a Hugging Face folder, .gguf file or Hub id; default: the bundled
SmolLM2-135M-Instruct) or ``--config``'s config.json with dummy weights. On the GPU,
decode is compared with its bandwidth roofline (weights + KV read per step over
the measured copy bandwidth; for a mixture of experts, the experts a step's tokens
touch on average under uniform routing), prefill with the measured bf16 matmul rate (fp8's
for fp8 weights).

``--quantization`` and ``--kv-cache-dtype`` take several values: each pair runs as an
engine of its own in the same run (random 16-bit weights quantized at load), its
roofline counting its own bytes (fp8: one per weight; int4: half, plus a 16-bit scale
and zero per 128), and ``vs_bf16`` is its speed over the bf16 engine's at the same
batch and input length.

With ``--tp N`` the same runs go at tensor parallelism 1 and N, one engine after the
other, and the report gives the speed-up and the time a decode step spends in
collectives: the model's all-reduces and its logits gather, replayed alone from a
CUDA graph on N ranks. On the CPU (``--device cpu``, float32) there are no ceilings
and no rooflines: the figures are TTFT, TPOT and tokens/s alone.

It writes bench/results/latency-<gpu or cpu>.json (bench-results/ in the working
directory where tristream is installed, not checked out). ``tristream bench latency``
takes the same flags.

    python3 bench/latency.py --config bench/configs/llama-3-8b.json
    python3 bench/latency.py --config bench/configs/llama-3-8b.json --tp 2 --batch-sizes 1 64 --input-lens 128
    python3 bench/latency.py --config bench/configs/llama-3-8b.json --quantization none fp8 awq \\
        --batch-sizes 1 --input-lens 128
    python3 bench/latency.py --config bench/configs/llama-3-8b.json --kv-cache-dtype auto fp8 \\
        --batch-sizes 256 --input-lens 2048
    # CPU, the bundled model
    OMP_NUM_THREADS=1 tristream bench latency --device cpu --batch-sizes 1 4 --input-lens 32 \\
        --output-len 8 --prefill-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from tristream import AsyncEngine, SamplingParams
from tristream.bench.ceilings import copy_bandwidth, fp8_matmul_rate, matmul_rate
from tristream.bench.report import RESULTS, git_info, model_summary, now, write_report
from tristream.bench.throughput import BenchModel, add_model_args, bench_model, resolve_device
from tristream.gpu_proc.layers.moe import Experts
from tristream.gpu_proc.models import model_class
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import shard_model

# Bytes per decoder weight as each quantization holds it, scales and zeros included (int4: a 16-bit scale and
# zero per group of 128 inputs); the embedding and the LM head stay bf16.
WEIGHT_BYTES = {"none": 2.0, "fp8": 1.0, "awq": 0.5 + 4 / 128, "gptq": 0.5 + 4 / 128}


def model_sizes(mc: ModelConfig) -> dict:
    """Parameter counts and bytes per step of a decoder, counted on the model built without memory. A
    mixture-of-experts model's experts count apart: ``expert_params`` of one expert in one sparse layer."""
    whole = shard_model(mc, 1, 0)
    with torch.device("meta"):
        model = model_class(mc.architecture)(mc, whole, TensorParallel(whole, torch.device("meta"), None))
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    expert_total = sum(p.numel() for m in experts for p in m.parameters())
    head = mc.vocab_size * mc.hidden_size
    return {
        "layer_params": sum(p.numel() for p in model.layers.parameters()) - expert_total,
        "sparse_layers": len(experts),
        "expert_params": expert_total // max(1, len(experts) * mc.num_experts),
        "lm_head_params": head,
        "embed_params": head,
        "kv_bytes_per_token": 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2,
    }


def decode_params(mc: ModelConfig, sizes: dict, batch: int) -> float:
    """The decoder parameters a decode step of ``batch`` tokens reads: every dense one, and in each sparse layer
    the experts its tokens chose, as many as ``batch`` uniform top-k choices touch on average."""
    if not sizes["sparse_layers"]:
        return sizes["layer_params"]
    touched = mc.num_experts * (1 - (1 - mc.num_experts_per_tok / mc.num_experts) ** batch)
    return sizes["layer_params"] + sizes["sparse_layers"] * touched * sizes["expert_params"]


def active_params(mc: ModelConfig, sizes: dict) -> int:
    """The decoder parameters that multiply each token: the dense ones and its top-k experts."""
    return sizes["layer_params"] + sizes["sparse_layers"] * mc.num_experts_per_tok * sizes["expert_params"]


async def run_batch(
    engine: AsyncEngine,
    batch: int,
    input_len: int,
    output_len: int,
    vocab: int,
    seed: int,
    loras: list[str | None] = (None,),
) -> dict:
    """``batch`` random prompts at once, greedy; request i runs through LoRA adapter ``loras[i % len(loras)]``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, vocab - 100, (input_len,), generator=gen).tolist() for _ in range(batch)]

    async def one(i: int, prompt: list[int]):
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, lora=loras[i % len(loras)])
        times, last = [], None
        async for out in engine.generate(prompt, params):
            times += [time.time()] * len(out.outputs[0].token_ids)
            last = out
        return last.metrics, times

    start = time.perf_counter()
    runs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    metrics = [m for m, _ in runs]
    ttft = [m.first_token_time - m.arrival_time for m in metrics]
    result = {
        "batch": batch,
        "input_len": input_len,
        "output_len": output_len,
        "wall_s": wall,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p50_s": statistics.median(ttft),
        "output_tok_per_s": batch * output_len / wall,
    }
    if output_len > 1:
        # Steady decode: from the moment every request has its first token until the first one ends.
        begin, end = max(t[0] for _, t in runs), min(t[-1] for _, t in runs)
        steps = statistics.mean(sum(begin < x <= end for x in t) for _, t in runs)
        # None: the batch never decoded all at once (the KV cache could not hold it).
        result["tpot_s"] = (end - begin) / steps if steps else None
        result["tpot_incl_prefill_s"] = statistics.mean(
            (m.finished_time - m.first_token_time) / (m.num_generated_tokens - 1) for m in metrics
        )
    return result


async def run_engine(
    args: argparse.Namespace,
    model: BenchModel,
    mc: ModelConfig,
    variant: dict,
    bandwidth: float | None,
    flops: float | None,
) -> tuple[list[dict], dict]:
    """Decode runs and one long prefill on an engine of ``variant`` (tp, quantization, kv_cache_dtype); the
    rooflines count one rank's share, at the variant's bytes per weight and per KV entry (None without
    ``bandwidth`` and ``flops``: on the CPU)."""
    sizes, tp, quant, kv = model_sizes(mc), variant["tp"], variant["quantization"], variant["kv_cache_dtype"]
    kv_bytes = sizes["kv_bytes_per_token"] / (2 if kv != "auto" else 1)
    results = []
    async with AsyncEngine(
        model=model.path,
        load_format=model.load_format,
        dtype=args.dtype,
        device=args.device,
        quantization=None if quant == "none" else quant,
        kv_cache_dtype=kv,
        max_model_len=args.max_len,
        tensor_parallel_size=tp,
        max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=max(args.prefill_len, 8192),
        enable_prefix_caching=False,
        log_level="INFO",
        skip_tokenizer_init=True,
    ) as engine:
        for n in args.input_lens:
            await run_batch(engine, 2, n, 4, mc.vocab_size, seed=0)
        for input_len in args.input_lens:
            for batch in args.batch_sizes:
                r = await run_batch(engine, batch, input_len, args.output_len, mc.vocab_size, seed=batch + input_len)
                ctx = input_len + args.output_len / 2
                weights = WEIGHT_BYTES[quant] * decode_params(mc, sizes, batch) + 2 * sizes["lm_head_params"]
                step_bytes = weights + batch * ctx * kv_bytes
                r.update(variant)
                # Bytes at 16 bits a weight and KV entry: the bf16 roofline's, not counted on the CPU.
                r["decode_bytes_per_step"] = step_bytes if bandwidth else None
                r["roofline_tpot_s"] = step_bytes / tp / bandwidth if bandwidth else None
                r["roofline_fraction"] = r["roofline_tpot_s"] / r["tpot_s"] if bandwidth and r["tpot_s"] else None
                results.append(r)
                print(f"{label(variant)} batch {batch:4d} in {input_len:5d}: {row(r)}", flush=True)
        pre = await run_batch(engine, 1, args.prefill_len, 1, mc.vocab_size, seed=7)
    n = args.prefill_len
    prefill_flops = (
        2 * active_params(mc, sizes) * n
        + 2 * sizes["lm_head_params"]
        + 2 * mc.num_layers * mc.num_heads * mc.head_dim * n * n
    )
    prefill = {
        **variant,
        "prompt_tokens": n,
        "ttft_s": pre["ttft_p50_s"],
        "tokens_per_s": n / pre["ttft_p50_s"],
        "flops": prefill_flops,
        "matmul_fraction": prefill_flops / pre["ttft_p50_s"] / (flops * tp) if flops else None,
    }
    return results, prefill


def _collectives_rank(rank: int, tp: int, mc: ModelConfig, batches: list[int], rendezvous: str, out: mp.Queue) -> None:
    from tristream.gpu_proc.parallel import TensorParallel

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    shard = shard_model(mc, tp, rank)
    group = TensorParallel(shard, device, rendezvous, max(batches) * mc.hidden_size * 2, torch.bfloat16)
    times = {}
    for batch in batches:
        x = torch.zeros(batch, mc.hidden_size, dtype=torch.bfloat16, device=device)
        logits = torch.zeros(batch, shard.vocab_rows, dtype=torch.bfloat16, device=device)
        for path, all_reduce in (("engine", group.all_reduce), ("nccl", group.nccl_all_reduce)):

            def step(all_reduce=all_reduce, x=x, logits=logits):
                for _ in range(2 * mc.num_layers + 1):
                    all_reduce(x)
                group.gather_vocab(logits, mc.vocab_size)

            step()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(10):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            end.synchronize()
            times[(path, batch)] = start.elapsed_time(end) / 50 / 1000
    if rank == 0:
        out.put(times)
    group.close()


def collective_time(mc: ModelConfig, tp: int, batches: list[int]) -> dict[tuple[str, int], float]:
    """Seconds per decode step in collectives at each batch size: the 2L+1 all-reduces of [batch, hidden]
    and the logits gather, captured in one CUDA graph on ``tp`` ranks. Path "engine" is what the engine
    runs (symmetric memory for decode all-reduces), "nccl" every all-reduce through NCCL."""
    return run_ranks(_collectives_rank, tp, mc, batches)


def run_ranks(target, tp: int, *args: object) -> object:
    """What rank 0 of ``target(rank, tp, *args, rendezvous, queue)``, run in ``tp`` processes, puts on the queue.
    The ranks get a little time to leave their process group, then the stragglers are stopped."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    rendezvous = "file://" + os.path.join(tempfile.mkdtemp(prefix="tristream-bench-"), "rendezvous")
    procs = [ctx.Process(target=target, args=(r, tp, *args, rendezvous, out)) for r in range(tp)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return result


def label(variant: dict) -> str:
    """``tp 1``, or ``tp 1 fp8 kv-fp8`` for a quantized one."""
    extra = [variant["quantization"]] * (variant["quantization"] != "none")
    return " ".join([f"tp {variant['tp']}", *extra, *(["kv-fp8"] * (variant["kv_cache_dtype"] != "auto"))])


def variants(args: argparse.Namespace) -> list[dict]:
    """Every (tp, quantization, KV dtype) to run, bf16 with a 16-bit KV cache first."""
    return [
        {"tp": tp, "quantization": quant, "kv_cache_dtype": kv}
        for tp in sorted({1, args.tp})
        for quant in sorted(set(args.quantization), key=lambda q: q != "none")
        for kv in sorted(set(args.kv_cache_dtype), key=lambda k: k != "auto")
    ]


def compare(results: list[dict], prefills: list[dict]) -> list[dict]:
    """Each quantized or fp8-KV run over the bf16 run of its tp, batch and input length: ``vs_bf16`` of TPOT
    (the bf16 step time over this one's) and of output tok/s, and of prefill tok/s."""
    key = ("tp", "batch", "input_len")
    plain = {
        tuple(r[k] for k in key): r for r in results if (r["quantization"], r["kv_cache_dtype"]) == ("none", "auto")
    }
    rows = []
    for r in results:
        base = plain.get(tuple(r[k] for k in key))
        if base is None or base is r:
            continue
        tpot = base["tpot_s"] / r["tpot_s"] if base["tpot_s"] and r["tpot_s"] else None
        rows.append(
            {
                **{k: r[k] for k in (*key, "quantization", "kv_cache_dtype")},
                "tpot_vs_bf16": tpot,
                "tok_per_s_vs_bf16": r["output_tok_per_s"] / base["output_tok_per_s"],
                "roofline_fraction": r["roofline_fraction"],
            }
        )
    plain_prefill = {p["tp"]: p for p in prefills if (p["quantization"], p["kv_cache_dtype"]) == ("none", "auto")}
    for p in prefills:
        base = plain_prefill.get(p["tp"])
        if base is not None and base is not p:
            rows.append(
                {
                    **{k: p[k] for k in ("tp", "quantization", "kv_cache_dtype", "prompt_tokens")},
                    "prefill_tok_per_s_vs_bf16": p["tokens_per_s"] / base["tokens_per_s"],
                }
            )
    return rows


def measure_ceilings(cuda: bool) -> dict | None:
    """The GPU's copy bandwidth and bf16 and fp8 matmul rates; None on the CPU."""
    if not cuda:
        return None
    device = torch.device("cuda")
    ceilings = {
        "copy_bytes_per_s": copy_bandwidth(device),
        "bf16_matmul_flops": matmul_rate(device),
        "fp8_matmul_flops": fp8_matmul_rate(device),
    }
    torch.cuda.empty_cache()
    return ceilings


def fit_prefill(args: argparse.Namespace, mc: ModelConfig) -> None:
    """Cut ``--prefill-len`` to what a real model's context holds (dummy weights get room for anything)."""
    room = mc.max_position_embeddings - 1
    if args.prefill_len > room:
        print(f"prefill cut to {room} tokens: the model's context is {mc.max_position_embeddings}", flush=True)
        args.prefill_len = room
    args.max_len = max(max(args.input_lens) + args.output_len, args.prefill_len + 1)


async def run(args: argparse.Namespace) -> dict:
    """Every variant of ``args`` on its model; the report."""
    cuda = args.device == "cuda"
    ceilings = measure_ceilings(cuda)
    args.max_len = max(max(args.input_lens) + args.output_len, args.prefill_len + 1)
    model = bench_model(args, args.max_len)
    mc = ModelConfig.load(model.path)
    if not model.dummy:
        fit_prefill(args, mc)
    results, prefills = [], []
    for variant in variants(args):
        rate_key = "fp8_matmul_flops" if variant["quantization"] == "fp8" else "bf16_matmul_flops"
        bandwidth, rate = (ceilings["copy_bytes_per_s"], ceilings[rate_key]) if ceilings else (None, None)
        decode, prefill = await run_engine(args, model, mc, variant, bandwidth, rate)
        results += decode
        prefills.append(prefill)
    profiles = [decode_profile(pathlib.Path(model.path), tp) for tp in sorted({1, args.tp})] if args.profile else None
    report = {
        "benchmark": "latency",
        "device": torch.cuda.get_device_name() if cuda else None,
        "num_devices": args.tp,
        "torch": torch.__version__,
        "model_config": args.config,
        "model": {"name": model.name, **model_summary(mc, args.dtype), **model_sizes(mc)},
        **git_info(),
        "timestamp": now(),
        "ceilings": ceilings,
        "decode": results,
        "prefill": prefills,
        "vs_bf16": compare(results, prefills),
        "batch1_decode_profile": profiles,
    }
    if args.tp > 1:
        comm = collective_time(mc, args.tp, args.batch_sizes)
        report["tensor_parallel"] = [
            tp_row(results, comm, args.tp, batch, n) for n in args.input_lens for batch in args.batch_sizes
        ]
    model.close()
    return report


def tp_row(results: list[dict], comm: dict[int, float], tp: int, batch: int, input_len: int) -> dict:
    """Tensor parallelism ``tp`` against one GPU at one batch size and input length."""
    plain = [r for r in results if (r["quantization"], r["kv_cache_dtype"]) == ("none", "auto")]
    one, many = ({(r["tp"], r["batch"], r["input_len"]): r for r in plain}[(t, batch, input_len)] for t in (1, tp))
    return {
        "tp": tp,
        "batch": batch,
        "input_len": input_len,
        "speedup_tok_per_s": many["output_tok_per_s"] / one["output_tok_per_s"],
        "speedup_tpot": one["tpot_s"] / many["tpot_s"] if one["tpot_s"] and many["tpot_s"] else None,
        "collectives_s_per_step": comm[("engine", batch)],
        "nccl_collectives_s_per_step": comm[("nccl", batch)],
        "collectives_fraction_of_tpot": comm[("engine", batch)] / many["tpot_s"] if many["tpot_s"] else None,
    }


def _profile_rank(rank: int, tp: int, folder: str, steps: int, rendezvous: str, out: mp.Queue) -> None:
    """Batch-1 decode steps on rank ``rank`` of ``tp``, with rank 0 under the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    from tristream.config import EngineConfig
    from tristream.gpu_proc.runner import ModelRunner
    from tristream.protocol import BatchPlan, NewSequence

    runner = ModelRunner(
        EngineConfig(
            model=folder,
            load_format="dummy",
            dtype="bfloat16",
            max_model_len=4096,
            max_num_seqs=1,
            kv_cache_tokens=8192,
            skip_tokenizer_init=True,
            tensor_parallel_size=tp,
        ),
        rank,
        rendezvous,
        rank,
    )
    greedy = SamplingParams(temperature=0, seed=0)
    runner.step(
        BatchPlan(
            0,
            new=[NewSequence(0, list(range(1000, 3048)), 0, 0, greedy)],
            pages=[(0, list(range(1, 257)))],
            slots=[0],
            num_tokens=[2048],
            sample=[True],
        )
    )
    decode = BatchPlan(1, slots=[0], num_tokens=[1], sample=[True])
    for _ in range(5):
        runner.step(decode)
    torch.cuda.synchronize()
    with (
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        if rank == 0
        else contextlib.nullcontext() as prof
    ):
        start = time.perf_counter()
        for _ in range(steps):
            runner.step(decode)
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / steps
    if rank == 0:
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        rows = [
            {"kernel": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
            for e in sorted(kernels, key=lambda e: -e.device_time_total)
        ]
        out.put(
            {
                "tp": tp,
                "in_process_step_s": step_s,
                "kernels_per_step": sum(r["calls_per_step"] for r in rows),
                "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
                "top_kernels": rows[:12],
            }
        )
    runner.tp.close()


def decode_profile(folder: pathlib.Path, tp: int, steps: int = 20) -> dict:
    """The torch profiler's CUDA kernel table of rank 0 over batch-1 decode steps replayed from a CUDA graph."""
    profile = run_ranks(_profile_rank, tp, str(folder), steps)
    print(
        f"\ntp {tp}: batch-1 decode, context 2048, in-process step {profile['in_process_step_s'] * 1e3:.2f} ms; "
        f"{profile['kernels_per_step']:.0f} CUDA kernels per step on rank 0, {profile['kernel_us_per_step']:.0f} us in all:"
    )
    for r in profile["top_kernels"]:
        print(f"{r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
    torch.cuda.empty_cache()
    return profile


def row(r: dict) -> str:
    tpot = f"{r['tpot_s'] * 1e3:7.2f} ms" if r["tpot_s"] else "    n/a   "
    if r["roofline_fraction"]:
        roof = f"  {100 * r['roofline_fraction']:5.1f}% of roofline"
    else:
        roof = "" if r["tpot_s"] else "  no steady decode window"
    return f"TTFT {r['ttft_p50_s'] * 1e3:8.1f} ms  TPOT {tpot}  {r['output_tok_per_s']:9.1f} tok/s" + roof


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for tp, input_len in sorted({(r["tp"], r["input_len"]) for r in report["decode"]}):
        rows = [r for r in report["decode"] if (r["tp"], r["input_len"]) == (tp, input_len)]
        steady = [r for r in rows if r["roofline_fraction"]]
        label = f"input {input_len}" + (f", tp {tp}" if report["num_devices"] > 1 else "")
        axes[0].plot([r["batch"] for r in rows], [r["output_tok_per_s"] for r in rows], "o-", label=label)
        axes[1].plot([r["batch"] for r in steady], [100 * r["roofline_fraction"] for r in steady], "o-", label=label)
    for ax, label in zip(axes, ("output tokens/s", "% of decode bandwidth roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['device'] or 'CPU'}: {report['model']['name']}, {report['model']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of this benchmark."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="auto: bfloat16 on the GPU, float32 on the CPU",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--input-lens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--prefill-len", type=int, default=8192, help="the long prefill (cut to a real model's context)"
    )
    parser.add_argument("--out", default=None, help=f"default: {RESULTS}/latency-<gpu or cpu>.json")
    parser.add_argument("--profile", action="store_true", help="also print the CUDA kernel table of batch-1 decode")
    parser.add_argument(
        "--tp", type=int, default=1, help="also run at this tensor parallelism and compare with one GPU"
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=tuple(WEIGHT_BYTES),
        help="the weights of each engine to run (default: none, bf16)",
    )
    parser.add_argument(
        "--kv-cache-dtype", nargs="+", default=["auto"], choices=("auto", "fp8"), help="the KV cache of each engine"
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the benchmark of the command line ``argv``, write its report and print its figures; the report."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    resolve_device(args)
    if args.device != "cuda" and (args.tp > 1 or args.profile):
        parser.error("--tp and --profile need a GPU")
    report = asyncio.run(run(args))
    write_report(report, "latency", report["device"], args.out, plot, f"-tp{args.tp}" if args.tp > 1 else "")
    print_summary(report)
    return report


def print_summary(report: dict) -> None:
    """The ceilings, then a line per decode run, prefill, quantized variant and tensor-parallel comparison."""
    ceilings = report["ceilings"]
    if ceilings:
        print(
            f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
            f"bf16 matmul {ceilings['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, "
            f"fp8 matmul {ceilings['fp8_matmul_flops'] / 1e12:.0f} TFLOP/s"
        )
    for r in report["decode"]:
        print(f"{label(r)} batch {r['batch']:4d} in {r['input_len']:5d}: {row(r)}")
    for p in report["prefill"]:
        rate = "fp8" if p["quantization"] == "fp8" else "bf16"
        share = f", {100 * p['matmul_fraction']:.1f}% of {rate} matmul rate (x{p['tp']} GPUs)" if ceilings else ""
        print(
            f"{label(p)} prefill {p['prompt_tokens']} tokens: {p['ttft_s'] * 1e3:.1f} ms, "
            f"{p['tokens_per_s']:.0f} tok/s{share}"
        )
    for c in report["vs_bf16"]:
        if "prefill_tok_per_s_vs_bf16" in c:
            print(f"{label(c)} prefill {c['prompt_tokens']}: {c['prefill_tok_per_s_vs_bf16']:.2f}x bf16's tok/s")
        else:
            tpot = f"{c['tpot_vs_bf16']:.2f}x" if c["tpot_vs_bf16"] else "n/a"
            print(
                f"{label(c)} batch {c['batch']:4d} in {c['input_len']:5d}: TPOT {tpot} faster than bf16, "
                f"{c['tok_per_s_vs_bf16']:.2f}x its tok/s"
            )
    for t in report.get("tensor_parallel", []):
        tpot = f"{t['speedup_tpot']:.2f}x" if t["speedup_tpot"] else "n/a"
        share = f"{100 * t['collectives_fraction_of_tpot']:.1f}%" if t["collectives_fraction_of_tpot"] else "n/a"
        print(
            f"tp {t['tp']} vs 1, batch {t['batch']:4d} in {t['input_len']:5d}: {t['speedup_tok_per_s']:.2f}x tok/s, "
            f"{tpot} TPOT; collectives {t['collectives_s_per_step'] * 1e6:.0f} us per step ({share} of the TP TPOT), "
            f"all through NCCL {t['nccl_collectives_s_per_step'] * 1e6:.0f} us"
        )


if __name__ == "__main__":
    main()
