"""Segmented matmul for batched LoRA: each sequence's rows multiply by its own adapter's matrix.

A LoRA delta is two of these: shrink ``s = x @ A[slot].T``, then expand ``y += s @ B[slot].T``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def segment_matmul_ref(
    x: torch.Tensor, w: torch.Tensor, indptr: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, accumulate: bool
) -> torch.Tensor:
    """For each segment b (rows ``indptr[b]:indptr[b+1]``) with ``slots[b] >= 0``:
    ``out[rows] = x[rows] @ w[slots[b]].T``, or ``+=`` that when ``accumulate``.

    x [T, K], w [S, N, K], out [T, N]; rows of other segments are left as they are.
    """
    row_slots = torch.repeat_interleave(slots.long(), indptr.diff().long(), output_size=x.shape[0])
    for slot in row_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (row_slots == slot).nonzero()[:, 0]
        prod = (x[rows].float() @ w[slot].float().T).to(out.dtype)
        if accumulate:
            out.index_add_(0, rows, prod)
        else:
            out.index_copy_(0, rows, prod)
    return out


@triton.jit
def _segment_matmul_kernel(
    x_ptr, w_ptr, out_ptr, indptr_ptr, slots_ptr, N, x_stride, w_stride_s, w_stride_n, out_stride,
    K: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (b, i, j) computes rows ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of segment b, columns of block j."""
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    row0 = start + tl.program_id(1) * BLOCK_M
    if (slot >= 0) & (row0 < end):
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_mask, col_mask = rows < end, cols < N
        w_base = w_ptr + slot.to(tl.int64) * w_stride_s
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_mask = k < K
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_base + cols[None, :] * w_stride_n + k[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
        ptrs = out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def segment_matmul(
    x: torch.Tensor, w: torch.Tensor, indptr: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, accumulate: bool,
    max_rows: int,
) -> torch.Tensor:
    """Triton :func:`segment_matmul_ref`; ``max_rows`` bounds a segment's length (it sizes the grid,
    so a captured graph keeps it fixed). x, w and out need unit strides in their last dim."""
    if x.stride(-1) != 1 or w.stride(-1) != 1 or out.stride(-1) != 1 or x.dtype != w.dtype:
        raise ValueError("x, w and out need a unit stride in their last dim, and x and w one dtype")
    n, k = w.shape[1], w.shape[2]
    block_m = 16
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    block_k = max(16, min(64, triton.next_power_of_2(k)))
    grid = (slots.shape[0], triton.cdiv(max_rows, block_m), triton.cdiv(n, block_n))
    _segment_matmul_kernel[grid](
        x, w, out, indptr, slots, n, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        K=k, ACCUMULATE=accumulate, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
