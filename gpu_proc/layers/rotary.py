"""Rotary position embedding, from fp32 cos/sin tables precomputed for every position."""

from __future__ import annotations

import torch

from tristream.gpu_proc import ops
from tristream.kernels.rope import rope_cos_sin, rope_inv_freq


class RotaryEmbedding:
    """The cos/sin tables of positions below ``max_positions`` (with the config's rope scaling), and their rotation."""

    def __init__(
        self, head_dim: int, theta: float, scaling: dict | None, max_positions: int, device: torch.device
    ) -> None:
        cos, sin = rope_cos_sin(rope_inv_freq(head_dim, theta, scaling), max_positions)
        self.cos, self.sin = cos.to(device), sin.to(device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim], rotated by their positions."""
        return ops.apply_rope(q, k, positions, self.cos, self.sin)
