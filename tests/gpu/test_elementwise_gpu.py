"""The Triton RMSNorm, RoPE and SiLU-and-mul kernels on CUDA in bf16 at Llama-3-8B sizes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Imported even when skipped: triton must not load outside its interpreter before the CPU tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.activation import silu_and_mul, silu_and_mul_ref
from tristream.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from tristream.kernels.rope import apply_rope, apply_rope_ref, rope_tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
TOL = 1e-2
EPS = 1e-5
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
MAX_POS = 16384
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TOKENS = [1, 37, 8192]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def randn(*shape: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(DTYPE)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def llama3_tables() -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope_tables(HEAD_DIM, 500000.0, LLAMA3_SCALING, MAX_POS)
    return cos.cuda(), sin.cuda()


def qk_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The q [T, H, D] and k [T, KVH, D] views of a fused projection output [T, (H + 2 KVH) D]."""
    tokens, q_width = qkv.shape[0], HEADS * HEAD_DIM
    q = qkv[:, :q_width].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, q_width : q_width + KV_HEADS * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    return q, k


def fused_qkv(tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random fused projection output and its q, k views."""
    qkv = randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, g=g)
    return (qkv, *qk_views(qkv))


@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm(tokens: int) -> None:
    g = gen(tokens)
    x = randn(tokens, HIDDEN, g=g, scale=3.0)
    weight = randn(HIDDEN, g=g, scale=0.1) + 1
    assert rel_err(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS)) < TOL


@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_per_head(tokens: int) -> None:
    g = gen(tokens + 1)
    _, q, _ = fused_qkv(tokens, g)
    weight = randn(HEAD_DIM, g=g, scale=0.1) + 1
    assert rel_err(rms_norm(q, weight, EPS), rms_norm_ref(q, weight, EPS)) < TOL


@pytest.mark.parametrize("tokens", TOKENS)
def test_add_rms_norm(tokens: int) -> None:
    g = gen(tokens + 2)
    x = randn(tokens, HIDDEN, g=g)
    residual = randn(tokens, HIDDEN, g=g, scale=2.0)
    weight = randn(HIDDEN, g=g, scale=0.1) + 1
    ref_out, ref_residual = add_rms_norm_ref(x, residual, weight, EPS)
    out, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual
    assert rel_err(new_residual, ref_residual) < TOL
    assert rel_err(out, ref_out) < TOL


@pytest.mark.parametrize("tokens", TOKENS)
def test_apply_rope(tokens: int) -> None:
    g = gen(tokens + 3)
    cos, sin = llama3_tables()
    qkv, q, k = fused_qkv(tokens, g)
    v_before = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].clone()
    positions = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=g)
    ref_q, ref_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin)
    apply_rope(q, k, positions, cos, sin)
    assert rel_err(q, ref_q) < TOL
    assert rel_err(k, ref_k) < TOL
    assert torch.equal(qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :], v_before)


# (rotary dim, interleaved): GLM-4's interleaved half, ERNIE 4.5's interleaved whole head, a partial rotate-half.
ROPE_VARIANTS = [(64, True), (HEAD_DIM, True), (96, False)]


@pytest.mark.parametrize("rotary_dim,interleaved", ROPE_VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_apply_rope_variants(tokens: int, rotary_dim: int, interleaved: bool) -> None:
    g = gen(tokens + rotary_dim)
    cos, sin = (t.cuda() for t in rope_tables(rotary_dim, 10000.0, None, MAX_POS))
    qkv, q, k = fused_qkv(tokens, g)
    before = qkv.clone()
    positions = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=g)
    ref_q, ref_k = apply_rope_ref(q.clone(), k.clone(), positions, cos, sin, interleaved)
    apply_rope(q, k, positions, cos, sin, interleaved)
    assert rel_err(q, ref_q) < TOL
    assert rel_err(k, ref_k) < TOL
    assert torch.equal(q[..., rotary_dim:], ref_q[..., rotary_dim:])
    assert torch.equal(qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :], before[:, (HEADS + KV_HEADS) * HEAD_DIM :])


@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul(tokens: int) -> None:
    x = randn(tokens, 2 * INTER, g=gen(tokens + 4), scale=4.0)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < TOL


def test_kernels_replay_in_a_cuda_graph() -> None:
    """Captured once, a graph of all four kernels follows new values copied into its inputs."""
    tokens = 64
    g = gen(5)
    cos, sin = llama3_tables()
    x, residual = randn(tokens, HIDDEN, g=g), randn(tokens, HIDDEN, g=g)
    weight = randn(HIDDEN, g=g, scale=0.1) + 1
    qkv, q, k = fused_qkv(tokens, g)
    positions = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=g)
    gate_up = randn(tokens, 2 * INTER, g=g)

    def step() -> tuple[torch.Tensor, ...]:
        normed = rms_norm(x, weight, EPS)
        out, _ = add_rms_norm(x, residual, weight, EPS)
        apply_rope(q, k, positions, cos, sin)
        return normed, out, silu_and_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, out, act = step()

    new_x, new_residual = randn(tokens, HIDDEN, g=g), randn(tokens, HIDDEN, g=g)
    new_qkv = randn(*qkv.shape, g=g)
    new_positions = torch.randint(0, MAX_POS, (tokens,), device="cuda", generator=g)
    new_gate_up = randn(tokens, 2 * INTER, g=g)
    x.copy_(new_x)
    residual.copy_(new_residual)
    qkv.copy_(new_qkv)
    positions.copy_(new_positions)
    gate_up.copy_(new_gate_up)
    graph.replay()
    torch.cuda.synchronize()

    ref_out, ref_residual = add_rms_norm_ref(new_x, new_residual, weight, EPS)
    ref_q, ref_k = apply_rope_ref(*qk_views(new_qkv), new_positions, cos, sin)
    assert rel_err(normed, rms_norm_ref(new_x, weight, EPS)) < TOL
    assert rel_err(out, ref_out) < TOL
    assert rel_err(residual, ref_residual) < TOL
    assert rel_err(q, ref_q) < TOL
    assert rel_err(k, ref_k) < TOL
    assert rel_err(act, silu_and_mul_ref(new_gate_up)) < TOL
