"""Fused mixture-of-experts (MoE) feed-forward: SiLU-gated experts, each token routed to ``top_k`` of them.

For x [T, H], w13 [E, 2I, H] (the gate projection's rows, then the up projection's, each [out, in] as in
``nn.Linear``), w2 [E, H, I], and a router's topk_ids and topk_weights [T, K]:

    y[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = topk_ids[t, k]

:func:`fused_moe_ref` is the torch version (the engine's CPU path): a loop over the experts that have tokens.
:func:`fused_moe` is the Triton one. Its shapes depend only on (T, K, E) and it never waits on the GPU, so that
it can be captured in a CUDA graph:

1. :func:`moe_align` sorts the T * K assignments (flat index ``t * K + k``) by expert, in token order within
   each expert, and pads each expert's run to a multiple of BLOCK_M (padding holds T * K); ``block_expert`` names
   the expert of each BLOCK_M rows, -1 past the rows in use. A fill and three small kernels: per-chunk counts,
   one program's prefix sums, the placement.
2. A grouped GEMM over those blocks: each program multiplies BLOCK_M gathered rows of x by one expert's gate and
   up tiles and writes ``silu(gate) * up`` in x's dtype at the rows' flat indices, [T * K, I].
3. The same kernel for the down projection, each row scaled by its router weight, writing [T * K, H] at the
   flat indices.
4. ``view(T, K, H).sum(1)``: each token's K rows summed in a fixed order (no atomics: runs repeat bit for bit;
   torch accumulates 16-bit sums in fp32).

The grid is sized for the most blocks T * K assignments can fill; programs of blocks marked -1 return at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Elements of the [assignments, experts] one-hot tiles that the alignment kernels hold per program.
_ALIGN_TILE = 8192
_GROUP_M = 8


class MoEConfig(NamedTuple):
    """Tiles of both grouped GEMMs of :func:`fused_moe`; ``block_m`` is also :func:`moe_align`'s padding."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Starting points by shape class, to be tuned per shape (T * K, E, H, I) on the GPU. The class is the number of
# assignments per expert: decode puts a few tokens on each expert, so a short BLOCK_M wastes the least of each
# weight tile's single read, and narrow BLOCK_N gives one token's K experts enough programs to spread over the
# SMs (Qwen3-30B-A3B: 8 experts * 768 / 32 = 192); prefill's many rows per expert want tall tiles that reuse
# each weight tile.
_CONFIGS = {
    "decode": MoEConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4),
    "small": MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4),
    "medium": MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    "prefill": MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
}
# (the most assignments per expert, on average, of each class)
_CLASSES = ((16, "decode"), (64, "small"), (256, "medium"))


def shape_class(num_assignments: int, num_experts: int) -> str:
    """The key of :data:`_CONFIGS` for ``num_assignments`` (T * K) routed over ``num_experts``."""
    per_expert = num_assignments / num_experts
    return next((name for most, name in _CLASSES if per_expert <= most), "prefill")


def choose_config(num_assignments: int, num_experts: int, hidden: int, inter: int) -> MoEConfig:
    """The tiles for T * K = ``num_assignments`` over ``num_experts`` experts of sizes H = ``hidden`` and
    I = ``inter``: the class's config, with N and K tiles no wider than the larger of H and I needs."""
    cfg = _CONFIGS[shape_class(num_assignments, num_experts)]
    widest = max(16, triton.next_power_of_2(max(hidden, inter)))
    return cfg._replace(block_n=min(cfg.block_n, widest), block_k=min(cfg.block_k, widest))


def max_blocks(num_assignments: int, num_experts: int, block_m: int) -> int:
    """The most BLOCK_M-row blocks the padded runs can fill: each expert with assignments adds fewer than
    ``block_m`` rows of padding, and at most ``min(E, T * K)`` experts have any."""
    return triton.cdiv(num_assignments + min(num_experts, num_assignments) * (block_m - 1), block_m)


