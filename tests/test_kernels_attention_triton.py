"""The Triton KV store and paged attention kernels against their torch references.

Without a GPU the kernels run in Triton's interpreter, in fp32 and fp16, over pools of the same
dtype or fp8 ones. Pools are filled with NaN before the used slots are written, so reading any
other slot shows up in the output.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the conftest fixes two of the interpreter's faults

from tristream.kernels.attention import (
    FP8,
    choose_num_splits,
    extend_attention,
    paged_attention_ref,
    paged_decode_attention,
    store_kv,
    store_kv_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
# (query heads, kv heads): GQA groups of 1, 3 and 8
HEADS = [(2, 2), (6, 2), (8, 1)]
PAGE_SIZES = (1, 16)
# (k_scale, v_scale) of fp8 pools: N(0, 1) K/V use about half of e4m3's range (+-448).
FP8_SCALES = (0.011, 0.017)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=g)


def nan_pools(
    num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype, device=DEVICE)
    return k_cache, torch.full_like(k_cache, math.nan)


def fill_pools(
    ctx_lens: list[int],
    page_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    pool_dtype: torch.dtype | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], torch.Tensor]:
    """NaN pools holding random K/V for each context on shuffled pages (page 0 and spares stay unused).

    K/V are drawn in ``dtype`` and stored with ``scales`` into pools of ``pool_dtype`` (default ``dtype``).
    Returns the pools, the page lists and a padded int32 block table with a spare column.
    """
    num_pages = [-(-n // page_size) for n in ctx_lens]
    pages = list(range(1, sum(num_pages) + 4))
    random.Random(seed).shuffle(pages)
    tables, start = [], 0
    for n in num_pages:
        tables.append(pages[start : start + n])
        start += n
    k_cache, v_cache = nan_pools(len(pages) + 1, page_size, kv_heads, head_dim, pool_dtype or dtype)
    slots = torch.tensor(
        [t[p // page_size] * page_size + p % page_size for t, n in zip(tables, ctx_lens) for p in range(n)],
        device=DEVICE,
    )
    g = gen(seed)
    store_kv(
        randn(len(slots), kv_heads, head_dim, dtype=dtype, g=g),
        randn(len(slots), kv_heads, head_dim, dtype=dtype, g=g),
        k_cache,
        v_cache,
        slots,
        *scales,
    )
    width = max(num_pages) + 1
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables, block_table


def qkv_view_q(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """q [tokens, heads, head_dim] as a strided view into a fused qkv projection."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, g=gen(seed + 1000))
    return qkv[:, : heads * head_dim].view(tokens, heads, head_dim)


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: list[list[int]],
    ctx_lens: list[int],
    qo_indptr: list[int],
    scale: float,
    kv_scales: tuple[float, float] = (1.0, 1.0),
    **opts: float,
) -> torch.Tensor:
    """The torch reference, in float64; it dequantizes an fp8 pool itself. ``opts``: window and softcap."""
    if k_cache.dtype != FP8:
        k_cache, v_cache = k_cache.double(), v_cache.double()
    return paged_attention_ref(q.double(), k_cache, v_cache, tables, ctx_lens, qo_indptr, scale, *kv_scales, **opts)


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------- store_kv


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_exactly_its_slots(dtype: torch.dtype, page_size: int, slot_dtype: torch.dtype) -> None:
    """k and v are views into a fused qkv; slot -1 (a padding token) writes nothing."""
    g = gen(page_size)
    tokens, heads, kv_heads, head_dim, num_pages = 11, 6, 3, 64, 40 // page_size + 1
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, g=g)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_pages * page_size, device=DEVICE, generator=g)[:tokens].to(slot_dtype)
    slots[[2, 7]] = -1
    written = slots >= 0

    k_cache, v_cache = nan_pools(num_pages, page_size, kv_heads, head_dim, dtype)
    k_ref, v_ref = nan_pools(num_pages, page_size, kv_heads, head_dim, dtype)
    store_kv(k, v, k_cache, v_cache, slots)
    store_kv_ref(k[written], v[written], k_ref, v_ref, slots[written])

    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        torch.testing.assert_close(cache, ref, rtol=0, atol=0, equal_nan=True)
        flat = cache.flatten(0, 1)
        assert not flat[slots[written].long()].isnan().any()
        assert flat.isnan().all(dim=(1, 2)).sum() == num_pages * page_size - int(written.sum())


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many fp8 values apart a and b are, elementwise (for values of the same sign)."""
    return (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_fp8_pool(dtype: torch.dtype) -> None:
    """Stored as clamp(x / scale), saturating at +-448 (values beyond 448 * scale included); slot -1 writes nothing."""
    g = gen(5)
    tokens, kv_heads, head_dim, page_size, num_pages = 13, 2, 64, 16, 3
    k = randn(tokens, kv_heads, head_dim, dtype=dtype, g=g) * 2
    v = randn(tokens, kv_heads, head_dim, dtype=dtype, g=g) * 2
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 4.5, -4.5])
    v[0, 0, :4] = torch.tensor([1e4, -1e4, 5.4, -5.4])
    slots = torch.randperm(num_pages * page_size, device=DEVICE, generator=g)[:tokens]
    slots[4] = -1
    written = slots >= 0
    k_scale, v_scale = 0.01, 0.012

    k_cache, v_cache = nan_pools(num_pages, page_size, kv_heads, head_dim, FP8)
    k_ref, v_ref = nan_pools(num_pages, page_size, kv_heads, head_dim, FP8)
    store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    store_kv_ref(k[written], v[written], k_ref, v_ref, slots[written], k_scale, v_scale)

    for x, scale, cache, ref in ((k, k_scale, k_cache, k_ref), (v, v_scale, v_cache, v_ref)):
        assert fp8_steps(cache, ref).max() <= 1
        flat = cache.flatten(0, 1)
        stored = flat[slots[written]].float()
        assert not stored.isnan().any()
        beyond = x[written].float().abs() >= 448 * scale
        assert beyond.sum() > 4
        assert torch.equal(stored[beyond], 448 * x[written].float()[beyond].sign())
        assert flat.isnan().all(dim=(1, 2)).sum() == num_pages * page_size - int(written.sum())


def test_scales_need_an_fp8_pool() -> None:
    k_cache, v_cache = nan_pools(2, 16, 2, 64, torch.float16)
    kv = torch.zeros(1, 2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError):
        store_kv(kv, kv, k_cache, v_cache, int32([3]), 0.5, 1.0)
    with pytest.raises(ValueError):
        paged_decode_attention(kv, k_cache, v_cache, int32([[0]]), int32([1]), 0.125, 1, 1.0, 0.5)


# ---------------------------------------------------------------- decode

# Contexts crossing page boundaries (and block boundaries at 16 positions), down to a single token.
DECODE_CTX = [37, 1, 16, 17, 70, 33]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_paged_decode_attention(heads: int, kv_heads: int, page_size: int, dtype: torch.dtype) -> None:
    """One split, three splits, and 16 splits: more than the blocks of any context, so some are empty."""
    head_dim, scale = 64, 64**-0.5
    seed = heads * 100 + page_size
    k_cache, v_cache, tables, block_table = fill_pools(DECODE_CTX, page_size, kv_heads, head_dim, dtype, seed)
    q = qkv_view_q(len(DECODE_CTX), heads, kv_heads, head_dim, dtype, seed)
    ref = reference(q, k_cache, v_cache, tables, DECODE_CTX, list(range(len(DECODE_CTX) + 1)), scale)
    for num_splits in (1, 3, 16):
        out = paged_decode_attention(q, k_cache, v_cache, block_table, int32(DECODE_CTX), scale, num_splits, block_n=16)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], num_splits


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_fp8_pool(dtype: torch.dtype) -> None:
    """Scaled fp8 K/V, read in the query's dtype: off the reference (reading the same pool) by rounding only."""
    heads, kv_heads, head_dim, page_size, scale = 6, 2, 64, 16, 64**-0.5
    k_cache, v_cache, tables, block_table = fill_pools(
        DECODE_CTX, page_size, kv_heads, head_dim, dtype, 21, FP8, FP8_SCALES
    )
    q = qkv_view_q(len(DECODE_CTX), heads, kv_heads, head_dim, dtype, 21)
    ref = reference(q, k_cache, v_cache, tables, DECODE_CTX, list(range(len(DECODE_CTX) + 1)), scale, FP8_SCALES)
    for num_splits in (1, 3):
        out = paged_decode_attention(
            q, k_cache, v_cache, block_table, int32(DECODE_CTX), scale, num_splits, *FP8_SCALES, block_n=16
        )
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], num_splits


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_attention_head_dim_128_default_blocks(num_splits: int) -> None:
    ctx_lens = [70, 5, 64, 65]
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, 16, 2, 128, torch.float32, 7)
    q = randn(len(ctx_lens), 8, 128, dtype=torch.float32, g=gen(8))
    out = paged_decode_attention(q, k_cache, v_cache, block_table, int32(ctx_lens), 0.1, num_splits)
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, list(range(len(ctx_lens) + 1)), 0.1)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_paged_decode_attention_zero_length_sequence_gives_zeros() -> None:
    """A padding row (seq_len 0) reads nothing and leaves the other rows untouched."""
    ctx_lens = [20, 0, 9]
    k_cache, v_cache, tables, block_table = fill_pools([20, 1, 9], 16, 2, 64, torch.float32, 9)
    q = randn(3, 4, 64, dtype=torch.float32, g=gen(9))
    out = paged_decode_attention(q, k_cache, v_cache, block_table, int32(ctx_lens), 0.125, 3, block_n=16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    live = [0, 2]
    ref = reference(q[live], k_cache, v_cache, [tables[b] for b in live], [20, 9], [0, 1, 2], 0.125)
    assert rel_err(out[live], ref) < TOL[torch.float32]


def test_choose_num_splits() -> None:
    # A lone sequence splits until every SM has a program, but never below 256 positions a split.
    assert choose_num_splits(1, 8, 4096) == 16
    assert choose_num_splits(1, 8, 4096, num_sms=64) == 8
    assert choose_num_splits(1, 8, 1000) == 3
    assert choose_num_splits(1, 8, 100) == 1
    # A batch that already fills the GPU is not split.
    assert choose_num_splits(64, 8, 4096) == 1
    assert choose_num_splits(4, 8, 32768) == 5


# ---------------------------------------------------------------- extend

# (context, new tokens): decode rows, pure prefills and extends on a prefix, crossing pages.
EXTEND_BATCH = [(37, 1), (16, 16), (40, 9), (1, 1), (70, 70), (65, 32), (20, 19), (5, 5), (33, 1)]


def run_extend(
    batch: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    seed: int,
    pool_dtype: torch.dtype | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
    **opts: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """extend_attention on a batch of (context, new tokens) and the reference output.

    ``opts``: block sizes, and window and softcap (which the reference gets too).
    """
    ctx_lens = [c for c, _ in batch]
    qo_indptr = [0]
    for _, n in batch:
        qo_indptr.append(qo_indptr[-1] + n)
    k_cache, v_cache, tables, block_table = fill_pools(
        ctx_lens, page_size, kv_heads, head_dim, dtype, seed, pool_dtype, scales
    )
    q = qkv_view_q(qo_indptr[-1], heads, kv_heads, head_dim, dtype, seed)
    scale = head_dim**-0.5
    max_q_len = max(n for _, n in batch)
    out = extend_attention(
        q, k_cache, v_cache, block_table, int32(ctx_lens), int32(qo_indptr), scale, max_q_len, *scales, **opts
    )
    assert out.shape == q.shape and out.dtype == dtype
    ref_opts = {k: v for k, v in opts.items() if k in ("window", "softcap")}
    return out, reference(q, k_cache, v_cache, tables, ctx_lens, qo_indptr, scale, scales, **ref_opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_extend_attention_mixed_batch(heads: int, kv_heads: int, page_size: int, dtype: torch.dtype) -> None:
    """Several query blocks per sequence and several key blocks per query block (16 x 16)."""
    out, ref = run_extend(
        EXTEND_BATCH, heads, kv_heads, 64, page_size, dtype, heads + page_size, block_m=16, block_n=16
    )
    assert rel_err(out, ref) < TOL[dtype]


def test_extend_attention_head_dim_128_default_blocks() -> None:
    out, ref = run_extend(EXTEND_BATCH, 8, 2, 128, 16, torch.float16, 11)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_extend_attention_decode_only_batch() -> None:
    batch = [(c, 1) for c in DECODE_CTX]
    out, ref = run_extend(batch, 6, 2, 64, 16, torch.float32, 12, block_m=16)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_attention_fp8_pool(dtype: torch.dtype) -> None:
    """Scaled fp8 K/V, read in the query's dtype: off the reference (reading the same pool) by rounding only."""
    out, ref = run_extend(EXTEND_BATCH, 6, 2, 64, 16, dtype, 22, FP8, FP8_SCALES, block_m=16, block_n=16)
    assert rel_err(out, ref) < TOL[dtype]


# ---------------------------------------------------------------- sliding window and soft-capping

# Gemma 2 caps attention logits at 50; a cap of 2 bends N(0, 1) scores visibly.
SOFTCAP = 2.0
# (window, softcap, decode splits): windows of 17 and 5 are no multiple of a page, and are below, equal to and
# above contexts of the batches; with 5, rows 16 on of a 32-row query block see none of the first 16 keys.
WINDOW_CASES = [(17, 0.0, 3), (0, SOFTCAP, 1), (5, SOFTCAP, 4)]
WINDOW_BATCH = [(37, 1), (17, 17), (40, 9), (1, 1), (50, 50), (33, 20), (5, 5)]


def indptr(batch: list[tuple[int, int]]) -> list[int]:
    """qo_indptr of a batch of (context, new tokens)."""
    out = [0]
    for _, n in batch:
        out.append(out[-1] + n)
    return out


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, softcap: float, scale: float
) -> torch.Tensor:
    """Naive attention of the last len(q) positions over dense k, v [ctx, KVH, D], masked by transformers."""
    n, ctx = q.shape[0], k.shape[0]
    mask_fn = sliding_window_causal_mask_function(window) if window else causal_mask_function
    mask = mask_fn(0, 0, torch.arange(ctx - n, ctx)[:, None], torch.arange(ctx)[None, :])
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~mask, -math.inf), -1)
    return torch.einsum("hqk,khd->qhd", p, v)


