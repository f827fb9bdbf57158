"""Hardware ceilings measured in the same run as a benchmark: copy bandwidth, bf16 and fp8 matmul rates."""

from __future__ import annotations

import torch


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30, repeats: int = 20) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), repeats)


def matmul_rate(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """bf16 n x n x n matrix product, FLOP per second, on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / _median_seconds(lambda: a @ b, repeats)


def fp8_matmul_rate(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """e4m3 n x n x n matrix product (``torch._scaled_mm``, per-tensor scales, bf16 out), FLOP per second."""
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    return 2 * n**3 / _median_seconds(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), repeats)


def bf16_ceilings() -> dict[str, float]:
    """The copy bandwidth and bf16 matmul rate of the current CUDA device, its cache emptied after."""
    device = torch.device("cuda")
    ceilings = {"copy_bytes_per_s": copy_bandwidth(device), "bf16_matmul_flops": matmul_rate(device)}
    torch.cuda.empty_cache()
    return ceilings


def _median_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def graph_seconds(fn, calls: list[tuple], repeats: int) -> float:
    """Seconds per call, from one CUDA graph of ``repeats`` rounds over ``calls``' arguments, replayed."""
    for args in calls:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for args in calls:
                fn(*args)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (repeats * len(calls)))
    return sorted(times)[len(times) // 2]
