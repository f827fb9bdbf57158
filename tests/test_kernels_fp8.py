"""FP8 quantization and matmuls: the torch references against computations written out here, and the
Triton kernels against the references (without a GPU, in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the conftest fixes two of the interpreter's faults

from tristream.kernels.fp8 import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    BlockMatmulConfig,
    block_matmul_config,
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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K) of its linear layers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def activations(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows of spread magnitudes, the second one (if any) all zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]
    x[1:2] = 0.0
    return x.to(dtype).to(DEVICE)


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most e4m3 steps between corresponding elements (the codes order magnitudes within a sign)."""

    def ordinal(t: torch.Tensor) -> torch.Tensor:
        code = t.view(torch.uint8).int()
        return torch.where(code >= 128, -(code - 128), code)

    return int((ordinal(a) - ordinal(b)).abs().max())


def assert_dequantizes(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    """``q * scale`` is ``x`` rounded to e4m3: at most half a step off, a step being 2^-3 of the value (normals)
    or 2^-9 times the scale (subnormals)."""
    x = x.double().cpu()
    scale = scale.double().cpu()
    err = (q.cpu().double() * scale - x).abs()
    assert bool((err <= 2**-4 * x.abs() * (1 + 1e-5) + 2**-10 * scale).all())


def test_quant_per_token_ref_scales_each_row_by_its_amax() -> None:
    x = activations(6, 300)
    q, scale = quant_fp8_per_token_ref(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (6, 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    assert torch.equal(scale, torch.where(amax > 0, amax, torch.tensor(AMAX_FLOOR)) / FP8_MAX)
    assert_dequantizes(q, scale, x)
    rows = torch.arange(6) != 1
    at_amax = x.abs().argmax(dim=1)[rows]
    assert torch.equal(q.float()[rows, at_amax].abs(), torch.full((5,), FP8_MAX))
    assert not q.float()[1].any(), "an all-zero row quantizes to zeros"


@pytest.mark.parametrize("group", [128, 32, 48])
def test_quant_per_group_ref_scales_each_group_by_its_amax(group: int) -> None:
    x = activations(5, group * 6, seed=1)
    q, scale = quant_fp8_per_group_ref(x, group)
    assert scale.shape == (5, 6)
    for g in range(6):
        cols = slice(g * group, (g + 1) * group)
        amax = x[:, cols].abs().amax(dim=1)
        assert torch.equal(scale[:, g], amax.clamp(min=AMAX_FLOOR) / FP8_MAX)
        assert_dequantizes(q[:, cols], scale[:, g : g + 1], x[:, cols])
        assert torch.equal(q.float()[:, cols].abs().amax(dim=1), torch.where(amax > 0, FP8_MAX, 0.0))


def test_quant_static_rounds_and_saturates() -> None:
    x = activations(4, 64, seed=2)
    scale = torch.tensor(x.abs().max().item() / 100)
    for s in (scale, scale.reshape(1)):
        q = quant_fp8_static(x, s)
        inside = x.abs() <= FP8_MAX * scale
        assert_dequantizes(q[inside], scale, x[inside])
        assert torch.equal(q.float()[~inside], torch.sign(x[~inside]) * FP8_MAX), "out of range saturates"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 96), (7, 1000), (3, 2304)])
def test_triton_quant_per_token_matches_reference(dtype: torch.dtype, m: int, k: int) -> None:
    x = activations(m, k, dtype, seed=3)
    q, scale = quant_fp8_per_token(x)
    q_ref, scale_ref = quant_fp8_per_token_ref(x)
    assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
    assert fp8_steps(q, q_ref) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,group", [(1, 256, 128), (6, 1280, 128), (5, 224, 32), (3, 240, 48)])
def test_triton_quant_per_group_matches_reference(dtype: torch.dtype, m: int, k: int, group: int) -> None:
    x = activations(m, k, dtype, seed=4)
    q, scale = quant_fp8_per_group(x, group)
    q_ref, scale_ref = quant_fp8_per_group_ref(x, group)
    assert scale.shape == scale_ref.shape
    assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
    assert fp8_steps(q, q_ref) <= 1


