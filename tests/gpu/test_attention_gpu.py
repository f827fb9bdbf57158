"""The Triton KV store and paged attention kernels on CUDA in bf16 at Llama-3-8B sizes, over bf16 or fp8 pools."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tristream.kernels.attention import (
    FP8,
    choose_num_splits,
    extend_attention,
    paged_attention_ref,
    paged_decode_attention,
    store_kv,
    store_kv_ref,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
TOL = 1e-2
HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5
MAX_CONTEXT = 4096
# (k_scale, v_scale) of fp8 pools: N(0, 1) K/V use about half of e4m3's range (+-448).
FP8_SCALES = (0.011, 0.017)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||``, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", generator=g).to(DTYPE)


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def nan_pools(num_pages: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.full(shape, math.nan, dtype=dtype, device="cuda")
    return k_cache, torch.full_like(k_cache, math.nan)


def fill_pools(
    ctx_lens: list[int],
    seed: int,
    spare_pages: int = 8,
    pool_dtype: torch.dtype = DTYPE,
    scales: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], torch.Tensor]:
    """NaN pools holding random K/V for each context on shuffled pages (page 0 and spares stay unused).

    K/V are stored with ``scales`` into pools of ``pool_dtype``.
    Returns the pools, the page lists and a padded int32 block table wide enough for MAX_CONTEXT.
    """
    num_pages = [-(-n // PAGE_SIZE) for n in ctx_lens]
    pages = list(range(1, sum(num_pages) + spare_pages))
    random.Random(seed).shuffle(pages)
    tables, start = [], 0
    for n in num_pages:
        tables.append(pages[start : start + n])
        start += n
    k_cache, v_cache = nan_pools(len(pages) + 1, pool_dtype)
    slots = torch.tensor(
        [t[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for t, n in zip(tables, ctx_lens) for p in range(n)],
        device="cuda",
    )
    g = gen(seed)
    k, v = randn(len(slots), KV_HEADS, HEAD_DIM, g=g), randn(len(slots), KV_HEADS, HEAD_DIM, g=g)
    store_kv(k, v, k_cache, v_cache, slots, *scales)
    width = MAX_CONTEXT // PAGE_SIZE
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, block_table


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: list[list[int]],
    ctx_lens: list[int],
    qo_indptr: list[int],
    kv_scales: tuple[float, float] = (1.0, 1.0),
    **opts: float,
) -> torch.Tensor:
    """The torch reference, in float32; it dequantizes an fp8 pool itself. ``opts``: window and softcap."""
    if k_cache.dtype != FP8:
        k_cache, v_cache = k_cache.float(), v_cache.float()
    return paged_attention_ref(q.float(), k_cache, v_cache, tables, ctx_lens, qo_indptr, SCALE, *kv_scales, **opts)


def test_store_kv_writes_exactly_its_slots() -> None:
    g = gen(0)
    tokens, num_pages = 4096, 512
    qkv = randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, g=g)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(num_pages * PAGE_SIZE, device="cuda", generator=g)[:tokens]
    slots[::97] = -1
    written = slots >= 0
    k_cache, v_cache = nan_pools(num_pages)
    k_ref, v_ref = nan_pools(num_pages)
    store_kv(k, v, k_cache, v_cache, slots)
    store_kv_ref(k[written], v[written], k_ref, v_ref, slots[written])
    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        torch.testing.assert_close(cache, ref, rtol=0, atol=0, equal_nan=True)
        assert cache.flatten(0, 1).isnan().all(dim=(1, 2)).sum() == num_pages * PAGE_SIZE - int(written.sum())


def test_store_kv_fp8_pool() -> None:
    """Within one fp8 step of the reference (which may round x / scale differently), saturating at +-448."""
    g = gen(4)
    tokens, num_pages = 4096, 512
    k = randn(tokens, KV_HEADS, HEAD_DIM, g=g) * 2
    v = randn(tokens, KV_HEADS, HEAD_DIM, g=g) * 2
    slots = torch.randperm(num_pages * PAGE_SIZE, device="cuda", generator=g)[:tokens]
    slots[::97] = -1
    written = slots >= 0
    k_cache, v_cache = nan_pools(num_pages, FP8)
    k_ref, v_ref = nan_pools(num_pages, FP8)
    store_kv(k, v, k_cache, v_cache, slots, *FP8_SCALES)
    store_kv_ref(k[written], v[written], k_ref, v_ref, slots[written], *FP8_SCALES)
    for x, scale, cache, ref in ((k, FP8_SCALES[0], k_cache, k_ref), (v, FP8_SCALES[1], v_cache, v_ref)):
        assert (cache.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs().max() <= 1
        stored = cache.flatten(0, 1)[slots[written]].float()
        assert not stored.isnan().any()
        beyond = x[written].float().abs() >= 448 * scale
        assert beyond.any()
        assert torch.equal(stored[beyond], 448 * x[written].float()[beyond].sign())
        assert cache.flatten(0, 1).isnan().all(dim=(1, 2)).sum() == num_pages * PAGE_SIZE - int(written.sum())


@pytest.mark.parametrize("batch,num_splits", [(1, 16), (8, 4), (8, 16), (64, 1), (64, 3)])
def test_paged_decode_attention(batch: int, num_splits: int) -> None:
    rng = random.Random(batch * 100 + num_splits)
    ctx_lens = ([MAX_CONTEXT, 1] + [rng.randint(1, MAX_CONTEXT) for _ in range(batch - 2)])[:batch]
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, batch + num_splits)
    q = randn(batch, HEADS, HEAD_DIM, g=gen(batch))
    out = paged_decode_attention(q, k_cache, v_cache, block_table, int32(ctx_lens), SCALE, num_splits)
    assert out.shape == q.shape and out.dtype == DTYPE
    assert rel_err(out, reference(q, k_cache, v_cache, tables, ctx_lens, list(range(batch + 1)))) < TOL


@pytest.mark.parametrize("batch,num_splits", [(8, 4), (64, 3)])
def test_paged_decode_attention_fp8_pool(batch: int, num_splits: int) -> None:
    rng = random.Random(batch * 100 + num_splits + 1)
    ctx_lens = [MAX_CONTEXT, 1] + [rng.randint(1, MAX_CONTEXT) for _ in range(batch - 2)]
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, batch + num_splits, pool_dtype=FP8, scales=FP8_SCALES)
    q = randn(batch, HEADS, HEAD_DIM, g=gen(batch))
    out = paged_decode_attention(q, k_cache, v_cache, block_table, int32(ctx_lens), SCALE, num_splits, *FP8_SCALES)
    assert out.shape == q.shape and out.dtype == DTYPE
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, list(range(batch + 1)), FP8_SCALES)
    assert rel_err(out, ref) < TOL


# (context, new tokens): chunks of ~500 on prefixes of ~1000, decode rows, pure prefills
MIXED_BATCH = [(1500, 500), (1537, 512), (1000, 1), (2000, 477), (700, 700), (4096, 1), (513, 513), (3000, 3)]


def indptr(batch: list[tuple[int, int]]) -> list[int]:
    """qo_indptr of a batch of (context, new tokens)."""
    out = [0]
    for _, n in batch:
        out.append(out[-1] + n)
    return out


def extend_mixed_batch(
    pool_dtype: torch.dtype = DTYPE, scales: tuple[float, float] = (1.0, 1.0), **opts: float
) -> float:
    """extend_attention's relative error on a mixed batch, over pools of ``pool_dtype`` holding K/V stored with
    ``scales``; ``opts``: window and softcap."""
    ctx_lens, qo_indptr = [c for c, _ in MIXED_BATCH], indptr(MIXED_BATCH)
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, 1, pool_dtype=pool_dtype, scales=scales)
    q = randn(qo_indptr[-1], HEADS, HEAD_DIM, g=gen(1))
    max_q_len = max(n for _, n in MIXED_BATCH)
    out = extend_attention(
        q, k_cache, v_cache, block_table, int32(ctx_lens), int32(qo_indptr), SCALE, max_q_len, *scales, **opts
    )
    assert out.shape == q.shape and out.dtype == DTYPE
    return rel_err(out, reference(q, k_cache, v_cache, tables, ctx_lens, qo_indptr, scales, **opts))


def test_extend_attention_mixed_batch() -> None:
    assert extend_mixed_batch() < TOL


def test_extend_attention_mixed_batch_fp8_pool() -> None:
    assert extend_mixed_batch(FP8, FP8_SCALES) < TOL


def test_paged_decode_attention_replays_in_a_cuda_graph() -> None:
    """Captured once; replayed after seq_lens, block tables and q change in place."""
    batch = 8
    num_splits = choose_num_splits(batch, KV_HEADS, MAX_CONTEXT)
    first, second = [100, 4096, 1, 2000, 17, 333, 1024, 3000], [4000, 5, 64, 2500, 1, 4096, 700, 129]
    k_cache, v_cache, tables, block_table = fill_pools(first + second, 2)
    q = randn(batch, HEADS, HEAD_DIM, g=gen(2))
    seq_lens, table = int32(first), block_table[:batch].clone()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode_attention(q, k_cache, v_cache, table, seq_lens, SCALE, num_splits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, SCALE, num_splits)

    graph.replay()
    assert rel_err(out, reference(q, k_cache, v_cache, tables[:batch], first, list(range(batch + 1)))) < TOL

    seq_lens.copy_(int32(second))
    table.copy_(block_table[batch:])
    q.copy_(randn(batch, HEADS, HEAD_DIM, g=gen(3)))
    graph.replay()
    assert rel_err(out, reference(q, k_cache, v_cache, tables[batch:], second, list(range(batch + 1)))) < TOL


# (window, softcap): windows below, at and above the contexts, none a multiple of a page or of a key block;
# Gemma 2's cap of 50 and one of 2 that bends N(0, 1) scores visibly.
WINDOW_CASES = [(1000, 0.0), (0, 50.0), (4095, 2.0), (37, 2.0)]


@pytest.mark.parametrize("window,softcap", WINDOW_CASES)
@pytest.mark.parametrize("batch,num_splits", [(1, 16), (8, 4), (64, 1)])
def test_paged_decode_attention_window_softcap(batch: int, num_splits: int, window: int, softcap: float) -> None:
    rng = random.Random(batch * 100 + num_splits + 2)
    ctx_lens = ([MAX_CONTEXT, 1] + [rng.randint(1, MAX_CONTEXT) for _ in range(batch - 2)])[:batch]
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, batch + num_splits + 2)
    q = randn(batch, HEADS, HEAD_DIM, g=gen(batch + 2))
    opts = {"window": window, "softcap": softcap}
    out = paged_decode_attention(q, k_cache, v_cache, block_table, int32(ctx_lens), SCALE, num_splits, **opts)
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, list(range(batch + 1)), **opts)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("window,softcap", WINDOW_CASES)
def test_extend_attention_window_softcap(window: int, softcap: float) -> None:
    assert extend_mixed_batch(window=window, softcap=softcap) < TOL


def test_extend_attention_window_softcap_fp8_pool() -> None:
    assert extend_mixed_batch(FP8, FP8_SCALES, window=1000, softcap=50.0) < TOL


def test_window_skips_pages_before_it() -> None:
    """Pages wholly before every query's window are never read: NaN there leaves every output as it was."""
    window = 1000
    ctx_lens, qo_indptr = [c for c, _ in MIXED_BATCH], indptr(MIXED_BATCH)
    k_cache, v_cache, tables, block_table = fill_pools(ctx_lens, 5)
    q = randn(qo_indptr[-1], HEADS, HEAD_DIM, g=gen(5))
    lens_t, indptr_t = int32(ctx_lens), int32(qo_indptr)
    decode = [b for b, (_, n) in enumerate(MIXED_BATCH) if n == 1]
    rows = [qo_indptr[b] for b in decode]

    def run() -> list[torch.Tensor]:
        return [
            paged_decode_attention(
                q[rows], k_cache, v_cache, block_table[decode], lens_t[decode], SCALE, 4, window=window
            ),
            extend_attention(q, k_cache, v_cache, block_table, lens_t, indptr_t, SCALE, 700, window=window),
        ]

    before = run()
    # Each sequence's first query sits at c - n; its window starts at c - n - window + 1.
    outside = [p for t, (c, n) in zip(tables, MIXED_BATCH) for p in t[: max(0, c - n - window + 1) // PAGE_SIZE]]
    assert len(outside) > 300
    k_cache[outside] = math.nan
    v_cache[outside] = math.nan
    for out, expected in zip(run(), before):
        assert out.isfinite().all()
        assert torch.equal(out, expected)


def test_paged_decode_attention_window_replays_in_a_cuda_graph() -> None:
    """A windowed, soft-capped decode captured once, replayed after seq_lens and block tables change in place."""
    batch, opts = 8, {"window": 1000, "softcap": 50.0}
    num_splits = choose_num_splits(batch, KV_HEADS, MAX_CONTEXT)
    first, second = [100, 4096, 1, 2000, 17, 333, 1024, 3000], [4000, 5, 64, 2500, 1, 4096, 700, 129]
    k_cache, v_cache, tables, block_table = fill_pools(first + second, 6)
    q = randn(batch, HEADS, HEAD_DIM, g=gen(6))
    seq_lens, table = int32(first), block_table[:batch].clone()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode_attention(q, k_cache, v_cache, table, seq_lens, SCALE, num_splits, **opts)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, SCALE, num_splits, **opts)

    graph.replay()
    assert rel_err(out, reference(q, k_cache, v_cache, tables[:batch], first, list(range(batch + 1)), **opts)) < TOL
    seq_lens.copy_(int32(second))
    table.copy_(block_table[batch:])
    graph.replay()
    assert rel_err(out, reference(q, k_cache, v_cache, tables[batch:], second, list(range(batch + 1)), **opts)) < TOL