def _check(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("x must be [T, H], w13 [E, 2I, H] and w2 [E, H, I]")
    (t, h), (e, two_i, h13) = x.shape, w13.shape
    if two_i % 2 or h13 != h or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x [{t}, {h}]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights must both be [{t}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, not {topk_ids.dtype}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"the experts' weights ({w13.dtype}, {w2.dtype}) must be in x's dtype {x.dtype}")


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """y [T, H] in x's dtype (see the module's formula): for each expert with tokens, its tokens' rows through
    both projections (matmuls in x's dtype, SiLU gating in fp32), weighted and added up in fp32. It reads the
    expert counts on the host, so it cannot be captured in a CUDA graph."""
    _check(x, w13, w2, topk_weights, topk_ids)
    top_k, inter = topk_ids.shape[1], w2.shape[2]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tokens, weights = order // top_k, topk_weights.reshape(-1)[order].float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            gate_up = F.linear(x[tokens[rows]], w13[expert]).float()
            h = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype)
            out.index_add_(0, tokens[rows], F.linear(h, w2[expert]).float() * weights[rows, None])
        start += count
    return out.to(x.dtype)


@triton.jit
def _one_hot(ids_ptr, chunk, num_assignments, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """The flat indices of chunk ``chunk``'s assignments and their experts one-hot, [CHUNK, E_POW2] (no expert
    for indices past the end)."""
    i = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + i, mask=i < num_assignments, other=-1)
    return i, (ids[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_assignments, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """Program c: ``counts[c, e]``, how many of assignments ``[c * CHUNK, (c + 1) * CHUNK)`` go to expert e."""
    chunk = tl.program_id(0)
    _, hot = _one_hot(ids_ptr, chunk, num_assignments, E_POW2, CHUNK)
    tl.store(counts_ptr + chunk * E_POW2 + tl.arange(0, E_POW2), tl.sum(hot, axis=0))


@triton.jit
def _scan_kernel(
    counts_ptr, starts_ptr, block_expert_ptr, num_padded_ptr, num_chunks, num_blocks, BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """One program: turns ``counts[c, e]`` into the assignments to e in chunks before c, writes the first row of
    each expert's padded run (``starts``), the rows in use (``num_padded``) and each block's expert."""
    experts = tl.arange(0, E_POW2)
    totals = tl.zeros((E_POW2,), dtype=tl.int32)
    for c0 in range(0, num_chunks, ROWS):
        chunks = c0 + tl.arange(0, ROWS)
        ptrs = counts_ptr + chunks[:, None] * E_POW2 + experts[None, :]
        mask = chunks[:, None] < num_chunks
        counts = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(counts, axis=0) - counts + totals[None, :], mask=mask)
        totals += tl.sum(counts, axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + experts, ends - padded)
    used = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, used)
    for b0 in range(0, num_blocks, ROWS):
        blocks = b0 + tl.arange(0, ROWS)
        first = blocks * BLOCK_M
        # The expert whose run holds row ``first`` is the number of runs that end at or before it.
        expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(first < used, expert, -1), mask=blocks < num_blocks)