def block_case(m: int, n: int, k: int, block_n: int, block_k: int, seed: int = 0, device: str = DEVICE):
    """Activations quantized per group of ``block_k``; random e4m3 weights with random positive block scales."""
    gen = torch.Generator().manual_seed(seed)
    xq, x_scale = quant_fp8_per_group_ref(torch.randn(m, k, generator=gen), block_k)
    w = (torch.randn(n, k, generator=gen) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w_scale = torch.rand(-(-n // block_n), k // block_k, generator=gen) / 64 + 1e-3
    return (t.to(device) for t in (xq, x_scale, w, w_scale))


def test_block_matmul_ref_matches_a_block_by_block_sum() -> None:
    m, n, k, block_n, block_k = 3, 40, 96, 16, 32
    xq, x_scale, w, w_scale = block_case(m, n, k, block_n, block_k, device="cpu")
    expected = torch.zeros(m, n, dtype=torch.float64)
    for kb in range(k // block_k):
        cols = slice(kb * block_k, (kb + 1) * block_k)
        part = xq[:, cols].double() @ w[:, cols].double().T
        w_col_scale = w_scale[torch.arange(n) // block_n, kb].double()
        expected += part * x_scale[:, kb : kb + 1].double() * w_col_scale[None, :]
    got = fp8_block_matmul_ref(xq, x_scale, w, w_scale, block_n, block_k, torch.float32)
    assert rel_err(got, expected) < 1e-6


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_n,block_k", [(128, 128), (32, 32)])
@pytest.mark.parametrize("k", [128, 256])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_triton_block_matmul_matches_reference(m: int, k: int, block_n: int, block_k: int, out_dtype) -> None:
    n = 200
    xq, x_scale, w, w_scale = block_case(m, n, k, block_n, block_k, seed=m + k)
    got = fp8_block_matmul(xq, x_scale, w, w_scale, block_n, block_k, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert rel_err(got, fp8_block_matmul_ref(xq, x_scale, w, w_scale, block_n, block_k, torch.float32)) < TOL[out_dtype]


@pytest.mark.parametrize(
    "m,config",
    [
        (70, None),
        (300, None),
        (9, BlockMatmulConfig(block_m=16, block_n=32, splits=4, num_warps=4, num_stages=2)),
        (20, BlockMatmulConfig(block_m=32, block_n=128, splits=2, num_warps=4, num_stages=2)),
    ],
)
def test_triton_block_matmul_other_tiles_and_strided_scales(m: int, config: BlockMatmulConfig | None) -> None:
    n, k, block_n, block_k = 136, 256, 64, 32
    xq, x_scale, w, w_scale = block_case(m, n, k, block_n, block_k, seed=m)
    x_scale_cols = x_scale.T.contiguous().T  # column-major, as some kernels lay activation scales out
    got = fp8_block_matmul(xq, x_scale_cols, w, w_scale, block_n, block_k, torch.float32, config=config)
    assert rel_err(got, fp8_block_matmul_ref(xq, x_scale, w, w_scale, block_n, block_k, torch.float32)) < 1e-5


def test_block_matmul_config_splits_k_only_for_few_tiles() -> None:
    for n, k in LLAMA3_8B:
        for m in (1, 16, 64, 256, 2048):
            cfg = block_matmul_config(m, n, k // 128, num_sms=132)
            assert (k // 128) % cfg.splits == 0
            assert cfg.splits == 1 or (m <= 64 and k // 128 // cfg.splits >= 4)
    assert block_matmul_config(1, 4096, 32, num_sms=132).splits > 1
    assert block_matmul_config(1, 28672, 32, num_sms=132).splits == 1
    assert block_matmul_config(2048, 4096, 32, num_sms=132).block_m == 64


def test_empty_batches() -> None:
    x = torch.zeros(0, 256, device=DEVICE)
    assert quant_fp8_per_token(x)[0].shape == (0, 256) and quant_fp8_per_group(x, 128)[1].shape == (0, 2)
    xq, x_scale, w, w_scale = block_case(1, 64, 256, 128, 128)
    assert fp8_block_matmul(xq[:0], x_scale[:0], w, w_scale, 128, 128, torch.float16).shape == (0, 64)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_ref_and_fallback_match_a_dequantized_matmul(per_tensor: bool, with_bias: bool) -> None:
    m, n, k = 5, 48, 64
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    if per_tensor:
        x_scale, w_scale = x.abs().max() / FP8_MAX, (w.abs().max() / FP8_MAX).reshape(1)
        xq, wq = quant_fp8_static(x, x_scale), quant_fp8_static(w, w_scale)
    else:
        xq, x_scale = quant_fp8_per_token_ref(x)
        wq, w_scale = quant_fp8_per_token_ref(w)
        w_scale = w_scale.reshape(n)
    x_deq = xq.double() * x_scale.double().reshape(-1, 1)
    w_deq = wq.double() * w_scale.double().reshape(-1, 1)
    expected = torch.einsum("mk,nk->mn", x_deq, w_deq) + (0 if bias is None else bias.double())
    ref = fp8_scaled_mm_ref(xq, x_scale, wq, w_scale, torch.float32, bias)
    assert rel_err(ref, expected) < 1e-6
    assert rel_err(expected, x.double() @ w.double().T + (0 if bias is None else bias.double())) < 0.1
    args = (t.to(DEVICE) for t in (xq, x_scale, wq, w_scale))
    got = fp8_scaled_mm(*args, torch.float16, None if bias is None else bias.to(DEVICE))
    assert got.dtype == torch.float16 and rel_err(got, expected) < 2e-3


def gemv_case(n: int, k: int, block_n: int, block_k: int, dtype: torch.dtype, seed: int = 0):
    """One 16-bit row, e4m3 weights and positive scales per channel (block_n 1, block_k K) or per block."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2 * k, generator=gen).to(dtype)[:, ::2]  # a strided row
    w = (torch.randn(n, k, generator=gen) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w_scale = torch.rand(-(-n // block_n), -(-k // block_k), generator=gen) / 64 + 1e-3
    return (t.to(DEVICE) for t in (x, w, w_scale.squeeze(1) if block_k == k else w_scale))


def test_gemv_ref_is_the_dequantized_product() -> None:
    x, w, w_scale = gemv_case(40, 256, 32, 128, torch.float32)
    deq = w.cpu().double() * w_scale.cpu().double().repeat_interleave(32, 0)[:40].repeat_interleave(128, 1)
    assert rel_err(fp8_gemv_ref(x, w, w_scale, 32, 128), x.cpu().double() @ deq.T) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,block_n,block_k", [(200, 256, 1, 256), (72, 384, 128, 128), (130, 128, 64, 128)])
def test_triton_gemv_matches_reference(n: int, k: int, block_n: int, block_k: int, dtype: torch.dtype) -> None:
    x, w, w_scale = gemv_case(n, k, block_n, block_k, dtype, seed=n)
    got = fp8_gemv(x, w, w_scale, block_n, block_k)
    assert got.dtype == dtype and got.shape == (1, n)
    assert rel_err(got, fp8_gemv_ref(x, w, w_scale, block_n, block_k)) < TOL[dtype]
