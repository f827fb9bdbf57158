"""The W4A16 Triton kernel on the GPU in bf16, at Llama-3-8B's projection shapes (group 128), against the
dequantized weights multiplied in fp32; and the same call replayed from a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate+up, down
TOL = 1e-2


def random_weights(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31, (k // 8, n), generator=gen, device="cuda", dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen, device="cuda") * 0.02 + 0.001).bfloat16()
    zeros = torch.randint(0, 16, (k // group, n), generator=gen, device="cuda").bfloat16()
    return qweight, scales, zeros


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("m", [1, 8, 64, 512])
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_matches_fp32_dequantized_matmul(m: int, n: int, k: int) -> None:
    from tristream.kernels.int4 import dequantize_int4, w4a16_matmul

    qweight, scales, zeros = random_weights(n, k, 128)
    x = torch.randn(m, k, device="cuda").bfloat16()
    out = w4a16_matmul(x, qweight, scales, zeros, 128)
    ref = x.float() @ dequantize_int4(qweight, scales, zeros, 128)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("m,group", [(4, 32), (300, 64), (16, 4096)])
def test_other_groups_and_a_strided_input(m: int, group: int) -> None:
    from tristream.kernels.int4 import dequantize_int4, w4a16_matmul

    qweight, scales, zeros = random_weights(1024, 4096, group, seed=1)
    x = torch.randn(m, 4096 + 64, device="cuda").bfloat16()[:, :4096]
    ref = x.float() @ dequantize_int4(qweight, scales, zeros, group)
    assert rel_err(w4a16_matmul(x, qweight, scales, zeros, group), ref) < TOL


def test_cuda_graph_replay_matches_eager() -> None:
    from tristream.kernels.int4 import w4a16_matmul

    qweight, scales, zeros = random_weights(4096, 4096, 128, seed=2)
    x = torch.randn(8, 4096, device="cuda").bfloat16()
    eager = w4a16_matmul(x, qweight, scales, zeros, 128)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4a16_matmul(x, qweight, scales, zeros, 128)
    x.copy_(torch.randn(8, 4096, device="cuda").bfloat16())
    graph.replay()
    assert torch.equal(captured, w4a16_matmul(x, qweight, scales, zeros, 128))
    assert not torch.equal(captured, eager)
