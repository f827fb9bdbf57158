"""The fused MoE kernel alone, against a loop of dense matmuls over the experts and torch's grouped matmul, on the GPU.

For each expert shape (Qwen3-30B-A3B's and Mixtral-8x7B's) and each number of tokens T it times one MoE
feed-forward in bf16, the router's output given (the softmax top-k of random logits):

- ``fused``: ``tristream.kernels.moe.fused_moe`` (Triton), replayed from a CUDA graph;
- ``expert_loop``: ``fused_moe_ref``, a dense ``F.linear`` pair per expert with tokens, run eagerly (it reads the
  experts' token counts on the host, which a graph cannot hold), host time included;
- ``grouped_mm``: ``torch._grouped_mm`` for both projections, rows sorted by expert with torch ops, replayed from
  a CUDA graph; left out where this torch or GPU lacks it.

Calls rotate over several routings, so that at decode each call reads other experts' weights. ``speedup_vs_*`` is
the other kernel's time over fused's. ``roofline_fraction`` is the longer of two floors over the measured time:
reading the weights of the experts the routing chose at the measured copy rate, and the matmuls' 2 * T * K * 3 * H
* I flops at the measured bf16 matmul rate (at T = 1 the bytes decide). Writes bench/results/moe-kernel-<gpu>.json.

With ``--sweep`` it times ``fused_moe`` over a grid of tile configs instead, and prints the best per shape and T
(the starting points for ``tristream.kernels.moe._CONFIGS``).

    python3 bench/moe_kernel.py
    python3 bench/moe_kernel.py --shapes qwen3-30b-a3b --tokens 1 16 64
    python3 bench/moe_kernel.py --sweep --tokens 1 64 2048
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import torch
import torch.nn.functional as F
import triton

from tristream.bench.ceilings import copy_bandwidth, graph_seconds, matmul_rate
from tristream.bench.report import git_info, now, write_report
from tristream.kernels.moe import MoEConfig, choose_config, fused_moe, fused_moe_ref

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}  # E, K, H, I
TOKENS = [1, 16, 64, 2048, 8192]
ROUTINGS = 4  # routings each timing rotates over


def routings(t: int, e: int, k: int, h: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """ROUTINGS sets of (x, topk_weights, topk_ids): random activations and a softmax top-k of random logits."""
    sets = []
    for _ in range(ROUTINGS):
        weights, ids = torch.randn(t, e, device=device).softmax(-1).topk(k, dim=-1)
        sets.append((torch.randn(t, h, device=device, dtype=torch.bfloat16), weights, ids))
    return sets


def grouped_mm_moe(
    x: torch.Tensor, w13_t: torch.Tensor, w2_t: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The same feed-forward through ``torch._grouped_mm`` (w13_t [E, H, 2I], w2_t [E, I, H]): the assignments
    sorted by expert, each projection one grouped matmul, the rows put back and summed per token."""
    t, k = topk_ids.shape
    inter = w2_t.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w13_t.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x[order // k], w13_t, offs=offs)
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w2_t, offs=offs) * topk_weights.reshape(-1)[order, None].to(x.dtype)
    return torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1).sum(1)


