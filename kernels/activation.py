"""The gated activations: SiLU or tanh-approximated GELU (Gemma) of the gate, times the up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x is [T, 2I] = [gate | up]; returns silu(gate) * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x is [T, 2I] = [gate | up]; returns gelu(gate, approximate="tanh") * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


_BLOCK = 1024


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, n_cols, x_stride_t, out_stride_t, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """Program (t, j) writes columns ``[j*BLOCK, (j+1)*BLOCK)`` of output row t."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + t * x_stride_t
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) * (g + 0.044715 g^3)
        act = gate / (1.0 + tl.exp(-1.5957691216057308 * gate * (1.0 + 0.044715 * gate * gate)))
    else:
        act = gate / (1.0 + tl.exp(-gate))
    # The activation is rounded to x's dtype before the product, as in the reference.
    act = act.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * out_stride_t + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton :func:`silu_and_mul_ref`: x [T, 2I] = [gate | up] -> new contiguous [T, I].

    x may have any row stride but needs a unit stride in its last dim.
    """
    return _act_and_mul(x, gelu=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton :func:`gelu_tanh_and_mul_ref`, as :func:`silu_and_mul`."""
    return _act_and_mul(x, gelu=True)


def _act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError("x must be [T, 2I] with a unit stride in its last dim")
    n_tokens, n_cols = x.shape[0], x.shape[1] // 2
    out = torch.empty((n_tokens, n_cols), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n_cols), _BLOCK)
    _act_and_mul_kernel[(n_tokens, triton.cdiv(n_cols, block))](
        x, out, n_cols, x.stride(0), out.stride(0), GELU=gelu, BLOCK=block, num_warps=4
    )
    return out
