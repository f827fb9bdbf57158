"""Rotary position embeddings: frequencies with the rope scalings of Hugging Face configs, cos/sin tables, and
the rotation in both pairings ("rotate half" and interleaved), over all or the first part of each head."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Types whose cos and sin are also multiplied by an attention factor.
_SCALED_TABLES = ("yarn", "longrope")


def rope_type(scaling: dict | None) -> str:
    """The ``rope_type`` (or older ``type``) of a ``rope_scaling`` dict; "default" for None."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_frequencies(
    rotary_dim: int,
    theta: float,
    scaling: dict | None,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2], attention factor of cos and sin), as transformers' ``ROPE_INIT_FUNCTIONS``.

    ``rotary_dim`` is the rotated width (``int(head_dim * partial_rotary_factor)``), which is also the base of the
    frequency exponents. Types: "default", "linear", "llama3", "yarn" and "longrope"; the last two take
    ``original_max_position_embeddings`` from ``scaling`` and, where ``factor`` is missing, the ratio of
    ``max_position_embeddings`` to it. longrope takes ``long_factor`` when ``seq_len`` exceeds
    ``original_max_position_embeddings``, else ``short_factor``.
    """
    kind = rope_type(scaling)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if kind == "default":
        return 1.0 / (theta**exponents), 1.0
    if kind == "linear":
        return 1.0 / (theta**exponents) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(1.0 / (theta**exponents), scaling), 1.0
    if kind == "yarn":
        return _yarn_frequencies(rotary_dim, theta, scaling, max_position_embeddings)
    if kind == "longrope":
        return _longrope_frequencies(exponents, theta, scaling, max_position_embeddings, seq_len)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of the types that leave cos and sin unscaled (all but yarn and longrope)."""
    if rope_type(scaling) in _SCALED_TABLES:
        raise ValueError(f"rope scaling {rope_type(scaling)!r} also scales cos and sin: use rope_tables")
    return rope_frequencies(head_dim, theta, scaling)[0]


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, those between blended."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _factor(scaling: dict, max_position_embeddings: int | None) -> float:
    """``factor``, else the ratio of the model's context to its pretraining one."""
    if scaling.get("factor") is not None:
        return scaling["factor"]
    if max_position_embeddings is None:
        raise ValueError(f"rope scaling {rope_type(scaling)!r} without a factor needs max_position_embeddings")
    return max_position_embeddings / scaling["original_max_position_embeddings"]


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_frequencies(
    dim: int, theta: float, scaling: dict, max_position_embeddings: int | None
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated (divided by ``factor``) below ``beta_slow`` rotations over the pretraining context,
    extrapolated (kept) above ``beta_fast``, a linear ramp between; the attention factor follows ``mscale``."""
    factor = _factor(scaling, max_position_embeddings)
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    old_len = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolated = 1 - ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolated) + 1.0 / pos_freqs * extrapolated
    return inv_freq, float(attention)


def _longrope_frequencies(
    exponents: torch.Tensor, theta: float, scaling: dict, max_position_embeddings: int | None, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-frequency ``short_factor`` or ``long_factor`` divisors; the attention factor is
    ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` unless given."""
    old_len = scaling["original_max_position_embeddings"]
    factor = _factor(scaling, max_position_embeddings)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    long = seq_len is not None and seq_len > old_len
    ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * theta**exponents), float(attention)