def eager_seconds(fn, calls: list[tuple], repeats: int = 5) -> float:
    """Seconds per call run eagerly, host time included, the median of ``repeats`` rounds over ``calls``."""
    for args in calls:
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for args in calls:
            fn(*args)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / len(calls))
    return sorted(times)[len(times) // 2]


@functools.cache
def grouped_mm_runs(device: torch.device) -> bool:
    """Whether this torch has ``torch._grouped_mm`` and it runs on this GPU: one small bf16 product tried."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    a, b = torch.ones(32, 64, device=device, dtype=torch.bfloat16), torch.ones(2, 64, 16, device=device)
    try:
        torch._grouped_mm(a, b.bfloat16(), offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
    except RuntimeError as e:
        print(f"torch._grouped_mm left out: {e}")
        return False
    return True


def measure(shape: str, t: int, w13: torch.Tensor, w2: torch.Tensor, bandwidth: float, rate: float) -> dict:
    """One row: each kernel's seconds and roofline fraction at T = ``t``, and fused's speedups."""
    e, k, h, i = SHAPES[shape]
    calls = [(x, w13, w2, weights, ids) for x, weights, ids in routings(t, e, k, h, w13.device)]
    seconds = {"fused": graph_seconds(fused_moe, calls, repeats=10), "expert_loop": eager_seconds(fused_moe_ref, calls)}
    if grouped_mm_runs(w13.device):
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)
        seconds["grouped_mm"] = graph_seconds(
            grouped_mm_moe, [(x, w13_t, w2_t, weights, ids) for x, _, _, weights, ids in calls], repeats=10
        )
    chosen = sum(len(ids.unique()) for *_, ids in calls) / len(calls)
    expert_bytes = chosen * 3 * h * i * w13.element_size()
    flops = 2 * t * k * 3 * h * i
    floor = max(expert_bytes / bandwidth, flops / rate)
    return {
        "shape": shape,
        "experts": e,
        "top_k": k,
        "hidden": h,
        "inter": i,
        "tokens": t,
        "config": choose_config(t * k, e, h, i)._asdict(),
        "experts_chosen": chosen,
        "expert_bytes": expert_bytes,
        "flops": flops,
        "seconds": seconds,
        "roofline_fraction": {name: floor / s for name, s in seconds.items()},
        **{f"speedup_vs_{name}": s / seconds["fused"] for name, s in seconds.items() if name != "fused"},
    }


def sweep_configs(t: int, k: int, e: int) -> list[MoEConfig]:
    """The tile configs ``--sweep`` tries: short blocks for a few tokens per expert, taller ones for more."""
    block_ms = (16, 32) if t * k <= 16 * e else (32, 64, 128)
    grid = itertools.product(block_ms, (32, 64, 128), (64, 128), (4, 8), (3, 4))
    return [MoEConfig(*c) for c in grid]


def sweep(shape: str, t: int, w13: torch.Tensor, w2: torch.Tensor) -> list[dict]:
    """fused_moe's seconds under each of :func:`sweep_configs` at T = ``t``; prints the best."""
    e, k, h, _ = SHAPES[shape]
    calls = [(x, w13, w2, weights, ids) for x, weights, ids in routings(t, e, k, h, w13.device)]
    rows = []
    for cfg in sweep_configs(t, k, e):
        try:
            seconds = graph_seconds(lambda *a, cfg=cfg: fused_moe(*a, config=cfg), calls, repeats=5)
        except triton.runtime.errors.OutOfResources:
            continue
        rows.append({"shape": shape, "tokens": t, "config": cfg._asdict(), "seconds": seconds})
    best = min(rows, key=lambda r: r["seconds"])
    default = choose_config(t * k, e, h, w2.shape[2])
    print(f"{shape:>14} T {t:5d}: best {best['seconds'] * 1e6:9.1f} us with {best['config']} (chosen: {default})")
    return rows


def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    bandwidth, rate = copy_bandwidth(device), matmul_rate(device)
    rows = []
    for shape in args.shapes:
        e, _, h, i = SHAPES[shape]
        w13 = torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16) / h**0.5
        w2 = torch.randn(e, h, i, device=device, dtype=torch.bfloat16) / i**0.5
        for t in args.tokens:
            if args.sweep:
                rows += sweep(shape, t, w13, w2)
                continue
            rows.append(measure(shape, t, w13, w2, bandwidth, rate))
            r = rows[-1]
            times = "  ".join(f"{name} {s * 1e6:9.1f} us" for name, s in r["seconds"].items())
            ratios = "  ".join(f"{key} {v:6.2f}x" for key, v in r.items() if key.startswith("speedup_vs_"))
            print(f"{shape:>14} T {t:5d}: {times}  {ratios}  fused at "
                  f"{100 * r['roofline_fraction']['fused']:5.1f}% of roofline", flush=True)  # fmt: skip
        del w13, w2
        torch.cuda.empty_cache()
    return {
        "benchmark": "moe_kernel",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        **git_info(),
        "timestamp": now(),
        "ceilings": {"copy_bytes_per_s": bandwidth, "bf16_matmul_flops": rate},
        "results": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--sweep", action="store_true", help="time fused_moe over a grid of tile configs instead")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = main(args)
    write_report(report, "moe-kernel-sweep" if args.sweep else "moe-kernel", report["device"], args.out)