def test_reference_window_and_softcap_match_dense_attention() -> None:
    """The reference, on a mixed batch, against dense attention with transformers' sliding-window causal mask."""
    page_size, g = 16, gen(30)
    ctx_lens, qo_indptr = [c for c, _ in EXTEND_BATCH], indptr(EXTEND_BATCH)
    tables = [[1 + 8 * b + p for p in range(-(-c // page_size))] for b, c in enumerate(ctx_lens)]
    k_cache = randn(8 * len(ctx_lens) + 1, page_size, 2, 64, dtype=torch.float64, g=g)
    v_cache = randn(*k_cache.shape, dtype=torch.float64, g=g)
    q = randn(qo_indptr[-1], 6, 64, dtype=torch.float64, g=g)
    for window, softcap in [(0, SOFTCAP), (1, 0.0), (5, SOFTCAP), (17, 0.0), (17, SOFTCAP), (200, 0.0)]:
        ref = reference(q, k_cache, v_cache, tables, ctx_lens, qo_indptr, 0.125, window=window, softcap=softcap)
        for b, (ctx, start, end) in enumerate(zip(ctx_lens, qo_indptr, qo_indptr[1:])):
            k, v = k_cache[tables[b]].flatten(0, 1)[:ctx], v_cache[tables[b]].flatten(0, 1)[:ctx]
            dense = dense_attention(q[start:end], k, v, window, softcap, 0.125)
            assert rel_err(ref[start:end], dense) < 1e-12, (window, softcap, b)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_decode_attention_window_softcap(page_size: int) -> None:
    """One split, three, and four: more than the in-window blocks of any context, so some are empty."""
    heads, kv_heads, head_dim, scale = 4, 1, 64, 64**-0.5
    k_cache, v_cache, tables, block_table = fill_pools(DECODE_CTX, page_size, kv_heads, head_dim, torch.float32, 40)
    q = qkv_view_q(len(DECODE_CTX), heads, kv_heads, head_dim, torch.float32, 40)
    for window, softcap, num_splits in WINDOW_CASES:
        opts = {"window": window, "softcap": softcap}
        ref = reference(q, k_cache, v_cache, tables, DECODE_CTX, list(range(len(DECODE_CTX) + 1)), scale, **opts)
        out = paged_decode_attention(
            q, k_cache, v_cache, block_table, int32(DECODE_CTX), scale, num_splits, block_n=16, **opts
        )
        assert rel_err(out, ref) < TOL[torch.float32], opts


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_extend_attention_window_softcap(page_size: int) -> None:
    """Query blocks of 32 whose windows start mid-page and mid-block, over key blocks of 16."""
    heads, kv_heads, head_dim, scale = 4, 2, 64, 64**-0.5
    ctx_lens, qo_indptr = [c for c, _ in WINDOW_BATCH], indptr(WINDOW_BATCH)
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, page_size, kv_heads, head_dim, torch.float32, 50)
    q = qkv_view_q(qo_indptr[-1], heads, kv_heads, head_dim, torch.float32, 50)
    meta = (block_table, int32(ctx_lens), int32(qo_indptr), scale, max(n for _, n in WINDOW_BATCH))
    for window, softcap, _ in WINDOW_CASES:
        opts = {"window": window, "softcap": softcap}
        out = extend_attention(q, k_cache, v_cache, *meta, block_m=32, block_n=16, **opts)
        ref = reference(q, k_cache, v_cache, tables, ctx_lens, qo_indptr, scale, **opts)
        assert rel_err(out, ref) < TOL[torch.float32], opts


def test_window_softcap_fp16_over_fp8_pool() -> None:
    """The soft cap folds k_scale in: fp16 queries over a scaled fp8 pool, window 16 (a whole page)."""
    opts = {"window": 16, "softcap": SOFTCAP}
    k_cache, v_cache, tables, block_table = fill_pools(DECODE_CTX, 16, 2, 64, torch.float16, 60, FP8, FP8_SCALES)
    q = qkv_view_q(len(DECODE_CTX), 4, 2, 64, torch.float16, 60)
    qo_indptr = list(range(len(DECODE_CTX) + 1))
    ref = reference(q, k_cache, v_cache, tables, DECODE_CTX, qo_indptr, 0.125, FP8_SCALES, **opts)
    lens_t, indptr_t = int32(DECODE_CTX), int32(qo_indptr)
    out = paged_decode_attention(q, k_cache, v_cache, block_table, lens_t, 0.125, 3, *FP8_SCALES, block_n=16, **opts)
    assert rel_err(out, ref) < TOL[torch.float16]
    out = extend_attention(q, k_cache, v_cache, block_table, lens_t, indptr_t, 0.125, 1, *FP8_SCALES, **opts)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_window_skips_pages_before_it() -> None:
    """Pages wholly before every query's window are never read: NaN there leaves every output as it was."""
    window, page_size = 20, 16
    batch = [(100, 1), (70, 1), (90, 7), (64, 40)]
    ctx_lens, qo_indptr = [c for c, _ in batch], indptr(batch)
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, page_size, 1, 64, torch.float32, 70)
    q = qkv_view_q(qo_indptr[-1], 2, 1, 64, torch.float32, 70)
    lens_t, indptr_t = int32(ctx_lens), int32(qo_indptr)

    def run() -> list[torch.Tensor]:
        return [
            paged_decode_attention(
                q[:2], k_cache, v_cache, block_table[:2], lens_t[:2], 0.125, 3, window=window, block_n=16
            ),
            extend_attention(
                q, k_cache, v_cache, block_table, lens_t, indptr_t, 0.125, 40, window=window, block_m=16, block_n=16
            ),
            reference(q, k_cache, v_cache, tables, ctx_lens, qo_indptr, 0.125, window=window),
        ]

    before = run()
    # Each sequence's first query sits at c - n; its window starts at c - n - window + 1.
    outside = [p for t, (c, n) in zip(tables, batch) for p in t[: max(0, c - n - window + 1) // page_size]]
    assert len(outside) == 5 + 3 + 4
    k_cache[outside] = math.nan
    v_cache[outside] = math.nan
    for out, expected in zip(run(), before):
        assert out.isfinite().all()
        assert torch.equal(out, expected)


def test_window_and_softcap_must_not_be_negative() -> None:
    k_cache, v_cache = nan_pools(2, 16, 2, 64, torch.float32)
    q = torch.zeros(1, 2, 64, device=DEVICE)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k_cache, v_cache, int32([[0]]), int32([1]), 0.125, 1, window=-1)
    with pytest.raises(ValueError):
        extend_attention(q, k_cache, v_cache, int32([[0]]), int32([1]), int32([0, 1]), 0.125, 1, softcap=-1.0)
