"""FP8 quantization and matmuls on CUDA at Llama-3-8B sizes: the Triton kernels and ``torch._scaled_mm``
against the torch references, with bf16 activations and outputs."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Imported even when skipped: triton must not load outside its interpreter before the CPU tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_block_matmul,
    fp8_block_matmul_ref,
    fp8_gemv,
    fp8_gemv_ref,
    fp8_scaled_mm,
    fp8_scaled_mm_ref,
    quant_fp8_per_group,
    quant_fp8_per_group_ref,
    quant_fp8_per_token,
    quant_fp8_per_token_ref,
    quant_fp8_static,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
TOL = 1e-2
BLOCK = 128
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K) of Llama-3-8B's linear layers
TOKENS = [1, 16, 256, 2048]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(DTYPE)


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most e4m3 steps between corresponding elements (the codes order magnitudes within a sign)."""

    def ordinal(t: torch.Tensor) -> torch.Tensor:
        code = t.view(torch.uint8).int()
        return torch.where(code >= 128, -(code - 128), code)

    return int((ordinal(a) - ordinal(b)).abs().max())


def quant_weight_blocks(w: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], scales [ceil(N / block_n), K // block_k]), as block-quantized checkpoints store it."""
    n, k = w.shape
    pad = -n % block_n
    blocks = torch.nn.functional.pad(w.float(), (0, 0, 0, pad)).reshape(-1, block_n, k // block_k, block_k)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(n + pad, k)[:n]
    return q.to(FP8_DTYPE), scale


@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("m", TOKENS)
def test_quant_kernels_match_references(m: int, k: int) -> None:
    x = randn(m, k, seed=m + k)
    for (q, scale), (q_ref, scale_ref) in [
        (quant_fp8_per_token(x), quant_fp8_per_token_ref(x)),
        (quant_fp8_per_group(x, BLOCK), quant_fp8_per_group_ref(x, BLOCK)),
    ]:
        assert scale.shape == scale_ref.shape
        assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
        assert fp8_steps(q, q_ref) <= 1


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_block_matmul_matches_reference(m: int, n: int, k: int) -> None:
    w, w_scale = quant_weight_blocks(randn(n, k, seed=n + k, scale=k**-0.5), BLOCK, BLOCK)
    xq, x_scale = quant_fp8_per_group(randn(m, k, seed=m), BLOCK)
    got = fp8_block_matmul(xq, x_scale, w, w_scale, BLOCK, BLOCK, DTYPE)
    assert got.dtype == DTYPE and got.shape == (m, n)
    assert rel_err(got, fp8_block_matmul_ref(xq, x_scale, w, w_scale, BLOCK, BLOCK, torch.float32)) < TOL


@pytest.mark.parametrize("m", [1, 16])
def test_block_matmul_replays_in_a_cuda_graph(m: int) -> None:
    n, k = 4096, 14336
    w, w_scale = quant_weight_blocks(randn(n, k, seed=1, scale=k**-0.5), BLOCK, BLOCK)
    xq, x_scale = quant_fp8_per_group(randn(m, k, seed=2), BLOCK)
    fp8_block_matmul(xq, x_scale, w, w_scale, BLOCK, BLOCK, DTYPE)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_block_matmul(xq, x_scale, w, w_scale, BLOCK, BLOCK, DTYPE)
    new_xq, new_x_scale = quant_fp8_per_group(randn(m, k, seed=3), BLOCK)
    xq.copy_(new_xq)
    x_scale.copy_(new_x_scale)
    graph.replay()
    assert rel_err(out, fp8_block_matmul_ref(xq, x_scale, w, w_scale, BLOCK, BLOCK, torch.float32)) < TOL


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_scaled_mm_matches_reference(m: int, n: int, k: int, per_tensor: bool) -> None:
    x, w = randn(m, k, seed=m), randn(n, k, seed=n + k, scale=k**-0.5)
    if per_tensor:
        x_scale, w_scale = x.float().abs().max() / FP8_MAX, (w.float().abs().max() / FP8_MAX).reshape(1)
        xq, wq = quant_fp8_static(x, x_scale), quant_fp8_static(w, w_scale)
    else:
        xq, x_scale = quant_fp8_per_token(x)
        wq, w_scale = quant_fp8_per_token(w)
        w_scale = w_scale.reshape(n)
    bias = randn(n, seed=7) if m == 16 else None
    got = fp8_scaled_mm(xq, x_scale, wq, w_scale, DTYPE, bias)
    assert got.dtype == DTYPE and got.shape == (m, n)
    assert rel_err(got, fp8_scaled_mm_ref(xq, x_scale, wq, w_scale, torch.float32, bias)) < TOL


@pytest.mark.parametrize("block", [None, BLOCK])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_matches_reference(n: int, k: int, block: int | None) -> None:
    """One bf16 row times e4m3 weights scaled per channel or per 128 x 128 block."""
    block_n, block_k = (block, block) if block else (1, k)
    w, w_scale = quant_weight_blocks(randn(n, k, seed=n + k, scale=k**-0.5), block_n, block_k)
    w_scale = w_scale[:, 0] if block is None else w_scale
    x = randn(1, k, seed=k)
    got = fp8_gemv(x, w, w_scale, block_n, block_k)
    assert got.dtype == DTYPE and got.shape == (1, n)
    assert rel_err(got, fp8_gemv_ref(x, w, w_scale, block_n, block_k)) < TOL
