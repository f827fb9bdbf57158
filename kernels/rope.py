"""Rotary position embeddings, including Llama-3.1 frequency scaling."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies; ``scaling`` is a ``rope_scaling`` dict or None."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables of shape [max_positions, head_dim] (halves repeated)."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] by their token positions [T]."""
    c = cos[positions].to(q.dtype)[:, None, :]
    s = sin[positions].to(q.dtype)[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


@triton.jit
def _rope_heads(
    x_ptr, stride_t, stride_h, stride_d, n_heads, t, c1, c2, s1, s2, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate all heads of token ``t`` in place: (x1, x2) -> (x1*c1 - x2*s1, x2*c2 + x1*s2)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    p1 = x_ptr + t * stride_t + heads * stride_h + dims * stride_d
    p2 = p1 + half * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    q_stride_t, q_stride_h, q_stride_d, k_stride_t, k_stride_h, k_stride_d,
    n_q_heads, n_k_heads, half, table_stride,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """One program per token: rotates its q heads, then its k heads."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < half
    cos_row = cos_ptr + pos * table_stride + dims
    sin_row = sin_ptr + pos * table_stride + dims
    # The tables are rounded to q's dtype first, as in the reference.
    dtype = q_ptr.dtype.element_ty
    c1 = tl.load(cos_row, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + half, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    s1 = tl.load(sin_row, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + half, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    _rope_heads(q_ptr, q_stride_t, q_stride_h, q_stride_d, n_q_heads, t, c1, c2, s1, s2, half, BLOCK_HQ, BLOCK_HALF)
    _rope_heads(k_ptr, k_stride_t, k_stride_h, k_stride_d, n_k_heads, t, c1, c2, s1, s2, half, BLOCK_HK, BLOCK_HALF)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`apply_rope_ref`, rotating q [T, H, D] and k [T, KVH, D] in place.

    q and k may have any strides (e.g. views into a fused qkv output) but must not
    overlap; cos and sin are contiguous fp32 [max_positions, D]; positions is a
    contiguous integer [T].
    Returns (q, k).
    """
    n_tokens, n_q_heads, head_dim = q.shape
    if k.shape[0] != n_tokens or k.shape[2] != head_dim or k.dtype != q.dtype or head_dim % 2:
        raise ValueError("q and k need the same T, an even head dim D and the same dtype")
    if cos.shape != sin.shape or cos.shape[1] != head_dim or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("cos and sin must be contiguous [max_positions, D]")
    if positions.shape != (n_tokens,) or not positions.is_contiguous():
        raise ValueError("positions must be contiguous [T]")
    half = head_dim // 2
    _rope_kernel[(n_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n_q_heads, k.shape[1], half, cos.stride(0),
        BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )  # fmt: skip
    return q, k