@triton.jit
def _place_kernel(
    ids_ptr, counts_ptr, starts_ptr, sorted_ids_ptr, num_assignments, E_POW2: tl.constexpr, CHUNK: tl.constexpr
):
    """Program c writes each of its chunk's flat indices into its expert's run, after the expert's assignments
    of earlier chunks and of earlier indices in this one."""
    chunk = tl.program_id(0)
    i, hot = _one_hot(ids_ptr, chunk, num_assignments, E_POW2, CHUNK)
    experts = tl.arange(0, E_POW2)
    base = tl.load(starts_ptr + experts) + tl.load(counts_ptr + chunk * E_POW2 + experts)
    slot = tl.sum(hot * (tl.cumsum(hot, axis=0) - hot + base[None, :]), axis=1)
    tl.store(sorted_ids_ptr + slot, i, mask=i < num_assignments)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, k) assignments of ``topk_ids`` [T, K] (values in [0, E)) by expert, in token order within
    each, and pad each expert's run to a multiple of ``block_m``. Returns ``sorted_ids`` [max_blocks * block_m]
    int32 (flat index ``t * K + k``, or T * K as padding), ``block_expert`` [max_blocks] int32 (the expert of
    each ``block_m`` rows; -1 for blocks past the end) and ``num_padded`` [1] int32 (the rows in use), with
    ``max_blocks`` from :func:`max_blocks`. No host synchronization; the shapes depend on (T, K, E) alone."""
    n, device = topk_ids.numel(), topk_ids.device
    blocks = max_blocks(n, num_experts, block_m)
    sorted_ids = torch.full((blocks * block_m,), n, dtype=torch.int32, device=device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=device)
    if n == 0:
        return sorted_ids, block_expert, torch.zeros(1, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(16, min(1024, _ALIGN_TILE // e_pow2))
    num_chunks = triton.cdiv(n, chunk)
    counts = torch.empty(num_chunks, e_pow2, dtype=torch.int32, device=device)
    starts = torch.empty(e_pow2, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    _count_kernel[(num_chunks,)](ids, counts, n, E_POW2=e_pow2, CHUNK=chunk, num_warps=4)
    _scan_kernel[(1,)](
        counts, starts, block_expert, num_padded, num_chunks, blocks, BLOCK_M=block_m, E_POW2=e_pow2,
        ROWS=max(1, _ALIGN_TILE // e_pow2), num_warps=4,
    )  # fmt: skip
    _place_kernel[(num_chunks,)](ids, counts, starts, sorted_ids, n, E_POW2=e_pow2, CHUNK=chunk, num_warps=4)
    return sorted_ids, block_expert, num_padded


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr, num_assignments, num_blocks, N, K,
    a_stride_m, a_stride_k, w_stride_e, w_stride_n, w_stride_k, out_stride_m, TOP_K: tl.constexpr,
    GATE_UP: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program p: one [BLOCK_M, BLOCK_N] tile of block m's rows times its expert's weights (rows ``n`` of
    ``w[e]``), written at the rows' flat indices. GATE_UP: the rows of ``a`` are tokens (``index // TOP_K``), a
    second product with rows ``N + n`` (up) and ``silu(gate) * up`` out; else the rows of ``a`` are the flat
    indices and each output row is scaled by its router weight. Tiles go GROUP_M blocks at a time."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
    block = first_m + pid % (GROUP_M * tiles_n) % group_rows
    tile_n = pid % (GROUP_M * tiles_n) // group_rows
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    ids = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < num_assignments
    # Padding rows and columns past N read valid ones (row 0, column n % N) and are dropped at the store.
    a_rows = tl.where(valid, ids // TOP_K if GATE_UP else ids, 0)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * a_stride_m
    w_ptrs = w_ptr + expert.to(tl.int64) * w_stride_e + (cols % N)[None, :] * w_stride_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = (k < K) | EVEN_K
        a = tl.load(a_ptrs + k[None, :] * a_stride_k, mask=k_mask[None, :], other=0.0)
        w_k = w_ptrs + k[:, None] * w_stride_k
        acc = tl.dot(a, tl.load(w_k, mask=k_mask[:, None], other=0.0), acc, input_precision=PRECISION)
        if GATE_UP:
            up = tl.load(w_k + N * w_stride_n, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        acc *= tl.load(weights_ptr + ids, mask=valid, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + ids[:, None].to(tl.int64) * out_stride_m + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor | None,
    top_k: int,
    cfg: MoEConfig,
) -> None:
    """Launch :func:`_moe_gemm_kernel`: gate/up when ``weights`` is None, else down scaled by ``weights``."""
    sorted_ids, block_expert, _ = align
    gate_up = weights is None
    n, k = (w.shape[1] // 2 if gate_up else w.shape[1]), w.shape[2]
    num_blocks = block_expert.numel()
    _moe_gemm_kernel[(num_blocks * triton.cdiv(n, cfg.block_n),)](
        a, w, out, sorted_ids, block_expert, a if gate_up else weights, out.shape[0], num_blocks, n, k, a.stride(0),
        a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), TOP_K=top_k, GATE_UP=gate_up,
        EVEN_K=k % cfg.block_k == 0, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=_GROUP_M, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Triton :func:`fused_moe_ref`, capturable in a CUDA graph; ``config`` overrides :func:`choose_config`.
    topk_ids (int32 or int64) must hold experts in [0, E): checking that would wait on the GPU."""
    _check(x, w13, w2, topk_weights, topk_ids)
    (t, h), (num_experts, two_i, _), top_k = x.shape, w13.shape, topk_ids.shape[1]
    if t == 0:
        return x.new_empty(0, h)
    cfg = config or choose_config(t * top_k, num_experts, h, two_i // 2)
    align = moe_align(topk_ids, num_experts, cfg.block_m)
    inter = torch.empty(t * top_k, two_i // 2, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, inter, align, None, top_k, cfg)
    out = torch.empty(t * top_k, h, dtype=x.dtype, device=x.device)
    _grouped_gemm(inter, w2, out, align, topk_weights.reshape(-1), top_k, cfg)
    return out if top_k == 1 else out.view(t, top_k, h).sum(1)
