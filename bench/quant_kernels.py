"""The quantized projections' kernels alone, against bf16 cuBLAS at the same shapes, on the GPU.

For each (N, K) of Llama-3-8B's projections and each number of rows M, it times one projection as the
engine runs it (``gpu_proc.ops``), activation quantization included: bf16 ``F.linear``; fp8 with
per-channel weight scales (per-token activation scales, ``torch._scaled_mm``); block-wise fp8 (128 x 128
weight blocks, per-group activation scales, the Triton GEMM); and 4-bit weights with 16-bit activations
(group 128, the Triton W4A16 kernel). A single row takes the one-row kernels (fp8 weights with the row
unquantized; the int4 GEMV). Each is replayed from a CUDA graph over rotating weights (more bytes than the L2 holds).
Small M is held to the bandwidth roofline (the weight bytes over the measured copy rate), large M to the
matmul rate (fp8's for the fp8 kernels). Writes bench/results/quant-kernels-<gpu>.json.

With ``--gemv-sweep`` it times the one-row kernels instead, over a grid of their configs (outputs per
program, inputs per step, programs per SM, warps), and prints the best per shape.

    python3 bench/quant_kernels.py
    python3 bench/quant_kernels.py --rows 1 16 --shapes 4096x4096
    python3 bench/quant_kernels.py --gemv-sweep
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from tristream.bench.ceilings import copy_bandwidth, fp8_matmul_rate, graph_seconds, matmul_rate
from tristream.bench.report import git_info, now, write_report
from tristream.gpu_proc import ops
from tristream.gpu_proc.layers.quantized import quantize_fp8
from tristream.kernels import fp8, int4

SHAPES = ["6144x4096", "4096x4096", "28672x4096", "4096x14336"]  # (N, K): qkv, o, gate/up, down
COPIES = 4  # weight sets the timing rotates over


def kernels(n: int, k: int, device: torch.device) -> dict[str, tuple[list, callable, float]]:
    """Each kind's weight sets, its projection of x, and its bytes per weight."""
    dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(COPIES)]
    channel = [quantize_fp8(w, None) for w in dense]
    block = [quantize_fp8(w, (128, 128)) for w in dense]
    packed = [int4.quantize(w.T.contiguous(), 128) for w in dense]

    return {
        "bf16": (dense, lambda x, w: F.linear(x, w), 2.0),
        "fp8": (channel, lambda x, w: ops.fp8_linear(x, *w, None, None), 1.0),
        "fp8_block": (block, lambda x, w: ops.fp8_block_linear(x, *w, (128, 128), None), 1.0),
        "int4": (packed, lambda x, w: ops.w4a16_matmul(x, *w, 128), 0.5 + 4 / 128),
    }


def gemv_sweep(shapes: list[str], bandwidth: float) -> list[dict]:
    """Each one-row kernel config's time at each shape, as a share of its bandwidth roofline."""
    device, rows = torch.device("cuda"), []
    grids = {
        "int4": [
            int4.GemvConfig(bn, pps, warps) for bn, pps, warps in itertools.product((128, 256), (2, 4, 8), (4, 8))
        ],
        "fp8": [fp8.GemvConfig(bn, bk, pps) for bn, bk, pps in itertools.product((32, 64), (128, 256), (2, 4, 8))],
    }
    for shape in shapes:
        n, k = map(int, shape.split("x"))
        table = kernels(n, k, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        calls = {
            "int4": lambda x, w, c: int4.int4_gemv(x, *w, 128, config=c),
            "fp8": lambda x, w, c, k=k: fp8.fp8_gemv(x, *w, 1, k, config=c),
        }
        for name, configs in grids.items():
            weight_sets, _, per_weight = table[name]
            call = calls[name]
            times = [
                (graph_seconds(lambda x, w, c=c, f=call: f(x, w, c), [(x, w) for w in weight_sets], 20), c)
                for c in configs
            ]
            for seconds, c in times:
                rows.append({"n": n, "k": k, "kernel": name, "config": c._asdict(), "seconds": seconds,
                             "roofline_fraction": n * k * per_weight / bandwidth / seconds})  # fmt: skip
            seconds, best = min(times)
            print(f"{shape:>11} {name:5}: best {seconds * 1e6:7.1f} us "
                  f"({100 * n * k * per_weight / bandwidth / seconds:5.1f}% of roofline) with {best}", flush=True)  # fmt: skip
        del table
        torch.cuda.empty_cache()
    return rows


def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    bandwidth, bf16_rate, fp8_rate = copy_bandwidth(device), matmul_rate(device), fp8_matmul_rate(device)
    rows = gemv_sweep(args.shapes, bandwidth) if args.gemv_sweep else []
    for shape in [] if args.gemv_sweep else args.shapes:
        n, k = map(int, shape.split("x"))
        table = kernels(n, k, device)
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base = None
            for name, (weight_sets, fn, per_weight) in table.items():
                seconds = graph_seconds(fn, [(x, w) for w in weight_sets], 20)
                base = base or seconds
                rate = fp8_rate if name.startswith("fp8") else bf16_rate
                floor = max(n * k * per_weight / bandwidth, 2 * m * n * k / rate)
                rows.append(
                    {
                        "n": n,
                        "k": k,
                        "m": m,
                        "kernel": name,
                        "seconds": seconds,
                        "speedup": base / seconds,
                        "roofline_fraction": floor / seconds,
                    }
                )
                r = rows[-1]
                print(
                    f"{shape:>11} M {m:5d} {name:9}: {seconds * 1e6:9.1f} us  {r['speedup']:5.2f}x bf16  "
                    f"{100 * r['roofline_fraction']:5.1f}% of roofline",
                    flush=True,
                )
        del table
        torch.cuda.empty_cache()
    return {
        "benchmark": "quant_kernels",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        **git_info(),
        "timestamp": now(),
        "ceilings": {"copy_bytes_per_s": bandwidth, "bf16_matmul_flops": bf16_rate, "fp8_matmul_flops": fp8_rate},
        "results": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, metavar="NxK")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 4096])
    parser.add_argument("--gemv-sweep", action="store_true", help="time the one-row kernels' configs instead")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = main(args)
    write_report(report, "quant-kernels", report["device"], args.out)
