"""The torch references in ``kernels/`` against naive implementations written here."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tristream.kernels.activation import silu_and_mul_ref
from tristream.kernels.attention import FP8, paged_attention_ref, store_kv_ref
from tristream.kernels.norm import add_rms_norm_ref, rms_norm_ref
from tristream.kernels.rope import apply_rope_ref, rope_cos_sin, rope_inv_freq

SEEDS = (0, 1, 2)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
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


# ---------------------------------------------------------------- attention


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_new: int, scale: float) -> torch.Tensor:
    """Causal attention of the last ``num_new`` of ``k.shape[0]`` tokens, one head at a time, in float64.

    q [num_new, H, D]; k, v [ctx, KVH, D] (the whole context of one sequence).
    """
    q, k, v = q.double(), k.double(), v.double()
    ctx, num_kv_heads = k.shape[0], k.shape[1]
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for h in range(num_heads):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(num_new):
            pos = ctx - num_new + i
            scores = (kh[: pos + 1] @ q[i, h]) * scale
            probs = torch.exp(scores - scores.max())
            probs = probs / probs.sum()
            out[i, h] = probs @ vh[: pos + 1]
    return out


# (context length, new tokens): decode, pure prefill and extend, several crossing page boundaries
BATCH = [(37, 1), (16, 16), (40, 9), (1, 1), (17, 17), (33, 1), (65, 32), (20, 19), (5, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_attention_matches_naive_dense(page_size: int, head_dim: int, group: int, dtype: torch.dtype) -> None:
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    scale = head_dim**-0.5
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        batch = BATCH[:]
        rng.shuffle(batch)
        pages_needed = [-(-ctx // page_size) for ctx, _ in batch]
        num_pages = sum(pages_needed) + 3  # page 0 and two spare pages are never used
        page_ids = list(range(1, num_pages))
        rng.shuffle(page_ids)
        k_cache = torch.full((num_pages, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        v_cache = torch.full_like(k_cache, float("nan"))

        tables, ks, vs, qs, qo_indptr, seq_lens = [], [], [], [], [0], []
        for (ctx, n), need in zip(batch, pages_needed):
            table, page_ids = page_ids[:need], page_ids[need:]
            k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
            q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)
            slots = torch.tensor([table[p // page_size] * page_size + p % page_size for p in range(ctx)])
            cached = ctx - n
            # the cached prefix was written by earlier steps, the new tokens by this one
            store_kv_ref(k[:cached], v[:cached], k_cache, v_cache, slots[:cached])
            store_kv_ref(k[cached:], v[cached:], k_cache, v_cache, slots[cached:])
            tables.append(table)
            ks.append(k)
            vs.append(v)
            qs.append(q)
            qo_indptr.append(qo_indptr[-1] + n)
            seq_lens.append(ctx)

        for table, k, v, ctx in zip(tables, ks, vs, seq_lens):
            positions = torch.arange(ctx)
            page = torch.tensor(table)[positions // page_size]
            assert torch.equal(k_cache[page, positions % page_size], k)
            assert torch.equal(v_cache[page, positions % page_size], v)

        out = paged_attention_ref(torch.cat(qs), k_cache, v_cache, tables, seq_lens, qo_indptr, scale)
        assert out.shape == (qo_indptr[-1], num_heads, head_dim)
        assert out.dtype == dtype
        ref = torch.cat([naive_attention(q, k, v, q.shape[0], scale) for q, k, v in zip(qs, ks, vs)])
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype]
        for b in range(len(batch)):
            rows = slice(qo_indptr[b], qo_indptr[b + 1])
            assert rel_err(out[rows], ref[rows]) < TOL[dtype], batch[b]


def test_store_kv_touches_only_the_mapped_slots() -> None:
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.zeros(6, 4, 2, 8)
    v_cache = torch.zeros(6, 4, 2, 8)
    k = torch.randn(5, 2, 8, generator=gen)
    v = torch.randn(5, 2, 8, generator=gen)
    slots = [22, 5, 6, 7, 13]
    store_kv_ref(k, v, k_cache, v_cache, torch.tensor(slots))
    for i, s in enumerate(slots):
        assert torch.equal(k_cache[s // 4, s % 4], k[i])
        assert torch.equal(v_cache[s // 4, s % 4], v[i])
    written = torch.zeros(6 * 4, dtype=torch.bool)
    written[slots] = True
    assert (k_cache.view(24, -1)[~written] == 0).all()
    assert (v_cache.view(24, -1)[~written] == 0).all()


def test_store_kv_ref_fp8_pool_divides_by_the_scale_and_saturates() -> None:
    k = torch.tensor([[[1.0, -0.37, 4.47, 4.49, -1e4, 0.0]]])
    v = torch.tensor([[[2.0, 0.5, -0.1, 100.0, 1e4, -0.0]]])
    k_cache = torch.full((2, 2, 1, 6), float("nan"), dtype=FP8)
    v_cache = torch.full_like(k_cache, float("nan"))
    store_kv_ref(k, v, k_cache, v_cache, torch.tensor([3]), k_scale=0.01, v_scale=0.5)
    assert torch.equal(k_cache[1, 1, 0].float(), torch.tensor([96.0, -36.0, 448.0, 448.0, -448.0, 0.0]))
    # 200 lies halfway between e4m3's 192 and 208 and rounds to the even mantissa.
    assert torch.equal(v_cache[1, 1, 0].float(), torch.tensor([4.0, 1.0, -0.203125, 192.0, 448.0, 0.0]))
    assert k_cache.flatten(0, 1)[:3].isnan().all() and v_cache.flatten(0, 1)[:3].isnan().all()
    with pytest.raises(ValueError):
        store_kv_ref(k, v, torch.zeros(2, 2, 1, 6), torch.zeros(2, 2, 1, 6), torch.tensor([3]), k_scale=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_fp8_pool_is_close_to_unquantized(dtype: torch.dtype) -> None:
    """N(0, 1) K/V stored in an fp8 pool with scale 1.0, against the same K/V unquantized.

    Observed relative error: 3.2% here (3.0-3.2% over seeds 0-4), in fp32 and fp16.
    """
    num_kv_heads, num_heads, head_dim, page_size = 2, 8, 128, 16
    gen = torch.Generator().manual_seed(0)
    tables, qo_indptr, seq_lens, next_page = [], [0], [], 1
    for ctx, n in BATCH:
        need = -(-ctx // page_size)
        tables.append(list(range(next_page, next_page + need)))
        next_page += need
        qo_indptr.append(qo_indptr[-1] + n)
        seq_lens.append(ctx)
    slots = torch.tensor(
        [t[p // page_size] * page_size + p % page_size for t, ctx in zip(tables, seq_lens) for p in range(ctx)]
    )
    k = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(qo_indptr[-1], num_heads, head_dim, generator=gen).to(dtype)
    outs = []
    for pool_dtype in (dtype, FP8):
        k_cache = torch.full((next_page, page_size, num_kv_heads, head_dim), float("nan"), dtype=pool_dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
        store_kv_ref(k, v, k_cache, v_cache, slots)
        outs.append(paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, qo_indptr, head_dim**-0.5))
    assert outs[1].dtype == dtype and torch.isfinite(outs[1]).all()
    assert rel_err(outs[1], outs[0]) < 0.04


# ---------------------------------------------------------------- norms and activation


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double(), weight.double()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        rms = math.sqrt(sum(float(t) ** 2 for t in x[i]) / x.shape[1] + eps)
        out[i] = w * x[i] / rms
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", SEEDS)
def test_rms_norm(seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden = 96
    x = (torch.randn(7, hidden, generator=gen) * (1 + 4 * torch.rand(7, 1, generator=gen))).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype)
    eps = 1e-5
    out = rms_norm_ref(x, weight, eps)
    assert out.shape == x.shape and out.dtype == dtype
    ref = naive_rms_norm(x, weight, eps)
    assert rel_err(out, ref) < TOL[dtype]
    for i in range(x.shape[0]):
        assert rel_err(out[i], ref[i]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", SEEDS)
def test_add_rms_norm(seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden = 64
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    residual = (3 * torch.randn(5, hidden, generator=gen)).to(dtype)
    weight = torch.rand(hidden, generator=gen).to(dtype)
    normed, new_residual = add_rms_norm_ref(x, residual, weight, 1e-6)
    summed = [[float(a) + float(b) for a, b in zip(xr, rr)] for xr, rr in zip(x, residual)]
    expected_residual = torch.tensor(summed, dtype=torch.float64)
    assert new_residual.dtype == dtype
    assert rel_err(new_residual, expected_residual) < TOL[dtype]
    assert rel_err(normed, naive_rms_norm(new_residual, weight, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", SEEDS)
def test_silu_and_mul(seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    inter = 48
    x = (3 * torch.randn(6, 2 * inter, generator=gen)).to(dtype)
    out = silu_and_mul_ref(x)
    assert out.shape == (6, inter) and out.dtype == dtype
    xd = x.double()
    gate, up = xd[:, :inter], xd[:, inter:]
    ref = gate * (1 / (1 + torch.exp(-gate))) * up
    assert rel_err(out, ref) < TOL[dtype]


# ---------------------------------------------------------------- rope


def naive_inv_freq(head_dim: int, theta: float) -> list[float]:
    return [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]


def naive_llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> list[float]:
    """The Llama-3.1 rule, per frequency: keep short wavelengths, divide long ones, blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    result = []
    for freq in naive_inv_freq(head_dim, theta):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            result.append(freq)
        elif wavelen > low_freq_wavelen:
            result.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            result.append((1 - smooth) * freq / factor + smooth * freq)
    return result


