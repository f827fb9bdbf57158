"""Batched LoRA: each sequence's rows go through its own adapter's matrices.

Shrink ``s = x @ A[slot].T`` is split along its long inner dimension, each split writing
partial sums in fp32; expand ``y += (sum of the partials) @ B[slot].T`` adds them up as it
reads them. Segment b is rows ``indptr[b]:indptr[b+1]``, with adapter ``slots[b]``; a
segment with slot -1 has no adapter, and its rows of ``y`` are left as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The inner length that one shrink program covers.
SPLIT_K = 256


def _row_slots(indptr: torch.Tensor, slots: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.repeat_interleave(slots.long(), indptr.diff().long(), output_size=rows)


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, indptr: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [T, K], a [S, R, K] -> partial sums [1, T, R] in fp32 (rows without an adapter are zeros)."""
    out = torch.zeros(1, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    row_slots = _row_slots(indptr, slots, x.shape[0])
    for slot in row_slots.unique().tolist():
        if slot >= 0:
            rows = (row_slots == slot).nonzero()[:, 0]
            out[0, rows] = x[rows].float() @ a[slot].float().T
    return out


def lora_expand_ref(
    parts: torch.Tensor, b: torch.Tensor, indptr: torch.Tensor, slots: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``y += parts.sum(0) @ b[slot].T`` for the rows of each segment with an adapter; b [S, N, R], y [T, N]."""
    s = parts.sum(0)
    row_slots = _row_slots(indptr, slots, y.shape[0])
    for slot in row_slots.unique().tolist():
        if slot >= 0:
            rows = (row_slots == slot).nonzero()[:, 0]
            y.index_add_(0, rows, (s[rows].to(b.dtype).float() @ b[slot].float().T).to(y.dtype))
    return y


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, indptr_ptr, slots_ptr, R, x_stride, a_stride_s, a_stride_r, out_stride_split, out_stride_t,
    K: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (b, i, j) writes split j of rows ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of segment b."""
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    row0 = start + tl.program_id(1) * BLOCK_M
    split = tl.program_id(2)
    if (slot >= 0) & (row0 < end):
        rows = row0 + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        row_mask, r_mask = rows < end, r < R
        a_base = a_ptr + slot.to(tl.int64) * a_stride_s
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, SPLIT, BLOCK_K):
            k = split * SPLIT + k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            xs = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + k[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + r[None, :] * a_stride_r + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.dot(xs, at, input_precision=PRECISION)
        tl.store(out_ptr + split * out_stride_split + rows[:, None].to(tl.int64) * out_stride_t + r[None, :], acc,
                 mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, y_ptr, indptr_ptr, slots_ptr, N, R, s_stride_split, s_stride_t, b_stride_s, b_stride_n, y_stride,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (b, i, j) adds to rows ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of segment b, columns of block j."""
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    row0 = start + tl.program_id(1) * BLOCK_M
    if (slot >= 0) & (row0 < end):
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        row_mask, col_mask, r_mask = rows < end, cols < N, r < R
        s_mask = row_mask[:, None] & r_mask[None, :]
        s_ptrs = s_ptr + rows[:, None].to(tl.int64) * s_stride_t + r[None, :]
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(SPLITS):
            s += tl.load(s_ptrs + split * s_stride_split, mask=s_mask, other=0.0)
        bt = tl.load(b_ptr + slot.to(tl.int64) * b_stride_s + cols[None, :] * b_stride_n + r[:, None],
                     mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(s.to(bt.dtype), bt, input_precision=PRECISION)
        ptrs = y_ptr + rows[:, None].to(tl.int64) * y_stride + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(x: torch.Tensor, a: torch.Tensor, indptr: torch.Tensor, slots: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Triton :func:`lora_shrink_ref`: partial sums [splits, T, R], one split per ``SPLIT_K`` of the inner
    dimension (rows without an adapter hold garbage). ``max_rows`` bounds a segment's length: it sizes
    the grid, so a captured graph keeps it fixed."""
    if x.stride(-1) != 1 or a.stride(-1) != 1 or x.dtype != a.dtype:
        raise ValueError("x and a need a unit stride in their last dim and one dtype")
    k, r = x.shape[1], a.shape[1]
    splits = triton.cdiv(k, SPLIT_K)
    out = torch.empty(splits, x.shape[0], r, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(r))
    _shrink_kernel[(slots.shape[0], triton.cdiv(max_rows, 16), splits)](
        x, a, out, indptr, slots, r, x.stride(0), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        K=k, SPLIT=SPLIT_K, PRECISION=_precision(x.dtype), BLOCK_M=16, BLOCK_R=block_r, BLOCK_K=64, num_warps=4,
    )
    return out


def lora_expand(
    parts: torch.Tensor, b: torch.Tensor, indptr: torch.Tensor, slots: torch.Tensor, y: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """Triton :func:`lora_expand_ref`, in place on ``y``."""
    if b.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("b and y need a unit stride in their last dim")
    n, r = b.shape[1], b.shape[2]
    block_n = 64
    _expand_kernel[(slots.shape[0], triton.cdiv(max_rows, 16), triton.cdiv(n, block_n))](
        parts, b, y, indptr, slots, n, r, parts.stride(0), parts.stride(1), b.stride(0), b.stride(1), y.stride(0),
        SPLITS=parts.shape[0], PRECISION=_precision(b.dtype), BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=4,
    )
    return y
