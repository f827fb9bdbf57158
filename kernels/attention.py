"""Attention over a paged KV pool, and writing new K/V into it.

The pool of one layer is ``[num_pages, page_size, num_kv_heads, head_dim]``;
a token's flat slot is ``page * page_size + offset``. A pool may be ``torch.float8_e4m3fn`` under
16/32-bit K/V, with one float scale per layer for K and one for V: real value = stored value * scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def _check_scales(cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if cache.dtype != FP8 and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(f"k_scale and v_scale must be 1.0 for a {cache.dtype} pool")


def _quantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    if dtype != FP8:
        return x
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write k, v [T, KVH, D] into the pools at flat slots [T]; an fp8 pool gets clamp(x / scale) (saturating)."""
    _check_scales(k_cache, k_scale, v_scale)
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = _quantize(k, k_cache.dtype, k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = _quantize(v, v_cache.dtype, v_scale)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: list[list[int]],
    seq_lens: list[int],
    qo_indptr: list[int],
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens over their whole context.

    Sequence b owns queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` (the last tokens of
    its ``seq_lens[b]``-token context) and its pages ``block_tables[b]``. K/V of an fp8 pool
    are dequantized to q's dtype. Single-token (decode) sequences run as one padded batch.
    With ``window`` > 0 the query at position p sees only keys at positions k with p - window < k <= p
    (keys before the first query's window are never read); with ``softcap`` > 0 the scaled scores s
    become softcap * tanh(s / softcap) before the mask. Returns [T, H, D].
    """
    _check_scales(k_cache, k_scale, v_scale)
    _check_window_softcap(window, softcap)
    opts = ((k_scale, v_scale), window, softcap)
    out = torch.empty_like(q)
    decode = [b for b in range(len(seq_lens)) if qo_indptr[b + 1] - qo_indptr[b] == 1]
    if decode:
        rows = torch.tensor([qo_indptr[b] for b in decode], device=q.device)
        tables, lens = [block_tables[b] for b in decode], [seq_lens[b] for b in decode]
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, tables, lens, scale, *opts)
    for b, ctx_len in enumerate(seq_lens):
        start, end = qo_indptr[b], qo_indptr[b + 1]
        if end - start == 1:
            continue
        out[start:end] = _extend_attention(q[start:end], k_cache, v_cache, block_tables[b], ctx_len, scale, *opts)
    return out


def _check_window_softcap(window: int, softcap: float) -> None:
    if window < 0 or softcap < 0:
        raise ValueError(f"window ({window}) and softcap ({softcap}) must be >= 0 (0 turns them off)")


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The pool's rows at ``slots``; an fp8 pool's dequantized to ``dtype``."""
    rows = cache.flatten(0, 1)[slots]
    return (rows.float() * scale).to(dtype) if rows.dtype == FP8 else rows


def _slots(table: list[int], lo: int, hi: int, page_size: int, device: torch.device) -> torch.Tensor:
    """The flat slots of positions ``lo..hi-1``."""
    pos = torch.arange(lo, hi, device=device)
    return torch.tensor(table, device=device)[pos // page_size] * page_size + pos % page_size


def _dense(q, k, v, mask, scale, softcap) -> torch.Tensor:
    """softmax over keys of q·k * scale (soft-capped when ``softcap`` > 0), where ``mask`` holds, times v."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    s = softcap * torch.tanh(s / softcap)
    return (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.to(s.dtype)).to(q.dtype)


def _decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, kv_scales, window, softcap) -> torch.Tensor:
    """One query per sequence: [B, H, D] over its in-window keys, padded to the longest, masked."""
    page_size = k_cache.shape[1]
    los = [max(0, n - window) if window else 0 for n in seq_lens]
    counts = [n - lo for n, lo in zip(seq_lens, los)]
    slots = torch.zeros(len(tables), max(counts), dtype=torch.long, device=q.device)
    for j, (table, lo, ctx_len) in enumerate(zip(tables, los, seq_lens)):
        slots[j, : ctx_len - lo] = _slots(table, lo, ctx_len, page_size, q.device)
    valid = torch.arange(max(counts), device=q.device)[None, :] < torch.tensor(counts, device=q.device)[:, None]
    pad = ~valid[:, :, None, None]
    k = _gather(k_cache, slots, q.dtype, kv_scales[0]).masked_fill(pad, 0).transpose(1, 2)
    v = _gather(v_cache, slots, q.dtype, kv_scales[1]).masked_fill(pad, 0).transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    o = _dense(
        q[:, :, None, :],
        k.repeat_interleave(groups, 1),
        v.repeat_interleave(groups, 1),
        valid[:, None, None, :],
        scale,
        softcap,
    )
    return o[:, :, 0, :]


def _extend_attention(q, k_cache, v_cache, table, ctx_len, scale, kv_scales, window, softcap) -> torch.Tensor:
    """The last ``len(q)`` tokens of one sequence, each attending causally to its context (or window)."""
    n = q.shape[0]
    lo = max(0, ctx_len - n - window + 1) if window else 0
    slots = _slots(table, lo, ctx_len, k_cache.shape[1], q.device)
    k = _gather(k_cache, slots, q.dtype, kv_scales[0]).transpose(0, 1)
    v = _gather(v_cache, slots, q.dtype, kv_scales[1]).transpose(0, 1)
    qb = q.transpose(0, 1)
    if n == ctx_len and not window and not softcap:
        o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        k_pos = torch.arange(lo, ctx_len, device=q.device)[None, :]
        q_pos = torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window) if window else k_pos <= q_pos
        groups = qb.shape[0] // k.shape[0]
        o = _dense(qb, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0), mask, scale, softcap)
    return o.transpose(0, 1)


# ---------------------------------------------------------------- Triton kernels

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E_TL = tl.constexpr(_LOG2E)
_FP8_MAX_TL = tl.constexpr(_FP8_MAX)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay exact (no TF32); 16-bit inputs run on tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _score_scales(scale: float, k_scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap) of the kernels: log2-domain scores are q·k * qk_scale, or tanh(q·k * qk_scale) * cap."""
    if softcap:
        return scale * k_scale / softcap, softcap * _LOG2E
    return scale * k_scale * _LOG2E, 1.0


@triton.jit
def _scores(q, k, qk_scale, cap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled (and soft-capped) scores of q against k, in log2 units."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (e^2x + 1), which saturates to +-1 for large |x|.
        s = (1.0 - 2.0 / (tl.exp2(s * (2.0 * _LOG2E_TL)) + 1.0)) * cap
    return s


@triton.jit
def _kv_rows(block_table_row, stride_bp, pos, valid, stride_cp, stride_co, head_offs, PAGE_SIZE: tl.constexpr):
    """Offsets into a pool of the entries at ``pos`` [N] of one sequence (its block-table row), for ``head_offs``."""
    page = tl.load(block_table_row + (pos // PAGE_SIZE) * stride_bp, mask=valid, other=0)
    return (page.to(tl.int64) * stride_cp + (pos % PAGE_SIZE) * stride_co)[:, None] + head_offs


@triton.jit
def _online_softmax(s, v, m, row_sum, acc, PRECISION: tl.constexpr):
    """One block of keys in the running softmax: masked scores ``s`` (log2 units) and their values ``v`` update
    the running max ``m``, ``row_sum`` and ``acc``."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    row_sum = row_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, row_sum, acc


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_scale, v_scale,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cp, stride_co, stride_ch, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    idx = tl.arange(0, BLOCK)
    h, d = idx // HEAD_DIM, idx % HEAD_DIM
    mask = idx < NUM_KV_HEADS * HEAD_DIM
    dst = (slot // PAGE_SIZE) * stride_cp + (slot % PAGE_SIZE) * stride_co + h * stride_ch + d * stride_cd
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        # Saturate before the cast: torch's and the interpreter's fp8 casts do not (out of range gives NaN or junk).
        k = tl.clamp(k.to(tl.float32) / k_scale, -_FP8_MAX_TL, _FP8_MAX_TL)
        v = tl.clamp(v.to(tl.float32) / v_scale, -_FP8_MAX_TL, _FP8_MAX_TL)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write k, v [T, KVH, D] into the pools at flat slots [T] (int32 or int64); negative slots are skipped.

    An fp8 pool gets clamp(x / scale) (saturating), as `store_kv_ref`.
    """
    _check_pools(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale, v_scale,
        *k.stride(), *v.stride(), *k_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK=triton.next_power_of_2(num_kv_heads * head_dim), num_warps=4,
    )  # fmt: skip


def _check_pools(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share shape, strides and dtype")
    _check_scales(k_cache, k_scale, v_scale)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, o_part_ptr, lse_part_ptr,
    qk_scale, cap,
    stride_qb, stride_qh, stride_qd,
    stride_cp, stride_co, stride_ch, stride_cd,
    stride_bb, stride_bp,
    GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head, split): all the group's query heads over the split's share of the in-window positions."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(seq_len - WINDOW, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_H)
    head_mask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=head_mask[:, None], other=0.0
    )

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    head_offs = kvh * stride_ch + d[None, :] * stride_cd
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        offs = _kv_rows(
            block_tables_ptr + b * stride_bb, stride_bp, pos, valid, stride_cp, stride_co, head_offs, PAGE_SIZE
        )
        k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0).to(q.dtype)
        s = tl.where(valid[None, :], _scores(q, k, qk_scale, cap, SOFTCAP, PRECISION), float("-inf"))
        v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0).to(q.dtype)
        m, row_sum, acc = _online_softmax(s, v, m, row_sum, acc, PRECISION)

    # An empty split (start >= end) keeps row_sum == 0 and m == -inf: it writes zeros and lse = -inf.
    l_safe = tl.where(row_sum > 0, row_sum, 1.0)
    lse = (m + tl.log2(l_safe)) * _LN2
    row = (b * num_heads + heads) * NUM_SPLITS + split
    tl.store(o_part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=head_mask[:, None])
    tl.store(lse_part_ptr + row, lse, mask=head_mask)


@triton.jit
def _decode_merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr,
    v_scale,
    stride_ob, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): weight each split's output by its share of the total softmax mass."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    split_mask = s < NUM_SPLITS
    row = (b * tl.num_programs(1) + h) * NUM_SPLITS + s
    lse = tl.load(lse_part_ptr + row, mask=split_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    # A zero-length sequence has every split empty: all weights 0, output 0.
    w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(o_part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=split_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0) * v_scale
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, res.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = 132) -> int:
    """Splits for `paged_decode_attention`: enough programs to cover every SM, each split >= 256 positions."""
    wanted = triton.cdiv(num_sms, max(1, batch * num_kv_heads))
    return max(1, min(wanted, max_context // 256))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    window: int = 0,
    softcap: float = 0.0,
    block_n: int = 64,
) -> torch.Tensor:
    """Split-KV attention of one query token per sequence over its paged context.

    q [B, H, D]; block_tables [B, max_pages] and seq_lens [B] are device tensors, so one launch
    serves every context length (CUDA-graph safe). A zero-length sequence gives zeros. An fp8 pool holds
    K / k_scale and V / v_scale. ``window`` and ``softcap`` are as in `paged_attention_ref`; with a window
    the splits share only the last ``window`` positions, and no earlier one is read. Returns [B, H, D].
    """
    _check_pools(k_cache, v_cache, k_scale, v_scale)
    _check_window_softcap(window, softcap)
    batch, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_heads % num_kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"unsupported heads {num_heads}/{num_kv_heads} or head_dim {head_dim}")
    o_part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse_part,
        *_score_scales(scale, k_scale, softcap),
        *q.stride(), *k_cache.stride(), *block_tables.stride(),
        GROUP=group, NUM_SPLITS=num_splits, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, PRECISION=_dot_precision(q.dtype),
        WINDOW=window, SOFTCAP=softcap > 0, num_warps=4,
    )  # fmt: skip
    _decode_merge_kernel[(batch, num_heads)](
        o_part, lse_part, out, v_scale, *out.stride(),
        NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qo_indptr_ptr, out_ptr,
    qk_scale, cap, v_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cp, stride_co, stride_ch, stride_cd,
    stride_bb, stride_bp,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head, block of new tokens): causal attention over the paged context (or window)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + b)
    num_new = tl.load(qo_indptr_ptr + b + 1) - q_start
    if mb * BLOCK_M >= num_new:
        return
    seq_len = tl.load(seq_lens_ptr + b)

    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = i < num_new
    # Rows past num_new take the last new token's position, so no row is left without keys.
    q_pos = seq_len - num_new + tl.minimum(i, num_new - 1)
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + (q_start + i)[:, None] * stride_qt + h * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_rows, mask=row_mask[:, None], other=0.0)

    # A row may see none of a block's keys (a window's): a finite running max keeps exp2 off (-inf) - (-inf).
    m = tl.full([BLOCK_M], -1e30, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    head_offs = (h // GROUP) * stride_ch + d[None, :] * stride_cd
    # Positions up to the block's last new token; rows past num_new see only positions < seq_len.
    end = seq_len - num_new + tl.minimum(num_new, (mb + 1) * BLOCK_M)
    # With a window, positions before the block's first query's window are never read.
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(seq_len - num_new + mb * BLOCK_M - WINDOW + 1, 0)
    for n0 in range(lo, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        offs = _kv_rows(
            block_tables_ptr + b * stride_bb, stride_bp, pos, valid, stride_cp, stride_co, head_offs, PAGE_SIZE
        )
        k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0).to(q.dtype)
        seen = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            seen &= pos[None, :] > q_pos[:, None] - WINDOW
        s = tl.where(seen, _scores(q, k, qk_scale, cap, SOFTCAP, PRECISION), float("-inf"))
        v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0).to(q.dtype)
        m, row_sum, acc = _online_softmax(s, v, m, row_sum, acc, PRECISION)

    out_rows = out_ptr + (q_start + i)[:, None] * stride_ot + h * stride_oh + d[None, :] * stride_od
    tl.store(out_rows, (acc / row_sum[:, None] * v_scale).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    scale: float,
    max_q_len: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    window: int = 0,
    softcap: float = 0.0,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens (decode rows included) over their paged context.

    Sequence b owns rows ``q[qo_indptr[b]:qo_indptr[b+1]]``, the last tokens of its ``seq_lens[b]``-token
    context, whose K/V are already in the pool. ``max_q_len`` bounds the rows of any sequence. An fp8 pool
    holds K / k_scale and V / v_scale. ``window`` and ``softcap`` are as in `paged_attention_ref`; with a
    window each block of queries reads from its first query's window on. Returns [T, H, D].
    """
    _check_pools(k_cache, v_cache, k_scale, v_scale)
    _check_window_softcap(window, softcap)
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"unsupported heads {num_heads}/{num_kv_heads} or head_dim {head_dim}")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    batch = seq_lens.shape[0]
    if batch == 0 or max_q_len == 0:
        return out
    _extend_kernel[(batch, num_heads, triton.cdiv(max_q_len, block_m))](
        q, k_cache, v_cache, block_tables, seq_lens, qo_indptr, out,
        *_score_scales(scale, k_scale, softcap), v_scale,
        *q.stride(), *out.stride(), *k_cache.stride(), *block_tables.stride(),
        GROUP=num_heads // num_kv_heads, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_dot_precision(q.dtype),
        WINDOW=window, SOFTCAP=softcap > 0, num_warps=4,
    )  # fmt: skip
    return out
