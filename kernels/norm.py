"""RMSNorm, alone and fused with the residual add."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim, computed in fp32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``, then RMSNorm of the sum; returns (normed, new residual)."""
    residual = residual + x
    return rms_norm_ref(residual, weight, eps), residual


_MAX_BLOCK = 8192


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    n_heads,
    x_stride_t, x_stride_h, res_stride_t, res_stride_h,
    eps,
    N_COLS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row ``(t, h)``; the output is contiguous ``[rows, N_COLS]``."""
    dtype = x_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    t, h = row // n_heads, row % n_heads
    x_row = x_ptr + t * x_stride_t + h * x_stride_h
    res_row = res_ptr + t * res_stride_t + h * res_stride_h
    out_row = out_ptr + row * N_COLS
    cols = tl.arange(0, BLOCK)
    if N_COLS <= BLOCK:
        mask = cols < N_COLS
        v = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_row + cols, mask=mask, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_row + cols, v, mask=mask)
        h32 = v.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(h32 * h32, axis=0) / N_COLS + eps)
        normed = (h32 * inv_rms).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Two passes over the row. The residual sum is recomputed in the second pass and
        # only stored there, so every element is read before it is overwritten.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N_COLS, BLOCK):
            mask = start + cols < N_COLS
            v = tl.load(x_row + start + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_row + start + cols, mask=mask, other=0.0)
                v = (v.to(tl.float32) + r.to(tl.float32)).to(dtype)
            h32 = v.to(tl.float32)
            acc += h32 * h32
        inv_rms = tl.rsqrt(tl.sum(acc, axis=0) / N_COLS + eps)
        for start in range(0, N_COLS, BLOCK):
            mask = start + cols < N_COLS
            v = tl.load(x_row + start + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_row + start + cols, mask=mask, other=0.0)
                v = (v.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(res_row + start + cols, v, mask=mask)
            normed = (v.to(tl.float32) * inv_rms).to(dtype).to(tl.float32)
            w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + start + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``[T, N]`` or ``[T, H, N]`` as ``[T, H, N]`` without copying."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    raise ValueError(f"expected a 2-D or 3-D tensor, got shape {tuple(t.shape)}")


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n_cols = x.shape[-1]
    if x.stride(-1) != 1 or weight.shape != (n_cols,) or not weight.is_contiguous():
        raise ValueError("x needs a unit stride in its last dim and weight must be contiguous [x.shape[-1]]")
    x3 = _as_rows(x)
    res3 = x3 if residual is None else _as_rows(residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    _rms_norm_kernel[(x3.shape[0] * x3.shape[1],)](
        x3, res3, weight, out,
        x3.shape[1],
        x3.stride(0), x3.stride(1), res3.stride(0), res3.stride(1),
        eps,
        N_COLS=n_cols, HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton :func:`rms_norm_ref` over the last dim of x ``[T, N]`` or ``[T, H, N]``.

    x may be a strided view as long as its last dim has unit stride; the output is a
    new contiguous tensor of x's shape.
    """
    return _launch_rms_norm(x, None, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`add_rms_norm_ref`; ``residual`` is updated in place and returned.

    x and residual share shape and dtype; both need a unit stride in their last dim.
    """
    if x.shape != residual.shape or x.dtype != residual.dtype or residual.stride(-1) != 1:
        raise ValueError("x and residual need the same shape and dtype, residual a unit last-dim stride")
    return _launch_rms_norm(x, residual, weight, eps), residual
