"""Seeded Gumbel-max sampling: noise hashed from (seed, counter, token id), so a seeded
request draws the same numbers whatever else shares its batch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_hash(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One 32-bit value per row (int64) from its 32-bit seed and its counter."""
    return _mix32(seeds ^ _mix32(counters + 0x9E3779B9))


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, vocab] that depends only on (seed, counter, token id)."""
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32((row_hash(seeds, counters)[:, None] + cols[None, :] * 0x9E3779B1) & _MASK32) >> 9
    return (bits.float() + 0.5) / float(1 << 23)  # 23 bits: exact in fp32, never 0 or 1


def gumbel_argmax_ref(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A sample of softmax(scaled) per row: argmax of scaled plus Gumbel noise. int64 [B]."""
    noise = uniform_noise(seeds, counters, scaled.shape[-1])
    return (scaled - torch.log(-torch.log(noise))).argmax(dim=-1)


@triton.jit
def _mix32_tl(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(scaled_ptr, row_hash_ptr, out_ptr, stride, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """Program b scans row b in blocks, keeping the first maximum of scaled + Gumbel noise."""
    b = tl.program_id(0).to(tl.int64)
    row = tl.load(row_hash_ptr + b)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, VOCAB, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < VOCAB
        x = tl.load(scaled_ptr + b * stride + cols, mask=mask, other=float("-inf"))
        bits = _mix32_tl((row + cols * 0x9E3779B1) & 0xFFFFFFFF) >> 9
        u = (bits.to(tl.float32) + 0.5) / 8388608.0
        g = tl.where(mask, x - tl.log(-tl.log(u)), float("-inf"))
        m = tl.max(g, 0)
        take = m > best
        best_idx = tl.where(take, start + tl.argmax(g, 0), best_idx)
        best = tl.where(take, m, best)
    tl.store(out_ptr + b, best_idx)


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Triton :func:`gumbel_argmax_ref`: fp32 scaled [B, V] -> int64 [B], noise never stored."""
    if scaled.dim() != 2 or scaled.dtype != torch.float32 or scaled.stride(1) != 1:
        raise ValueError("scaled must be fp32 [B, V] with a unit stride in its last dim")
    out = torch.empty(scaled.shape[0], dtype=torch.int64, device=scaled.device)
    block = min(triton.next_power_of_2(scaled.shape[1]), 4096)
    _gumbel_argmax_kernel[(scaled.shape[0],)](
        scaled, row_hash(seeds, counters).contiguous(), out, scaled.stride(0), VOCAB=scaled.shape[1], BLOCK=block,
        num_warps=8,
    )  # fmt: skip
    return out