def rope_cos_sin(
    inv_freq: torch.Tensor, max_positions: int, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables [max_positions, 2 * len(inv_freq)] (halves repeated), multiplied by ``attention_factor``."""
    return _cos_sin(torch.arange(max_positions), inv_freq, attention_factor)


def _cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rope_tables(
    rotary_dim: int, theta: float, scaling: dict | None, max_positions: int, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [max_positions, rotary_dim] of ``scaling``'s frequencies and attention factor.

    longrope: rows below ``original_max_position_embeddings`` take ``short_factor`` and later rows
    ``long_factor``. transformers picks one set for a whole forward pass, long once the sequence passes that
    length, so this matches it for sequences within that length and, beyond it, for tokens decoded one at a
    time after a prompt within it (the cached keys keep their short rotation there too). Where transformers
    encodes a longer prompt in one pass, its first positions take ``long_factor`` instead.
    """
    inv_freq, attention_factor = rope_frequencies(rotary_dim, theta, scaling, max_position_embeddings)
    cos, sin = rope_cos_sin(inv_freq, max_positions, attention_factor)
    old_len = (scaling or {}).get("original_max_position_embeddings", max_positions)
    if rope_type(scaling) == "longrope" and max_positions > old_len:
        long_freq, _ = rope_frequencies(rotary_dim, theta, scaling, max_position_embeddings, seq_len=old_len + 1)
        cos[old_len:], sin[old_len:] = _cos_sin(torch.arange(old_len, max_positions), long_freq, attention_factor)
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x`` with its first ``c.shape[-1]`` dims rotated, the rest passed through."""
    rotary_dim = c.shape[-1]
    if interleaved:
        c = c[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
        s = s[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
    rot = x[..., :rotary_dim]
    out = rot * c + (_rotate_interleaved(rot) if interleaved else _rotate_half(rot)) * s
    return out if rotary_dim == x.shape[-1] else torch.cat((out, x[..., rotary_dim:]), dim=-1)


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] by their token positions [T].

    The tables' width R <= D is the rotated part of each head: its first R dims, in pairs (i, i + R/2), or
    (2i, 2i + 1) when ``interleaved``, at the frequency of column i; the last D - R dims pass through.
    """
    c = cos[positions].to(q.dtype)[:, None, :]
    s = sin[positions].to(q.dtype)[:, None, :]
    return _rotate(q, c, s, interleaved), _rotate(k, c, s, interleaved)


@triton.jit
def _rope_heads(
    x_ptr, stride_t, stride_h, stride_d, n_heads, t, c1, c2, s1, s2, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """Rotate all heads of token ``t`` in place: (x1, x2) -> (x1*c1 - x2*s1, x2*c2 + x1*s2)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    if INTERLEAVED:
        p1 = x_ptr + t * stride_t + heads * stride_h + 2 * dims * stride_d
        p2 = p1 + stride_d
    else:
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
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
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
    s1 = tl.load(sin_row, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    if INTERLEAVED:
        # Both dims of pair i turn by column i of the tables' first half.
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(cos_row + half, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
        s2 = tl.load(sin_row + half, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    _rope_heads(
        q_ptr, q_stride_t, q_stride_h, q_stride_d, n_q_heads, t, c1, c2, s1, s2, half,
        BLOCK_HQ, BLOCK_HALF, INTERLEAVED,
    )  # fmt: skip
    _rope_heads(
        k_ptr, k_stride_t, k_stride_h, k_stride_d, n_k_heads, t, c1, c2, s1, s2, half,
        BLOCK_HK, BLOCK_HALF, INTERLEAVED,
    )  # fmt: skip


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`apply_rope_ref`, rotating q [T, H, D] and k [T, KVH, D] in place.

    q and k may have any strides (e.g. views into a fused qkv output) but must not
    overlap; cos and sin are contiguous fp32 [max_positions, R], R even and at most D;
    positions is a contiguous integer [T].
    Returns (q, k).
    """
    n_tokens, n_q_heads, head_dim = q.shape
    if k.shape[0] != n_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError("q and k need the same T, head dim D and dtype")
    rotary_dim = cos.shape[1]
    if cos.shape != sin.shape or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError("cos and sin must be [max_positions, R], R even and at most the head dim")
    if not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("cos and sin must be contiguous")
    if positions.shape != (n_tokens,) or not positions.is_contiguous():
        raise ValueError("positions must be contiguous [T]")
    half = rotary_dim // 2
    _rope_kernel[(n_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n_q_heads, k.shape[1], half, cos.stride(0),
        BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), INTERLEAVED=interleaved,
        num_warps=4,
    )  # fmt: skip
    return q, k
