"""The fused MoE: the torch reference against a per-token loop written here, the alignment's invariants, and the
Triton path against the reference (without a GPU, in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when triton's own and these kernels' functions are defined: before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tristream.kernels import moe
from tristream.kernels.moe import MoEConfig, choose_config, fused_moe, fused_moe_ref, max_blocks, moe_align

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
CASES = [  # T, E, K, H, I, router skew (0: even loads), config (None: chosen by shape)
    (1, 8, 2, 40, 24, 0.0, None),
    (1, 16, 8, 64, 32, 0.0, None),
    (33, 8, 2, 40, 24, 4.0, None),
    (33, 6, 1, 48, 40, 0.0, MoEConfig(32, 32, 32, 4, 2)),
    (20, 4, 2, 72, 56, 6.0, MoEConfig(64, 64, 32, 4, 2)),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def route(t: int, e: int, k: int, skew: float, gen: torch.Generator, dtype: torch.dtype = torch.int64):
    """A softmax router's top-k over random logits, expert j's raised by ``skew * (1 - 2j / E)`` (a skew of 4 or
    more leaves the last experts without tokens)."""
    logits = torch.randn(t, e, generator=gen) + skew * (1 - 2 * torch.arange(e) / e)
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    return weights, ids.to(dtype)


def experts(e: int, h: int, i: int, dtype: torch.dtype, gen: torch.Generator):
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen) / i**0.5).to(dtype)
    return w13, w2


def test_reference_matches_a_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    t, e, k, h, i = 9, 5, 2, 24, 16
    x = torch.randn(t, h, generator=gen)
    w13, w2 = experts(e, h, i, torch.float32, gen)
    weights, ids = route(t, e, k, 8.0, gen)
    assert len(ids.unique()) < e, "some expert must have no tokens"
    expected = torch.zeros(t, h, dtype=torch.float64)
    for token in range(t):
        for slot in range(k):
            w_gate_up, w_down = w13[ids[token, slot]].double(), w2[ids[token, slot]].double()
            gate, up = w_gate_up[:i] @ x[token].double(), w_gate_up[i:] @ x[token].double()
            hidden = gate * torch.sigmoid(gate) * up
            expected[token] += weights[token, slot].double() * (w_down @ hidden)
    assert rel_err(fused_moe_ref(x, w13, w2, weights, ids), expected) < 1e-6


def aligned(ids: torch.Tensor, e: int, block_m: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout moe_align must produce, built a run at a time: each expert's flat indices in order, padded."""
    n, rows, owners = ids.numel(), [], []
    for expert in range(e):
        run = torch.nonzero(ids.reshape(-1) == expert).reshape(-1).tolist()
        padding = -len(run) % block_m
        rows += run + [n] * padding
        owners += [expert] * ((len(run) + padding) // block_m)
    rows += [n] * (size - len(rows))
    owners += [-1] * (size // block_m - len(owners))
    return torch.tensor(rows, dtype=torch.int32), torch.tensor(owners, dtype=torch.int32)


@pytest.mark.parametrize(
    "t,e,k,block_m,skew", [(1, 128, 8, 16, 0.0), (33, 8, 2, 16, 4.0), (70, 3, 3, 32, 0.0), (32, 5, 1, 16, 99.0)]
)
def test_align_sorts_by_expert_and_pads_each_run(t: int, e: int, k: int, block_m: int, skew: float) -> None:
    _, ids = route(t, e, k, skew, torch.Generator().manual_seed(t), torch.int32)
    sorted_ids, block_expert, num_padded = (v.cpu() for v in moe_align(ids.to(DEVICE), e, block_m))
    n, blocks = t * k, max_blocks(t * k, e, block_m)
    assert sorted_ids.shape == (blocks * block_m,) and block_expert.shape == (blocks,)
    assert sorted_ids.dtype == block_expert.dtype == num_padded.dtype == torch.int32
    used = int(num_padded)
    real = sorted_ids[sorted_ids < n]
    assert torch.equal(real.sort().values, torch.arange(n, dtype=torch.int32)), "each (t, k) exactly once"
    assert (sorted_ids[used:] == n).all() and (block_expert[used // block_m :] == -1).all()
    assert (block_expert[: used // block_m] >= 0).all()
    for b in range(used // block_m):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        rows = rows[rows < n].long()
        assert len(rows) and (ids.reshape(-1)[rows] == block_expert[b]).all(), f"block {b} holds one expert"
    expected_ids, expected_experts = aligned(ids, e, block_m, len(sorted_ids))
    assert torch.equal(sorted_ids, expected_ids) and torch.equal(block_expert, expected_experts)
    assert used == (expected_experts >= 0).sum() * block_m


@pytest.mark.parametrize("tile,t,e,k", [(None, 20, 128, 8), (128, 70, 8, 4), (128, 40, 3, 2)])
def test_align_across_chunks(monkeypatch: pytest.MonkeyPatch, tile: int | None, t: int, e: int, k: int) -> None:
    # A smaller one-hot tile splits the assignments into more chunks than the scan takes in one step.
    if tile:
        monkeypatch.setattr(moe, "_ALIGN_TILE", tile)
    _, ids = route(t, e, k, 1.0, torch.Generator().manual_seed(2))
    sorted_ids, block_expert, num_padded = (v.cpu() for v in moe_align(ids.to(DEVICE), e, 16))
    expected_ids, expected_experts = aligned(ids, e, 16, len(sorted_ids))
    assert torch.equal(sorted_ids, expected_ids) and torch.equal(block_expert, expected_experts)
    assert int(num_padded) == (expected_experts >= 0).sum() * 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,e,k,h,i,skew,config", CASES)
def test_triton_matches_reference(t, e, k, h, i, skew, config, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(t * e + k)
    x = torch.randn(t, h + 8, generator=gen).to(dtype)[:, :h]  # a view with a row stride
    w13, w2 = experts(e, h, i, dtype, gen)
    weights, ids = route(t, e, k, skew, gen, torch.int32 if k % 2 else torch.int64)
    args = [v.to(DEVICE) for v in (x, w13, w2, weights, ids)]
    got = fused_moe(*args, config=config)
    assert got.shape == (t, h) and got.dtype == dtype
    assert rel_err(got, fused_moe_ref(*args)) < TOL[dtype]


def test_all_tokens_on_one_expert() -> None:
    gen = torch.Generator().manual_seed(1)
    t, e, h, i = 21, 4, 40, 24
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    w13, w2 = (w.to(DEVICE) for w in experts(e, h, i, torch.float32, gen))
    ids = torch.full((t, 1), 2, dtype=torch.int64, device=DEVICE)
    weights = torch.rand(t, 1, generator=gen).to(DEVICE)
    assert rel_err(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids)) < TOL[torch.float32]


def test_configs_are_short_for_decode_and_tall_for_prefill() -> None:
    assert choose_config(8, 128, 2048, 768).block_m == 16  # Qwen3-30B-A3B, one token
    assert choose_config(2 * 64, 8, 4096, 14336).block_m == 16  # Mixtral, 64 tokens
    assert choose_config(8 * 2048, 128, 2048, 768).block_m == 64
    assert choose_config(2 * 8192, 8, 4096, 14336).block_m == 128
    assert choose_config(8, 4, 40, 24).block_k == 64  # no wider than the larger of H and I needs
    assert max_blocks(8, 128, 16) == 8 and max_blocks(1, 8, 64) == 1


def test_bad_shapes_and_dtypes() -> None:
    x, w13, w2 = torch.zeros(3, 8), torch.zeros(2, 12, 8), torch.zeros(2, 8, 6)
    weights, ids = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int64)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 8)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2[:, :, :5], weights, ids)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError):
        fused_moe(x, w13.half(), w2.half(), weights, ids)
    with pytest.raises(ValueError):
        fused_moe_ref(x, w13, w2, weights[:2], ids[:2])