def naive_rope(x: torch.Tensor, positions: list[int], inv_freq: list[float]) -> torch.Tensor:
    """Rotate each pair (i, i + D/2) as the complex number x_i + j x_{i+D/2}, in float64."""
    x = x.double()
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for t, pos in enumerate(positions):
        rot = torch.tensor([complex(math.cos(pos * f), math.sin(pos * f)) for f in inv_freq], dtype=torch.complex128)
        z = torch.complex(x[t, :, :half], x[t, :, half:]) * rot
        out[t, :, :half], out[t, :, half:] = z.real, z.imag
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_inv_freq(head_dim: int) -> None:
    inv_freq = rope_inv_freq(head_dim, 10000.0, None)
    ref = torch.tensor(naive_inv_freq(head_dim, 10000.0), dtype=torch.float64)
    assert inv_freq.shape == (head_dim // 2,)
    assert rel_err(inv_freq, ref) < 1e-6
    assert torch.equal(rope_inv_freq(head_dim, 10000.0, {"rope_type": "default"}), inv_freq)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_inv_freq(head_dim: int) -> None:
    theta = 500000.0
    ref = torch.tensor(naive_llama3_inv_freq(head_dim, theta, LLAMA3_SCALING), dtype=torch.float64)
    got = rope_inv_freq(head_dim, theta, LLAMA3_SCALING)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=0)
    # the older "type" key means the same
    legacy = {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"} | {"type": "llama3"}
    assert torch.equal(rope_inv_freq(head_dim, theta, legacy), got)
    # all three regimes occur for these settings: unchanged, divided by the factor, blended
    base = torch.tensor(naive_inv_freq(head_dim, theta), dtype=torch.float64)
    ratio = ref / base
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "no-such-rope"])
def test_unknown_rope_type_raises(kind: str) -> None:
    """Types without tables raise, and so does yarn here: its frequencies come with a factor on cos and sin."""
    with pytest.raises(ValueError):
        rope_inv_freq(64, 10000.0, {"rope_type": kind, "factor": 2.0})


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_rope(dtype: torch.dtype, head_dim: int, scaling: dict | None) -> None:
    theta = 500000.0 if scaling else 10000.0
    max_positions = 64
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, theta, scaling), max_positions)
    assert cos.shape == sin.shape == (max_positions, head_dim) and cos.dtype == torch.float32
    freqs = naive_llama3_inv_freq(head_dim, theta, scaling) if scaling else naive_inv_freq(head_dim, theta)
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, max_positions, (9,), generator=gen)
        q = torch.randn(9, 6, head_dim, generator=gen).to(dtype)
        k = torch.randn(9, 2, head_dim, generator=gen).to(dtype)
        q_out, k_out = apply_rope_ref(q, k, positions, cos, sin)
        assert q_out.dtype == k_out.dtype == dtype
        assert rel_err(q_out, naive_rope(q, positions.tolist(), freqs)) < TOL[dtype]
        assert rel_err(k_out, naive_rope(k, positions.tolist(), freqs)) < TOL[dtype]


def test_apply_rope_far_positions() -> None:
    """fp32 angles lose precision in proportion to the position; far positions stay within that."""
    head_dim, max_positions = 128, 8192
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 10000.0, None), max_positions)
    gen = torch.Generator().manual_seed(5)
    positions = torch.tensor([0, 1, 511, 4095, 8191])
    q = torch.randn(5, 4, head_dim, generator=gen)
    k = torch.randn(5, 2, head_dim, generator=gen)
    q_out, _ = apply_rope_ref(q, k, positions, cos, sin)
    ref = naive_rope(q, positions.tolist(), naive_inv_freq(head_dim, 10000.0))
    for t, pos in enumerate(positions.tolist()):
        # angle error ~ pos * (fp32 epsilon), plus the rounding of the base frequencies
        bound = 1e-6 + 4 * pos * torch.finfo(torch.float32).eps * math.log(10000.0)
        assert rel_err(q_out[t], ref[t]) < bound, pos
    # rotation preserves the norm of every pair
    half = head_dim // 2

    def pair_norm(x: torch.Tensor) -> torch.Tensor:
        return x[..., :half] ** 2 + x[..., half:] ** 2

    assert torch.allclose(pair_norm(q_out), pair_norm(q), rtol=1e-5, atol=1e-5)
