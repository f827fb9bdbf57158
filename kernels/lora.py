"""Batched LoRA: each token row goes through its own adapter's matrices.

The rows that have an adapter are listed grouped by adapter: ``rows[indptr[s]:indptr[s+1]]``
are adapter slot s's, so each program multiplies a tile of one adapter's rows by that
adapter's matrix. Shrink ``s = x[rows] @ A[slot].T`` is split along its long inner
dimension, each split writing partial sums in fp32, indexed like ``rows``; expand
``y[rows] += (sum of the partials) @ B[slot].T`` adds them up as it reads them. Rows of
``y`` not listed are left as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The inner length that one shrink program covers when the groups are short (decode); longer
# groups (prefill) have enough tiles to fill the GPU without splitting.
SPLIT_K = 256
SHORT = 64


def _block_m(max_rows: int) -> int:
    return 16 if max_rows <= SHORT else 64


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor) -> torch.Tensor:
    """x [T, K], a [S, R, K] -> partial sums [1, T, R] in fp32; entry i belongs to row ``rows[i]``."""
    out = torch.zeros(1, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for slot, (start, end) in enumerate(zip(indptr.tolist(), indptr[1:].tolist())):
        if end > start:
            out[0, start:end] = x[rows[start:end].long()].float() @ a[slot].float().T
    return out


def lora_expand_ref(
    parts: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``y[rows[i]] += parts[:, i].sum(0) @ b[slot].T`` for entry i of each slot's group; b [S, N, R], y [T, N]."""
    s = parts.sum(0)
    for slot, (start, end) in enumerate(zip(indptr.tolist(), indptr[1:].tolist())):
        if end > start:
            delta = s[start:end].to(b.dtype).float() @ b[slot].float().T
            y.index_add_(0, rows[start:end].long(), delta.to(y.dtype))
    return y


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, rows_ptr, indptr_ptr, R, x_stride, a_stride_s, a_stride_r, out_stride_split, out_stride_t,
    K: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (s, i, j) writes split j of entries ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of slot s's group."""
    slot = tl.program_id(0)
    start = tl.load(indptr_ptr + slot)
    end = tl.load(indptr_ptr + slot + 1)
    entry0 = start + tl.program_id(1) * BLOCK_M
    split = tl.program_id(2)
    if entry0 < end:
        entries = entry0 + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        row_mask, r_mask = entries < end, r < R
        rows = tl.load(rows_ptr + entries, mask=row_mask, other=0)
        a_base = a_ptr + slot.to(tl.int64) * a_stride_s
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, SPLIT, BLOCK_K):
            k = split * SPLIT + k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            xs = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * x_stride + k[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            at = tl.load(
                a_base + r[None, :] * a_stride_r + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0
            )
            acc += tl.dot(xs, at, input_precision=PRECISION)
        tl.store(
            out_ptr + split * out_stride_split + entries[:, None].to(tl.int64) * out_stride_t + r[None, :],
            acc,
            mask=row_mask[:, None] & r_mask[None, :],
        )


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, y_ptr, rows_ptr, indptr_ptr, N, R, s_stride_split, s_stride_t, b_stride_s, b_stride_n, y_stride,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (s, i, j) adds to the rows of entries ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of slot s's group, columns of block j."""
    slot = tl.program_id(0)
    start = tl.load(indptr_ptr + slot)
    end = tl.load(indptr_ptr + slot + 1)
    entry0 = start + tl.program_id(1) * BLOCK_M
    if entry0 < end:
        entries = entry0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        row_mask, col_mask, r_mask = entries < end, cols < N, r < R
        rows = tl.load(rows_ptr + entries, mask=row_mask, other=0)
        s_mask = row_mask[:, None] & r_mask[None, :]
        s_ptrs = s_ptr + entries[:, None].to(tl.int64) * s_stride_t + r[None, :]
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(SPLITS):
            s += tl.load(s_ptrs + split * s_stride_split, mask=s_mask, other=0.0)
        bt = tl.load(
            b_ptr + slot.to(tl.int64) * b_stride_s + cols[None, :] * b_stride_n + r[:, None],
            mask=r_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(s.to(bt.dtype), bt, input_precision=PRECISION)
        ptrs = y_ptr + rows[:, None].to(tl.int64) * y_stride + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """Triton :func:`lora_shrink_ref`: partial sums [splits, T, R], for short groups one split per ``SPLIT_K``
    of the inner dimension, else one (entries past the listed rows hold garbage). ``max_rows`` bounds a group's length: it sizes
    the grid, so a captured graph keeps it fixed."""
    if x.stride(-1) != 1 or a.stride(-1) != 1 or x.dtype != a.dtype:
        raise ValueError("x and a need a unit stride in their last dim and one dtype")
    k, r = x.shape[1], a.shape[1]
    split = SPLIT_K if max_rows <= SHORT else triton.cdiv(k, 64) * 64
    splits, block_m = triton.cdiv(k, split), _block_m(max_rows)
    out = torch.empty(splits, x.shape[0], r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(a.shape[0], triton.cdiv(max_rows, block_m), splits)](
        x, a, out, rows, indptr, r, x.stride(0), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        K=k, SPLIT=split, PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_K=64, num_warps=4,
    )  # fmt: skip
    return out


def lora_expand(
    parts: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, y: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """Triton :func:`lora_expand_ref`, in place on ``y``."""
    if b.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("b and y need a unit stride in their last dim")
    n, r = b.shape[1], b.shape[2]
    block_n, block_m = 64, _block_m(max_rows)
    _expand_kernel[(b.shape[0], triton.cdiv(max_rows, block_m), triton.cdiv(n, block_n))](
        parts, b, y, rows, indptr, n, r, parts.stride(0), parts.stride(1), b.stride(0), b.stride(1), y.stride(0),
        SPLITS=parts.shape[0], PRECISION=_precision(b.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=4,
    )  # fmt: skip
    return y
