"""The Triton RMSNorm, RoPE and SiLU-and-mul kernels against their torch references.

Without a GPU the kernels run in Triton's interpreter, in fp32 and fp16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.activation import silu_and_mul, silu_and_mul_ref
from tristream.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from tristream.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
EPS = 1e-6
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=g)


# ---------------------------------------------------------------- RMSNorm

# (tokens, hidden): the bundled model's 576, a non-power-of-two 1536, one token, and
# 9000, past the largest block, so the row is covered in chunks with a ragged last one.
NORM_SHAPES = [(7, 576), (5, 1536), (1, 64), (3, 9000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = gen(shape[1])
    x = randn(*shape, dtype=dtype, g=g) * 3
    weight = 1 + randn(shape[1], dtype=dtype, g=g) * 0.1
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, rms_norm_ref(x, weight, EPS)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_a_fused_projection(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: [T, H, D] views into a fused qkv output, normalised per head."""
    g = gen(3)
    tokens, heads, kv_heads, head_dim = 6, 9, 3, 64
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, g=g)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    weight = 1 + randn(head_dim, dtype=dtype, g=g) * 0.1
    before = qkv.clone()
    for t in (q, k):
        out = rms_norm(t, weight, EPS)
        assert out.shape == t.shape
        assert rel_err(out, rms_norm_ref(t, weight, EPS)) < TOL[dtype]
    assert torch.equal(qkv, before)


def test_rms_norm_fp32_weight_promotes_like_the_reference() -> None:
    g = gen(4)
    x = randn(4, 576, dtype=torch.float16, g=g)
    weight = 1 + randn(576, dtype=torch.float32, g=g) * 0.1
    out = rms_norm(x, weight, EPS)
    assert out.dtype == torch.float32
    assert rel_err(out, rms_norm_ref(x, weight, EPS)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = gen(shape[0] + shape[1])
    x = randn(*shape, dtype=dtype, g=g)
    residual = randn(*shape, dtype=dtype, g=g) * 2
    weight = 1 + randn(shape[1], dtype=dtype, g=g) * 0.1
    ref_out, ref_residual = add_rms_norm_ref(x, residual, weight, EPS)
    x_before = x.clone()
    out, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual
    assert rel_err(new_residual, ref_residual) < TOL[dtype]
    assert rel_err(out, ref_out) < TOL[dtype]
    assert torch.equal(x, x_before)


# ---------------------------------------------------------------- RoPE

# (theta, scaling, heads, kv heads, head dim)
ROPE_CASES = [(500000.0, LLAMA3_SCALING, 9, 3, 64), (1e6, None, 32, 8, 128), (10000.0, None, 5, 1, 96)]
MAX_POS = 4096


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["qkv-views", "contiguous"])
@pytest.mark.parametrize("theta,scaling,heads,kv_heads,head_dim", ROPE_CASES)
def test_apply_rope(
    theta: float, scaling: dict | None, heads: int, kv_heads: int, head_dim: int, fused: bool, dtype: torch.dtype
) -> None:
    g = gen(heads * head_dim)
    tokens = 13
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(rope_inv_freq(head_dim, theta, scaling), MAX_POS))
    positions = torch.randint(0, MAX_POS, (tokens,), device=DEVICE, generator=g)
    q_width, k_width = heads * head_dim, kv_heads * head_dim
    if fused:
        qkv = randn(tokens, q_width + 2 * k_width, dtype=dtype, g=g)
        q = qkv[:, :q_width].view(tokens, heads, head_dim)
        k = qkv[:, q_width : q_width + k_width].view(tokens, kv_heads, head_dim)
        v_before = qkv[:, q_width + k_width :].clone()
    else:
        q = randn(tokens, heads, head_dim, dtype=dtype, g=g)
        k = randn(tokens, kv_heads, head_dim, dtype=dtype, g=g)
    ref_q, ref_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin)
    out_q, out_k = apply_rope(q, k, positions, cos, sin)
    assert out_q is q and out_k is k
    assert rel_err(q, ref_q) < TOL[dtype]
    assert rel_err(k, ref_k) < TOL[dtype]
    if fused:
        assert torch.equal(qkv[:, q_width + k_width :], v_before)


def test_apply_rope_position_zero_is_identity() -> None:
    g = gen(5)
    cos, sin = (t.to(DEVICE) for t in rope_cos_sin(rope_inv_freq(64, 1e6, None), 16))
    q = randn(3, 4, 64, dtype=torch.float32, g=g)
    k = randn(3, 2, 64, dtype=torch.float32, g=g)
    q0, k0 = q.clone(), k.clone()
    apply_rope(q, k, torch.zeros(3, dtype=torch.int64, device=DEVICE), cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# ---------------------------------------------------------------- SiLU and mul

# (tokens, intermediate): 28672 spans many column blocks of a row.
SILU_SHAPES = [(7, 576), (5, 1536), (1, 100), (2, 28672)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_and_mul(shape: tuple[int, int], dtype: torch.dtype) -> None:
    tokens, inter = shape
    x = randn(tokens, 2 * inter, dtype=dtype, g=gen(inter)) * 4
    out = silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    assert rel_err(out, silu_and_mul_ref(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_of_a_strided_view(dtype: torch.dtype) -> None:
    """Rows of x need not be adjacent: here x is the left part of a wider tensor."""
    wide = randn(6, 2 * 1536 + 40, dtype=dtype, g=gen(6)) * 4
    x = wide[:, : 2 * 1536]
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < TOL[dtype]
