"""Rotary position embedding, from fp32 cos/sin tables precomputed for every position."""

from __future__ import annotations

import copy

import torch

from tristream.gpu_proc import ops
from tristream.kernels import rope


class RotaryEmbedding:
    """The cos/sin tables of positions below ``max_positions`` (with the config's rope scaling), and their rotation.

    Only the first ``rotary_dim`` dims of each head rotate (transformers' ``int(head_dim * partial_rotary_factor)``,
    which is also the base of the frequency exponents); None takes ``scaling``'s ``partial_rotary_factor``, else
    the whole head. ``interleaved`` pairs dims (2i, 2i + 1) as GLM-4 and ERNIE 4.5 do, instead of (i, i + R/2).
    yarn and longrope read ``original_max_position_embeddings`` from ``scaling`` (Phi-3 keeps it beside
    ``rope_scaling``: merge it in, as transformers does) and, without a ``factor``, ``max_position_embeddings``.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict | None,
        max_positions: int,
        device: torch.device,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        max_position_embeddings: int | None = None,
    ) -> None:
        if rotary_dim is None:
            rotary_dim = int(head_dim * (scaling or {}).get("partial_rotary_factor", 1.0))
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and within the head dim {head_dim}")
        cos, sin = rope.rope_tables(rotary_dim, theta, scaling, max_positions, max_position_embeddings)
        self.cos, self.sin = cos.to(device), sin.to(device)
        self.rotary_dim, self.interleaved = rotary_dim, interleaved

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim], rotated by their positions."""
        if not self.interleaved:
            return ops.apply_rope(q, k, positions, self.cos, self.sin)
        apply = rope.apply_rope if q.is_cuda else rope.apply_rope_ref
        return apply(q, k, positions, self.cos, self.sin, interleaved=True)

    def multimodal(self, positions: torch.Tensor, section: list[int]) -> RotaryEmbedding:
        """The rotation of tokens at multimodal positions [3, tokens] (time, height, width), as a table of one row
        per token (rotate at ``arange(tokens)``): frequency i takes its position from the row that ``section``
        (frequencies per row, Qwen2-VL's ``mrope_section``) gives it."""
        rows = torch.arange(3, device=positions.device).repeat_interleave(
            torch.tensor(section, device=positions.device)
        )
        index = torch.cat([rows, rows]).expand(positions.shape[1], 1, -1)
        table = copy.copy(self)
        table.cos, table.sin = (t[positions.T].gather(1, index)[:, 0] for t in (self.cos, self.sin))
        return table
