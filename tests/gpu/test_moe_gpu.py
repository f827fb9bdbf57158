"""The fused MoE on the GPU in bf16 at Qwen3-30B-A3B's expert shapes and at Mixtral's scaled down, decode and
prefill sizes, against the torch reference; run to run equality; and the call replayed from a captured CUDA graph."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Imported even when skipped: triton must not load outside its interpreter before the CPU tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels.moe import fused_moe, fused_moe_ref, moe_align

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {  # E, K, H, I
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b/4": (8, 2, 1024, 3584),  # Mixtral's 4096 and 14336 divided by 4
}
TOKENS = [1, 16, 64, 512, 2048]
TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def experts(e: int, h: int, i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device="cuda") / h**0.5).bfloat16()
    w2 = (torch.randn(e, h, i, generator=gen, device="cuda") / i**0.5).bfloat16()
    return w13, w2


def inputs(t: int, e: int, k: int, h: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] in bf16, and a softmax router's top-k over random logits (int64 ids, as torch.topk gives)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
    weights, ids = torch.randn(t, e, generator=gen, device="cuda").softmax(-1).topk(k, dim=-1)
    return x, weights, ids


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_reference(shape: str, t: int) -> None:
    e, k, h, i = SHAPES[shape]
    w13, w2 = experts(e, h, i)
    x, weights, ids = inputs(t, e, k, h, seed=t)
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16 and out.shape == (t, h)
    assert rel_err(out, fused_moe_ref(x, w13, w2, weights, ids)) < TOL


def test_int32_ids_skewed_loads_and_repeat_runs_are_equal() -> None:
    e, k, h, i = SHAPES["qwen3-30b-a3b"]
    w13, w2 = experts(e, h, i, seed=1)
    x, _, _ = inputs(300, e, k, h, seed=1)
    logits = torch.randn(300, e, device="cuda") + torch.linspace(6, -6, e, device="cuda")
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    assert len(ids.unique()) < e, "the skew must leave some experts without tokens"
    out = fused_moe(x, w13, w2, weights, ids.int())
    assert torch.equal(out, fused_moe(x, w13, w2, weights, ids))
    assert rel_err(out, fused_moe_ref(x, w13, w2, weights, ids)) < TOL


def test_align_on_the_gpu_matches_a_stable_sort() -> None:
    e, k = 128, 8
    ids = torch.randn(2048, e, device="cuda").topk(k, dim=-1).indices
    sorted_ids, block_expert, num_padded = moe_align(ids, e, 64)
    real = sorted_ids[sorted_ids < ids.numel()]
    assert torch.equal(real.long(), torch.argsort(ids.reshape(-1), stable=True))
    used = int(num_padded)
    assert (block_expert[: used // 64] >= 0).all() and (block_expert[used // 64 :] == -1).all()


def test_cuda_graph_replay_matches_eager() -> None:
    e, k, h, i = SHAPES["qwen3-30b-a3b"]
    w13, w2 = experts(e, h, i, seed=2)
    x, weights, ids = inputs(8, e, k, h, seed=2)
    eager = fused_moe(x, w13, w2, weights, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe(x, w13, w2, weights, ids)
    new_x, new_weights, new_ids = inputs(8, e, k, h, seed=3)
    x.copy_(new_x)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(captured, fused_moe(x, w13, w2, weights, ids))
    assert not torch.equal(captured, eager)
